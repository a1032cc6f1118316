"""Writers of small synthetic datasets in the real on-disk layouts (Omniglot PNG folders, mini-ImageNet
CSV splits and JPEGs), shared by the data, CLI and job tests."""

import csv

import numpy as np
from PIL import Image

OMNIGLOT = {  # folder -> alphabet -> number of characters
    "images_background": {"Alphabet_of_the_Magi": 3, "Bengali": 2},
    "images_evaluation": {"Angelic": 2, "Atemayar_Qelisayer": 1},
}


def write_omniglot(root, per_character=4):
    """105×105 1-bit PNGs, black strokes on white; character i has a black bar at row 10·i."""
    index = 0
    for folder, alphabets in OMNIGLOT.items():
        for alphabet, n_chars in alphabets.items():
            for c in range(1, n_chars + 1):
                d = root / folder / alphabet / f"character{c:02d}"
                d.mkdir(parents=True)
                for k in range(per_character):
                    img = np.full((105, 105), 255, np.uint8)
                    img[10 * index : 10 * index + 12, 20:80] = 0
                    img[90:95, 5 * k : 5 * k + 5] = 0
                    Image.fromarray(img).convert("1").save(d / f"{index + 1:04d}_{k + 1:02d}.png")
                index += 1
    return index


COLORS = {
    "n01532829": (255, 0, 0),
    "n01558993": (0, 255, 0),
    "n01704323": (0, 0, 255),
    "n01749939": (255, 255, 0),
    "n01770081": (0, 255, 255),
    "n01843383": (255, 0, 255),
}
SPLIT_LABELS = {"train": list(COLORS)[:3], "val": list(COLORS)[3:5], "test": list(COLORS)[5:]}


def write_miniimagenet(root, per_class=3, split_labels=SPLIT_LABELS):
    """JPEGs of assorted sizes, one flat color per class, named like the Ravi & Larochelle files.
    split_labels: {split: [WordNet-like labels]}; labels not in COLORS get a color from their hash."""
    (root / "images").mkdir(parents=True)
    for split, labels in split_labels.items():
        with open(root / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["filename", "label"])
            for label in labels:
                for k in range(per_class):
                    name = f"{label}{k + 1:08d}.jpg"
                    size = (120 + 7 * k, 90 + 5 * k)
                    color = COLORS.get(label) or tuple(
                        int(v) for v in np.random.default_rng(int(label[1:])).integers(0, 256, 3)
                    )
                    Image.new("RGB", size, color).save(root / "images" / name, quality=95)
                    w.writerow([name, label])
