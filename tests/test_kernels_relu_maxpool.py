"""ReLU + MaxPool2d as one rule that pools first (`ReLUMaxPool2dRule`): the C++ CPU forward
(csrc/relu_maxpool.cpp) against the torch reference (fastmaml/ops/reference/block_tail.py) on odd shapes,
real layer sizes, NaN and infinite planes, float32 and float64, independent of the number of threads; opcheck;
channels-last inputs left to PyTorch's pooling; meta_step through the rule on every backend against the
autograd oracle (float64)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmaml.ops import registry
from fastmaml.programs.fused import compile_model
from fastmaml.programs.fused.pooling import ReLUMaxPool2dRule

from models import classification_tasks
from oracle import check_meta_step

DEVICE = torch.device("cpu")
# (T, N, C, H, W, k): one plane; odd H and W (rows and columns the windows skip); k = 3 and k = 1; conv4's
# 28×28 maps; 75 images; real layers (5 and 75 images of 84×84, 75 images of 28×28 in two tasks); windows as
# large as the plane
CASES = [
    (1, 1, 1, 2, 2, 2),
    (3, 2, 3, 5, 7, 2),
    (2, 5, 4, 9, 10, 3),
    (2, 1, 3, 4, 4, 1),
    (1, 3, 8, 28, 28, 2),
    (1, 75, 3, 7, 5, 2),
    (1, 5, 32, 84, 84, 2),
    (1, 75, 4, 84, 84, 2),
    (2, 75, 8, 28, 28, 2),
    (2, 3, 2, 3, 3, 3),
]
IDS = ["T{}N{}C{}H{}W{}k{}".format(*c) for c in CASES]


@pytest.fixture(scope="module")
def cpp():
    ok, why = registry.availability("cpp", DEVICE)
    assert ok, f"the C++ extension must build here: {why}"
    return registry.implementation("relu_maxpool_fwd", "cpp")


def check_against_reference(z, idx, x, k):
    """z as the reference's, bit for bit; idx the reference's where z > 0 (elsewhere any element of the window,
    all of whose relu values are 0); idx routes the pooled gradient as PyTorch's max-pool backward does."""
    ref_z, ref_idx = registry.reference("relu_maxpool_fwd")(x, k)
    assert z.shape == ref_z.shape and idx.dtype == torch.int64
    assert torch.equal(z, ref_z)
    on = z > 0
    assert torch.equal(idx[on], ref_idx[on])
    T, N, C, H, W = x.shape
    Ho, Wo = H // k, W // k
    oh = torch.arange(Ho).view(Ho, 1).expand(Ho, Wo)
    ow = torch.arange(Wo).view(1, Wo).expand(Ho, Wo)
    h, w = idx // W, idx % W
    assert bool(((h // k == oh) & (w // k == ow)).all()), "a pick outside its window"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_matches_reference(cpp, case, dtype):
    T, N, C, H, W, k = case
    g = torch.Generator().manual_seed(sum(case))
    x = (torch.randn(T, N, C, H, W, generator=g, dtype=torch.float64) * 2 - 0.3).to(dtype)
    z, idx = cpp(x, k)
    check_against_reference(z, idx, x, k)


def test_ties_zeros_nan_and_infinity(cpp):
    """Integer maps (ties everywhere, all-negative and zero windows), a plane with a NaN (it wins its window,
    as in PyTorch) and one with infinities (a plane whose sum is not finite takes the scalar path)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (2, 3, 4, 6, 8), generator=g).float()
    x[0, 1, 2, 3, 5] = float("nan")
    x[1, 0, 1, 0, 0] = float("inf")
    x[1, 0, 1, 4, 4] = float("-inf")
    z, idx = cpp(x, 2)
    ref_z, ref_idx = registry.reference("relu_maxpool_fwd")(x, 2)
    assert torch.equal(z.isnan(), ref_z.isnan()) and torch.equal(z.nan_to_num(), ref_z.nan_to_num())
    on = (z > 0) | z.isnan()
    assert torch.equal(idx[on], ref_idx[on])


def test_threads_do_not_change_results(cpp):
    x = torch.randn(2, 7, 5, 13, 12, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpp(x, 2)
        torch.set_num_threads(max(2, threads))
        many = cpp(x, 2)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


def test_channels_last_takes_the_reference_and_bad_arguments_are_named(cpp):
    x = torch.randn(1, 2, 3, 6, 6)
    cl = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    why = registry.spec("relu_maxpool_fwd", "cpp").supports(cl, 2)
    assert why is not None and "channels-last" in why
    assert registry.spec("relu_maxpool_fwd", "cpp").supports(x, 2) is None
    with pytest.raises(RuntimeError, match="k: expected a pooling window"):
        cpp(x, 7)
    with pytest.raises(RuntimeError, match=r"x: expected activations \[T, N, C, H, W\]"):
        cpp(x[0], 2)


def test_opcheck(cpp):
    x = torch.randn(2, 3, 4, 7, 6, generator=torch.Generator().manual_seed(2))
    torch.library.opcheck(torch.ops.fastmaml.relu_maxpool_fwd.default, (x, 2))


class NoNormNet(nn.Module):
    """conv-ReLU-pool blocks without a norm (the fusion's case), a 3×3 window that overlaps and one that does
    not."""

    def __init__(self, ways=5):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * 2 * 2, ways)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 3, 2, 1)
        return self.head(x.flatten(1))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("order", ["second", "checkpoint", "first"])
def test_meta_step_through_the_rule(backend, order):
    torch.manual_seed(3)
    model = NoNormNet().double()
    graph = compile_model(model)
    fused = [n.rule for n in graph.nodes if isinstance(n.rule, ReLUMaxPool2dRule)]
    assert [r.pool.window for r in fused] == [2, None]
    tasks = classification_tasks(T=2, size=8, ways=5)
    check_meta_step(
        model, tasks, loss="cross_entropy", loss_fn=F.cross_entropy, inner_lr=0.3, steps=2, order=order, backend=backend
    )
