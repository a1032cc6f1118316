"""Few-shot classification data: the episode sampler, the Omniglot and mini-ImageNet readers and the
embedded glyph dataset (no download needed)."""

from .episodes import ClassDataset, Episodes, EpisodeSampler, Splits, as_class_dataset, split_classes
from .glyphs import glyph_splits, glyphs
from .miniimagenet import load_miniimagenet, miniimagenet_splits
from .omniglot import load_omniglot, omniglot_splits, split_omniglot

__all__ = [
    "ClassDataset",
    "EpisodeSampler",
    "Episodes",
    "Splits",
    "as_class_dataset",
    "glyph_splits",
    "glyphs",
    "load_miniimagenet",
    "load_omniglot",
    "miniimagenet_splits",
    "omniglot_splits",
    "split_classes",
    "split_omniglot",
]
