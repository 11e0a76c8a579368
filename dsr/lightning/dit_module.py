"""Stage 2: flow-matching training of a diffusion transformer on the latents of a frozen encoder.

The module owns the encoder (images -> latents), the backbone (built for the encoder's latent shape),
its EMA copy, the transport (noise path, time distribution, loss) and the sampler (ODE/SDE solver plus
classifier-free guidance). Sampling always uses the EMA weights unless asked otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import grad_norm
from omegaconf import OmegaConf
from torch import Tensor, nn

from dsr.config import rename_keys
from dsr.diffusion.guidance import ClassifierFreeGuidance
from dsr.diffusion.transport import Transport
from dsr.encoders.base import LatentCodec
from dsr.lightning.training import ema_copy, steps_per_epoch
from dsr.utils.files import load_tensors
from dsr.utils.frozen import drop_frozen, fill_frozen
from dsr.utils.seeding import step_generator


@dataclass
class LRSchedule:
    """Learning-rate multiplier over optimizer steps, given in epochs.

    `warmup_epochs` ramps linearly from 0; then the rate stays constant until `constant_epochs` (None: forever,
    the DSR release's recipe) and decays linearly to `final_lr` at `decay_end_epochs` (RAE: 40 -> 800, to 2e-5).
    """

    warmup_epochs: float = 0.0
    constant_epochs: float | None = None
    decay_end_epochs: float | None = None
    final_lr: float | None = None

    def multiplier(self, step: int, steps_per_epoch: float, base_lr: float) -> float:
        epoch = step / steps_per_epoch
        if self.warmup_epochs and epoch < self.warmup_epochs:
            return epoch / self.warmup_epochs
        if self.constant_epochs is None or epoch < self.constant_epochs:
            return 1.0
        if self.decay_end_epochs is None or self.final_lr is None:
            raise ValueError("module.lr_schedule: a decay needs decay_end_epochs and final_lr")
        final = self.final_lr / base_lr
        progress = min(1.0, (epoch - self.constant_epochs) / (self.decay_end_epochs - self.constant_epochs))
        return 1.0 - (1.0 - final) * progress


class DiTModule(L.LightningModule):
    def __init__(
        self,
        backbone: Callable[..., nn.Module],
        encoder: LatentCodec,
        transport: Transport,
        solver: Any,
        guidance: ClassifierFreeGuidance,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
        lr_schedule: LRSchedule | dict | None = None,
        ema_decay: float = 0.9999,
        seed: int = 0,
    ) -> None:
        """`backbone` is a factory taking `in_channels` and `input_size`, so the backbone is sized by the encoder."""
        super().__init__()
        self.encoder = encoder
        self.latent_shape: tuple[int, int, int] = tuple(encoder.latent_shape)
        channels, height, width = self.latent_shape
        self.backbone = backbone(in_channels=channels, input_size=(height, width))
        self.ema = ema_copy(self.backbone, ema_decay)
        self.transport = transport
        self.solver = solver
        self.guidance = guidance
        self.optimizer_factory = optimizer
        self.lr_schedule = LRSchedule(**lr_schedule) if isinstance(lr_schedule, dict) else lr_schedule or LRSchedule()
        self.ema_decay = ema_decay
        self.seed = seed
        self.run_config: dict | None = None  # the resolved Hydra config, stored in every checkpoint
        self.yields_latents = False  # batches hold raw latents, not images (the datamodule says so at setup)

    # ---------------------------------------------------------------------------------------------------
    # training
    # ---------------------------------------------------------------------------------------------------

    def step_randomness(self, batch_idx: int, micro_batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
        """Noise [b, C, h, w], times [b] and label-drop draws [b] for this micro-batch.

        They are drawn for the device's whole share of the global batch from a generator keyed by
        (seed, optimizer step, rank), and this micro-batch takes its slice. So a resumed run draws exactly
        what an uninterrupted one would have, and k accumulated micro-batches see exactly what one batch
        k times larger would.
        """
        accumulate = self.trainer.accumulate_grad_batches
        generator = step_generator(self.seed, self.global_step, self.global_rank, self.device)
        share = micro_batch_size * accumulate
        noise = torch.randn((share, *self.latent_shape), generator=generator, device=self.device)
        t = self.transport.sample_time(share, self.latent_shape, generator=generator, device=self.device)
        uniform = torch.rand(share, generator=generator, device=self.device)
        part = slice((batch_idx % accumulate) * micro_batch_size, (batch_idx % accumulate + 1) * micro_batch_size)
        return noise[part], t[part], uniform[part]

    def setup(self, stage: str) -> None:
        self.yields_latents = getattr(self.trainer.datamodule, "yields_latents", self.yields_latents)

    def latents(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Normalised latents [B, C, h, w] and labels [B] of a batch `(x, y)`: x holds images, encoded here, or (with
        `yields_latents`, as with `data=latents`) raw latents from `dsr.data.latents.CachedLatents`, normalised
        here by the same codec."""
        x, y = batch
        with torch.no_grad():
            return (self.encoder.normalize(x.float()) if self.yields_latents else self.encoder.encode(x)), y

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        z, y = self.latents(batch)
        noise, t, uniform = self.step_randomness(batch_idx, len(y))
        y = self.backbone.y_embedder.drop_labels(y, uniform)
        out = self.transport.training_loss(self.backbone, z, y, noise=noise.to(z.dtype), t=t.to(z.dtype))
        self.log("train/loss", out.loss, prog_bar=True)
        if out.masked_fraction is not None:
            self.log("train/masked_fraction", out.masked_fraction)
        return out.loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Before clipping: the norm the optimizer would have seen without it.
        self.log("train/grad_norm", grad_norm(self.backbone, norm_type=2)["grad_2.0_norm_total"])

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.ema.update_parameters(self.backbone)

    def configure_optimizers(self) -> dict:
        optimizer = self.optimizer_factory([p for p in self.backbone.parameters() if p.requires_grad])
        base_lr = optimizer.param_groups[0]["lr"]
        steps_per_epoch = self.steps_per_epoch()
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: self.lr_schedule.multiplier(step, steps_per_epoch, base_lr)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def steps_per_epoch(self) -> float:
        return steps_per_epoch(self.trainer, "module.lr_schedule")

    # ---------------------------------------------------------------------------------------------------
    # sampling
    # ---------------------------------------------------------------------------------------------------

    def sampling_model(self, use_ema: bool = True) -> nn.Module:
        return self.ema.module if use_ema else self.backbone

    @torch.no_grad()
    def sample(
        self,
        y: Tensor,
        noise: Tensor | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        use_ema: bool = True,
        progress: bool = False,
    ) -> Tensor:
        """Class labels y [B] -> images [B, 3, H, W] in [0, 1], through the sampler and the encoder's decoder.

        `generator` may be one generator per row (a stochastic sampler then draws each row's noise from its own)."""
        if noise is None:
            if not isinstance(generator, torch.Generator | None):
                raise ValueError("pass `noise` explicitly when giving one generator per row")
            noise = torch.randn((len(y), *self.latent_shape), generator=generator, device=self.device)
        model = self.sampling_model(use_ema)
        velocity_fn = self.guidance.velocity_fn(model, y.to(self.device), model.null_class, self.transport)
        shift = self.transport.shift_for(self.latent_shape)
        z = self.solver.integrate(
            velocity_fn, noise, shift, generator=generator, progress=progress, t_end=self.transport.sample_t_end
        )
        return self.encoder.decode(z).clamp(0, 1)

    # ---------------------------------------------------------------------------------------------------
    # checkpoints
    # ---------------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The frozen encoder and decoder reload from their own files; the latent statistics stay (buffers).
        checkpoint["state_dict"] = drop_frozen(self, checkpoint["state_dict"])
        checkpoint["dsr"] = {"config": self.run_config, "latent_shape": list(self.latent_shape)}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        return super().load_state_dict(fill_frozen(self, state_dict), strict=strict, assign=assign)

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> DiTModule:
        """Rebuild the module from the config stored in a training checkpoint and load its weights (EMA included)."""
        checkpoint = load_tensors(path, "ckpt", map_location)
        config = checkpoint.get("dsr", {}).get("config")
        if config is None:
            raise ValueError(f"{path} holds no dsr config: it was not written by dsr.train")
        build = rename_keys("train", OmegaConf.create(config), warn=False)  # a checkpoint's older spellings
        if "stats" in build.module.encoder:
            build.module.encoder.stats = None  # the statistics are in the checkpoint; the file may have moved
        module = instantiate(build.module)
        module.load_state_dict(checkpoint["state_dict"])
        module.run_config = config
        return module.eval()
