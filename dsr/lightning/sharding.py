"""Fully sharded data parallel training (`trainer.strategy=fsdp`), for backbones too large to replicate comfortably
(DiT-DH-XL with its EMA copy and AdamW state: ~13 GB per replica in fp32)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy

from dsr.models.ddt import DiTDH
from dsr.models.dit import DiTBlock, LightningDiT
from dsr.models.jit import JiT
from dsr.utils.frozen import frozen_prefixes

# Shard units: every transformer block (HeadBlock is a DiTBlock), and each whole backbone, so the trained backbone
# and its EMA copy can each run a forward of their own (sampling callbacks) with their parameters gathered.
WRAPPED = {DiTBlock, LightningDiT, DiTDH, JiT}


class ShardedStrategy(FSDPStrategy):
    """FSDP whose sharded checkpoints (one directory each, every rank writing its part) are swapped in whole:
    written under a temporary name, then renamed over the old one, which is removed only after that."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: str | Path, storage_options: Any = None) -> None:
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(f"{path.name}.partial")
        previous = path.with_name(f"{path.name}.previous")
        if self.global_rank == 0 and partial.exists():
            shutil.rmtree(partial)  # left by a crash mid-write
        self.barrier("sharded_checkpoint_clean")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("sharded_checkpoint_written")
        if self.global_rank == 0:
            if path.exists():
                path.rename(previous)
            partial.rename(path)
            shutil.rmtree(previous, ignore_errors=True)
        self.barrier("sharded_checkpoint_swapped")


def fsdp_strategy(module: L.LightningModule, **kwargs) -> ShardedStrategy:
    """FSDP with `WRAPPED` as the wrap policy; frozen networks are left out of sharding (replicated, as under DDP),
    and checkpoints are sharded."""
    return ShardedStrategy(
        auto_wrap_policy=WRAPPED,
        state_dict_type="sharded",
        ignored_modules=[module.get_submodule(prefix.rstrip(".")) for prefix in frozen_prefixes(module)],
        **kwargs,
    )
