"""Guidance in velocity space, inside a time interval: classifier-free guidance and AutoGuidance.

Times are model times (t = 1 is noise). Both combine velocities, not raw outputs, so they mean the same for velocity
and x-prediction networks, and an AutoGuidance guide may predict another quantity than the main model: each output
becomes a velocity through its own model's transport.

Outside the interval a sample takes the plain conditional velocity, and the second network (the unconditional half
of CFG, the guide of AutoGuidance) runs only on the rows of the batch inside it: a step with no row inside costs one
forward of the main model, as unguided sampling does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dsr.diffusion.samplers import VelocityFn
from dsr.diffusion.transport import Transport

# (x [B, ...], t [B], y [B]) -> the network's output [B, ...]
Network = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass
class Guide:
    """AutoGuidance's weaker model and the transport it was trained with (its output -> a velocity)."""

    model: nn.Module
    transport: Transport


# Grid times reach the interval's ends through different float arithmetic (dsr's grid runs 1 -> 0 in float64 and is
# cast to float32; JiT's runs 0 -> 1 in float32), so a time within this distance of an end counts as on it.
INTERVAL_END_TOLERANCE = 1e-6


class _IntervalGuidance:
    """v = v_ref + scale * (v_main - v_ref) for samples whose t lies in the interval, v_main elsewhere.

    The interval is [t_min, t_max] by default; `include_t_min` / `include_t_max` false open an end. JiT's interval
    (interval_min 0.1, interval_max 1.0 in its time, 1 = data) is applied as 0.1 < t_jit < 1, which is dsr's (0, 0.9)
    with both ends open: on JiT's 50-step grid the step from t = 0.9 is not guided. A time within
    `INTERVAL_END_TOLERANCE` of an end is on it.

    `guided_channels=k` guides only the first k channels and leaves the rest at v_main: DiT's and SiT's sampling code
    guides the first 3 of the SD-VAE's 4 latent channels ("for exact reproducibility", as their comment has it), and
    SiT's published numbers were made that way, so SiT's sampler presets set 3. None (the default everywhere else)
    guides every channel, the standard form.
    """

    def __init__(
        self,
        scale: float,
        t_min: float,
        t_max: float,
        guided_channels: int | None,
        include_t_min: bool = True,
        include_t_max: bool = True,
    ) -> None:
        if t_min > t_max:
            raise ValueError(f"need t_min <= t_max, got t_min={t_min}, t_max={t_max}")
        if guided_channels is not None and guided_channels < 1:
            raise ValueError(f"guided_channels must be >= 1 (or null for all), got {guided_channels}")
        self.scale = scale
        self.t_min = t_min
        self.t_max = t_max
        self.guided_channels = guided_channels
        self.include_t_min = include_t_min
        self.include_t_max = include_t_max

    @property
    def active(self) -> bool:
        """Whether guidance changes anything (scale 1 is the plain conditional model)."""
        return self.scale != 1.0

    @property
    def whole_interval(self) -> bool:
        """Whether every time in [0, 1] is guided (the default interval): then no step checks its times, which would
        read a flag back from the GPU (a host sync) at every evaluation."""
        return (self.t_min < 0 or (self.t_min == 0 and self.include_t_min)) and (
            self.t_max > 1 or (self.t_max == 1 and self.include_t_max)
        )

    def inside(self, t: Tensor) -> Tensor:
        """Which samples [B] of times t [B] are guided."""
        tol = INTERVAL_END_TOLERANCE
        above = t >= self.t_min - tol if self.include_t_min else t > self.t_min + tol
        below = t <= self.t_max + tol if self.include_t_max else t < self.t_max - tol
        return above & below

    def combine(self, v_main: Tensor, v_ref: Tensor) -> Tensor:
        """The guided velocity of rows that are inside the interval: v_main, v_ref [b, ...]."""
        guided = v_ref + self.scale * (v_main - v_ref)
        if self.guided_channels is not None:  # DiT / SiT: the channels after the first k stay at v_main
            guided = torch.cat([guided[:, : self.guided_channels], v_main[:, self.guided_channels :]], dim=1)
        return guided

    def guide_rows(self, v_main: Tensor, t: Tensor, reference: Callable[[Tensor], Tensor]) -> Tensor:
        """v_main [B, ...] with the rows inside the interval guided; `reference(rows)` gives v_ref of those rows."""
        if self.whole_interval:
            return self.combine(v_main, reference(slice(None)))
        inside = self.inside(t)
        if not bool(inside.any()):
            return v_main
        if bool(inside.all()):
            return self.combine(v_main, reference(slice(None)))
        rows = inside.nonzero().squeeze(1)
        out = v_main.clone()
        out[rows] = self.combine(v_main[rows], reference(rows))
        return out


class ClassifierFreeGuidance(_IntervalGuidance):
    """Classifier-free guidance: the reference is the same network with the null class.

    Inside the interval the conditional and unconditional forwards run as one pass on the doubled batch of the rows
    inside; rows outside (all rows, on a step outside the interval) run the conditional forward alone.
    """

    def __init__(
        self,
        scale: float = 1.0,
        t_min: float = 0.0,
        t_max: float = 1.0,
        guided_channels: int | None = None,
        include_t_min: bool = True,
        include_t_max: bool = True,
    ) -> None:
        super().__init__(scale, t_min, t_max, guided_channels, include_t_min, include_t_max)

    def velocity_fn(self, model: Network, y: Tensor, null_class: int, transport: Transport) -> VelocityFn:
        """Wrap `model(x, t, y)` and labels y [B] into a sampler's velocity function (x [B, ...], t [B])."""
        if not self.active:
            return lambda x, t: transport.velocity(model(x, t, y), x, t)

        y_null = torch.full_like(y, null_class)

        def guided(x: Tensor, t: Tensor) -> Tensor:
            if self.whole_interval:
                rows = slice(None)
            else:
                inside = self.inside(t)
                if not bool(inside.any()):
                    return transport.velocity(model(x, t, y), x, t)
                rows = slice(None) if bool(inside.all()) else inside.nonzero().squeeze(1)
            # One pass on [all rows, conditional; rows inside, unconditional].
            x2, t2 = torch.cat([x, x[rows]]), torch.cat([t, t[rows]])
            v = transport.velocity(model(x2, t2, torch.cat([y, y_null[rows]])), x2, t2)
            v_c, v_u = v[: len(x)], v[len(x) :]
            return self.guide_rows(v_c, t, lambda _: v_u)

        return guided


class AutoGuidance(_IntervalGuidance):
    """AutoGuidance (Karras et al. 2024), as RAE runs it: the reference is a weaker model of the same latent space
    (RAE: DiT-DH-S at epoch 14 for the DiT-DH-XL headline, scale 1.42, no interval), conditioned on the same labels.

    One forward of the main model on the batch and one of the guide on the rows inside the interval per evaluation;
    no doubled batch, no null labels. `guide_ckpt` is read by the module that samples (`DiTModule.use_sampler`, which
    checks that the guide's latent space is the model's) and attached with `attach`; `guide_ema` picks its weights
    ("auto": its first EMA, a decay, or "none").
    """

    def __init__(
        self,
        guide_ckpt: str,
        scale: float = 1.42,
        t_min: float = 0.0,
        t_max: float = 1.0,
        guide_ema: float | str = "auto",
        guided_channels: int | None = None,
        include_t_min: bool = True,
        include_t_max: bool = True,
    ) -> None:
        super().__init__(scale, t_min, t_max, guided_channels, include_t_min, include_t_max)
        self.guide_ckpt = guide_ckpt
        self.guide_ema = guide_ema
        self.guide: Guide | None = None

    def attach(self, guide: Guide) -> None:
        self.guide = guide

    def velocity_fn(self, model: Network, y: Tensor, null_class: int, transport: Transport) -> VelocityFn:
        """Wrap `model(x, t, y)` and labels y [B] into a sampler's velocity function (x [B, ...], t [B])."""
        if not self.active:
            return lambda x, t: transport.velocity(model(x, t, y), x, t)
        if self.guide is None:
            raise RuntimeError(f"AutoGuidance: the guide {self.guide_ckpt} is not loaded (DiTModule.use_sampler does)")
        guide = self.guide
        if isinstance(model, nn.Module):  # the guide follows the main model's device
            device = next(model.parameters()).device
            if next(guide.model.parameters()).device != device:
                guide.model.to(device)

        def guided(x: Tensor, t: Tensor) -> Tensor:
            v_main = transport.velocity(model(x, t, y), x, t)

            def v_guide(rows):
                xr, tr = x[rows], t[rows]
                return guide.transport.velocity(guide.model(xr, tr, y[rows]), xr, tr)

            return self.guide_rows(v_main, t, v_guide)

        return guided
