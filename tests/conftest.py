"""Shared helpers: compose the real `conf/` tree with tiny overrides and run the real training function."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# A model and data small enough for a CPU test: 16x16 images, 4x4 tokens of 48 channels.
TINY_RUN = [
    "experiment=quickstart",
    "data.image_size=16",
    "data.num_classes=4",
    "data.dataset.num_samples=128",
    "data.global_batch_size=16",
    "backbone.hidden_size=32",
    "backbone.depth=2",
    "backbone.num_heads=2",
    "backbone.num_registers=2",
    "backbone.register_start=1",
    "sampler.solver.num_steps=4",
    "callbacks.sample_grid.per_class=2",
    "trainer.max_steps=6",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
]

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def compose_train(overrides: list[str], run_dir: Path) -> DictConfig:
    """The config `python -m dsr.train <overrides>` would run, with its run directory at `run_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="train"):
        cfg = compose("train", overrides=[*overrides, f"hydra.run.dir={run_dir}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.run_dir = str(run_dir)
    return cfg


def compose_script(config_name: str, overrides: list[str]) -> DictConfig:
    """The config of another entry point (`stats`, `cache_latents`, `analyze`) with Hydra's runtime set, as its
    `@hydra.main` would see it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=config_name):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def run_train(tmp_path):
    """Run the real training function on composed overrides; returns (metrics, run_dir)."""
    from dsr.train import train

    def _run(overrides: list[str], name: str = "run") -> tuple[dict, Path]:
        run_dir = tmp_path / name
        metrics = train(compose_train(overrides, run_dir))
        return metrics, run_dir

    yield _run
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """A seeded random-init state dict for torch-fidelity's InceptionV3, saved where `torch.load` reads it offline.

    The extractor's constructor always loads a state dict; a subclass that skips the load yields the module's own
    parameters. Convolutions get He init so activations keep their scale through the 90-odd layers (PyTorch's default
    init shrinks them to ~1e-8, which would make every distance trivially zero).
    """
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    folder = tmp_path_factory.mktemp("inception")
    empty = folder / "empty.pth"
    torch.save({}, empty)
    torch.manual_seed(0)
    net = _Unloaded("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(empty))
    for module in net.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = folder / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    return path
