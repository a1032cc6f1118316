"""The black-box meta-learners (fastmaml.blackbox): shapes, invariance to the order of the support set,
independence of the queries from each other, clear errors, and learning on a tiny problem."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastmaml.blackbox import NeuralProcess, SnailClassifier


def test_neural_process_shapes_and_support_order():
    torch.manual_seed(0)
    model = NeuralProcess(x_dim=2, y_dim=3, hidden=16, heads=4).double()
    sx, sy, qx = torch.randn(4, 7, 2).double(), torch.randn(4, 7, 3).double(), torch.randn(4, 5, 2).double()
    mean, std = model(sx, sy, qx)
    assert mean.shape == std.shape == (4, 5, 3) and (std > 0).all()
    perm = torch.randperm(7)
    mean_p, std_p = model(sx[:, perm], sy[:, perm], qx)
    torch.testing.assert_close(mean_p, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(std_p, std, rtol=1e-12, atol=1e-12)
    # a query's prediction depends on its own x only (not on the other queries)
    torch.testing.assert_close(model(sx, sy, qx[:, :2])[0], mean[:, :2], rtol=1e-12, atol=1e-12)
    # the tasks are independent
    torch.testing.assert_close(model(sx[1:2], sy[1:2], qx[1:2])[0], mean[1:2], rtol=1e-12, atol=1e-12)
    nll = model.nll(sx, sy, qx, torch.zeros(4, 5, 3).double())
    want = (torch.log(std) + 0.5 * (mean / std) ** 2).mean() + 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(nll, want)


def test_snail_shapes_support_order_and_query_independence():
    torch.manual_seed(1)
    model = SnailClassifier(1, ways=3, hidden=4, image_size=16, d_model=8, heads=2, layers=2).double().eval()
    sx, qx = torch.randn(2, 6, 1, 16, 16).double(), torch.randn(2, 4, 1, 16, 16).double()
    sy = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 1, 1, 0, 0]])
    logits = model(sx, sy, qx)
    assert logits.shape == (2, 4, 3)
    perm = torch.randperm(6)
    torch.testing.assert_close(model(sx[:, perm], sy[:, perm], qx), logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model(sx, sy, qx[:, 1:3]), logits[:, 1:3], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model(sx[1:], sy[1:], qx[1:]), logits[1:], rtol=1e-10, atol=1e-10)
    # the labels matter: swapping two classes' labels swaps their logits
    swapped = torch.where(sy == 0, 1, torch.where(sy == 1, 0, sy))
    assert not torch.allclose(model(sx, swapped, qx), logits)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: NeuralProcess(hidden=10, heads=4), "hidden: expected a multiple of heads=4"),
        (lambda: NeuralProcess(x_dim=0), "x_dim: expected a positive int"),
        (lambda: SnailClassifier(1, 5, image_size=8), "image_size: four 2×2 max-poolings"),
        (lambda: SnailClassifier(1, 5, d_model=10, heads=4), "d_model: expected a multiple of heads=4"),
        (lambda: SnailClassifier(1, ways=True), "ways: expected a positive int"),
    ],
)
def test_bad_arguments_name_the_argument(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_neural_process_learns_tiny_linear_tasks():
    """Tasks y = a·x with a random slope a per task: from 5 support points the process predicts the query
    far better than the best constant (the prior mean), after a few hundred Adam steps."""
    torch.manual_seed(2)
    model = NeuralProcess(hidden=16, heads=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def tasks(n):
        a = torch.rand(n, 1, 1) * 4 - 2
        x = torch.rand(n, 10, 1) * 2 - 1
        return x[:, :5], a * x[:, :5], x[:, 5:], a * x[:, 5:]

    for _ in range(300):
        sx, sy, qx, qy = tasks(16)
        opt.zero_grad()
        model.nll(sx, sy, torch.cat([sx, qx], 1), torch.cat([sy, qy], 1)).backward()
        opt.step()
    sx, sy, qx, qy = tasks(200)
    with torch.no_grad():
        mse = F.mse_loss(model(sx, sy, qx)[0], qy)
    assert mse < 0.2 * qy.pow(2).mean(), float(mse)


def test_snail_learns_tiny_episodes():
    """Two-way episodes whose two classes are new random coarse patterns (2×2 blocks) in every episode, seen
    with noise; the labels are arbitrary per episode, so only reading the support (image, label) pairs solves
    them (chance: 50%)."""
    torch.manual_seed(3)
    model = SnailClassifier(1, ways=2, hidden=8, image_size=16, d_model=16, heads=2, layers=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def episodes(n):
        protos = F.interpolate(torch.randn(n * 2, 1, 2, 2), size=16).view(n, 2, 1, 16, 16)
        sy = torch.stack([torch.randperm(2) for _ in range(n)])
        qy = torch.randint(0, 2, (n, 4))
        noisy = lambda y: protos[torch.arange(n)[:, None], y] + 0.1 * torch.randn(n, y.shape[1], 1, 16, 16)  # noqa: E731
        return noisy(sy), sy, noisy(qy), qy

    for _ in range(250):
        sx, sy, qx, qy = episodes(16)
        opt.zero_grad()
        F.cross_entropy(model(sx, sy, qx).flatten(0, 1), qy.flatten()).backward()
        opt.step()
    sx, sy, qx, qy = episodes(100)
    with torch.no_grad():
        accuracy = (model(sx, sy, qx).argmax(-1) == qy).float().mean()
    assert accuracy > 0.8, float(accuracy)
