"""Builds and loads the optional C++/CUDA extension in `csrc/` (`torch.ops.fastmaml.*`).

Compiled with `torch.utils.cpp_extension.load(..., is_python_module=False)` and ninja at first use
(or ahead of time with `fastmaml build`), cached under `$TORCH_EXTENSIONS_DIR/fastmaml-...` or
`~/.cache/fastmaml/...`. The CUDA sources are added only where `cpp_extension.CUDA_HOME` is set
(a CUDA build of torch with nvcc). A failed build is remembered with its reason: the "cpp" backend
then reports itself unavailable and `auto` falls back to the reference.

Environment: `FASTMAML_BUILD=0` never compiles (only a build already in the cache is loaded).
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import List, Optional, Tuple

import torch

def _find_csrc() -> Path:
    """`fastmaml/csrc` in an installed wheel (package data), else `csrc/` of the source tree."""
    here = Path(__file__).resolve().parent
    installed = here / "csrc"
    return installed if installed.is_dir() else here.parent / "csrc"


CSRC = _find_csrc()
NAME = "fastmaml_ext"
BUILD_ENV = "FASTMAML_BUILD"

# --exclude-libs,ALL: a compiler that links libstdc++ statically (the GPU machine's /opt/gcc g++ does)
# would otherwise export that copy's symbols, and the loader binds some of them to the process's own
# libstdc++ (its locale facet ids, for one): every TORCH_CHECK message that formats a number then
# crashed the process there (and was cut short here). Hidden, the private copy is self-consistent;
# with a shared libstdc++ (the usual case) the flag changes nothing.
LINK_FLAGS = ["-Wl,--exclude-libs,ALL"]

_lock = threading.Lock()
_state: Optional[Tuple[bool, str]] = None  # (loaded, reason) once load() was attempted


class BuildError(RuntimeError):
    """The extension could not be compiled or loaded; the message says why."""


def cuda_enabled() -> bool:
    """Whether the CUDA sources are part of the build (a CUDA torch with `CUDA_HOME`)."""
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None


def sources(with_cuda: bool) -> List[str]:
    """C++ sources always; `csrc/cuda/*.cu` and `csrc/cuda/*.cpp` (torch-facing registration) with CUDA."""
    if not CSRC.is_dir():
        raise BuildError(f"the C++ sources are missing: {CSRC} is not a directory")
    files = sorted(CSRC.glob("*.cpp"))
    if with_cuda:
        files += sorted((CSRC / "cuda").glob("*.cu")) + sorted((CSRC / "cuda").glob("*.cpp"))
    return [str(f) for f in files]


def headers_digest() -> str:
    """A short digest of every header under csrc/."""
    digest = hashlib.sha256()
    for h in sorted(CSRC.rglob("*.h")):
        digest.update(h.read_bytes())
    return digest.hexdigest()[:16]


def build_directory(with_cuda: bool) -> Path:
    """One folder per torch installation (version and path): two environments with the same torch
    version (a virtual environment and the system Python) compile with different include paths, and
    sharing a folder would make each rebuild the other's extension."""
    base = os.environ.get("TORCH_EXTENSIONS_DIR")
    root = Path(base) if base else Path.home() / ".cache" / "fastmaml"
    where = hashlib.sha256(str(Path(torch.__file__).resolve().parent).encode()).hexdigest()[:8]
    tag = f"torch{torch.__version__}".replace("+", "_") + f"-{where}"
    return root / f"{NAME}-{tag}-{'cuda' if with_cuda else 'cpu'}"


def _library_path(with_cuda: bool) -> Path:
    return build_directory(with_cuda) / f"{NAME}.so"


def _ops_registered() -> bool:
    return hasattr(torch.ops, "fastmaml") and hasattr(torch.ops.fastmaml, "inner_update")


def build(verbose: bool = False) -> Path:
    """Compiles (if sources changed) and loads the extension; returns the library path.

    Raises BuildError with the compiler's complaint on failure.
    """
    from torch.utils import cpp_extension

    with_cuda = cuda_enabled()
    directory = build_directory(with_cuda)
    directory.mkdir(parents=True, exist_ok=True)
    # the C++ standard is torch's choice (C++17 up to 2.12, C++20 after); the headers' digest is a
    # define so that editing a header alone also triggers a rebuild (load() hashes only sources)
    # -fopenmp: at::parallel_for is an inline template that runs serially unless the extension itself
    # is compiled with OpenMP (the runtime symbols resolve to the libgomp torch already loaded)
    cflags = ["-O3", "-fopenmp", f"-DFASTMAML_HEADERS_DIGEST={headers_digest()}"]
    # (copies of the flag lists: load() appends to extra_ldflags, and changed flags would make a second
    # build() in the process load a second copy of the library under a new version name)
    try:
        cpp_extension.load(
            name=NAME, sources=sources(with_cuda), extra_cflags=cflags,
            extra_cuda_cflags=["-O3", f"-DFASTMAML_HEADERS_DIGEST={headers_digest()}"] if with_cuda else None,
            extra_ldflags=list(LINK_FLAGS), build_directory=str(directory), with_cuda=with_cuda,
            is_python_module=False, verbose=verbose)
    except Exception as exc:  # compiler errors arrive as RuntimeError / CalledProcessError
        raise BuildError(f"building the fastmaml C++ extension failed in {directory}: {exc}") from exc
    return _library_path(with_cuda)


def _load_cached() -> Path:
    path = _library_path(cuda_enabled())
    if not path.exists():
        raise BuildError(f"${BUILD_ENV}=0 and no prebuilt extension at {path}; run `fastmaml build`")
    torch.ops.load_library(str(path))
    return path


def load() -> Tuple[bool, str]:
    """Loads the extension once per process (building it if needed); returns (ok, reason)."""
    global _state
    with _lock:
        if _state is None:
            try:
                if _ops_registered():
                    path = "already loaded"
                elif os.environ.get(BUILD_ENV, "1") == "0":
                    path = _load_cached()
                else:
                    path = build()
                _state = (True, f"C++ extension loaded ({path})")
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [repr(exc)])[0][:500]
                _state = (False, f"{first} (`fastmaml build --verbose` shows the compiler output)")
        return _state
