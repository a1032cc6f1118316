"""Shared by the on-disk readers: decoding image files in parallel and the decoded-array cache.

A cache is two files in the cache folder: `<stem>.npy` (uint8 `[total, C, H, W]`, classes stored
one after the other) and `<stem>.json` (class names, examples per class, and a fingerprint of the
source files: the second load checks the fingerprint and skips decoding when it matches).
"""
from __future__ import annotations

import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np

from .episodes import ClassDataset

CACHE_VERSION = 1


def require_pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - Pillow is present wherever the readers are tested
        raise ImportError(
            "reading Omniglot / mini-ImageNet image files needs Pillow: pip install pillow"
        ) from e
    return Image


def decode_all(paths: Sequence[Path], decode: Callable[[Path], np.ndarray],
               workers: Optional[int] = None) -> np.ndarray:
    """Decodes every file with `decode(path) -> uint8 [C, H, W]` (threads) -> `[len(paths), C, H, W]`,
    written straight into one preallocated array."""
    first = decode(paths[0])
    out = np.empty((len(paths), *first.shape), dtype=np.uint8)
    out[0] = first

    def fill(i: int) -> None:
        out[i] = decode(paths[i])

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(fill, range(1, len(paths))))
    return out


def load_cached(cache_dir: Path, stem: str, fingerprint) -> Optional[ClassDataset]:
    """The cached dataset if its fingerprint matches, else None."""
    meta_path, data_path = cache_dir / f"{stem}.json", cache_dir / f"{stem}.npy"
    if not (meta_path.is_file() and data_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("version") != CACHE_VERSION or meta.get("fingerprint") != fingerprint:
            return None
        images = np.load(data_path)
        return ClassDataset(images, meta["counts"], meta["names"])
    except (OSError, ValueError, KeyError) as e:
        warnings.warn(f"ignoring the unreadable cache {data_path} ({e}); decoding the images again")
        return None


def save_cached(cache_dir: Path, stem: str, fingerprint, images: np.ndarray, counts: List[int],
                names: List[str]) -> None:
    """Writes the cache atomically; a read-only folder only costs a warning (the next load decodes again)."""
    meta = {"version": CACHE_VERSION, "fingerprint": fingerprint, "counts": counts, "names": names}
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f".{stem}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, images)
        os.replace(tmp, cache_dir / f"{stem}.npy")
        tmp = cache_dir / f".{stem}.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, cache_dir / f"{stem}.json")
    except OSError as e:
        warnings.warn(f"could not write the decoded-image cache in {cache_dir} ({e}); pass cache_dir= "
                      "a writable folder to make the next load fast")
