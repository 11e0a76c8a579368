"""Training entry point: `python -m dsr.train [group=option ...] [key=value ...]`.

Composes `conf/train.yaml`, builds everything with `hydra.utils.instantiate`, derives the per-device batch
and gradient accumulation from the global batch and the device count, resumes from the run directory's
`checkpoints/last.ckpt` when there is one, and fits.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dsr.lightning.checkpoint_io import AtomicCheckpointIO
from dsr.models.profile import register_overhead

log = logging.getLogger("dsr.train")

# Deprecation notices raised inside torchdata and Lightning themselves: nothing a user can act on.
warnings.filterwarnings("ignore", message=".*set_vital.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
# Frozen encoders, LPIPS and discriminator backbones stay in eval mode on purpose.
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")


def resume_checkpoint(run_dir: Path, resume: bool) -> Path | None:
    """`<run_dir>/checkpoints/last.ckpt` if resuming and it exists."""
    last = run_dir / "checkpoints" / "last.ckpt"
    return last if resume and last.is_file() else None


def initialize_from(module: L.LightningModule, path: str | Path) -> None:
    """Load a checkpoint's weights (strictly: every trained key must match) into a fresh module; the optimizer,
    schedule and step count start anew."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"init_from={path} does not exist")
    module.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["state_dict"])


def resolved_config(cfg: DictConfig) -> dict:
    """The run's config as plain, resolved data (without Hydra's own node, present when composed by tests)."""
    return {
        key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
        for key in cfg
        if key != "hydra"
    }


def build(node: DictConfig):
    """`instantiate`, but a configuration error (missing file, bad value) surfaces as itself, with the
    message that names the setting, rather than wrapped in Hydra's InstantiationException."""
    try:
        return instantiate(node)
    except InstantiationException as err:
        if isinstance(err.__cause__, (OSError, ValueError)):
            raise err.__cause__ from None
        raise


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured stage; return the final logged metrics."""
    run_dir = Path(cfg.paths.run_dir)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("matmul_precision"):
        torch.set_float32_matmul_precision(cfg.matmul_precision)

    datamodule = build(cfg.data)
    module = build(cfg.module)
    if hasattr(datamodule.dataset, "check_encoder"):  # cached latents: made by this encoder?
        datamodule.dataset.check_encoder(OmegaConf.to_container(cfg.encoder, resolve=True), module.latent_shape)
    module.run_config = resolved_config(cfg)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    loggers = [instantiate(c) for c in cfg.logger.values() if c is not None] if cfg.get("logger") else []
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[AtomicCheckpointIO()])

    plan = datamodule.configure_batches(trainer.world_size)
    if module.automatic_optimization:
        trainer.accumulate_grad_batches = plan.accumulate
    else:  # several optimizers stepped by hand (stage=decoder): the module accumulates itself
        module.accumulate_grad_batches = plan.accumulate
    if trainer.is_global_zero:
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

    ckpt_path = resume_checkpoint(run_dir, cfg.resume)
    if ckpt_path is not None:
        log.info("resuming from %s", ckpt_path)
    elif cfg.get("init_from"):
        initialize_from(module, cfg.init_from)
        log.info("weights (and EMA) initialised from %s", cfg.init_from)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        report_outputs(run_dir, trainer)
    return metrics


def report_outputs(run_dir: Path, trainer: L.Trainer) -> None:
    """Tell the user where the run's artifacts are."""
    lines = [f"run directory: {run_dir}"]
    if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.last_model_path:
        lines.append(f"checkpoint:    {trainer.checkpoint_callback.last_model_path}")
    for callback in trainer.callbacks:
        if getattr(callback, "last_path", None):
            lines.append(f"sample grid:   {callback.last_path}")
    for logger in trainer.loggers:
        metrics_file = Path(logger.log_dir or "") / "metrics.csv" if hasattr(logger, "log_dir") else None
        if metrics_file is not None and metrics_file.is_file():
            lines.append(f"metrics:       {metrics_file}")
    print("\n".join(lines), flush=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    if HydraConfig.get().mode.name == "MULTIRUN":
        log.info("job %s: %s", HydraConfig.get().job.num, HydraConfig.get().job.override_dirname)
    metrics = train(cfg)
    return metrics.get("train/loss")


if __name__ == "__main__":
    main()
