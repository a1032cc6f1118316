"""The ops registry: named ops, each with a plain-PyTorch reference and optional faster backends.

    @register("inner_update", "torch")          # the reference (also the test oracle)
    def inner_update(phi, g, alpha): ...

    ops = resolve("auto", device)               # an OpTable: ops.inner_update(...)

Backends: "torch" (the reference, always there) and faster ones ("triton", "cpp") that register
themselves with an availability check. One mechanism decides where an implementation runs, declared
when it is registered:
- `devices`: the device types it has kernels for (elsewhere the reference runs);
- `dtypes` and `supports(*args) -> None | reason`: the arguments it takes; a call it does not take runs
  the reference (so a float16 model under "auto" or "cpp" gets the reference for that op, not an error);
- `auto`: the device types where `"auto"` may pick it (False: none; kernels that are tested but not
  measured faster than the reference there), with `why_not_auto` for `fastmaml info`.
`"auto"` takes, per op, the first backend of `AUTO_ORDER` that is available on the device and allowed
there, else the reference. An explicitly named backend that cannot run on the device raises
`BackendUnavailable` saying why; the ops it does not implement run their reference. The environment
variable `FASTMAML_BACKEND` replaces `"auto"` (an explicit argument still wins).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from ..errors import BackendUnavailable

BACKENDS = ("auto", "torch", "triton", "cpp")
AUTO_ORDER = {"cuda": ("cpp", "triton", "torch"), "cpu": ("cpp", "torch")}
ENV_VAR = "FASTMAML_BACKEND"
Supports = Callable[..., Optional[str]]


@dataclass(frozen=True)
class Spec:
    """Where one backend's implementation of an op runs (see the module docstring)."""

    devices: Optional[Tuple[str, ...]] = None
    auto: Union[bool, Tuple[str, ...]] = True
    why_not_auto: str = ""
    supports: Optional[Supports] = None
    limits: str = ""  # what `supports` checks, for `fastmaml info`

    def runs_on(self, device_type: str) -> bool:
        return self.devices is None or device_type in self.devices

    def auto_on(self, device_type: str) -> bool:
        return self.auto is True or (bool(self.auto) and device_type in self.auto)


_IMPLS: Dict[str, Dict[str, Callable]] = {}  # op -> backend -> function
_SPECS: Dict[Tuple[str, str], Spec] = {}  # (op, backend) -> where it runs
_AVAILABILITY: Dict[str, Callable[[torch.device], Tuple[bool, str]]] = {
    "torch": lambda device: (True, "plain PyTorch reference"),
}


def _first_tensor(args, kwargs) -> Optional[torch.Tensor]:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
    return None


def _dtype_check(dtypes: Sequence[torch.dtype]) -> Supports:
    allowed = tuple(dtypes)

    def check(*args, **kwargs):
        t = _first_tensor(args, kwargs)
        return None if t is None or t.dtype in allowed else f"dtype {t.dtype}"

    return check


def _both(a: Optional[Supports], b: Optional[Supports]) -> Optional[Supports]:
    if a is None or b is None:
        return a or b

    def check(*args, **kwargs):
        return a(*args, **kwargs) or b(*args, **kwargs)

    return check


def register(
    name: str,
    backend: str,
    *,
    devices: Optional[Sequence[str]] = None,
    dtypes: Optional[Sequence[torch.dtype]] = None,
    supports: Optional[Supports] = None,
    limits: str = "",
    auto: Union[bool, Sequence[str]] = True,
    why_not_auto: str = "",
):
    """Decorator: `fn` implements op `name` for `backend`.

    Args:
        devices: device types it has kernels for (None: every device the backend runs on).
        dtypes: the dtypes of its first tensor argument it takes (None: any).
        supports: `supports(*args) -> None | reason`, the other arguments it takes.
        limits: a few words on what `dtypes`/`supports` require, for `fastmaml info`.
        auto: True, or the device types where "auto" may pick it (False: none).
        why_not_auto: why "auto" leaves it out elsewhere (shown by `fastmaml info`).
    """
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"backend: unknown backend {backend!r}; expected one of {BACKENDS[1:]}")
    check = _both(_dtype_check(dtypes) if dtypes is not None else None, supports)
    if dtypes is not None and not limits:
        limits = "dtypes " + ", ".join(str(d).replace("torch.", "") for d in dtypes)

    def deco(fn):
        _IMPLS.setdefault(name, {})[backend] = fn
        _SPECS[(name, backend)] = Spec(
            None if devices is None else tuple(devices),
            auto if isinstance(auto, bool) else tuple(auto),
            why_not_auto or ("" if auto is True else "not chosen by auto"),
            check,
            limits,
        )
        return fn

    return deco


def register_backend(backend: str, availability: Callable[[torch.device], Tuple[bool, str]]) -> None:
    """`availability(device) -> (ok, reason)` says whether `backend` can run on `device` and why not."""
    _AVAILABILITY[backend] = availability


def implementation(name: str, backend: str) -> Callable:
    """The function registered for op `name` and `backend` (unwrapped: no fallback, no checks)."""
    impls = _IMPLS.get(name)
    if impls is None:
        raise ValueError(f"op: unknown op {name!r}; the ops are {op_names()}")
    if backend not in impls:
        raise ValueError(f"backend: op {name!r} has no {backend!r} implementation; it has {sorted(impls)}")
    return impls[backend]


def spec(name: str, backend: str) -> Spec:
    """Where the `backend` implementation of op `name` runs (devices, argument limits, `auto`)."""
    implementation(name, backend)
    return _SPECS.get((name, backend), Spec())


def reference(name: str) -> Callable:
    """The plain-PyTorch reference of op `name`."""
    return implementation(name, "torch")


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


def availability(backend: str, device) -> Tuple[bool, str]:
    check = _AVAILABILITY.get(backend)
    if check is None:
        return False, f"the {backend!r} backend is not part of this build"
    return check(torch.device(device))


def _guarded(fn: Callable, supports: Supports, ref: Callable) -> Callable:
    """`fn` where `supports` takes the arguments, else the reference."""

    def call(*args, **kwargs):
        if supports(*args, **kwargs) is None:
            return fn(*args, **kwargs)
        return ref(*args, **kwargs)

    call.__name__ = getattr(fn, "__name__", "op")
    call.__doc__ = fn.__doc__
    return call


class OpTable:
    """The implementation chosen for every op on one device type, with the reason (`fastmaml info`).

    `chosen[name] = (backend, fn, why)`; `getattr(table, name)` is the callable (for an implementation
    with argument limits, a guard that runs the reference on the calls it does not take)."""

    def __init__(self, backend: str, device_type: str, chosen: Dict[str, Tuple[str, Callable, str]]):
        self.backend = backend
        self.device_type = device_type
        self.chosen = chosen
        for name, (_, fn, _) in chosen.items():
            setattr(self, name, fn)

    def describe(self) -> Dict[str, str]:
        return {name: f"{b} ({why})" for name, (b, _, why) in sorted(self.chosen.items())}


_CACHE: Dict[Tuple[str, str], OpTable] = {}


def resolve(backend: Optional[str], device) -> OpTable:
    """The OpTable of `backend` ("auto", "torch", "triton", "cpp"; None: "auto") on `device`'s type."""
    backend = requested_backend(backend)
    device = torch.device(device)
    key = (backend, device.type)
    if key not in _CACHE:
        _CACHE[key] = _build(backend, device)
    return _CACHE[key]


def _pick(name: str, backend: str, why: str) -> Tuple[str, Callable, str]:
    fn, s = _IMPLS[name][backend], spec(name, backend)
    if s.supports is None or backend == "torch":
        return backend, fn, why
    limits = f"; {s.limits}, else the reference" if s.limits else "; the reference where it does not apply"
    return backend, _guarded(fn, s.supports, _IMPLS[name]["torch"]), why + limits


def _build(backend: str, device: torch.device) -> OpTable:
    chosen = {}
    dev = device.type
    for name, all_impls in _IMPLS.items():
        impls = {b for b in all_impls if spec(name, b).runs_on(dev)}
        if backend == "auto":
            reasons = []
            for b in AUTO_ORDER.get(dev, ("torch",)):
                if b in impls and not spec(name, b).auto_on(dev):
                    reasons.append(f"{b}: {spec(name, b).why_not_auto}")
                    continue
                ok, why = availability(b, device)
                if b in impls and ok:
                    chosen[name] = _pick(name, b, why if not reasons else f"{why}; " + "; ".join(reasons))
                    break
                missing = "no implementation of this op" if b not in all_impls else f"no {dev} kernel of this op"
                reasons.append(f"{b}: {why if not ok else missing}")
        else:
            ok, why = availability(backend, device)
            if not ok:
                raise BackendUnavailable(f"backend={backend!r} cannot run on {device}: {why}")
            if backend in impls:
                chosen[name] = _pick(name, backend, why)
            else:  # a backend need not implement every op: the others run their reference
                where = "" if backend not in all_impls else f" for {dev}"
                chosen[name] = ("torch", all_impls["torch"], f"no {backend} implementation of this op{where}")
    return OpTable(backend, dev, chosen)
