"""What the stage-1 and stage-2 LightningModules share: EMA copies of the trained network, and the epoch length that
turns schedules given in epochs into optimizer steps."""

from __future__ import annotations

import lightning as L
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def ema_copy(model: nn.Module, decay: float) -> AveragedModel:
    """A frozen exponential moving average of `model` (buffers included) with this decay; one per decay for runs that
    keep several. `update_parameters(model)` after each optimizer step; the average lives in `.module`."""
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.requires_grad_(False)
    return ema


def steps_per_epoch(trainer: L.Trainer, setting: str) -> float:
    """Optimizer steps per epoch, from the datamodule; a clear error naming `setting` (what asked for epochs)."""
    datamodule = trainer.datamodule
    if datamodule is None or not hasattr(datamodule, "steps_per_epoch"):
        raise ValueError(f"{setting} is given in epochs: it needs a datamodule with steps_per_epoch()")
    return datamodule.steps_per_epoch()
