"""Omniglot (Lake et al. 2015) from the folders as distributed, with the MAML protocol's split.

Get the data from the official repository https://github.com/brendenlake/omniglot : the files
`python/images_background.zip` and `python/images_evaluation.zip`. Unzip both into one folder:

    ROOT/images_background/Alphabet_of_the_Magi/character01/0709_01.png   (964 characters)
    ROOT/images_evaluation/Angelic/character01/0965_01.png                (659 characters)

Each character has 20 PNGs of 105×105 pixels, black strokes on white.

Preprocessing: grayscale, resized to 28×28 with PIL's LANCZOS filter (antialiased, as the resize
script of Finn et al.'s MAML code asks for), inverted and scaled so that strokes are 1 and the
background 0 (as in that code's loader). Note: on the 1-bit PNGs Pillow ignores the requested filter
and resizes with nearest neighbour, so Finn's script effectively produced binary images; we convert
to grayscale first so the antialiasing really happens (as torchmeta and learn2learn do).

Split (Finn et al.'s code): all 1623 characters, shuffled with a fixed seed, the first 1200 for
meta-training and meta-validation (1100 + 100) and the remaining 423 for meta-testing. Rotations by
90°, 180° and 270° make new classes in meta-training only (`EpisodeSampler(..., rotations=True)`).

The decoded array (uint8 `[1623 · 20, 1, 28, 28]`, 25 MB) is cached in `ROOT/.fastmaml_cache` (or
`cache_dir`), so the second load takes well under a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import numpy as np

from .episodes import ClassDataset, Splits, split_classes
from .imagefiles import DatasetLayoutError, decode_all, files_fingerprint, load_cached, require_pil, save_cached

SOURCE = (
    "https://github.com/brendenlake/omniglot (python/images_background.zip and "
    "python/images_evaluation.zip, unzipped into one folder)"
)
FOLDERS = ("images_background", "images_evaluation")
LAYOUT = "ROOT/images_background/Alphabet_of_the_Magi/character01/0709_01.png"
NUM_CHARACTERS = 1623


def _layout_error(root: Path, problem: str) -> DatasetLayoutError:
    return DatasetLayoutError(
        f"Omniglot: {problem}. Expected the folders {FOLDERS[0]}/ and {FOLDERS[1]}/ in {root}, laid out as "
        f"{LAYOUT} (alphabet / character / PNG files). Get the data from {SOURCE}."
    )


def _check_root(root: Path) -> None:
    if not root.is_dir():
        raise _layout_error(root, f"the folder {root} does not exist")
    for folder in FOLDERS:
        if (root / folder / folder).is_dir():
            raise _layout_error(root, f"found {folder}/{folder}/: the archive was unzipped one level too deep")
        if (root / folder).is_dir():
            continue
        hints = []
        if (root / f"{folder}.zip").is_file():
            hints.append(f"found {folder}.zip: unzip it in {root}")
        if (root / "python" / folder).is_dir():
            hints.append(f"found python/{folder}/: pass --data {root / 'python'}")
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise _layout_error(root, f"no folder {folder}/ in {root}{hint}")


def list_characters(root) -> List[tuple]:
    """[(name 'images_background/Alphabet/characterNN', [png paths])] in a fixed (sorted) order."""
    root = Path(root)
    _check_root(root)
    characters = []
    for folder in FOLDERS:
        alphabets = sorted(p for p in (root / folder).iterdir() if p.is_dir())
        if not alphabets:
            raise _layout_error(root, f"{root / folder} contains no alphabet folders")
        for alphabet in alphabets:
            chars = sorted(p for p in alphabet.iterdir() if p.is_dir())
            if not chars:
                pngs = sorted(alphabet.glob("*.png"))
                what = f"PNG files directly in {alphabet}" if pngs else f"nothing in {alphabet}"
                raise _layout_error(root, f"found {what} but expected character folders (character01, ...)")
            for char in chars:
                pngs = sorted(char.glob("*.png"))
                if not pngs:
                    raise _layout_error(root, f"the character folder {char} contains no .png files")
                characters.append((f"{folder}/{alphabet.name}/{char.name}", pngs))
    return characters


def _decoder(size: int):
    Image = require_pil()

    def decode(path: Path) -> np.ndarray:
        with Image.open(path) as im:
            im = im.convert("L").resize((size, size), resample=Image.LANCZOS)
            return (255 - np.asarray(im, dtype=np.uint8))[None]  # strokes bright: [1, size, size]

    return decode


def load_omniglot(root, *, image_size: int = 28, cache_dir=None, workers: Optional[int] = None) -> ClassDataset:
    """All characters of both folders as a `ClassDataset` (uint8 `[1, image_size, image_size]`, strokes
    bright; one class per character, named 'images_background/Alphabet/characterNN')."""
    root = Path(root).expanduser()
    characters = list_characters(root)
    names = [name for name, _ in characters]
    counts = [len(pngs) for _, pngs in characters]
    paths = [p for _, pngs in characters for p in pngs]
    fingerprint = {"image_size": image_size, "names": names, "counts": counts, "files": files_fingerprint(paths, root)}
    cache = Path(cache_dir) if cache_dir is not None else root / ".fastmaml_cache"
    stem = f"omniglot_{image_size}"
    cached = load_cached(cache, stem, fingerprint)
    if cached is not None:
        return cached
    images = decode_all(paths, _decoder(image_size), workers)
    save_cached(cache, stem, fingerprint, images, counts, names)
    return ClassDataset(images, counts, names)


def omniglot_splits(
    root,
    *,
    image_size: int = 28,
    train_characters: int = 1100,
    val_characters: int = 100,
    seed: int = 1,
    cache_dir=None,
) -> Splits:
    """The MAML split: characters shuffled with `seed`; `train_characters` for meta-training, the next
    `val_characters` for validation, the rest (423 of the 1623) for the meta-test."""
    data = load_omniglot(root, image_size=image_size, cache_dir=cache_dir)
    return split_omniglot(data, train_characters=train_characters, val_characters=val_characters, seed=seed)


def split_omniglot(
    data: ClassDataset, *, train_characters: int = 1100, val_characters: int = 100, seed: int = 1
) -> Splits:
    """`omniglot_splits` on an already loaded `load_omniglot(...)` dataset."""
    n = data.num_classes
    if train_characters < 1 or val_characters < 1 or train_characters + val_characters >= n:
        raise ValueError(
            f"train_characters, val_characters: {train_characters} + {val_characters} must leave at least one "
            f"of the {n} characters for the meta-test"
        )
    cut = train_characters + val_characters
    train, val, test = split_classes(n, [train_characters, val_characters, n - cut], seed=seed)
    return Splits(data.subset(train), data.subset(val), data.subset(test))
