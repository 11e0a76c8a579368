"""Lightning Fabric for the data-parallel scripts (sampling, statistics, latent caching): one process per device,
DDP when more than one, and `torchrun` works as well."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from omegaconf import OmegaConf


def _strategy(devices: Any) -> str:
    if isinstance(devices, int) and devices > 1:
        return "ddp"
    if isinstance(devices, str) and devices.isdigit() and int(devices) > 1:
        return "ddp"
    if isinstance(devices, Sequence) and not isinstance(devices, str) and len(devices) > 1:
        return "ddp"
    return "auto"


def launch_fabric(accelerator: str, devices: Any, precision: str = "32-true") -> L.Fabric:
    """A launched Fabric on `devices` (an int, "auto", or a list; a config node is accepted)."""
    devices = OmegaConf.to_container(devices) if OmegaConf.is_config(devices) else devices
    fabric = L.Fabric(accelerator=accelerator, devices=devices, strategy=_strategy(devices), precision=precision)
    fabric.launch()
    return fabric
