"""Device selection."""

from __future__ import annotations

import torch


def resolve_device(accelerator: str | torch.device) -> torch.device:
    """One device from Lightning's `accelerator` names: `auto` (the GPU when there is one, else the CPU), `gpu` or
    `cuda`, `cpu`, `mps`; a torch device name (`cuda:1`) picks one GPU."""
    if str(accelerator) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device("cuda" if str(accelerator) == "gpu" else accelerator)
