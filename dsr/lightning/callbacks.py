"""Training callbacks: checkpoints that always include the final step, a checkpoint on preemption signals, sample grids
from the EMA model, and FID / Inception Score (and precision / recall) of EMA samples at regular steps."""

from __future__ import annotations

import gc
import logging
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import FSDPStrategy
from torchvision.utils import make_grid, save_image

log = logging.getLogger(__name__)


def sharded(trainer: L.Trainer) -> bool:
    """Whether the weights are sharded over ranks (FSDP): then a forward pass needs every rank."""
    return isinstance(trainer.strategy, FSDPStrategy)


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


class Preempted(SystemExit):
    """The run stopped on a preemption signal after writing `last.ckpt` (exit status 0: nothing failed)."""

    def __init__(self) -> None:
        super().__init__(0)


class Preemption(L.Callback):
    """SIGUSR2 / SIGTERM, what SLURM sends before a time limit or a preemption, write `last.ckpt` at the next optimizer
    step boundary and end the run.

    The signal handler only records the signal; the work happens at the step boundary (`on_train_batch_end` after an
    optimizer step), where the loop state is the one a resume expects, so the same command resumes exactly. Under DDP
    the ranks agree on it first: every `check_every_n_steps` steps one all-reduce of a flag (Lightning itself
    broadcasts its SIGTERM flag every step there), so every rank saves at the same step. Then the handler that was
    installed before is called, so dsr hands over rather than replacing it: submitit's (its USR2 handler requeues the
    job and exits on rank 0; the requeued job resumes from `last.ckpt`) and Lightning's SIGTERM handling. With none (a
    local run; the default action of SIGUSR2 would kill the process) the run ends cleanly, exit status 0 (`Preempted`),
    skipping the end-of-training samples and evaluation.
    """

    def __init__(self, signals: Sequence[str] = ("SIGUSR2", "SIGTERM"), check_every_n_steps: int = 1) -> None:
        unknown = [name for name in signals if not isinstance(getattr(signal, str(name), None), signal.Signals)]
        if unknown:
            raise ValueError(f"callbacks.preemption.signals: {unknown} are not signal names (e.g. SIGUSR2, SIGTERM)")
        if check_every_n_steps < 1:
            raise ValueError(f"callbacks.preemption.check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.signals = [getattr(signal, str(name)) for name in signals]
        self.check_every_n_steps = check_every_n_steps
        self._previous: dict[int, Any] = {}
        self._received = 0
        self._last_step = -1
        self._checkpoints: list[RunCheckpoint] = []

    def _record(self, signum: int, frame: Any) -> None:
        self._received = signum  # all a signal handler should do: the step boundary acts on it

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("callbacks.preemption: not in the main thread, so no signal handlers; a signal is not caught")
            return
        by_dir = {str(cb.dirpath): cb for cb in trainer.checkpoint_callbacks if isinstance(cb, RunCheckpoint)
                  and cb.save_last}  # fmt: skip
        if not by_dir:
            raise ValueError("callbacks.preemption writes last.ckpt through callbacks.checkpoint: keep it, with "
                             "save_last: true (or set callbacks.preemption=null)")  # fmt: skip
        self._checkpoints = list(by_dir.values())
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._record)
        self._received, self._last_step = 0, trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self._last_step or not self._previous:  # mid-accumulation (no optimizer step yet), or not installed
            return
        self._last_step = step
        received = self._received
        if trainer.world_size > 1:
            if step % self.check_every_n_steps:
                return
            flag = torch.tensor(received, device=pl_module.device)
            received = int(trainer.strategy.reduce(flag, reduce_op="max"))
        if received:
            self._stop(trainer, received)

    def _stop(self, trainer: L.Trainer, signum: int) -> None:
        for checkpoint in self._checkpoints:
            checkpoint.save_final(trainer)
        name = signal.Signals(signum).name
        written = ", ".join(str(cb.last_model_path) for cb in self._checkpoints)
        if trainer.is_global_zero:
            log.warning("%s received: wrote %s at step %d; the same command resumes from it", name, written,
                        trainer.global_step)  # fmt: skip
        previous = self._previous.get(signum)
        self.restore()
        if callable(previous):
            previous(signum, None)  # submitit requeues (and exits on rank 0) here; Lightning notes its SIGTERM
        raise Preempted()

    def restore(self) -> None:
        """Put back the handlers found at the start of training."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous:
            self.restore()


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

    def save(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> Path | None:
        if not (trainer.is_global_zero or sharded(trainer)):
            return None
        grid = self.grid(pl_module)  # with sharded weights every rank takes part in the forward passes
        if not trainer.is_global_zero:
            return None
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"{name}.png"
        save_image(grid, path)
        self.last_path = path
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                # The saved file, not the float tensor: W&B would read [0, 1] floats as 0..255 values (a black grid).
                logger.log_image("samples/grid", images=[str(path)], step=trainer.global_step, caption=[name])
        return path

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        self.save(trainer, pl_module, f"step_{step:07d}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer, pl_module, "final")


class FIDEvaluation(EveryNSteps):
    """Every `every_n_steps` optimizer steps: `num_samples` class-balanced samples of the EMA model, generated on all
    ranks (rank r takes indices r, r + world, ...; image i depends only on (seed, i), as in `dsr.sample`), features
    extracted on each rank and gathered, then scored against the reference by `dsr.metrics.evaluation.feature_scores`
    (the computation `dsr.evaluate` makes offline) and saved with a grid of the first samples.

    `features="inception"`: FID and Inception Score (and precision / recall if asked) as `fid/*`, against `reference`
    (an ADM reference batch, its `mu`/`sigma` used; an image folder or npz of images; or a statistics npz), whose
    features are computed once and cached by content hash. `features="proxy"`: FD and conditional accuracy (and
    precision / recall) as `proxy/*`, in the features of the training data's proxy classifier (trained or loaded from
    `proxy_dir` at the first evaluation), against the data's held-out split. The weights and the reference are checked
    when training starts, not at the first evaluation. `every_n_steps: 0` turns it off.

    A run with several EMAs (`module.ema_decays`) is evaluated once per EMA, each logged under its decay
    (`proxy/ema0.9996/fd`); a run with one logs the plain names (`proxy/fd`). The sampler's velocity evaluations per
    sample are logged as `sample/nfe`.
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
        features: str = "inception",
        proxy_dir: str | None = None,
    ) -> None:
        super().__init__(every_n_steps)
        if features not in ("inception", "proxy"):
            raise ValueError(f"evaluation.features={features!r}: choose inception or proxy")
        self.reference = reference
        self.inception_weights = inception_weights
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.precision_recall = precision_recall
        self.seed = seed
        self.cache_dir = cache_dir
        self.dirpath = Path(dirpath) if dirpath else None
        self.features = features
        self.proxy_dir = proxy_dir
        self.weights_path: Path | None = None
        self.network = None  # the proxy classifier, kept (small); Inception is built per evaluation and freed
        self.last_metrics: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.every_n_steps:
            return
        if self.features == "proxy":
            from dsr.metrics.proxy import check_proxy_data

            if self.proxy_dir is None:
                raise ValueError("evaluation.features=proxy needs evaluation.proxy_dir (where classifiers are cached)")
            check_proxy_data(trainer.datamodule.dataset)  # the classifier itself is trained at the first evaluation
            return
        from dsr.metrics.inception import resolve_inception_weights

        if not self.reference:
            raise ValueError(
                "FID evaluation needs a reference: set evaluation.reference=<ADM reference .npz, image folder or "
                "statistics .npz> (or $DSR_FID_REFERENCE), use evaluation.features=proxy on the built-in data, or "
                "turn it off with callbacks.fid.every_n_steps=0"
            )
        if not Path(self.reference).exists():
            raise FileNotFoundError(f"evaluation.reference={self.reference} not found")
        self.weights_path = resolve_inception_weights(self.inception_weights)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        decays = pl_module.ema_decays
        metrics = {}
        for decay in decays:
            metrics.update(self.evaluate(trainer, pl_module, decay if len(decays) > 1 else "auto"))
        metrics["sample/nfe"] = float(pl_module.solver.last_nfe)
        self.last_metrics = metrics
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def metric_names(self) -> list[str]:
        """The keys of `feature_scores` this callback logs, in order (as `<prefix>/<key>`)."""
        names = ["fd", "conditional_accuracy"] if self.features == "proxy" else ["fid", "inception_score_mean"]
        return names + (["precision", "recall"] if self.precision_recall else [])

    def log_name(self, key: str, ema: float | str = "auto") -> str:
        prefix = "proxy" if self.features == "proxy" else "fid"
        if ema != "auto":
            prefix = f"{prefix}/ema{ema:g}"
        return f"{prefix}/{'inception_score' if key == 'inception_score_mean' else key}"

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, ema: float | str = "auto") -> dict[str, float]:
        """The scores of `num_samples` samples of the EMA `ema` picks, as {log name: value}."""
        from dsr.diffusion.generation import generate_shard
        from dsr.metrics.evaluation import feature_scores
        from dsr.metrics.inception import InceptionFeatures
        from dsr.metrics.reference import default_cache_dir, reference_statistics

        if self.features == "proxy" and self.network is None:
            from dsr.metrics.proxy import proxy_for

            proxy = proxy_for(trainer.datamodule.dataset, self.proxy_dir)  # every rank: the same deterministic file
            self.network, self.reference = proxy.network, str(proxy.reference)
        world, rank = trainer.world_size, trainer.global_rank
        per_rank = -(-self.num_samples // world)
        indices = np.arange(per_rank) * world + rank  # may run past num_samples on the last ranks: dropped below
        images, labels = generate_shard(
            pl_module,
            indices,
            num_classes=pl_module.backbone.y_embedder.num_classes,
            seed=self.seed,
            batch_size=self.batch_size,
            ema=ema,
        )
        network = self.network or InceptionFeatures(self.weights_path)
        features, logits = network.extract(images, batch_size=self.batch_size, device=pl_module.device)
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.float32)[:, None]
        # [world, per_rank, D] -> sample order (index = k * world + r), then drop the padding.
        gathered = [trainer.strategy.all_gather(t.to(pl_module.device)) for t in (features, logits, labels)]
        features, logits, labels = [
            g.reshape(world, per_rank, -1).transpose(0, 1).reshape(world * per_rank, -1)[: self.num_samples].cpu()
            for g in gathered
        ]
        names = self.metric_names()
        metrics = torch.zeros(len(names), dtype=torch.float64, device=pl_module.device)
        if trainer.is_global_zero:
            reference, reference_features = reference_statistics(
                self.reference,
                network,
                self.cache_dir or default_cache_dir(),
                batch_size=self.batch_size,
                device=pl_module.device,
                need_features=self.precision_recall,
            )
            scores = feature_scores(features, logits, labels[:, 0].long(), network, reference, reference_features,
                                    self.precision_recall)  # fmt: skip
            metrics[:] = torch.tensor([float("nan") if scores[k] is None else scores[k] for k in names])
            self.save_grid(images, trainer.global_step, "" if ema == "auto" else f"_ema{ema:g}")
        # Inception and the samples go before training resumes: nothing large is kept between evaluations.
        del network, gathered
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        metrics = trainer.strategy.broadcast(metrics, src=0).tolist()
        self.last_metrics = {self.log_name(k, ema): v for k, v in zip(names, metrics, strict=True)}
        return self.last_metrics

    def save_grid(self, images: np.ndarray, step: int, suffix: str = "") -> None:
        if self.dirpath is None:
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        first = torch.from_numpy(images[:64]).permute(0, 3, 1, 2).float() / 255
        path = self.dirpath / f"fid_step_{step:07d}{suffix}.png"
        save_image(make_grid(first, nrow=8, padding=1, pad_value=1.0), path)


class SkippedImages(L.Callback):
    """Once per training epoch: the number of training images that did not decode so far (a dataset with a `skipped`
    count, e.g. `ImageTree`), logged as `data/skipped_images` and, when there are any, in one line of the log."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dataset = getattr(trainer.datamodule, "dataset", None) if trainer.datamodule is not None else None
        count = getattr(dataset, "skipped", None)
        if count is None:
            return
        if count and trainer.is_global_zero:
            log.warning("epoch %d: %d unreadable training image(s) skipped so far on rank 0", trainer.current_epoch,
                        count)  # fmt: skip
        pl_module.log("data/skipped_images", float(count), on_step=False, on_epoch=True, sync_dist=True,
                      reduce_fx="sum")  # fmt: skip


class OutlierMonitor(EveryNSteps):
    """Every `every_n_steps` optimizer steps: outlier statistics of the backbone's blocks on a fixed batch.

    The batch is the first `num_samples` items of the training set (or, for a dataset without random access, of
    the first training batch), encoded once and kept; it is noised once with seeded noise at the fixed time `t`
    (t = 0 data, t = 1 noise) and run through the training weights (`use_ema=False`) or the EMA copy in eval
    mode, without gradients; the previous train/eval mode is restored. Per block l (patch tokens only: diffusion
    registers excluded) it logs to every logger `outliers/layer_{l:02d}/max_median` (the per-image max/median
    patch-norm ratio, mean over the batch), `outliers/layer_{l:02d}/top1_norm` (the largest patch-token norm in
    the batch) and `outliers/layer_{l:02d}/median_norm`, plus `outliers/max_median_peak` (the largest ratio over
    blocks). With `dirpath` (or a W&B logger) it draws the max/median-per-block plot, saved as
    `<dirpath>/step_XXXXXXX.png` and logged to W&B as `outliers/max_median`. Rank zero only; `every_n_steps: 0`
    turns it off, and so does a module without a diffusion transformer (stage=decoder).
    """

    def __init__(
        self,
        every_n_steps: int = 5000,
        num_samples: int = 8,
        t: float = 0.5,
        seed: int = 0,
        use_ema: bool = False,
        dirpath: str | None = None,
    ) -> None:
        super().__init__(every_n_steps)
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"callbacks.outlier_monitor.t={t} must lie in [0, 1]")
        self.num_samples = num_samples
        self.t = t
        self.seed = seed
        self.use_ema = use_ema
        self.dirpath = Path(dirpath) if dirpath else None
        self.last_metrics: dict[str, float] = {}
        self._first_batch = None
        self._fixed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # z, y, noise (CPU)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.every_n_steps and getattr(getattr(pl_module, "backbone", None), "blocks", None) is None:
            self.every_n_steps = 0  # nothing to monitor, e.g. the stage-1 decoder

    @staticmethod
    def _training_set(trainer: L.Trainer):
        """The datamodule's dataset when it allows random access (map-style), else None."""
        from torch.utils.data import IterableDataset

        dataset = getattr(trainer.datamodule, "dataset", None) if trainer.datamodule is not None else None
        if dataset is None or isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            return None
        return dataset

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        keeps = trainer.is_global_zero or sharded(trainer)  # the ranks that will measure
        if self.every_n_steps and self._fixed is None and self._first_batch is None and keeps:
            if self._training_set(trainer) is None:  # a stream: keep the first rows of the first batch
                self._first_batch = [v[: self.num_samples].detach().clone().cpu() for v in batch]
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def fixed_batch(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[torch.Tensor, ...]:
        """(normalised latents z [n, C, h, w], labels y [n], noise [n, C, h, w]), computed once."""
        if self._fixed is None:
            from torch.utils.data import default_collate

            dataset = self._training_set(trainer)
            if dataset is not None:
                batch = default_collate([dataset[i] for i in range(min(self.num_samples, len(dataset)))])
            else:
                batch = self._first_batch
            x, y = batch
            with torch.no_grad():
                z, y = pl_module.latents((x.to(pl_module.device), y.to(pl_module.device)))
            generator = torch.Generator().manual_seed(self.seed)
            noise = torch.randn(z.shape, generator=generator)  # on the CPU: the same on every device
            self._fixed = (z.float().cpu(), y.cpu(), noise)
            self._first_batch = None
        return self._fixed

    @torch.no_grad()
    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[dict]:
        """Per-block `layer_statistics` records on the fixed batch (diffusion registers excluded)."""
        from dsr.analysis.capture import capture_block_outputs
        from dsr.analysis.outliers import layer_statistics

        z, y, noise = (v.to(pl_module.device) for v in self.fixed_batch(trainer, pl_module))
        backbone = pl_module.ema.module if self.use_ema else pl_module.backbone
        was_training = backbone.training
        backbone.eval()
        try:
            t = torch.full((len(z),), self.t, device=z.device)
            x_t = pl_module.transport.interpolate(z, noise, t)
            hidden, registers = capture_block_outputs(backbone, x_t, t, y)
        finally:
            backbone.train(was_training)
        records = []
        for layer, (h, r) in enumerate(zip(hidden, registers, strict=True)):
            (record,) = layer_statistics([h], num_prefix_tokens=r, top_k=1)
            record["layer"] = layer
            records.append(record)
        return records

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        if not (trainer.is_global_zero or sharded(trainer)):
            return
        records = self.measure(trainer, pl_module)  # with sharded weights every rank takes part
        if not trainer.is_global_zero:
            return
        metrics = {}
        for r in records:
            prefix = f"outliers/layer_{r['layer']:02d}"
            metrics[f"{prefix}/max_median"] = r["max_median_ratio"]
            metrics[f"{prefix}/top1_norm"] = r["norm_max"]
            metrics[f"{prefix}/median_norm"] = r["norm_median"]
        metrics["outliers/max_median_peak"] = max(r["max_median_ratio"] for r in records)
        self.last_metrics = metrics
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        wandb_loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if self.dirpath is None and not wandb_loggers:
            return
        import tempfile

        from dsr.analysis.figures import plot_max_median_ratio

        label = f"step {step}, t={self.t:g}"
        ratios = {label: [r["max_median_ratio"] for r in records]}
        with tempfile.TemporaryDirectory() as scratch:
            path = (self.dirpath or Path(scratch)) / f"step_{step:07d}.png"
            plot_max_median_ratio(ratios, path, title="DiT block outputs")
            for logger in wandb_loggers:
                logger.log_image("outliers/max_median", images=[str(path)], step=step, caption=[label])
