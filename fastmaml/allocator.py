"""Freed CPU memory kept in the process for reuse: `retain_freed_memory()`.

PyTorch's CPU tensors come from the C library's `malloc`. With glibc's defaults a block above the mmap threshold
(128 KiB at first, raised as such blocks are freed, up to 32 MiB) is mapped afresh and unmapped when freed, and
free memory at the top of the heap beyond the trim threshold goes back to the system. Each page mapped afresh
costs a page fault in which the kernel zeroes it. A meta-step frees its large activations at the end of every
task chunk and allocates them again in the next one (the autograd loop does the same per task), so on the CPU a
step can spend a large part of its time in those faults, more or less from one process to the next depending on
the heap's history (benchmarks/RESULTS.md).

`retain_freed_memory()` sets both thresholds to `RETAIN_BYTES` with `mallopt`: blocks below that size come from
the heap, and up to that much free memory stays at the heap's top, so freed pages are used again without a
fault. The process then keeps its peak memory resident (as PyTorch's CUDA caching allocator keeps GPU memory).
The setting is process-wide and lasts until the process exits (glibc then no longer adapts its thresholds).

`fastmaml train` jobs and `fastmaml bench` apply `--allocator retain` by default; `--allocator system` (or
`FASTMAML_ALLOCATOR=system` in the environment, which sets the options' default) leaves the C library as it is.
"""

from __future__ import annotations

import argparse
import ctypes
import os
from typing import Optional

RETAIN_BYTES = 1 << 30
ALLOCATORS = ("retain", "system")
ENV = "FASTMAML_ALLOCATOR"

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_retained = False


def glibc_version() -> Optional[str]:
    """The running glibc's version ("2.36"), or None under another C library."""
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None
    if not text or not text.startswith("glibc "):
        return None
    return text.split()[1]


def retain_freed_memory() -> bool:
    """Keeps memory freed by this process for reuse (see the module docstring): glibc's mmap and trim thresholds
    set to `RETAIN_BYTES`. Returns True once set (Linux with glibc; calling again changes nothing), False under
    another C library, where nothing changes.

    Raises:
        RuntimeError: glibc refused a setting (the message names it).
    """
    global _retained
    if _retained:
        return True
    if glibc_version() is None:
        return False
    libc = ctypes.CDLL("libc.so.6")
    for name, param in (("M_MMAP_THRESHOLD", _M_MMAP_THRESHOLD), ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD)):
        if libc.mallopt(param, RETAIN_BYTES) != 1:
            raise RuntimeError(f"retain_freed_memory: glibc refused mallopt({name}, {RETAIN_BYTES})")
    _retained = True
    return True


def allocator_option(text: str) -> str:
    """The value of an `--allocator` option (argparse `type`), checked against `ALLOCATORS`."""
    if text not in ALLOCATORS:
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(ALLOCATORS)}, got {text!r} (the default comes from ${ENV}, else retain)"
        )
    return text


def default_allocator() -> str:
    """The default of the `--allocator` options: $FASTMAML_ALLOCATOR, else "retain" (checked by the option's
    type, `allocator_option`, when the command line is parsed)."""
    return os.environ.get(ENV, "retain")


def apply_allocator(choice: str) -> None:
    """What an `--allocator` option asks for: "retain" calls `retain_freed_memory()`, "system" nothing.

    Raises:
        ValueError: `choice` is not one of `ALLOCATORS`.
    """
    if choice not in ALLOCATORS:
        raise ValueError(f"allocator: expected one of {', '.join(ALLOCATORS)}, got {choice!r}")
    if choice == "retain":
        retain_freed_memory()


def describe() -> str:
    """How this process allocates CPU memory, for reports: the C library and whether freed memory is retained."""
    version = glibc_version()
    if version is None:
        return "not glibc (the C library's own policy)"
    if _retained:
        return f"glibc {version}, freed memory retained (mallopt: mmap and trim thresholds {RETAIN_BYTES >> 30} GiB)"
    return f"glibc {version}, its default thresholds"


__all__ = [
    "ALLOCATORS",
    "RETAIN_BYTES",
    "allocator_option",
    "apply_allocator",
    "default_allocator",
    "describe",
    "retain_freed_memory",
]
