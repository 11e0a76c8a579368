"""Classifier-free guidance: exact combination, guidance interval per sample, one batched forward pass."""

from __future__ import annotations

import pytest
import torch

from dsr.diffusion.guidance import ClassifierFreeGuidance
from dsr.diffusion.samplers import ODESampler
from dsr.diffusion.transport import Transport

NUM_CLASSES, NULL = 3, 3
B, C, H, W = 4, 2, 3, 3


class ToyModel:
    """out = a[y] * x + t * b[y]: class-dependent (the null class has its own row), records batch sizes."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(NUM_CLASSES + 1, generator=g, dtype=torch.float64)
        self.b = torch.randn(NUM_CLASSES + 1, C, generator=g, dtype=torch.float64)
        self.batch_sizes = []

    def __call__(self, x, t, y):
        self.batch_sizes.append(x.shape[0])
        return self.a[y][:, None, None, None] * x + t[:, None, None, None] * self.b[y][:, :, None, None]

    def direct(self, x, t, y):
        """The same output, computed sample by sample without recording."""
        return torch.stack(
            [self.a[yi] * xi + ti * self.b[yi][:, None, None] for xi, ti, yi in zip(x, t, y, strict=True)]
        )


def _inputs(t):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    return x, torch.tensor(t, dtype=torch.float64), y


def test_scale_one_is_conditional_model():
    model, transport = ToyModel(), Transport()
    cfg = ClassifierFreeGuidance(scale=1.0)
    assert not cfg.active
    x, t, y = _inputs([0.2, 0.5, 0.7, 0.9])
    v = cfg.velocity_fn(model, y, NULL, transport)(x, t)
    assert torch.equal(v, model.direct(x, t, y))
    assert model.batch_sizes == [B]


def test_guided_inside_interval():
    model, transport, w = ToyModel(), Transport(), 4.0
    cfg = ClassifierFreeGuidance(scale=w, t_min=0.0, t_max=1.0)
    assert cfg.active
    x, t, y = _inputs([0.2, 0.5, 0.7, 1.0])
    v = cfg.velocity_fn(model, y, NULL, transport)(x, t)
    assert model.batch_sizes == [2 * B]  # one forward pass on the doubled batch
    v_c, v_u = model.direct(x, t, y), model.direct(x, t, torch.full_like(y, NULL))
    assert not torch.allclose(v_c, v_u)
    torch.testing.assert_close(v, v_u + w * (v_c - v_u), rtol=1e-12, atol=1e-12)


def test_outside_interval_is_conditional():
    model, transport = ToyModel(), Transport()
    cfg = ClassifierFreeGuidance(scale=3.0, t_min=0.3, t_max=0.6)
    x, t, y = _inputs([0.1, 0.2, 0.7, 0.95])
    v = cfg.velocity_fn(model, y, NULL, transport)(x, t)
    assert torch.equal(v, model.direct(x, t, y))


def test_interval_per_sample_inclusive():
    model, transport, w = ToyModel(), Transport(), 2.5
    cfg = ClassifierFreeGuidance(scale=w, t_min=0.3, t_max=0.6)
    x, t, y = _inputs([0.1, 0.3, 0.6, 0.9])  # out, in (lower edge), in (upper edge), out
    v = cfg.velocity_fn(model, y, NULL, transport)(x, t)
    v_c, v_u = model.direct(x, t, y), model.direct(x, t, torch.full_like(y, NULL))
    guided = v_u + w * (v_c - v_u)
    for i, inside in enumerate([False, True, True, False]):
        if inside:
            torch.testing.assert_close(v[i], guided[i], rtol=1e-12, atol=1e-12)
            assert not torch.allclose(v[i], v_c[i])
        else:
            assert torch.equal(v[i], v_c[i])


def test_x_prediction_converts_to_velocity():
    model, w, clamp = ToyModel(), 3.0, 0.05
    transport = Transport(prediction="x", x_pred_t_clamp=clamp)
    cfg = ClassifierFreeGuidance(scale=w, t_min=0.0, t_max=0.8)
    x, t, y = _inputs([0.01, 0.4, 0.8, 0.9])
    v = cfg.velocity_fn(model, y, NULL, transport)(x, t)

    def to_velocity(x_hat):
        return torch.stack([(xi - hi) / max(ti.item(), clamp) for xi, hi, ti in zip(x, x_hat, t, strict=True)])

    v_c = to_velocity(model.direct(x, t, y))
    v_u = to_velocity(model.direct(x, t, torch.full_like(y, NULL)))
    expected = torch.cat([(v_u + w * (v_c - v_u))[:3], v_c[3:]])
    torch.testing.assert_close(v, expected, rtol=1e-12, atol=1e-12)


def test_with_sampler_and_validation():
    model, transport = ToyModel(), Transport()
    cfg = ClassifierFreeGuidance(scale=2.0, t_min=0.2, t_max=0.8)
    sampler = ODESampler("heun", num_steps=6, t_end=0.001)
    x, _, y = _inputs([0.0] * B)
    out = sampler.integrate(cfg.velocity_fn(model, y, NULL, transport), x, shift=2.0)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert model.batch_sizes == [2 * B] * sampler.nfe()
    with pytest.raises(ValueError):
        ClassifierFreeGuidance(scale=2.0, t_min=0.7, t_max=0.3)


def test_guided_channels_guide_the_first_k_and_leave_the_rest_conditional():
    model, transport = ToyModel(), Transport(prediction="velocity")
    g = torch.Generator().manual_seed(4)
    x, t, y = (
        torch.randn(B, C, H, W, generator=g, dtype=torch.float64),
        torch.rand(B, dtype=torch.float64),
        torch.tensor([0, 1, 2, 0]),
    )
    v_c, v_u = model.direct(x, t, y), model.direct(x, t, torch.full_like(y, NULL))
    guided = ClassifierFreeGuidance(scale=3.0, guided_channels=1).velocity_fn(model, y, NULL, transport)(x, t)
    torch.testing.assert_close(guided[:, :1], (v_u + 3.0 * (v_c - v_u))[:, :1], rtol=0, atol=1e-12)
    torch.testing.assert_close(guided[:, 1:], v_c[:, 1:], rtol=0, atol=0)
    every = ClassifierFreeGuidance(scale=3.0).velocity_fn(model, y, NULL, transport)(x, t)
    torch.testing.assert_close(every, v_u + 3.0 * (v_c - v_u), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="guided_channels must be >= 1"):
        ClassifierFreeGuidance(guided_channels=0)
