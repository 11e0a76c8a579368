"""Stage 1 of the SD-VAE input space at small scale: train an AutoencoderKL on the data, for a CPU quickstart.

Stable Diffusion's VAE is used as released at 256 px; a model small enough for a CPU, or for 16-32 px images,
does not exist, so `stage=vae` trains one (diffusers' `AutoencoderKL` from `encoder.config`) with the usual VAE
objective: the L1 reconstruction of a posterior sample plus `kl_weight` times the KL divergence to N(0, I) per
latent dimension. It exports the EMA weights with `save_pretrained` to `export_dir`, where `encoder=sd_vae
encoder.pretrained=<export_dir>` loads them through the same path as the released VAE. No perceptual or GAN loss:
they need pretrained VGG / discriminator weights a fresh machine does not have.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from dsr.encoders.vae import load_autoencoder
from dsr.lightning.training import ema_copy


class VAEModule(L.LightningModule):
    """Trains an AutoencoderKL on images in [0, 1] (mapped to [-1, 1], as the codec feeds it).

    Args:
        config: the AutoencoderKL config dict of a new model (seeded by `seed`); or `pretrained` to fine-tune one.
        optimizer: a factory taking the parameters (AdamW, `_partial_`).
        kl_weight: weight of the KL term, which is a mean over latent dimensions (the L1 term is a mean over pixels).
        ema_decay: per-step decay of the exported weights' EMA.
        export_dir: where the EMA model is written with `save_pretrained` at the end of training and at every
            checkpoint (None: not written).
    """

    def __init__(
        self,
        optimizer: Callable[..., torch.optim.Optimizer],
        config: dict | None = None,
        pretrained: str | None = None,
        local_files_only: bool = True,
        seed: int = 0,
        kl_weight: float = 1e-3,
        ema_decay: float = 0.999,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.vae = load_autoencoder(pretrained, config, seed, local_files_only)
        self.vae.train()
        self.ema = ema_copy(self.vae, ema_decay)
        self.optimizer_factory = optimizer
        self.kl_weight = kl_weight
        self.export_dir = Path(export_dir) if export_dir else None
        self.run_config: dict | None = None  # the resolved Hydra config, stored in every checkpoint

    def losses(self, images: Tensor) -> dict[str, Tensor]:
        """L1 reconstruction of a posterior sample, KL per latent dimension, and their weighted sum."""
        x = images * 2 - 1
        posterior = self.vae.encode(x).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample
        l1 = (reconstruction - x).abs().mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        return {"loss": l1 + self.kl_weight * kl, "l1": l1, "kl": kl}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        losses = self.losses(batch[0])
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True)
        return losses["loss"]

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.ema.update_parameters(self.vae)  # once per optimizer step, with or without gradient accumulation

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.vae.parameters())

    def export(self) -> None:
        """`save_pretrained` of the EMA model to `export_dir` (rank 0; written beside it, then swapped in)."""
        if self.export_dir is None or (self._trainer is not None and not self.trainer.is_global_zero):
            return
        partial = self.export_dir.with_name(f"{self.export_dir.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        self.ema.module.save_pretrained(partial)
        shutil.rmtree(self.export_dir, ignore_errors=True)
        partial.rename(self.export_dir)

    def on_train_end(self) -> None:
        self.export()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["dsr"] = {"config": self.run_config}
        self.export()
