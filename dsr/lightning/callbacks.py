"""Training callbacks: checkpoints that always include the final step, and sample grids from the EMA model."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also writes `last.ckpt` at the final step (max_steps or max_epochs reached between
    two scheduled saves), so the end of a run is never lost and the same command resumes from it. It saves
    from the last batch or epoch hook, where the loop state is still the one a resume expects."""

    def save_final(self, trainer: L.Trainer) -> None:
        if self.save_last and trainer.global_step != self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        if 0 < trainer.max_steps <= trainer.global_step:
            self.save_final(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1:
            self.save_final(trainer)


class SampleGrid(L.Callback):
    """Every `every_n_steps` optimizer steps and at the end of training, sample `per_class` images for each
    of the first `num_classes` classes with the EMA model (one row per class, fixed noise so grids are
    comparable over training), save `<dirpath>/step_XXXXXXX.png` and `<dirpath>/final.png`, and log to W&B."""

    def __init__(self, dirpath: str, every_n_steps: int = 0, num_classes: int = 10, per_class: int = 8, seed: int = 0):
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.num_classes = num_classes
        self.per_class = per_class
        self.seed = seed
        self.last_path: Path | None = None
        self._last_step = -1

    def grid(self, pl_module: L.LightningModule) -> torch.Tensor:
        """[3, H', W'] grid, row c = class c."""
        num_classes = min(self.num_classes, pl_module.backbone.y_embedder.num_classes)
        y = torch.arange(num_classes).repeat_interleave(self.per_class)
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        images = pl_module.sample(y, generator=generator)
        return make_grid(images.float().cpu(), nrow=self.per_class, padding=1, pad_value=1.0)

    @rank_zero_only
    def save(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> Path:
        grid = self.grid(pl_module)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"{name}.png"
        save_image(grid, path)
        self.last_path = path
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples/grid", images=[grid], step=trainer.global_step, caption=[name])
        return path

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step  # counts optimizer steps: unchanged across accumulated micro-batches
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.save(trainer, pl_module, f"step_{step:07d}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer, pl_module, "final")
