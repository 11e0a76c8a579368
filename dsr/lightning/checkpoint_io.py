"""Checkpoint writing that never leaves a half-written file under the final name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dsr.utils.files import TEMP_SUFFIX, atomic_write, load_tensors


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous one is untouched."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints go through `atomic_write`: a crash mid-write keeps the previous checkpoint intact; a resume
    reads them through `load_tensors` (weights_only: a checkpoint swapped in by someone else cannot run code)."""

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return load_tensors(path, "resume", map_location if map_location is not None else "cpu")

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        """Write `path` atomically; a failed write (a full disk, no permission) stops the run with one message naming
        the file and the error, and leaves the previous checkpoint under that name intact."""
        path = Path(path)
        # A run killed mid-save leaves `<name>.ckpt.tmp-<pid>`, as large as a checkpoint, under a name no later save
        # reuses (top-k names carry the step); one process writes a run's checkpoints, so any found now are stale.
        for stale in path.parent.glob(f"*.ckpt{TEMP_SUFFIX}*"):
            stale.unlink(missing_ok=True)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda f: torch.save(checkpoint, f))
        except (OSError, RuntimeError) as error:  # torch.save reports a failed write as a RuntimeError
            kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written before"
            raise CheckpointWriteError(
                f"could not write the checkpoint {path}: {error}; {kept}. Free space (or fix the permissions) and run "
                "the same command again to resume"
            ) from error
