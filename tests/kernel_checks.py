"""Helpers shared by the kernel tests: the device, tolerances, random BatchNorm cases with strided
gradient outputs, and meta_step with a named backend."""

import torch

import fastmaml

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float64]


def assert_close(got, want, dtype, what, scale=1.0):
    """‖got − want‖ within TOL of max(‖want‖, scale, 1); `scale` for gradients of the normalization:
    r·‖gy‖, the size of the terms that cancel when a channel has one element (x̂ = 0, r = 1/√eps)."""
    assert (got is None) == (want is None), what
    if want is None:
        return
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape)
    err = float((got.double() - want.double()).norm())
    assert err <= TOL[dtype] * max(float(want.double().norm()), scale, 1.0), (what, err)


class Case:
    """Random inputs of one case: activations `[T, N, C, S]`, per-channel weights as views into a flat
    `[T, P]` buffer (per task), `[C]` (common) or None, and NaN-filled strided gradient outputs."""

    def __init__(self, T, N, C, S, weights, dtype, seed=0):
        self.g = torch.Generator().manual_seed(seed + T + N + C + S)
        self.T, self.C, self.dtype, self.shape = T, C, dtype, (T, N, C, S)
        self.weights = weights
        self.x = self.act() * 2 + 3  # a mean far from 0 (the variance's shift)

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.g, dtype=torch.float64).to(DEVICE, self.dtype)

    def act(self):
        return self.randn(*self.shape)

    def channel(self, per_task=None):
        """A per-channel vector in this case's weights form (or `per_task`: True -> `[T, C]` view)."""
        form = self.weights if per_task is None else ("task" if per_task else None)
        if form == "task":
            return self.randn(self.T, 2 * self.C + 1)[:, 1::2]  # non-contiguous view of a flat buffer
        return self.randn(self.C) + 1 if form == "common" else None

    def outs(self, k):
        """k (output, reference output) pairs `[T, C]`, NaN-filled: even ones are column blocks of a flat
        `[T, P]` buffer (returned too), odd ones transposed `[C, T]` tensors."""
        T, C = self.T, self.C
        flat = torch.full((T, k * (C + 1) + 1), float("nan"), dtype=self.dtype, device=DEVICE)
        views = [
            flat[:, 1 + i * (C + 1) : 1 + i * (C + 1) + C]
            if i % 2 == 0
            else torch.full((C, T), float("nan"), dtype=self.dtype, device=DEVICE).t()
            for i in range(k)
        ]
        return [(v, v.clone()) for v in views], flat

    def stats(self, batch):
        return (None, None) if batch else (self.randn(self.C) * 2 + 3, self.randn(self.C).abs() + 0.5)


def check_outs(pairs, flat, dtype):
    """Each given output as its reference, and nothing written into `flat` outside them."""
    for i, (got, want) in enumerate(pairs):
        if got is not None:
            assert_close(got, want, dtype, f"out {i}")
            got.fill_(float("nan"))
    assert torch.isnan(flat).all()


def directions(case, w, i):
    """ẋ, ẇ, ḃ for variant i: all given, no ẋ (no adapted parameter upstream), only ẋ (shared affine)."""
    xd = None if i == 1 else case.act()
    if i == 2 or w is None:
        return xd, None, None
    return xd, case.channel(per_task=True), case.channel(per_task=True)


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def run(model, tasks, backend, *, loss, inner_lr, steps, order):
    model.zero_grad()
    res = fastmaml.meta_step(model, tasks, inner_lr=inner_lr, steps=steps, order=order, loss=loss, backend=backend)
    return res, grads_of(model)
