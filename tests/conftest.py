"""Shared fixtures: the real training function on composed overrides, offline W&B, tiny Inception weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def run_train(tmp_path):
    """Run the real training function on composed overrides; returns (metrics, run_dir)."""
    from helpers import compose_train

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


@pytest.fixture(scope="session")
def proxy_dir(tmp_path_factory) -> Path:
    """Where this test run caches its proxy classifiers (each trained once per run, ~10 s)."""
    return tmp_path_factory.mktemp("proxy")


@pytest.fixture(scope="session")
def digits_proxy(proxy_dir):
    """The proxy classifier of the 16 px digits (the size the quality tests train at)."""
    from dsr.data.digits import Digits
    from dsr.metrics.proxy import proxy_for

    return proxy_for(Digits("train", image_size=16), proxy_dir)
