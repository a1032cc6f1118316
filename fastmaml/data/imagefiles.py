"""Shared by the on-disk readers: decoding image files in parallel and the decoded-array cache.

A cache is two files in the cache folder: `<stem>.npy` (uint8 `[total, C, H, W]`, classes stored
one after the other) and `<stem>.json` (class names, examples per class, and a fingerprint of the
source files: their names, sizes and modification times, so that a file replaced or edited later is
decoded again; the second load checks the fingerprint and skips decoding when it matches).

Errors in the data a user points at (a layout that is not the expected one, a CSV without its header, a
truncated or unreadable image file) are `DatasetError`s that name the file or folder; the training
jobs print them as one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np

from .episodes import ClassDataset

CACHE_VERSION = 2  # 2: the fingerprint covers file sizes and modification times


class DatasetError(Exception):
    """A problem with the dataset files the user pointed at; the message names the file or folder."""


class DatasetLayoutError(DatasetError, FileNotFoundError):
    """The folder is missing or not laid out as expected."""


class DatasetFormatError(DatasetError, ValueError):
    """A file has unexpected contents (a CSV without its header, a split with no images...)."""


class ImageFileError(DatasetError, OSError):
    """An image file cannot be decoded (truncated, not an image, unreadable)."""


def files_fingerprint(paths: Sequence[Path], root: Path) -> str:
    """SHA-256 of every file's path (relative to `root`), size and modification time (ns), in order:
    it changes when a file is added, removed, renamed, rewritten or touched."""
    digest = hashlib.sha256()
    for path in paths:
        st = os.stat(path)
        digest.update(f"{Path(path).relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def require_pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - Pillow is present wherever the readers are tested
        raise ImportError("reading Omniglot / mini-ImageNet image files needs Pillow: pip install pillow") from e
    return Image


def decode_all(
    paths: Sequence[Path], decode: Callable[[Path], np.ndarray], workers: Optional[int] = None
) -> np.ndarray:
    """Decodes every file with `decode(path) -> uint8 [C, H, W]` (threads) -> `[len(paths), C, H, W]`,
    written straight into one preallocated array. A file that cannot be decoded raises `ImageFileError`
    with its path."""

    def decode_one(path: Path) -> np.ndarray:
        try:
            return decode(path)
        except (OSError, ValueError, SyntaxError, EOFError) as exc:  # what Pillow raises for broken files
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ImageFileError(f"cannot decode the image {path}: {reason}") from exc

    first = decode_one(paths[0])
    out = np.empty((len(paths), *first.shape), dtype=np.uint8)
    out[0] = first

    def fill(i: int) -> None:
        out[i] = decode_one(paths[i])

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
        warnings.warn(f"ignoring the unreadable cache {data_path} ({e}); decoding the images again", stacklevel=2)
        return None


def save_cached(
    cache_dir: Path, stem: str, fingerprint, images: np.ndarray, counts: List[int], names: List[str]
) -> None:
    """Writes the cache atomically; a read-only folder only costs a warning (the next load decodes again)."""
    meta = {"version": CACHE_VERSION, "fingerprint": fingerprint, "counts": counts, "names": names}
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f".{stem}.npy.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, images)
        os.replace(tmp, cache_dir / f"{stem}.npy")
        tmp = cache_dir / f".{stem}.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, cache_dir / f"{stem}.json")
    except OSError as e:
        warnings.warn(
            f"could not write the decoded-image cache in {cache_dir} ({e}); pass cache_dir= "
            "a writable folder to make the next load fast",
            stacklevel=2,
        )
