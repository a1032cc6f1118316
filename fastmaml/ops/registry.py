"""The ops registry: named ops, each with a plain-PyTorch reference and optional faster backends.

    @register("inner_update", "torch")          # the reference (also the test oracle)
    def inner_update(phi, g, alpha): ...

    ops = resolve("auto", device)               # an OpTable: ops.inner_update(...)

Backends: "torch" (reference, always there), and faster ones ("triton", "cpp") that register
themselves with an availability check. `"auto"` takes, per op, the first available backend in
`AUTO_ORDER` for the device whose implementation `auto` may pick there (`auto=False`: kernels that
are tested but not measured faster than the reference; `auto=("cpu",)`: measured faster on those
device types only), else the reference; an explicitly named backend that cannot run on the device
raises `BackendUnavailable` saying why, and ops it does not implement run their reference. The
environment variable `FASTMAML_BACKEND` replaces `"auto"` (an explicit argument still wins).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from ..errors import BackendUnavailable

BACKENDS = ("auto", "torch", "triton", "cpp")
AUTO_ORDER = {"cuda": ("cpp", "triton", "torch"), "cpu": ("cpp", "torch")}
ENV_VAR = "FASTMAML_BACKEND"

_IMPLS: Dict[str, Dict[str, Callable]] = {}
# (op, backend) -> (the device types where "auto" may pick it, why not elsewhere)
_EXPLICIT_ONLY: Dict[Tuple[str, str], Tuple[Tuple[str, ...], str]] = {}
_DEVICES: Dict[Tuple[str, str], Tuple[str, ...]] = {}  # (op, backend) -> the only device types it runs on
_AVAILABILITY: Dict[str, Callable[[torch.device], Tuple[bool, str]]] = {
    "torch": lambda device: (True, "plain PyTorch reference"),
}


def register(name: str, backend: str, *, auto: Union[bool, Tuple[str, ...]] = True, why_not_auto: str = "",
             devices: Optional[Tuple[str, ...]] = None):
    """Decorator: `fn` implements op `name` for `backend`. `auto`: True, or the device types where
    "auto" may pick it (False: none; elsewhere only an explicitly requested `backend` uses it, and
    `why_not_auto` says why in `fastmaml info`); `devices`: the device types it has kernels for
    (None: every device the backend runs on; elsewhere the reference runs)."""
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"backend: unknown backend {backend!r}; expected one of {BACKENDS[1:]}")

    def deco(fn):
        _IMPLS.setdefault(name, {})[backend] = fn
        if auto is not True:
            _EXPLICIT_ONLY[(name, backend)] = (tuple(auto or ()), why_not_auto or "not chosen by auto")
        if devices is not None:
            _DEVICES[(name, backend)] = tuple(devices)
        return fn

    return deco


def register_backend(backend: str, availability: Callable[[torch.device], Tuple[bool, str]]) -> None:
    """`availability(device) -> (ok, reason)` says whether `backend` can run on `device` and why not."""
    _AVAILABILITY[backend] = availability


def reference(name: str) -> Callable:
    return _IMPLS[name]["torch"]


def op_names() -> tuple:
    return tuple(sorted(_IMPLS))


def requested_backend(backend: Optional[str]) -> str:
    """The backend asked for: the argument, with "auto" (or None) replaced by $FASTMAML_BACKEND if set."""
    if backend is None or backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
        where = f"${ENV_VAR}" if backend != "auto" else "backend"
    else:
        where = "backend"
    if backend not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {backend!r}; expected one of {BACKENDS}")
    return backend


def availability(backend: str, device: torch.device) -> Tuple[bool, str]:
    check = _AVAILABILITY.get(backend)
    if check is None:
        return False, f"the {backend!r} backend is not part of this build"
    return check(torch.device(device))


class OpTable:
    """The implementation chosen for every op, with the reason (for `fastmaml info`)."""

    def __init__(self, chosen: Dict[str, Tuple[str, Callable, str]]):
        self.chosen = chosen
        for name, (_, fn, _) in chosen.items():
            setattr(self, name, fn)

    def describe(self) -> Dict[str, str]:
        return {name: f"{b} ({why})" for name, (b, _, why) in sorted(self.chosen.items())}


_CACHE: Dict[Tuple[str, str], OpTable] = {}


def resolve(backend: Optional[str], device) -> OpTable:
    backend = requested_backend(backend)
    device = torch.device(device)
    key = (backend, device.type)
    if key not in _CACHE:
        _CACHE[key] = _build(backend, device)
    return _CACHE[key]


def _build(backend: str, device: torch.device) -> OpTable:
    chosen = {}
    for name, all_impls in _IMPLS.items():
        impls = {b: fn for b, fn in all_impls.items() if device.type in _DEVICES.get((name, b), (device.type,))}
        if backend == "auto":
            reasons = []
            for b in AUTO_ORDER.get(device.type, ("torch",)):
                allowed, why_not = _EXPLICIT_ONLY.get((name, b), ((device.type,), ""))
                if device.type not in allowed:
                    reasons.append(f"{b}: {why_not}")
                    continue
                ok, why = availability(b, device)
                if b in impls and ok:
                    chosen[name] = (b, impls[b], why if not reasons else f"{why}; " + "; ".join(reasons))
                    break
                missing = ("no implementation of this op" if b not in all_impls
                           else f"no {device.type} kernel of this op")
                reasons.append(f"{b}: {why if not ok else missing}")
        else:
            ok, why = availability(backend, device)
            if not ok:
                raise BackendUnavailable(f"backend={backend!r} cannot run on {device}: {why}")
            if backend in impls:
                chosen[name] = (backend, impls[backend], why)
            else:  # a backend need not implement every op: the others run their reference
                where = "" if backend not in all_impls else f" for {device.type}"
                chosen[name] = ("torch", impls["torch"], f"no {backend} implementation of this op{where}")
    return OpTable(chosen)
