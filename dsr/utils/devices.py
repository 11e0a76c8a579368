"""Device selection."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto`: the GPU when there is one, else the CPU; anything else as torch names it."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
