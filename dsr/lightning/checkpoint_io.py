"""Checkpoint writing that never leaves a half-written file under the final name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dsr.utils.files import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints go through `atomic_write`: a crash mid-write keeps the previous checkpoint intact."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(checkpoint, f))
