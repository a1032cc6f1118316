"""The episode sampler and the embedded glyph dataset."""

import pytest
import torch

import fastmaml
from fastmaml.data import ClassDataset, EpisodeSampler, glyph_splits, glyphs, split_classes


def labelled_dataset(num_classes=12, per_class=10, size=6):
    """uint8 images whose pixels encode (class, example): pixel [0, 0] = class, [0, 1] = example."""
    x = torch.zeros(num_classes, per_class, 1, size, size, dtype=torch.uint8)
    x[:, :, 0, 0, 0] = torch.arange(num_classes)[:, None]
    x[:, :, 0, 0, 1] = torch.arange(per_class)[None, :]
    return x


def decode(images):
    """[T, M, 1, H, W] floats in [0, 1] -> (class ids, example ids) `[T, M]`."""
    raw = (images * 255).round().long()
    return raw[:, :, 0, 0, 0], raw[:, :, 0, 0, 1]


def test_shapes_labels_and_dtype():
    s = EpisodeSampler(labelled_dataset(), ways=4, shots=2, query=3)
    b = s.sample(7, torch.Generator().manual_seed(0))
    assert isinstance(b, fastmaml.TaskBatch)
    assert b.support_x.shape == (7, 8, 1, 6, 6) and b.query_x.shape == (7, 12, 1, 6, 6)
    assert b.support_y.dtype == torch.long and b.support_y.shape == (7, 8)
    assert b.support_x.dtype == torch.float32 and 0 <= float(b.support_x.min()) and float(b.support_x.max()) <= 1
    assert b.support_y[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert b.query_y[3].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_labels_follow_classes_and_support_query_disjoint():
    s = EpisodeSampler(labelled_dataset(), ways=5, shots=2, query=4)
    b = s.sample(50, torch.Generator().manual_seed(1))
    sc, se = decode(b.support_x)
    qc, qe = decode(b.query_x)
    for t in range(50):
        # one class per label, N distinct classes, the same class for support and query of a label
        s_map = {int(y): set() for y in b.support_y[t]}
        for y, c in zip(b.support_y[t].tolist(), sc[t].tolist()):
            s_map[y].add(c)
        assert all(len(v) == 1 for v in s_map.values())
        classes = [next(iter(s_map[y])) for y in range(5)]
        assert len(set(classes)) == 5
        for y, c in zip(b.query_y[t].tolist(), qc[t].tolist()):
            assert c == classes[y]
        # within each class, the K + Q examples are distinct
        for y in range(5):
            ex = se[t][b.support_y[t] == y].tolist() + qe[t][b.query_y[t] == y].tolist()
            assert len(ex) == 6 and len(set(ex)) == 6


def test_class_order_is_random_per_task():
    s = EpisodeSampler(labelled_dataset(), ways=3, shots=1, query=1)
    b = s.sample(40, torch.Generator().manual_seed(2))
    first = decode(b.support_x)[0][:, 0]
    assert len(set(first.tolist())) > 3  # label 0 is not always the same (or the smallest) class
    ordered = (decode(b.support_x)[0].diff(dim=1) > 0).all(dim=1)
    assert not bool(ordered.all())


def test_determinism_and_fixed_episodes():
    s = EpisodeSampler(labelled_dataset(), ways=5, shots=1, query=2)
    a = s.sample(6, torch.Generator().manual_seed(3))
    b = s.sample(6, torch.Generator().manual_seed(3))
    c = s.sample(6, torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.support_x, c.support_x)
    e1, e2 = s.fixed_episodes(9, seed=0), s.fixed_episodes(9, seed=0)
    assert torch.equal(e1.classes, e2.classes) and torch.equal(e1.examples, e2.examples)
    chunks = list(s.batches(e1, 4))
    assert [c.num_tasks for c in chunks] == [4, 4, 1]
    whole = s.gather(e1)
    assert torch.equal(torch.cat([c.query_x for c in chunks]), whole.query_x)


def test_variable_counts_and_list_input():
    per_class = [torch.full((n, 2, 3, 3), float(i)) for i, n in enumerate([3, 5, 4, 3])]
    s = EpisodeSampler(per_class, ways=4, shots=1, query=2)
    b = s.sample(30, torch.Generator().manual_seed(0))
    # every image of a label carries its class id; never a row past a class's end
    for x, y in ((b.support_x, b.support_y), (b.query_x, b.query_y)):
        cls = x[:, :, 0, 0, 0]
        for t in range(30):
            for label in range(4):
                assert len(set(cls[t][y[t] == label].tolist())) == 1
    ds = ClassDataset.from_list(per_class)
    assert ds.counts.tolist() == [3, 5, 4, 3] and ds.offsets.tolist() == [0, 3, 8, 12]


def test_rotations_are_new_classes():
    base = torch.zeros(2, 3, 1, 5, 5, dtype=torch.uint8)
    base[:, :, 0, 0, 0] = 255  # a marker in the top-left corner
    base[1, :, 0, 4, 4] = 255  # class 1 also bottom-right
    s = EpisodeSampler(base, ways=8, shots=1, query=1, rotations=True)
    assert s.num_virtual == 8
    ep = s.fixed_episodes(3, seed=0)
    b = s.gather(ep)
    for t in range(3):
        for label in range(8):
            v = int(ep.classes[t, label])
            expect = torch.rot90(base[v // 4, 0].float() / 255, v % 4, dims=(-2, -1))
            assert torch.equal(b.support_x[t, label], expect)
            assert torch.equal(b.query_x[t, label], expect)


def test_split_classes_disjoint_and_seeded():
    a = split_classes(50, [30, 10, 10], seed=5)
    b = split_classes(50, [30, 10, 10], seed=5)
    assert [len(x) for x in a] == [30, 10, 10]
    assert sorted(torch.cat(a).tolist()) == list(range(50))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="sizes"):
        split_classes(10, [8, 3])


def test_bad_arguments_name_the_argument():
    data = labelled_dataset(num_classes=4, per_class=3)
    with pytest.raises(ValueError, match="ways"):
        EpisodeSampler(data, ways=5, shots=1, query=1)
    with pytest.raises(ValueError, match="shots \\+ query"):
        EpisodeSampler(data, ways=2, shots=2, query=2)
    with pytest.raises(ValueError, match="shots"):
        EpisodeSampler(data, ways=2, shots=0, query=1)
    with pytest.raises(TypeError, match="generator"):
        EpisodeSampler(data, ways=2, shots=1, query=1).sample(2, 0)
    with pytest.raises(TypeError, match="data"):
        EpisodeSampler("images", ways=2, shots=1, query=1)
    with pytest.raises(TypeError, match="images"):
        ClassDataset(torch.zeros(4, 1, 2, 2, dtype=torch.int32), [2, 2])
    with pytest.raises(ValueError, match="counts"):
        ClassDataset(torch.zeros(4, 1, 2, 2), [2, 3])
    with pytest.raises(ValueError, match="rotations"):
        EpisodeSampler(torch.zeros(4, 3, 1, 2, 5), ways=2, shots=1, query=1, rotations=True)


def test_glyph_splits_disjoint_deterministic_and_structured():
    splits = glyph_splits()
    assert [s.num_classes for s in splits] == [400, 100, 100]
    names = [set(s.names) for s in splits]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    data = glyphs()
    assert data.shape == (600, 20, 1, 28, 28) and data.dtype == torch.uint8
    assert glyphs() is data  # kept in memory
    # same seed, same data (generated afresh, bypassing the in-memory cache)
    from fastmaml.data.glyphs import _make

    small = _make(30, 20, 28, 0)
    assert torch.equal(_make(30, 20, 28, 0), small)
    assert not torch.equal(_make(30, 20, 28, 1), small)
    # examples of a class are closer to each other than to other classes (nearest class mean > chance)
    x = data[:50].float().flatten(2) / 255
    means = x[:, 1:].mean(1)  # [50, D]
    d = torch.cdist(x[:, 0], means)  # first example of each class against every class mean
    assert float((d.argmin(1) == torch.arange(50)).float().mean()) > 0.5
