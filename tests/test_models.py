"""The ready-made few-shot networks: structure, output shapes, and an exact meta-gradient through them."""

import pytest
import torch
from torch import nn

import fastmaml
from fastmaml.models import conv4, omniglot_mlp, vit

from oracle import autograd_meta_grad, rel_err


@pytest.mark.parametrize("channels, size, hidden, features", [(1, 28, 64, 64), (3, 84, 32, 32 * 25), (1, 16, 8, 8)])
def test_conv4_shapes_and_layers(channels, size, hidden, features):
    model = conv4(channels, 5, hidden=hidden, image_size=size)
    assert isinstance(model, nn.Sequential)
    kinds = [type(m) for m in model]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d] * 4 + [nn.Flatten, nn.Linear]
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.out_channels == hidden for c in convs)
    assert convs[0].in_channels == channels and model[-1].in_features == features
    assert model(torch.rand(7, channels, size, size)).shape == (7, 5)


def test_conv4_norms():
    group = conv4(1, 5, hidden=8, image_size=16, norm="group", groups=2)
    assert [type(m) for m in group][:4] == [nn.Conv2d, nn.GroupNorm, nn.ReLU, nn.MaxPool2d]
    assert all(m.num_groups == 2 and m.num_channels == 8 for m in group if isinstance(m, nn.GroupNorm))
    plain = conv4(1, 5, hidden=8, image_size=16, norm="none")
    assert [type(m) for m in plain][:3] == [nn.Conv2d, nn.ReLU, nn.MaxPool2d]
    for model in (group, plain):
        assert fastmaml.explain(model, "cross_entropy").program == "fused"
        assert model(torch.rand(2, 1, 16, 16)).shape == (2, 5)


def test_omniglot_mlp_shapes_and_layers():
    model = omniglot_mlp(20)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 256), (256, 128), (128, 64), (64, 64), (64, 20)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model) == 4 and sum(isinstance(m, nn.ReLU) for m in model) == 4
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 20)


def test_bad_arguments():
    with pytest.raises(ValueError, match="image_size"):
        conv4(1, 5, image_size=12)
    with pytest.raises(ValueError, match="num_classes"):
        conv4(1, 0)
    with pytest.raises(ValueError, match="hidden"):
        conv4(1, 5, hidden=2.5)
    with pytest.raises(ValueError, match="num_classes"):
        omniglot_mlp(True)
    with pytest.raises(ValueError, match="norm: expected one of"):
        conv4(1, 5, norm="layer")
    with pytest.raises(ValueError, match="groups: expected a divisor of hidden=64, got 5"):
        conv4(1, 5, norm="group", groups=5)


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: conv4(1, 3, hidden=4, image_size=16), (1, 16, 16)),
        (lambda: conv4(1, 3, hidden=4, image_size=16, norm="group", groups=2), (1, 16, 16)),
        (lambda: omniglot_mlp(3, in_features=36), (1, 6, 6)),
        (lambda: vit(3, image_size=8, patch=4, dim=4, depth=2, heads=2, in_channels=1), (1, 8, 8)),
    ],
)
def test_meta_gradient_matches_autograd(make, shape):
    torch.manual_seed(0)
    model = make().double()
    T, ways = 2, 3
    y = torch.arange(ways).repeat(2).expand(T, -1).contiguous()
    tasks = fastmaml.TaskBatch(
        torch.rand(T, 2 * ways, *shape, dtype=torch.float64), y, torch.rand(T, 2 * ways, *shape, dtype=torch.float64), y
    )
    result = fastmaml.meta_step(model, tasks, inner_lr=0.3, steps=2, loss="cross_entropy")
    loss, ref, _ = autograd_meta_grad(model, tasks, inner_lr=0.3, steps=2, loss_fn=torch.nn.functional.cross_entropy)
    assert abs(float(result.meta_loss) - float(loss)) < 1e-10
    got = torch.cat([p.grad.reshape(-1) for _, p in model.named_parameters()])
    want = torch.cat([ref[n].reshape(-1) for n, _ in model.named_parameters()])
    assert rel_err(got, want) < 1e-8


def test_resnet12_shapes_and_fused_graph():
    from fastmaml.models import resnet12

    model = resnet12(5, widths=(4, 5, 6, 7))
    assert model(torch.rand(2, 3, 84, 84)).shape == (2, 5)
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 5)
    e = fastmaml.explain(model, "cross_entropy")
    assert e.program == "fused"
    assert sum("BatchNorm2d+LeakyReLU" in line for line in e.layers) == 8  # two per block
    assert sum("(add)" in line for line in e.layers) == 4
    with pytest.raises(ValueError, match="widths: expected 4"):
        resnet12(5, widths=(4, 5))


def test_resnet12_meta_gradient_matches_the_oracle():
    from fastmaml.models import resnet12

    from models import classification_tasks

    torch.manual_seed(0)
    model = resnet12(3, widths=(2, 3, 2, 3), in_channels=1).double()
    tasks = classification_tasks(T=2, ways=3, shots=2, query=1, size=16)
    model.zero_grad()
    fastmaml.meta_step(model, tasks, inner_lr=0.1, steps=1, loss="cross_entropy")
    _, ref, _ = autograd_meta_grad(model, tasks, inner_lr=0.1, steps=1, loss_fn=torch.nn.functional.cross_entropy)
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert rel_err(got, torch.cat([ref[n].reshape(-1) for n, _ in model.named_parameters()])) < 1e-9


def test_vit_shapes_fused_graph_and_bad_arguments():
    model = vit(5, image_size=16, patch=4, dim=8, depth=1, heads=2, dropout=0.1)
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 5)
    e = fastmaml.explain(model, "cross_entropy")
    assert e.program == "fused" and sum("Dropout" in line for line in e.layers) == 4
    for kwargs, what in (({"patch": 5}, "patch"), ({"heads": 3}, "heads"), ({"dropout": 1.0}, "dropout")):
        with pytest.raises(ValueError, match=what):
            vit(5, image_size=16, dim=8, **{"patch": 4, **kwargs})
