"""mini-ImageNet with the Ravi & Larochelle (2017) split, from a local folder.

The split files come from https://github.com/twitter-research/meta-learning-lstm (`data/miniImagenet/
train.csv`, `val.csv`, `test.csv`); the 60,000 images are the ImageNet (ILSVRC-12) training images
they name, which must be obtained from ImageNet (image-net.org) under its terms. Put them together:

    ROOT/train.csv   (header `filename,label`; 64 classes × 600 images)
    ROOT/val.csv     (16 classes)
    ROOT/test.csv    (20 classes)
    ROOT/images/n0153282900000005.jpg ...

Preprocessing (Finn et al.'s MAML code): RGB, resized to 84×84 with PIL's LANCZOS filter (a no-op for
images that are already 84×84), values scaled to [0, 1] with no mean/std normalization. Each split's
decoded array (uint8 `[images, 3, 84, 84]`; 813 MB for train) is cached in `ROOT/.fastmaml_cache`
(or `cache_dir`).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .episodes import ClassDataset, Splits
from .imagefiles import (
    DatasetFormatError,
    DatasetLayoutError,
    decode_all,
    files_fingerprint,
    load_cached,
    require_pil,
    save_cached,
)

SOURCE = (
    "split CSVs: https://github.com/twitter-research/meta-learning-lstm (data/miniImagenet); images: "
    "the ILSVRC-12 training images they name, from image-net.org"
)
SPLITS = ("train", "val", "test")
LAYOUT = "ROOT/train.csv, ROOT/val.csv, ROOT/test.csv (header filename,label) and ROOT/images/<filename>.jpg"


def _layout_error(root: Path, problem: str) -> DatasetLayoutError:
    return DatasetLayoutError(f"mini-ImageNet: {problem}. Expected {LAYOUT} in {root}. Data: {SOURCE}.")


def read_split(root, split: str) -> Dict[str, List[str]]:
    """{label: [file names]} of one split's CSV, labels in sorted order."""
    root = Path(root).expanduser()
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    if not root.is_dir():
        raise _layout_error(root, f"the folder {root} does not exist")
    path = root / f"{split}.csv"
    if not path.is_file():
        raise _layout_error(root, f"no {split}.csv in {root}")
    if not (root / "images").is_dir():
        raise _layout_error(root, f"no images/ folder in {root}")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        seen = ",".join(rows[0]) if rows else "an empty file"
        raise DatasetFormatError(f"mini-ImageNet: {path} must start with the header 'filename,label', found {seen!r}")
    classes: Dict[str, List[str]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 2:
            raise DatasetFormatError(
                f"mini-ImageNet: {path} line {line}: expected 'filename,label', got {','.join(row)!r}"
            )
        classes.setdefault(row[1].strip(), []).append(row[0].strip())
    if not classes:
        raise DatasetFormatError(f"mini-ImageNet: {path} lists no images")
    return {label: classes[label] for label in sorted(classes)}


def _decoder(size: int):
    Image = require_pil()

    def decode(path: Path) -> np.ndarray:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size, size), resample=Image.LANCZOS)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()  # [3, size, size]

    return decode


def load_miniimagenet(
    root, split: str, *, image_size: int = 84, cache_dir=None, workers: Optional[int] = None
) -> ClassDataset:
    """One split as a `ClassDataset` (uint8 `[3, image_size, image_size]`, one class per WordNet label)."""
    root = Path(root).expanduser()
    classes = read_split(root, split)
    names = list(classes)
    counts = [len(files) for files in classes.values()]
    paths = [root / "images" / name for files in classes.values() for name in files]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise _layout_error(
            root, f"{len(missing)} image(s) listed in {split}.csv are missing from images/, e.g. {missing[:3]}"
        )
    fingerprint = {"image_size": image_size, "names": names, "counts": counts, "files": files_fingerprint(paths, root)}
    cache = Path(cache_dir) if cache_dir is not None else root / ".fastmaml_cache"
    stem = f"miniimagenet_{split}_{image_size}"
    cached = load_cached(cache, stem, fingerprint)
    if cached is not None:
        return cached
    images = decode_all(paths, _decoder(image_size), workers)
    save_cached(cache, stem, fingerprint, images, counts, names)
    return ClassDataset(images, counts, names)


def miniimagenet_splits(root, *, image_size: int = 84, cache_dir=None) -> Splits:
    """The Ravi & Larochelle split: 64 meta-train, 16 meta-validation, 20 meta-test classes."""
    loaded = [load_miniimagenet(root, s, image_size=image_size, cache_dir=cache_dir) for s in SPLITS]
    overlap = set(loaded[0].names) & (set(loaded[1].names) | set(loaded[2].names)) | (
        set(loaded[1].names) & set(loaded[2].names)
    )
    if overlap:
        raise DatasetFormatError(f"mini-ImageNet: classes {sorted(overlap)[:5]} appear in more than one split CSV")
    return Splits(*loaded)
