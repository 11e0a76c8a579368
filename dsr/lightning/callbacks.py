"""Training callbacks: checkpoints that always include the final step, sample grids from the EMA model, and
FID / Inception Score (and precision / recall) of EMA samples at regular steps."""

from __future__ import annotations

import gc
from pathlib import Path

import lightning as L
import numpy as np
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


class EveryNSteps(L.Callback):
    """Calls `run(trainer, pl_module, step)` once at every optimizer step that is a multiple of `every_n_steps`
    (0: never). `global_step` counts optimizer steps, so accumulated micro-batches do not trigger it again."""

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = every_n_steps
        self._last_step = -1

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        raise NotImplementedError

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.run(trainer, pl_module, step)


class SampleGrid(EveryNSteps):
    """Every `every_n_steps` optimizer steps and at the end of training, sample `per_class` images for each
    of the first `num_classes` classes with the EMA model (one row per class, fixed noise so grids are
    comparable over training), save `<dirpath>/step_XXXXXXX.png` and `<dirpath>/final.png`, and log to W&B."""

    def __init__(self, dirpath: str, every_n_steps: int = 0, num_classes: int = 10, per_class: int = 8, seed: int = 0):
        super().__init__(every_n_steps)
        self.dirpath = Path(dirpath)
        self.num_classes = num_classes
        self.per_class = per_class
        self.seed = seed
        self.last_path: Path | None = None

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

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        self.save(trainer, pl_module, f"step_{step:07d}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer, pl_module, "final")


class FIDEvaluation(EveryNSteps):
    """Every `every_n_steps` optimizer steps: `num_samples` class-balanced samples of the EMA model, generated on all
    ranks (rank r takes indices r, r + world, ...; image i depends only on (seed, i), as in `dsr.sample`), Inception
    features extracted on each rank and gathered, then FID and Inception Score (and precision / recall if asked)
    against `reference`, logged as `fid/*` and saved with a grid of the first samples.

    `reference` is an ADM reference batch (its `mu`/`sigma` are used), an image folder or npz of images, or a
    statistics npz; its features are computed once and cached by content hash. The Inception weights and the
    reference are checked when training starts, not at the first evaluation. `every_n_steps: 0` turns it off.
    """

    def __init__(
        self,
        reference: str | None,
        inception_weights: str | None = None,
        every_n_steps: int = 25000,
        num_samples: int = 10000,
        batch_size: int = 64,
        precision_recall: bool = False,
        seed: int = 0,
        cache_dir: str | None = None,
        dirpath: str | None = None,
    ) -> None:
        super().__init__(every_n_steps)
        self.reference = reference
        self.inception_weights = inception_weights
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.precision_recall = precision_recall
        self.seed = seed
        self.cache_dir = cache_dir
        self.dirpath = Path(dirpath) if dirpath else None
        self.weights_path: Path | None = None
        self.last_metrics: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.every_n_steps:
            return
        from dsr.evaluate import resolve_inception_weights

        if not self.reference:
            raise ValueError(
                "FID evaluation needs a reference: set evaluation.reference=<ADM reference .npz, image folder or "
                "statistics .npz> (or $DSR_FID_REFERENCE), or turn it off with callbacks.fid.every_n_steps=0"
            )
        if not Path(self.reference).exists():
            raise FileNotFoundError(f"evaluation.reference={self.reference} not found")
        self.weights_path = resolve_inception_weights(self.inception_weights)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        pl_module.log_dict(self.evaluate(trainer, pl_module), on_step=True, on_epoch=False)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        from dsr.evaluate import (
            FeatureStats,
            InceptionFeatures,
            default_cache_dir,
            frechet_distance,
            inception_score,
            precision_recall,
            reference_statistics,
        )
        from dsr.sample import generate_shard

        world, rank = trainer.world_size, trainer.global_rank
        per_rank = -(-self.num_samples // world)
        indices = np.arange(per_rank) * world + rank  # may run past num_samples on the last ranks: dropped below
        images, _ = generate_shard(
            pl_module,
            indices,
            num_classes=pl_module.backbone.y_embedder.num_classes,
            seed=self.seed,
            batch_size=self.batch_size,
        )
        extractor = InceptionFeatures(self.weights_path)
        pool, logits = extractor.extract(images, batch_size=self.batch_size, device=pl_module.device)
        # [world, per_rank, D] -> sample order (index = k * world + r), then drop the padding.
        gathered = [trainer.strategy.all_gather(t.to(pl_module.device)) for t in (pool, logits)]
        pool, logits = [g.reshape(world, per_rank, -1).transpose(0, 1).reshape(world * per_rank, -1) for g in gathered]
        pool, logits = pool[: self.num_samples].cpu(), logits[: self.num_samples].cpu()

        metrics = torch.zeros(4, dtype=torch.float64, device=pl_module.device)
        if trainer.is_global_zero:
            cache_dir = self.cache_dir or default_cache_dir()
            reference, reference_features = reference_statistics(
                self.reference,
                extractor,
                cache_dir,
                batch_size=self.batch_size,
                device=pl_module.device,
                need_features=self.precision_recall,
            )
            metrics[0] = frechet_distance(FeatureStats.from_features(pool), reference)
            metrics[1] = inception_score(logits, splits=min(10, self.num_samples))[0]
            if self.precision_recall and reference_features is not None:
                metrics[2:] = torch.tensor(precision_recall(reference_features, pool), dtype=torch.float64)
            self.save_grid(images, trainer.global_step)
        # The extractor and the samples go before training resumes: nothing is kept between evaluations.
        del extractor, gathered
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        metrics = trainer.strategy.broadcast(metrics, src=0).tolist()
        names = ["fid/fid", "fid/inception_score"] + (["fid/precision", "fid/recall"] if self.precision_recall else [])
        self.last_metrics = dict(zip(names, metrics[: len(names)], strict=True))
        return self.last_metrics

    def save_grid(self, images: np.ndarray, step: int) -> None:
        if self.dirpath is None:
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        first = torch.from_numpy(images[:64]).permute(0, 3, 1, 2).float() / 255
        save_image(make_grid(first, nrow=8, padding=1, pad_value=1.0), self.dirpath / f"fid_step_{step:07d}.png")
