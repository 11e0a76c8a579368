"""A callback for multi-process tests: every rank saves its own copy of the trained weights at the end."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class SaveRankWeights(L.Callback):
    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.backbone.state_dict().items()}
        torch.save({"state": state, "world_size": trainer.world_size}, self.dirpath / f"rank{trainer.global_rank}.pt")
