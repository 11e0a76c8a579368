"""Transport: interpolation, loss and time sampling against independent float64 / scipy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from dsr.diffusion.transport import (
    Transport,
    resolution_shift,
    sample_logit_normal,
    score_from_velocity,
    time_shift,
)

B, C, H, W = 4, 3, 5, 6


def _batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, C, H, W))
    noise = rng.standard_normal((B, C, H, W))
    t = np.array([0.01, 0.03, 0.4, 0.9])  # two below the x-prediction clamp of 0.05
    y = np.array([0, 2, 1, 2])
    return x, noise, t, y


class LinearModel:
    """A fixed per-pixel linear map over channels plus a t- and class-dependent bias."""

    def __init__(self, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.weight = rng.standard_normal((C, C)) / math.sqrt(C)
        self.class_bias = rng.standard_normal((3, C))

    def numpy(self, x_t, t, y):
        out = np.zeros_like(x_t)
        for b in range(x_t.shape[0]):
            for o in range(C):
                out[b, o] = sum(self.weight[o, c] * x_t[b, c] for c in range(C))
                out[b, o] += t[b] + self.class_bias[y[b], o]
        return out

    def __call__(self, x_t, t, y):
        w = torch.as_tensor(self.weight, dtype=x_t.dtype)
        bias = torch.as_tensor(self.class_bias, dtype=x_t.dtype)[y]
        return torch.einsum("oc,bchw->bohw", w, x_t) + (t[:, None] + bias)[:, :, None, None]


def test_interpolate_and_target():
    x, noise, t, _ = _batch()
    tr = Transport()
    x_t = tr.interpolate(torch.from_numpy(x), torch.from_numpy(noise), torch.from_numpy(t))
    for b in range(B):
        np.testing.assert_allclose(x_t[b].numpy(), (1 - t[b]) * x[b] + t[b] * noise[b], rtol=1e-12)
    u = tr.target_velocity(torch.from_numpy(x), torch.from_numpy(noise))
    np.testing.assert_allclose(u.numpy(), noise - x, rtol=1e-12)
    # u is the time derivative of the interpolation.
    eps = 1e-6
    x_t2 = tr.interpolate(torch.from_numpy(x), torch.from_numpy(noise), torch.from_numpy(t + eps))
    np.testing.assert_allclose(((x_t2 - x_t) / eps).numpy(), noise - x, atol=1e-6)


@pytest.mark.parametrize("prediction", ["velocity", "x"])
def test_training_loss_matches_reference(prediction):
    x, noise, t, y = _batch()
    model = LinearModel()
    clamp = 0.05
    tr = Transport(prediction=prediction, x_pred_t_clamp=clamp)
    out = tr.training_loss(
        model, torch.from_numpy(x), torch.from_numpy(y), noise=torch.from_numpy(noise), t=torch.from_numpy(t)
    )

    x_t = np.stack([(1 - t[b]) * x[b] + t[b] * noise[b] for b in range(B)])
    raw = model.numpy(x_t, t, y)
    if prediction == "velocity":
        v = raw
    else:
        v = np.stack([(x_t[b] - raw[b]) / max(t[b], clamp) for b in range(B)])
    loss_map = ((v - (noise - x)) ** 2).mean(axis=1)

    assert out.loss_map.shape == (B, H, W)
    assert out.t.shape == (B,)
    np.testing.assert_allclose(out.pred_velocity.numpy(), v, rtol=1e-10)
    np.testing.assert_allclose(out.loss_map.numpy(), loss_map, rtol=1e-10)
    np.testing.assert_allclose(out.loss.item(), loss_map.mean(), rtol=1e-10)

    if prediction == "x":
        # The clamp changes exactly the samples with t < clamp.
        unclamped = np.stack([(x_t[b] - raw[b]) / t[b] for b in range(B)])
        for b in range(B):
            same = np.allclose(out.pred_velocity[b].numpy(), unclamped[b], rtol=1e-10)
            assert same == (t[b] >= clamp)


def test_training_loss_float32_and_float64_agree():
    x, noise, t, y = _batch(3)
    tr = Transport(prediction="x")
    args = dict(noise=torch.from_numpy(noise), t=torch.from_numpy(t))
    out64 = tr.training_loss(LinearModel(), torch.from_numpy(x), torch.from_numpy(y), **args)
    args32 = {k: v.float() for k, v in args.items()}
    out32 = tr.training_loss(LinearModel(), torch.from_numpy(x).float(), torch.from_numpy(y), **args32)
    assert out32.loss.dtype == torch.float32 and out32.t.dtype == torch.float32
    np.testing.assert_allclose(out32.loss.item(), out64.loss.item(), rtol=1e-5)


def test_training_loss_draws_noise_and_time():
    tr = Transport(t_max=0.999)
    x = torch.randn(64, 4, 2, 2)
    y = torch.zeros(64, dtype=torch.long)
    lin = torch.nn.Conv2d(4, 4, 1)
    model = lambda x_t, t, y: lin(x_t)  # noqa: E731

    a = tr.training_loss(model, x, y, generator=torch.Generator().manual_seed(5))
    b = tr.training_loss(model, x, y, generator=torch.Generator().manual_seed(5))
    c = tr.training_loss(model, x, y, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.t, b.t) and torch.equal(a.loss, b.loss)
    assert not torch.equal(a.t, c.t)
    assert a.t.dtype == x.dtype and a.t.device == x.device
    assert (a.t >= 0).all() and (a.t <= 1).all()
    a.loss.backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_invalid_options():
    with pytest.raises(ValueError, match="velocity"):
        Transport(prediction="eps")
    with pytest.raises(ValueError, match="logit_normal"):
        Transport(time_dist="beta")
    for bad in (0.0, -2.0):
        with pytest.raises(ValueError, match="shift"):
            time_shift(torch.tensor([0.5]), bad)


def test_score_from_velocity_gaussian():
    # Data N(mu, s^2): x_t ~ N((1 - t) mu, V), V = (1 - t)^2 s^2 + t^2, so the score is -(x_t - m) / V.
    mu, s = 0.7, 0.4
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    x_t = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    var = (1 - t) ** 2 * s**2 + t**2
    v = -mu + (t - (1 - t) * s**2) / var * (x_t - (1 - t) * mu)
    torch.testing.assert_close(score_from_velocity(v, x_t, t), -(x_t - (1 - t) * mu) / var)


def test_time_shift_closed_form():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for s in (1.0, 2.5, math.sqrt(48)):
        shifted = time_shift(t, s)
        ref = np.array([s * ti / (1 + (s - 1) * ti) for ti in t.tolist()])
        np.testing.assert_allclose(shifted.numpy(), ref, rtol=1e-12, atol=0)
        assert shifted[0] == 0 and shifted[-1] == 1
        assert (shifted.diff() > 0).all()
        assert (shifted[1:-1] >= t[1:-1]).all()  # pushes toward noise
    assert torch.equal(time_shift(t, 1.0), t)
    # Latents smaller than the base dimension give s < 1: still a bijection, now toward data.
    shifted = time_shift(t, resolution_shift((48, 8, 8)))
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted.diff() > 0).all()
    assert (shifted[1:-1] < t[1:-1]).all()


def test_time_shift_cdf():
    # Shifting uniform t gives CDF F(t') = t' / (s - (s - 1) t'), the inverse map of time_shift.
    s = 3.0
    tr = Transport(time_dist="uniform", t_min=0.0, t_max=1.0, shift=s)
    t = tr.sample_time(50_000, (4, 8, 8), generator=torch.Generator().manual_seed(0)).double().numpy()
    cdf = lambda q: q / (s - (s - 1) * q)  # noqa: E731
    assert stats.kstest(t, cdf).pvalue > 1e-3
    assert stats.kstest(t, stats.uniform.cdf).pvalue < 1e-6  # the test can tell shifted from unshifted


def test_resolution_shift():
    assert resolution_shift((768, 16, 16)) == pytest.approx(math.sqrt(48))
    assert resolution_shift((4, 32, 32), base_dim=4096) == pytest.approx(1.0)
    assert Transport().shift_for((1152, 16, 16)) == pytest.approx(math.sqrt(72))
    assert Transport(shift_dim=196608).shift_for((1152, 16, 16)) == pytest.approx(math.sqrt(48))
    assert Transport(shift=2.0, shift_dim=196608).shift_for((1152, 16, 16)) == 2.0


def _truncated_logit_normal_cdf(q, mean, std, t_min, t_max):
    a, b = (math.log(t_min / (1 - t_min)) - mean) / std, (math.log(t_max / (1 - t_max)) - mean) / std
    z = (np.log(q / (1 - q)) - mean) / std
    return np.clip((stats.norm.cdf(z) - stats.norm.cdf(a)) / (stats.norm.cdf(b) - stats.norm.cdf(a)), 0, 1)


def test_sample_logit_normal_distribution():
    mean, std, t_min, t_max = 0.3, 1.2, 0.1, 0.8
    t = sample_logit_normal(40_000, mean, std, t_min, t_max, torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and t.shape == (40_000,)
    assert t.min() >= t_min and t.max() <= t_max
    t = t.double().numpy()
    assert stats.kstest(t, lambda q: _truncated_logit_normal_cdf(q, mean, std, t_min, t_max)).pvalue > 1e-3
    # Power check: the untruncated distribution is rejected.
    untruncated = lambda q: stats.norm.cdf((np.log(q / (1 - q)) - mean) / std)  # noqa: E731
    assert stats.kstest(t, untruncated).pvalue < 1e-6


def test_sample_logit_normal_open_lower_bound_and_reproducible():
    g = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    a = sample_logit_normal(1000, 0.0, 1.0, 0.0, 0.999, g(1))
    assert torch.equal(a, sample_logit_normal(1000, 0.0, 1.0, 0.0, 0.999, g(1)))
    assert not torch.equal(a, sample_logit_normal(1000, 0.0, 1.0, 0.0, 0.999, g(2)))
    assert torch.isfinite(a).all() and a.min() >= 0 and a.max() <= 0.999


def test_shifted_logit_normal_quantiles():
    tr = Transport(t_max=0.999)
    t = tr.sample_time(200_000, (768, 16, 16), generator=torch.Generator().manual_seed(0))
    q = torch.quantile(t.double(), torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64))
    np.testing.assert_allclose(q.numpy(), [0.572, 0.779, 0.874, 0.932, 0.973], atol=0.01)
    assert t.max() <= time_shift(torch.tensor(0.999), math.sqrt(48))


def test_loss_masking_drops_high_norm_tokens_per_sample():
    """Loss masking (tau on the clean latent's per-token norm) against a loop over samples and tokens."""
    x, noise, t, y = _batch(3)
    x[0, :, 1, 2] *= 40  # planted outliers: two tokens of sample 0, one of sample 2
    x[0, :, 4, 0] *= 40
    x[2, :, 0, 0] *= 40
    x[3] *= 40  # every token of sample 3: an empty mask must not divide by zero
    tau = 10.0
    out = Transport(prediction="velocity", mask_norm_threshold=tau).training_loss(
        LinearModel(), torch.from_numpy(x), torch.from_numpy(y), noise=torch.from_numpy(noise), t=torch.from_numpy(t)
    )
    loss_map = out.loss_map.numpy()
    norms = np.sqrt((x**2).sum(axis=1))
    per_sample, dropped = [], 0
    for b in range(B):
        kept = [loss_map[b, i, j] for i in range(H) for j in range(W) if norms[b, i, j] <= tau]
        dropped += H * W - len(kept)
        per_sample.append(sum(kept) / max(1, len(kept)))
    assert dropped == 3 + H * W
    np.testing.assert_allclose(out.masked_fraction.item(), dropped / (B * H * W), rtol=1e-12)
    np.testing.assert_allclose(out.loss.item(), np.mean(per_sample), rtol=1e-10)
    # Without a threshold nothing is masked and the loss is the plain mean.
    plain = Transport(prediction="velocity").training_loss(
        LinearModel(), torch.from_numpy(x), torch.from_numpy(y), noise=torch.from_numpy(noise), t=torch.from_numpy(t)
    )
    assert plain.masked_fraction is None
    np.testing.assert_allclose(plain.loss.item(), loss_map.mean(), rtol=1e-10)
