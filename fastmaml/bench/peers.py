"""Importing the optional peer libraries (learn2learn, higher, TorchOpt), each with the reason when
it cannot be imported. `python -m fastmaml.bench.peers` prints what is available.

learn2learn imports torchvision, and a torchvision wheel whose compiled ops do not match the
installed torch fails at import with `operator torchvision::nms does not exist` (its fake-tensor
registrations for `nms`/`qnms` run even when its C++ library did not load). MAML never calls those
ops, so placeholder schemas are registered for them first when torchvision's own are missing.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Dict, Optional, Tuple

PEERS = ("learn2learn", "higher", "torchopt")
_TORCHVISION_PLACEHOLDERS = ("nms", "qnms")
_CACHE: Dict[str, Tuple[Optional[object], str]] = {}
_PLACEHOLDER_LIB = []  # keeps the torch.library.Library alive


def _torchvision_placeholders() -> None:
    """Imports torchvision; if its compiled ops are missing, defines `torchvision::nms`/`qnms`
    placeholder schemas and imports it again."""
    import sys

    import torch

    if _PLACEHOLDER_LIB:
        return
    try:
        import torchvision  # noqa: F401

        return
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[mod]
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in _TORCHVISION_PLACEHOLDERS:
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _PLACEHOLDER_LIB.append(lib)
    import torchvision  # noqa: F401,F811


def load(name: str) -> Tuple[Optional[object], str]:
    """(module or None, "name version" or the reason it cannot be imported), cached per process."""
    if name not in PEERS:
        raise ValueError(f"peer: unknown peer {name!r}; expected one of {PEERS}")
    if name not in _CACHE:
        try:
            if name == "learn2learn":
                _torchvision_placeholders()
            module = importlib.import_module(name)
            try:
                version = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                version = str(getattr(module, "__version__", "unknown version"))
            _CACHE[name] = (module, f"{name} {version}")
        except Exception as e:  # any import-time failure is a reason to report, not a crash
            _CACHE[name] = (None, f"cannot import {name}: {type(e).__name__}: {e}".splitlines()[0])
    return _CACHE[name]


def reset() -> None:
    """Forgets cached import results (tests simulate a missing peer with this)."""
    _CACHE.clear()


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore")
    for peer in PEERS:
        module, info = load(peer)
        print(f"{peer:12s} {'available: ' + info if module is not None else 'unavailable: ' + info}")
