"""Classifier-free guidance with a guidance interval, applied in velocity space."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dsr.diffusion.samplers import VelocityFn
from dsr.diffusion.transport import Transport


class ClassifierFreeGuidance:
    """v = v_u + scale * (v_c - v_u) for samples whose t lies in [t_min, t_max], v_c elsewhere.

    Times are model times (t = 1 is noise). Guidance combines velocities, not raw outputs, so it means
    the same for velocity and x-prediction networks.

    `guided_channels=k` guides only the first k channels and leaves the rest conditional: DiT's and SiT's sampling
    code guides the first 3 of the SD-VAE's 4 latent channels ("for exact reproducibility", as their comment has it),
    and SiT's published numbers were made that way, so SiT's sampler presets set 3. None (the default everywhere
    else) guides every channel, the standard form.
    """

    def __init__(
        self, scale: float = 1.0, t_min: float = 0.0, t_max: float = 1.0, guided_channels: int | None = None
    ) -> None:
        if t_min > t_max:
            raise ValueError(f"need t_min <= t_max, got t_min={t_min}, t_max={t_max}")
        if guided_channels is not None and guided_channels < 1:
            raise ValueError(f"guided_channels must be >= 1 (or null for all), got {guided_channels}")
        self.scale = scale
        self.t_min = t_min
        self.t_max = t_max
        self.guided_channels = guided_channels

    @property
    def active(self) -> bool:
        """Whether guidance changes anything (scale 1 is the plain conditional model)."""
        return self.scale != 1.0

    def velocity_fn(
        self,
        model: Callable[[Tensor, Tensor, Tensor], Tensor],
        y: Tensor,
        null_class: int,
        transport: Transport,
    ) -> VelocityFn:
        """Wrap `model(x, t, y)` and labels y [B] into a sampler's velocity function (x [B, ...], t [B])."""
        if not self.active:

            def conditional(x: Tensor, t: Tensor) -> Tensor:
                return transport.velocity(model(x, t, y), x, t)

            return conditional

        y_null = torch.full_like(y, null_class)

        def guided(x: Tensor, t: Tensor) -> Tensor:
            # One forward pass on the doubled batch [cond; uncond].
            x2, t2 = torch.cat([x, x]), torch.cat([t, t])
            v_c, v_u = transport.velocity(model(x2, t2, torch.cat([y, y_null])), x2, t2).chunk(2)
            v_cfg = v_u + self.scale * (v_c - v_u)
            if self.guided_channels is not None:  # DiT / SiT: the channels after the first k stay conditional
                v_cfg = torch.cat([v_cfg[:, : self.guided_channels], v_c[:, self.guided_channels :]], dim=1)
            inside = (t >= self.t_min) & (t <= self.t_max)
            return torch.where(inside.reshape(-1, *([1] * (x.ndim - 1))), v_cfg, v_c)

        return guided
