"""Classifier-free guidance: exact combination, guidance interval per sample, one batched forward pass."""

from __future__ import annotations

import pytest
import torch

from dsr.diffusion.guidance import ClassifierFreeGuidance
from dsr.diffusion.samplers import ODESampler, time_grid
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
    # The unconditional half runs only on steps inside [0.2, 0.8]: Heun evaluates at t_i and t_{i+1} of every step.
    grid = time_grid(6, 2.0, 0.001).tolist()
    times = [t for t_cur, t_next in zip(grid[:-1], grid[1:], strict=True) for t in (t_cur, t_next)]
    assert model.batch_sizes == [2 * B if 0.2 <= t <= 0.8 else B for t in times]
    assert B in model.batch_sizes and 2 * B in model.batch_sizes and len(times) == sampler.nfe() == sampler.last_nfe
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


# ------------------------------------------------------------------------------------------------------------------
# AutoGuidance
# ------------------------------------------------------------------------------------------------------------------


def _autoguidance(scale, guide_model, guide_transport, **interval):
    from dsr.diffusion.guidance import AutoGuidance, Guide

    guidance = AutoGuidance("unused.ckpt", scale=scale, **interval)
    guidance.attach(Guide(model=guide_model, transport=guide_transport))
    return guidance


class ShiftedToy(ToyModel):
    """Another toy network (a weaker guide): other coefficients."""

    def __init__(self):
        super().__init__()
        self.a, self.b = 0.5 * self.a + 0.1, self.b - 0.3


def test_autoguidance_is_the_hand_computation_with_each_model_once_on_the_batch():
    main, guide, transport = ToyModel(), ShiftedToy(), Transport(prediction="velocity")
    guide_transport = Transport(prediction="x", x_pred_t_clamp=0.05)  # another prediction type: its own velocity
    x, t, y = _inputs([0.01, 0.4, 0.8, 0.9])
    v = _autoguidance(2.5, guide, guide_transport, t_min=0.0, t_max=0.85).velocity_fn(main, y, NULL, transport)(x, t)
    v_main = main.direct(x, t, y)
    x_guide = guide.direct(x, t, y)  # the same labels, no null class
    v_guide = torch.stack([(xi - gi) / max(ti.item(), 0.05) for xi, gi, ti in zip(x, x_guide, t, strict=True)])
    expected = torch.cat([(v_guide + 2.5 * (v_main - v_guide))[:3], v_main[3:]])
    torch.testing.assert_close(v, expected, rtol=1e-12, atol=1e-12)
    assert main.batch_sizes == [B] and guide.batch_sizes == [3]  # the guide only on the rows inside the interval

    sampler = ODESampler("euler", num_steps=5, t_end=0.001)
    main.batch_sizes, guide.batch_sizes = [], []
    _ = sampler.integrate(_autoguidance(2.5, guide, guide_transport).velocity_fn(main, y, NULL, transport), x, 1.0)
    assert main.batch_sizes == [B] * 4 and guide.batch_sizes == [B] * 4  # once each per step, never a doubled batch


def test_autoguidance_scale_one_and_guide_equal_to_main_are_the_main_model():
    main, transport = ToyModel(), Transport()
    x, t, y = _inputs([0.2, 0.5, 0.7, 0.9])
    v_main = main.direct(x, t, y)
    unit = _autoguidance(1.0, ShiftedToy(), transport).velocity_fn(main, y, NULL, transport)(x, t)
    assert torch.equal(unit, v_main) and main.batch_sizes == [B]
    for scale in (0.0, 1.7, 4.0):
        same = _autoguidance(scale, ToyModel(), transport).velocity_fn(main, y, NULL, transport)(x, t)
        torch.testing.assert_close(same, v_main, rtol=1e-12, atol=1e-12)


def test_autoguidance_needs_its_guide_loaded():
    from dsr.diffusion.guidance import AutoGuidance

    x, t, y = _inputs([0.5] * B)
    with pytest.raises(RuntimeError, match="not loaded"):
        AutoGuidance("guide.ckpt", scale=2.0).velocity_fn(ToyModel(), y, NULL, Transport())(x, t)


def test_cfg_outside_its_interval_runs_the_conditional_forward_alone():
    model, transport = ToyModel(), Transport()
    x, t, y = _inputs([0.05, 0.06, 0.07, 0.08])
    v = ClassifierFreeGuidance(scale=3.0, t_min=0.1, t_max=1.0).velocity_fn(model, y, NULL, transport)(x, t)
    assert torch.equal(v, model.direct(x, t, y)) and model.batch_sizes == [B]
    model.batch_sizes = []
    x, t, y = _inputs([0.05, 0.5, 0.07, 0.9])  # two rows inside: the doubled part is those two
    v = ClassifierFreeGuidance(scale=3.0, t_min=0.1, t_max=1.0).velocity_fn(model, y, NULL, transport)(x, t)
    assert model.batch_sizes == [B + 2]
    v_c, v_u = model.direct(x, t, y), model.direct(x, t, torch.full_like(y, NULL))
    expected = torch.where(torch.tensor([False, True, False, True])[:, None, None, None], v_u + 3.0 * (v_c - v_u), v_c)
    torch.testing.assert_close(v, expected, rtol=1e-12, atol=1e-12)


def test_the_whole_interval_guides_without_reading_the_times_back(monkeypatch):
    # On a GPU, checking which times lie in the interval reads a flag back (a host sync) every evaluation; the default
    # interval, [0, 1] closed, covers every time, so the check is skipped. Narrower intervals keep it.
    from dsr.diffusion.guidance import AutoGuidance, Guide

    w = 2.5
    x, t, y = _inputs([0.0, 0.5, 0.7, 1.0])
    expected = {}
    for cls in (ClassifierFreeGuidance, AutoGuidance):
        for t_min, t_max, include in ((0.0, 1.0, True), (-0.1, 1.0, True), (0.0, 1.0, False), (0.1, 1.0, True)):
            guidance = cls(scale=w, t_min=t_min, t_max=t_max, include_t_min=include, include_t_max=include,
                           **({"guide_ckpt": "unused"} if cls is AutoGuidance else {}))  # fmt: skip
            if cls is AutoGuidance:
                weaker = ToyModel()
                weaker.a = 0.5 * weaker.a  # a guide that differs from the main model
                guidance.attach(Guide(weaker, Transport()))
            assert guidance.whole_interval == (include and t_min <= 0.0)
            fn = guidance.velocity_fn(ToyModel(), y, NULL, Transport())
            reference = fn(x, t)  # the interval checked per sample (a t on an open end is not guided)
            if guidance.whole_interval:
                monkeypatch.setattr(type(guidance), "inside", lambda self, t: pytest.fail("the times were checked"))
                torch.testing.assert_close(fn(x, t), reference, rtol=0, atol=0)
                monkeypatch.undo()
            expected[(cls.__name__, t_min, include)] = reference
    # the whole interval guides every row; the open one leaves the rows at t = 0 and t = 1 conditional
    for name in ("ClassifierFreeGuidance", "AutoGuidance"):
        closed, opened = expected[(name, 0.0, True)], expected[(name, 0.0, False)]
        assert torch.equal(closed[1:3], opened[1:3]) and not torch.allclose(closed[0], opened[0])
