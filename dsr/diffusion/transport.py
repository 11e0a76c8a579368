"""Rectified-flow transport: the interpolation, training-time sampling of t and the flow-matching loss.

Time convention (RAE and the DSR release): t = 0 is data and t = 1 is pure noise,

    x_t = (1 - t) * x + t * noise,        u = dx_t / dt = noise - x.

The network either predicts the velocity u directly ("velocity", RAE) or the clean latent x
("x", the DSR release and JiT), which is turned into a velocity before the loss so both train on the same
velocity-space objective. `noise_scale` s (JiT: 2 at 512 px) makes the noise s * N(0, I): x_t = (1 - t) x + t s eps.

The time interval [t_min, t_max] is one setting for training and sampling, as in both reference codes: training
draws t on it (then shifts), and the samplers' grid runs from t = 1 down to 1 - t_max (then shifts). Its default
follows the prediction type as the references do: the DSR release zeroes its epsilons for x-prediction, so
[0, 1] and the last grid point is t = 0 (the final Euler step lands on the model's clean prediction); RAE (velocity)
caps t_max at 1 - 1/1000, so [0, 0.999] and the grid ends at shift(0.001).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

PREDICTIONS = ("velocity", "x")
TIME_DISTS = ("logit_normal", "uniform")
# The references' interval end per prediction type (see the module docstring).
REFERENCE_T_MAX = {"x": 1.0, "velocity": 0.999}


def _bcast(t: Tensor, x: Tensor) -> Tensor:
    """Reshape per-sample times [B] so they broadcast against x [B, ...]."""
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def time_shift(t: Tensor, shift: float) -> Tensor:
    """Shift times toward noise: t' = s t / (1 + (s - 1) t), with t' = 0 at 0 and t' = 1 at 1.

    Higher-dimensional latents keep more signal at a given noise level, so larger `shift` spends more
    of the schedule at high noise. `shift` = 1 is the identity; any s > 0 is a monotone bijection of
    [0, 1], and s < 1 (latents smaller than `base_dim`, e.g. the 48x8x8 quickstart) pushes toward data.
    """
    if shift <= 0.0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * t / (1.0 + (shift - 1.0) * t)


def resolution_shift(latent_shape: Sequence[int], base_dim: int = 4096) -> float:
    """The dimension-dependent shift sqrt(C * H * W / base_dim); (768, 16, 16) -> sqrt(48) ~ 6.93.

    `latent_shape` is (C, H, W) without the batch dimension.
    """
    # Computed from the actual latent shape. The release hard-codes SigLIP2-B's dimension (196608) for
    # So400M as well; we do not, but Transport's `shift_dim` lets users mimic it.
    return math.sqrt(math.prod(latent_shape) / base_dim)


def sample_logit_normal(
    n: int,
    mean: float,
    std: float,
    t_min: float,
    t_max: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw n times [n] with logit(t) ~ N(mean, std^2) truncated to [logit(t_min), logit(t_max)].

    Sampled exactly by inverse CDF (no rejection), in float64 so the tails near t_max survive, and
    returned as float32.
    """
    f64 = dict(dtype=torch.float64, device=device)
    bounds = torch.logit(torch.tensor([t_min, t_max], **f64))  # t_min = 0 gives -inf, which ndtr maps to 0
    cdf_lo, cdf_hi = torch.special.ndtr((bounds - mean) / std)
    u = cdf_lo + (cdf_hi - cdf_lo) * torch.rand(n, generator=generator, **f64)
    t = torch.sigmoid(mean + std * torch.special.ndtri(u))
    return t.clamp(t_min, t_max).float()


def interpolate(x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x + t noise for x, noise [B, ...] and t [B]."""
    t = _bcast(t, x)
    return (1.0 - t) * x + t * noise


def score_from_velocity(v: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """The score grad log p_t(x_t) implied by a velocity v [B, ...] at times t [B] (valid for t > 0).

    With x = noise - v and x_t = (1 - t) x + t noise, E[noise | x_t] = x_t + (1 - t) v, and for a
    Gaussian noising kernel of std t the score is -E[noise | x_t] / t.
    """
    t = _bcast(t, x_t)
    return -(x_t + (1.0 - t) * v) / t


@dataclass
class LossOutput:
    """The flow-matching loss and what the training loop logs from it."""

    loss: Tensor  # scalar: loss_map.mean(), or the per-sample mean over kept tokens when masking
    loss_map: Tensor  # [B, H, W], squared velocity error averaged over channels
    t: Tensor  # [B]
    pred_velocity: Tensor  # [B, C, H, W]
    masked_fraction: Tensor | None = None  # scalar: share of tokens left out of the loss (with a norm threshold)


class Transport:
    """Linear (rectified-flow) transport between data at t = 0 and Gaussian noise at t = 1."""

    interpolate = staticmethod(interpolate)
    score_from_velocity = staticmethod(score_from_velocity)

    def __init__(
        self,
        prediction: str = "velocity",
        time_dist: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        t_min: float = 0.0,
        t_max: float | None = None,
        shift: float | None = None,
        shift_dim: int | None = None,
        shift_base_dim: int = 4096,
        x_pred_t_clamp: float = 0.05,
        clamp_target: bool = False,
        noise_scale: float = 1.0,
        mask_norm_threshold: float | None = None,
    ) -> None:
        """`clamp_target` (x-prediction only) divides the target by the same clamped t as the prediction, as JiT does:
        v_hat = (x_t - x_hat) / max(t, c) against u = (x_t - x) / max(t, c), so the loss is |x_hat - x|^2 / max(t, c)^2.
        Without it (the DSR release) the clamped prediction is compared with the true velocity s eps - x; the two
        agree for t >= c = `x_pred_t_clamp` and differ near the data end."""
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if time_dist not in TIME_DISTS:
            raise ValueError(f"time_dist must be one of {TIME_DISTS}, got {time_dist!r}")
        if t_max is None:
            t_max = REFERENCE_T_MAX[prediction]
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        if clamp_target and prediction != "x":
            raise ValueError("transport.clamp_target=true is JiT's x-prediction loss: it needs transport.prediction=x")
        if noise_scale <= 0:
            raise ValueError(f"transport.noise_scale must be > 0, got {noise_scale}")
        self.prediction = prediction
        self.time_dist = time_dist
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.t_min = t_min
        self.t_max = t_max
        self.shift = shift
        self.shift_dim = shift_dim
        self.shift_base_dim = shift_base_dim
        self.x_pred_t_clamp = x_pred_t_clamp
        self.clamp_target = clamp_target
        self.noise_scale = noise_scale
        self.mask_norm_threshold = mask_norm_threshold

    @property
    def sample_t_end(self) -> float:
        """Where the samplers' grid ends before the shift: 1 - t_max (0 for the release's x-prediction, 0.001 for
        RAE's velocity), since both references walk their sampling grid over the training interval reversed."""
        return 1.0 - self.t_max

    def shift_for(self, latent_shape: Sequence[int]) -> float:
        """The time shift for latents of shape (C, H, W): explicit `shift`, else from `shift_dim`,
        else from the latent shape itself."""
        if self.shift is not None:
            return float(self.shift)
        if self.shift_dim is not None:
            return math.sqrt(self.shift_dim / self.shift_base_dim)
        return resolution_shift(latent_shape, self.shift_base_dim)

    def target_velocity(self, x: Tensor, noise: Tensor) -> Tensor:
        """The conditional velocity dx_t / dt = noise - x."""
        return noise - x

    def sample_time(
        self,
        batch_size: int,
        latent_shape: Sequence[int],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Training times [B] (float32): `time_dist` on [t_min, t_max], then shifted toward noise."""
        if self.time_dist == "logit_normal":
            t = sample_logit_normal(
                batch_size, self.logit_mean, self.logit_std, self.t_min, self.t_max, generator, device
            )
        else:
            u = torch.rand(batch_size, generator=generator, device=device)
            t = self.t_min + (self.t_max - self.t_min) * u
        return time_shift(t, self.shift_for(latent_shape))

    def velocity(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Turn the network output [B, ...] into a velocity.

        For "x" prediction the output is the clean latent x_hat and v = (x_t - x_hat) / t; t is clamped
        from below because the division blows up network errors near the data end.
        """
        if self.prediction == "velocity":
            return model_output
        t = _bcast(t, x_t).clamp_min(self.x_pred_t_clamp)
        return (x_t - model_output) / t

    def training_loss(
        self,
        model: Callable[[Tensor, Tensor, Tensor], Tensor],
        x: Tensor,
        y: Tensor,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        t: Tensor | None = None,
    ) -> LossOutput:
        """Flow-matching loss for clean latents x [B, C, H, W] and labels y [B].

        `model(x_t, t, y)` returns a velocity or a clean-latent prediction (see `prediction`). Noise (standard
        normal; the transport scales it by `noise_scale`) and t are drawn with `generator` unless given.

        With `mask_norm_threshold` = tau (the paper's loss-masking ablation), tokens whose clean latent has norm
        ||x[b, :, i, j]|| > tau are left out: loss = mean_b (sum of kept errors / max(1, kept tokens)), a per-sample
        mean over kept tokens so images with outliers are not down-weighted. They are still noised, seen by the
        model and generated at sampling time; they are only unsupervised.
        """
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if t is None:
            t = self.sample_time(x.shape[0], x.shape[1:], generator=generator, device=x.device)
        t = t.to(device=x.device, dtype=x.dtype)
        if self.noise_scale != 1.0:
            noise = noise * self.noise_scale

        x_t = self.interpolate(x, noise, t)
        v_hat = self.velocity(model(x_t, t, y), x_t, t)
        if self.clamp_target:  # JiT: the target goes through the same clamped divisor as the prediction
            u = self.velocity(x, x_t, t)
        else:
            u = self.target_velocity(x, noise)

        # At least float32 so a bf16 forward pass does not quantise the error.
        dtype = torch.promote_types(v_hat.dtype, torch.float32)
        err = (v_hat.to(dtype) - u.to(dtype)).square()
        loss_map = err.mean(dim=1)
        if self.mask_norm_threshold is None:
            return LossOutput(loss=loss_map.mean(), loss_map=loss_map, t=t, pred_velocity=v_hat)
        keep = (x.to(dtype).norm(dim=1) <= self.mask_norm_threshold).to(dtype)  # [B, H, W]
        per_sample = (loss_map * keep).flatten(1).sum(1) / keep.flatten(1).sum(1).clamp_min(1)
        return LossOutput(
            loss=per_sample.mean(), loss_map=loss_map, t=t, pred_velocity=v_hat, masked_fraction=1 - keep.mean()
        )
