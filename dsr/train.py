"""Training entry point: `python -m dsr.train [group=option ...] [key=value ...]`.

Composes `conf/train.yaml`, builds everything with `hydra.utils.instantiate`, derives the per-device batch
and gradient accumulation from the global batch and the device count, resumes from the run directory's
`checkpoints/last.ckpt` when there is one, and fits.
"""

from __future__ import annotations

import logging
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dsr.config import build, entry_point, resolved_config, resume_changes
from dsr.utils.files import atomic_write, load_tensors

if TYPE_CHECKING:
    import lightning as L

# torch, Lightning and the models are imported where a run needs them, so `--help` and a configuration error answer
# without them (importing Lightning alone takes seconds).
log = logging.getLogger("dsr.train")

# Deprecation notices raised inside torchdata and Lightning themselves: nothing a user can act on.
warnings.filterwarnings("ignore", message=".*set_vital.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
# Frozen encoders, LPIPS and discriminator backbones stay in eval mode on purpose.
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")


def resume_checkpoint(run_dir: Path, resume: bool) -> Path | None:
    """`<run_dir>/checkpoints/last.ckpt` (a file, or a directory when sharded) if resuming and it exists; a sharded
    checkpoint caught between its two renames is still found under its `.previous` name."""
    if not resume:
        return None
    last = run_dir / "checkpoints" / "last.ckpt"
    previous = last.with_name(f"{last.name}.previous")
    return last if last.exists() else previous if previous.exists() else None


def stored_config(ckpt: Path) -> dict | None:
    """The run config a checkpoint stores (None for one without): `last.ckpt`, or a sharded checkpoint's `meta.pt`,
    whose tensors are mapped, not read."""
    path = ckpt / "meta.pt" if ckpt.is_dir() else ckpt
    if not path.is_file():
        return None
    return (load_tensors(path, "resume", mmap=not ckpt.is_dir()).get("dsr") or {}).get("config")


def check_resume(ckpt: Path, cfg: DictConfig) -> None:
    """Refuse to resume `ckpt` with settings that define another experiment (a diff of them; resume=force overrides);
    log the safe changes (step budget, loggers, devices, callbacks' cadence)."""
    stored = stored_config(ckpt)
    if stored is None:
        return
    refused, allowed = resume_changes(stored, resolved_config(cfg))
    for line in allowed:
        log.info("resuming with a changed setting: %s", line)
    if refused and str(cfg.resume) != "force":
        raise ValueError(
            f"{ckpt} was written by a run with other settings, which resuming would silently change:\n  "
            + "\n  ".join(refused)
            + "\nrun the same settings to resume, resume=force to resume with these anyway, or start a new run from "
            "its weights with init_from=<that checkpoint> and another name="
        )
    for line in refused:
        log.warning("resume=force: resuming with a changed setting: %s", line)


def initialize_from(module: L.LightningModule, path: str | Path) -> None:
    """Load a checkpoint's weights (strictly: every trained key must match) into a fresh module; the optimizer,
    schedule and step count start anew."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"init_from={path} does not exist")
    module.load_state_dict(load_tensors(path, "init_from")["state_dict"])


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured stage; return the final logged metrics."""
    from dsr.lightning.preflight import check_prerequisites

    run_dir = Path(cfg.paths.run_dir)
    check_prerequisites(cfg)  # every missing file named at once, before anything heavy is imported or built
    ckpt_path = resume_checkpoint(run_dir, cfg.resume)
    if ckpt_path is not None:
        check_resume(ckpt_path, cfg)  # before anything is built: a changed experiment is refused at once

    import lightning as L

    from dsr.lightning.checkpoint_io import AtomicCheckpointIO
    from dsr.models.profile import register_overhead
    from dsr.utils.devices import apply_matmul_precision, compile_backbone, resolve_device, select_attention_backend

    L.seed_everything(cfg.seed, workers=True)
    # Process-wide numerics and kernels, each logged: TF32 for float32 matmuls and convolutions, the SDPA kernel.
    settings = [apply_matmul_precision(cfg.get("matmul_precision") or "highest")]
    device_type = resolve_device(cfg.trainer.get("accelerator", "auto")).type
    settings.append(select_attention_backend(cfg.get("attention_backend") or "auto", device_type))

    datamodule = build(cfg.data)
    module = build(cfg.module)
    if hasattr(datamodule.dataset, "check_encoder"):  # cached latents: made by this encoder?
        cached = getattr(module.encoder, "cache_shape", module.latent_shape)  # the SD-VAE caches its posterior
        datamodule.dataset.check_encoder(OmegaConf.to_container(cfg.encoder, resolve=True), cached)
    module.run_config = resolved_config(cfg)
    if cfg.get("compile"):
        if not hasattr(module, "backbone"):
            raise ValueError("compile=true compiles the diffusion backbone; this stage has none (set compile=false)")
        # `compile={mode: ..., regional: true}` passes options; regional compiles one block, reused by every block.
        options = OmegaConf.to_container(cfg.compile) if OmegaConf.is_config(cfg.compile) else {}
        settings.append(compile_backbone(module.backbone, options))
    # `callbacks.progress_bar` sets the bar's cadence; without a bar (trainer.enable_progress_bar=false) it is left out.
    without_bar = not cfg.trainer.get("enable_progress_bar", True)
    callbacks = [
        instantiate(c) for k, c in cfg.callbacks.items() if c is not None and not (k == "progress_bar" and without_bar)
    ]
    loggers = [build_logger(c, run_dir) for c in cfg.logger.values() if c is not None] if cfg.get("logger") else []
    plugins = [AtomicCheckpointIO()]
    if cfg.get("cluster_environment"):
        plugins.append(instantiate(cfg.cluster_environment))
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers, plugins=plugins, strategy=strategy_for(cfg, module)
    )

    plan = datamodule.configure_batches(trainer.world_size)
    if module.automatic_optimization:
        trainer.accumulate_grad_batches = plan.accumulate
    else:  # several optimizers stepped by hand (stage=decoder): the module accumulates itself
        module.accumulate_grad_batches = plan.accumulate
    if trainer.is_global_zero:
        for line in settings:
            log.info(line)
        log.info(
            "batch: global %d = %d devices x %d micro-batch x %d accumulation",
            plan.global_batch_size,
            plan.world_size,
            plan.micro_batch_size,
            plan.accumulate,
        )
        model_info = {}
        if "backbone" in cfg.module:
            model_info = register_overhead(instantiate(cfg.module.backbone), module.latent_shape)
            log.info(
                "backbone: %.2fM params, %.2f GFLOPs/forward; without registers %.2fM, %.2f GFLOPs "
                "(registers add %.2f%% params, %.2f%% FLOPs)",
                model_info["params_M_with_registers"],
                model_info["gflops_with_registers"],
                model_info["params_M_without_registers"],
                model_info["gflops_without_registers"],
                model_info["params_overhead_pct"],
                model_info["gflops_overhead_pct"],
            )
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": module.run_config, "model": model_info})

    if ckpt_path is not None:
        log.info("resuming from %s", ckpt_path)
    elif cfg.get("init_from"):
        initialize_from(module, cfg.init_from)
        log.info("weights (and EMA) initialised from %s", cfg.init_from)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        finish_loggers(trainer)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        report_outputs(run_dir, trainer)
    return metrics


def build_logger(node: DictConfig, run_dir: Path) -> L.pytorch.loggers.Logger:
    """Instantiate a logger; a W&B logger gets the run directory's own run id, so a resumed or requeued run
    continues the same W&B run (its curves and media) instead of starting a new one."""
    if node.get("_target_", "").endswith("WandbLogger") and node.get("id") is None:
        return instantiate(node, id=wandb_run_id(run_dir), resume="allow")
    return instantiate(node)


def wandb_run_id(run_dir: Path) -> str:
    """The id stored in `<run_dir>/wandb_run_id`, created by global rank 0 on first use (only rank 0 logs)."""
    from lightning.pytorch.utilities import rank_zero_only

    path = run_dir / "wandb_run_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]  # other ranks never open a W&B run: theirs is unused
    if rank_zero_only.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(run_id.encode()))
    return run_id


def finish_loggers(trainer: L.Trainer) -> None:
    """Close the W&B run, so the next job of a multirun in this process starts its own."""
    from lightning.pytorch.loggers import WandbLogger

    if trainer.is_global_zero and any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        import wandb

        wandb.finish()


def strategy_for(cfg: DictConfig, module: L.LightningModule):
    """`trainer.strategy`, with `fsdp` built for this module (its wrap policy, sharded checkpoints)."""
    strategy = cfg.trainer.get("strategy", "auto")
    if strategy == "fsdp":
        from dsr.lightning.sharding import fsdp_strategy

        return fsdp_strategy(module)
    return strategy


def report_outputs(run_dir: Path, trainer: L.Trainer) -> None:
    """Tell the user where the run's artifacts are."""
    from dsr.lightning.callbacks import FIDEvaluation

    lines = [f"run directory: {run_dir}"]
    if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.last_model_path:
        lines.append(f"checkpoint:    {trainer.checkpoint_callback.last_model_path}")
    for callback in trainer.callbacks:
        if getattr(callback, "last_path", None):
            lines.append(f"sample grid:   {callback.last_path}")
        if isinstance(callback, FIDEvaluation):
            lines += [f"{name + ':':<28}{value:.4f}" for name, value in callback.last_metrics.items()]
    for logger in trainer.loggers:
        metrics_file = Path(logger.log_dir or "") / "metrics.csv" if hasattr(logger, "log_dir") else None
        if metrics_file is not None and metrics_file.is_file():
            lines.append(f"metrics:       {metrics_file}")
    print("\n".join(lines), flush=True)


@entry_point("train")
def main(cfg: DictConfig) -> float | None:
    if HydraConfig.get().mode.name == "MULTIRUN":
        log.info("job %s: %s", HydraConfig.get().job.num, HydraConfig.get().job.override_dirname)
    metrics = train(cfg)
    return metrics.get("train/loss")


if __name__ == "__main__":
    main()
