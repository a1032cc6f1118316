"""N-way K-shot episodes from any class-indexed dataset, batched straight into a `TaskBatch`.

A `ClassDataset` keeps every example in one tensor `images [total, C, H, W]` (uint8 0..255 or
float), class c owning the rows `offsets[c] : offsets[c] + counts[c]`. An `EpisodeSampler` draws
episodes as index arithmetic (for each task, N distinct classes in random order; for each class,
K + Q distinct examples) and materializes a whole meta-batch with one row gather per set:

    support_x [T, N*K, C, H, W], support_y [T, N*K] (int64 in 0..N-1, class-major),
    query_x   [T, N*Q, C, H, W], query_y   [T, N*Q]

Label j of a task is the j-th class drawn for it, so the class order (and the label mapping) is
random per task. With `rotations=True` every class also appears rotated by 90°, 180° and 270° as
three new classes (Finn et al. 2017, Omniglot meta-training): virtual class v is class v // 4
rotated by (v % 4) · 90°. Sampling is driven by a `torch.Generator`, so it is reproducible;
`fixed_episodes(count, seed)` gives the same evaluation episodes on every run.
"""

from __future__ import annotations

import numbers
from typing import Iterator, List, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from ..tasks import TaskBatch

ArrayLike = Union[torch.Tensor, np.ndarray]


def _positive_int(value, name: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise TypeError(f"{name}: expected uint8 (0..255) or floating-point images, got {x.dtype}")
    return x


class ClassDataset:
    """Examples grouped by class.

    images: `[total, C, H, W]` (uint8 0..255, or float already scaled); counts: examples per class
    `[num_classes]` (rows are stored class after class); names: optional class names.
    """

    def __init__(self, images: ArrayLike, counts: ArrayLike, names: Optional[Sequence[str]] = None):
        images = _as_tensor(images, "images")
        counts = torch.as_tensor(np.asarray(counts), dtype=torch.long).reshape(-1)
        if images.dim() < 2:
            raise ValueError(f"images: expected [total, C, H, W] (one row per example), got {tuple(images.shape)}")
        if counts.numel() == 0 or bool((counts < 1).any()):
            raise ValueError(
                f"counts: expected at least one class and >= 1 example per class, got {counts.tolist()[:10]}"
            )
        if int(counts.sum()) != images.shape[0]:
            raise ValueError(f"counts: they sum to {int(counts.sum())} examples but images has {images.shape[0]} rows")
        if names is not None and len(names) != counts.numel():
            raise ValueError(f"names: expected one name per class ({counts.numel()}), got {len(names)}")
        self.images = images
        self.counts = counts.to(images.device)
        self.offsets = torch.cumsum(self.counts, 0) - self.counts
        self.names = list(names) if names is not None else None

    @classmethod
    def from_tensor(cls, data: ArrayLike, names: Optional[Sequence[str]] = None) -> "ClassDataset":
        """data `[num_classes, examples_per_class, C, H, W]` (uint8 or float)."""
        data = _as_tensor(data, "data")
        if data.dim() < 3:
            raise ValueError(f"data: expected [num_classes, examples_per_class, C, H, W], got {tuple(data.shape)}")
        counts = torch.full((data.shape[0],), data.shape[1], dtype=torch.long)
        return cls(data.reshape(-1, *data.shape[2:]), counts, names)

    @classmethod
    def from_list(cls, per_class: Sequence[ArrayLike], names: Optional[Sequence[str]] = None) -> "ClassDataset":
        """per_class: one `[examples_c, C, H, W]` array per class (counts may differ)."""
        if len(per_class) == 0:
            raise ValueError("per_class: expected at least one class, got an empty list")
        tensors = [_as_tensor(x, f"per_class[{i}]") for i, x in enumerate(per_class)]
        shapes = {tuple(t.shape[1:]) for t in tensors}
        dtypes = {t.dtype for t in tensors}
        if len(shapes) != 1 or len(dtypes) != 1:
            raise ValueError(
                f"per_class: every class must have the same example shape and dtype; got shapes "
                f"{sorted(shapes)} and dtypes {sorted(map(str, dtypes))}"
            )
        return cls(torch.cat(tensors), [t.shape[0] for t in tensors], names)

    @property
    def num_classes(self) -> int:
        return self.counts.numel()

    @property
    def example_shape(self) -> tuple:
        return tuple(self.images.shape[1:])

    def subset(self, classes: Sequence[int]) -> "ClassDataset":
        """A new dataset with only `classes` (in that order), copied."""
        classes = torch.as_tensor(classes, dtype=torch.long).reshape(-1)
        if classes.numel() == 0:
            raise ValueError("classes: expected at least one class index")
        if int(classes.min()) < 0 or int(classes.max()) >= self.num_classes:
            raise ValueError(
                f"classes: indices must lie in 0..{self.num_classes - 1}, got "
                f"{int(classes.min())}..{int(classes.max())}"
            )
        counts = self.counts[classes.to(self.counts.device)]
        rows = torch.cat(
            [torch.arange(int(o), int(o) + int(c)) for o, c in zip(self.offsets[classes].tolist(), counts.tolist())]
        )
        names = [self.names[i] for i in classes.tolist()] if self.names is not None else None
        return ClassDataset(self.images[rows.to(self.images.device)], counts, names)

    def to(self, device) -> "ClassDataset":
        moved = ClassDataset.__new__(ClassDataset)
        moved.images = self.images.to(device)
        moved.counts = self.counts.to(device)
        moved.offsets = self.offsets.to(device)
        moved.names = self.names
        return moved

    def __repr__(self) -> str:
        return (
            f"ClassDataset({self.num_classes} classes, {self.images.shape[0]} examples of "
            f"{self.example_shape}, {self.images.dtype})"
        )


def as_class_dataset(data) -> ClassDataset:
    """A `ClassDataset`, a tensor/array `[num_classes, examples, C, H, W]` or a list of per-class arrays."""
    if isinstance(data, ClassDataset):
        return data
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return ClassDataset.from_tensor(data)
    if isinstance(data, (list, tuple)):
        return ClassDataset.from_list(data)
    raise TypeError(
        "data: expected a ClassDataset, a tensor [num_classes, examples_per_class, C, H, W] or a list of "
        f"per-class arrays [examples, C, H, W]; got {type(data).__name__}"
    )


def split_classes(num_classes: int, sizes: Sequence[int], *, seed: int = 0) -> List[torch.Tensor]:
    """Disjoint random class splits: a seeded permutation of 0..num_classes-1 cut into `sizes`."""
    num_classes = _positive_int(num_classes, "num_classes")
    sizes = [_positive_int(s, "sizes") for s in sizes]
    if sum(sizes) > num_classes:
        raise ValueError(f"sizes: {sizes} add up to {sum(sizes)} classes but only {num_classes} exist")
    perm = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed))
    return list(torch.split(perm[: sum(sizes)], sizes))


class Splits(NamedTuple):
    """Disjoint meta-train / meta-validation / meta-test classes."""

    train: ClassDataset
    val: ClassDataset
    test: ClassDataset


class Episodes(NamedTuple):
    """Episodes as indices: `classes [T, N]` (virtual class ids) and `examples [T, N, K+Q]` (rows
    within each class; the first K are the support set)."""

    classes: torch.Tensor
    examples: torch.Tensor

    def __len__(self) -> int:
        return self.classes.shape[0]

    def chunks(self, size: int) -> Iterator["Episodes"]:
        size = _positive_int(size, "size")
        for start in range(0, len(self), size):
            yield Episodes(self.classes[start : start + size], self.examples[start : start + size])


class EpisodeSampler:
    """N-way (`ways`) K-shot (`shots`) episodes with `query` query examples per class from `dataset`.

    rotations: add the 90°/180°/270° rotations of every class as new classes (square images only).
    dtype: the dtype of the images handed out; uint8 datasets are scaled to [0, 1].
    """

    def __init__(
        self, dataset, ways: int, shots: int, query: int, *, rotations: bool = False, dtype: torch.dtype = torch.float32
    ):
        self.dataset = as_class_dataset(dataset)
        self.ways = _positive_int(ways, "ways")
        self.shots = _positive_int(shots, "shots")
        self.query = _positive_int(query, "query")
        self.rotations = bool(rotations)
        self.dtype = dtype
        self._rotated: Optional[torch.Tensor] = None
        shape = self.dataset.example_shape
        if self.rotations and (len(shape) < 2 or shape[-1] != shape[-2]):
            raise ValueError(f"rotations: need square images [..., H, W] with H == W, got {shape}")
        self.num_virtual = self.dataset.num_classes * (4 if self.rotations else 1)
        if self.ways > self.num_virtual:
            raise ValueError(
                f"ways: {self.ways}-way episodes need at least {self.ways} classes; the dataset has "
                f"{self.num_virtual}" + (" (rotations included)" if self.rotations else "")
            )
        fewest = int(self.dataset.counts.min())
        if self.shots + self.query > fewest:
            raise ValueError(
                f"shots + query: {self.shots} + {self.query} examples per class are needed but the smallest "
                f"class has {fewest}"
            )

    def sample_indices(self, num_tasks: int, generator: torch.Generator) -> Episodes:
        """Draws `num_tasks` episodes (indices only, on the CPU)."""
        T = _positive_int(num_tasks, "num_tasks")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
        N, M = self.ways, self.shots + self.query
        classes = torch.rand(T, self.num_virtual, generator=generator).topk(N, dim=1).indices
        counts = self.dataset.counts.cpu()[classes // 4 if self.rotations else classes]  # [T, N]
        most = int(self.dataset.counts.max())
        keys = torch.rand(T, N, most, generator=generator)
        keys.masked_fill_(torch.arange(most) >= counts[..., None], 2.0)  # rows past a class's end never win
        examples = keys.topk(M, dim=2, largest=False).indices
        return Episodes(classes, examples)

    def gather(self, episodes: Episodes) -> TaskBatch:
        """Materializes episodes as a `TaskBatch` on the dataset's device (one row gather per set)."""
        ds = self.dataset
        classes = episodes.classes.to(ds.images.device)
        examples = episodes.examples.to(ds.images.device)
        if self.rotations:
            rows = ds.offsets[classes // 4][..., None] + examples + (classes % 4)[..., None] * ds.images.shape[0]
        else:
            rows = ds.offsets[classes][..., None] + examples
        K = self.shots
        return TaskBatch(
            self._images(rows[..., :K]),
            self._labels(rows.shape[0], K),
            self._images(rows[..., K:]),
            self._labels(rows.shape[0], self.query),
        )

    def _images(self, rows: torch.Tensor) -> torch.Tensor:
        """rows `[T, N, M]` -> images `[T, N*M, C, H, W]` of `self.dtype` (uint8 scaled to [0, 1])."""
        x = self._table().index_select(0, rows.reshape(-1))
        x = torch.div(x, 255).to(self.dtype) if x.dtype == torch.uint8 else x.to(self.dtype)
        return x.view(rows.shape[0], -1, *x.shape[1:])

    def _labels(self, num_tasks: int, per_class: int) -> torch.Tensor:
        """`[T, N*per_class]`: 0..N-1, each repeated `per_class` times (class-major)."""
        labels = torch.arange(self.ways, device=self.dataset.images.device).repeat_interleave(per_class)
        return labels.expand(num_tasks, -1).contiguous()

    def _table(self) -> torch.Tensor:
        """The rows to gather from: the images, or with rotations all four turns of them stacked
        `[4 · total, C, H, W]` (made once, on the dataset's device)."""
        images = self.dataset.images
        if not self.rotations:
            return images
        if self._rotated is None or self._rotated.device != images.device:
            self._rotated = torch.cat([torch.rot90(images, r, dims=(-2, -1)) for r in range(4)])
        return self._rotated

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        """A meta-batch of `num_tasks` fresh episodes."""
        return self.gather(self.sample_indices(num_tasks, generator))

    def fixed_episodes(self, count: int, seed: int) -> Episodes:
        """The same `count` episodes on every run for a given `seed` (for validation and test)."""
        return self.sample_indices(count, torch.Generator().manual_seed(seed))

    def batches(self, episodes: Episodes, size: int) -> Iterator[TaskBatch]:
        """`TaskBatch`es of at most `size` tasks covering `episodes` in order."""
        for chunk in episodes.chunks(size):
            yield self.gather(chunk)
