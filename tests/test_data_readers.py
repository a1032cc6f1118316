"""The Omniglot and mini-ImageNet readers on small folders laid out exactly as distributed."""

import os
import re

import numpy as np
import pytest
import torch

from fastmaml.data import (
    EpisodeSampler,
    imagefiles,
    load_miniimagenet,
    load_omniglot,
    miniimagenet_splits,
    omniglot_splits,
)

from dataset_files import COLORS, SPLIT_LABELS, write_miniimagenet, write_omniglot

Image = pytest.importorskip("PIL.Image")


def test_omniglot_reads_inverts_and_caches(tmp_path, monkeypatch):
    n = write_omniglot(tmp_path)
    data = load_omniglot(tmp_path)
    assert data.num_classes == n == 8 and data.counts.tolist() == [4] * 8
    assert data.example_shape == (1, 28, 28) and data.images.dtype == torch.uint8
    assert data.names[0] == "images_background/Alphabet_of_the_Magi/character01"
    assert data.names[-1] == "images_evaluation/Atemayar_Qelisayer/character01"
    img = data.images[0, 0].float() / 255  # character 0: bar at rows 0..11 of 105 -> rows 0..3 of 28
    assert float(img[1, 10]) > 0.9 and float(img[15, 10]) < 0.1  # strokes bright, background dark
    assert 0 < float(((img > 0.05) & (img < 0.95)).float().sum())  # antialiased edges exist
    assert (tmp_path / ".fastmaml_cache" / "omniglot_28.npy").is_file()

    def no_decoding(*args, **kwargs):
        raise AssertionError("the second load decoded the images again")

    monkeypatch.setattr("fastmaml.data.omniglot.decode_all", no_decoding)
    again = load_omniglot(tmp_path)
    assert torch.equal(again.images, data.images) and again.names == data.names


def test_omniglot_cache_is_refreshed_when_files_change(tmp_path):
    write_omniglot(tmp_path)
    load_omniglot(tmp_path)
    extra = tmp_path / "images_evaluation" / "Angelic" / "character03"
    extra.mkdir()
    Image.fromarray(np.zeros((105, 105), np.uint8)).save(extra / "0999_01.png")
    assert load_omniglot(tmp_path).num_classes == 9


def test_omniglot_cache_is_refreshed_when_a_file_is_rewritten_or_touched(tmp_path, monkeypatch):
    """The cache is keyed on every file's size and modification time, not only on names and counts."""
    write_omniglot(tmp_path)
    first = load_omniglot(tmp_path)
    png = sorted((tmp_path / "images_background").rglob("*.png"))[0]  # class 0, example 0
    Image.fromarray(np.zeros((105, 105), np.uint8)).convert("1").save(png)  # now all strokes: bright everywhere
    again = load_omniglot(tmp_path)
    assert float(again.images[0].float().mean()) > 250 > float(first.images[0].float().mean())
    assert torch.equal(again.images[1:], first.images[1:])
    decoded = []
    real = imagefiles.decode_all
    monkeypatch.setattr("fastmaml.data.omniglot.decode_all", lambda *a, **k: decoded.append(1) or real(*a, **k))
    load_omniglot(tmp_path)
    assert decoded == []  # unchanged files: served from the cache
    st = png.stat()
    os.utime(png, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # same bytes, newer modification time
    load_omniglot(tmp_path)
    assert decoded == [1]


@pytest.mark.parametrize("reader", ["omniglot", "miniimagenet"])
def test_truncated_or_garbage_image_names_the_file(tmp_path, reader):
    if reader == "omniglot":
        write_omniglot(tmp_path)
        files, load = sorted(tmp_path.rglob("*.png")), lambda: load_omniglot(tmp_path)
    else:
        write_miniimagenet(tmp_path)
        files, load = sorted((tmp_path / "images").iterdir()), lambda: load_miniimagenet(tmp_path, "train")
    broken = files[1]
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    with pytest.raises(imagefiles.ImageFileError, match=f"cannot decode the image {re.escape(str(broken))}: ") as err:
        load()
    assert isinstance(err.value, OSError) and isinstance(err.value, imagefiles.DatasetError)
    broken.write_bytes(b"not an image at all")
    with pytest.raises(imagefiles.ImageFileError, match=re.escape(str(broken))):
        load()


def test_omniglot_splits_and_rotations(tmp_path):
    write_omniglot(tmp_path)
    splits = omniglot_splits(tmp_path, train_characters=5, val_characters=1)
    assert [s.num_classes for s in splits] == [5, 1, 2]
    names = [set(s.names) for s in splits]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    sampler = EpisodeSampler(splits.train, ways=20, shots=1, query=1, rotations=True)
    assert sampler.sample(2, torch.Generator().manual_seed(0)).support_x.shape == (2, 20, 1, 28, 28)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda r: None, "does not exist"),
        (lambda r: (r / "images_background").mkdir(parents=True), "no folder images_evaluation/"),
        (lambda r: (r.mkdir(), (r / "images_background.zip").write_bytes(b"PK")), "unzip it"),
        (
            lambda r: [(r / "python" / f).mkdir(parents=True) for f in ("images_background", "images_evaluation")],
            "pass --data",
        ),
        (
            lambda r: [(r / f / f).mkdir(parents=True) for f in ("images_background", "images_evaluation")],
            "one level too deep",
        ),
    ],
)
def test_omniglot_layout_errors_say_what_was_expected(tmp_path, make, message):
    root = tmp_path / "omniglot"
    make(root)
    with pytest.raises(FileNotFoundError, match=message) as err:
        load_omniglot(root)
    text = str(err.value)
    assert "images_background" in text and "character01" in text and "github.com/brendenlake/omniglot" in text


def test_omniglot_pngs_directly_in_alphabet_folder(tmp_path):
    for folder in ("images_background", "images_evaluation"):
        d = tmp_path / folder / "Latin"
        d.mkdir(parents=True)
        Image.fromarray(np.zeros((105, 105), np.uint8)).save(d / "0001_01.png")
    with pytest.raises(FileNotFoundError, match="PNG files directly in .*Latin.*character folders"):
        load_omniglot(tmp_path)


def test_miniimagenet_reads_resizes_and_caches(tmp_path, monkeypatch):
    write_miniimagenet(tmp_path)
    train = load_miniimagenet(tmp_path, "train")
    assert train.names == SPLIT_LABELS["train"] and train.counts.tolist() == [3, 3, 3]
    assert train.example_shape == (3, 84, 84) and train.images.dtype == torch.uint8
    for c, label in enumerate(train.names):
        mean = train.images[3 * c : 3 * c + 3].float().mean((0, 2, 3))
        assert torch.allclose(mean, torch.tensor(COLORS[label], dtype=torch.float32), atol=6)
    monkeypatch.setattr(
        "fastmaml.data.miniimagenet.decode_all", lambda *a, **k: pytest.fail("the second load decoded the images again")
    )
    assert torch.equal(load_miniimagenet(tmp_path, "train").images, train.images)


def test_miniimagenet_splits_sample_in_unit_range(tmp_path):
    write_miniimagenet(tmp_path)
    splits = miniimagenet_splits(tmp_path)
    assert [s.num_classes for s in splits] == [3, 2, 1]
    b = EpisodeSampler(splits.train, ways=3, shots=1, query=2).sample(2, torch.Generator().manual_seed(0))
    assert b.support_x.shape == (2, 3, 3, 84, 84) and b.query_x.shape == (2, 6, 3, 84, 84)
    assert 0 <= float(b.query_x.min()) and float(b.query_x.max()) <= 1 and float(b.query_x.max()) > 0.9


def test_miniimagenet_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*train.csv.*images/"):
        load_miniimagenet(tmp_path / "nowhere", "train")
    write_miniimagenet(tmp_path)
    (tmp_path / "val.csv").unlink()
    with pytest.raises(FileNotFoundError, match="no val.csv in .*meta-learning-lstm"):
        load_miniimagenet(tmp_path, "val")
    (tmp_path / "test.csv").write_text("image,class\na.jpg,n01\n")
    with pytest.raises(ValueError, match="header 'filename,label'.*'image,class'"):
        load_miniimagenet(tmp_path, "test")
    first = sorted((tmp_path / "images").iterdir())[0]
    first.unlink()
    with pytest.raises(FileNotFoundError, match=f"missing from images/.*{first.name}"):
        load_miniimagenet(tmp_path, "train")
    with pytest.raises(ValueError, match="split: expected one of"):
        load_miniimagenet(tmp_path, "validation")


def test_unwritable_cache_only_warns(tmp_path, monkeypatch):
    write_omniglot(tmp_path)

    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(imagefiles.np, "save", refuse)
    with pytest.warns(UserWarning, match="could not write the decoded-image cache"):
        data = load_omniglot(tmp_path)
    assert data.num_classes == 8
