"""One LightningDataModule for every image source: a map-style dataset of (image [3, H, W] in [0, 1], label).

The global batch size is the recipe's (1024 in the paper); the per-device batch and the gradient
accumulation are derived from the number of devices, so the same config trains on 1 or 64 GPUs.
The order of epoch e is a pure function of (seed, e) (a `DistributedSampler` over the actual ranks, even
for one device), and the loader is a `StatefulDataLoader`, whose position Lightning saves in checkpoints:
a run resumed mid-epoch continues with the very next batch, and later epochs are unchanged.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from dsr.data.latents import FlipSampler

# `val_dataloader` returns [] when there is no validation set; Lightning then skips validation, with this notice.
warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch is split: global = per_device * world_size, per_device = micro * accumulate."""

    global_batch_size: int
    world_size: int
    micro_batch_size: int
    accumulate: int

    @classmethod
    def derive(cls, global_batch_size: int, world_size: int, max_micro_batch_size: int | None = None) -> BatchPlan:
        """Split `global_batch_size` over `world_size` devices, accumulating when a device's share exceeds
        `max_micro_batch_size` (the most that fits in its memory)."""
        if global_batch_size % world_size:
            raise ValueError(
                f"data.global_batch_size={global_batch_size} is not divisible by the {world_size} devices; "
                "change data.global_batch_size or the number of devices"
            )
        per_device = global_batch_size // world_size
        micro = per_device if max_micro_batch_size is None else min(per_device, max_micro_batch_size)
        if per_device % micro:
            raise ValueError(
                f"the per-device batch {per_device} (data.global_batch_size={global_batch_size} over {world_size} "
                f"devices) is not divisible by data.micro_batch_size={max_micro_batch_size}"
            )
        return cls(global_batch_size, world_size, micro, per_device // micro)


class ImageDataModule(L.LightningDataModule):
    def __init__(
        self,
        dataset: Dataset,
        image_size: int,
        num_classes: int,
        global_batch_size: int,
        micro_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = True,
        prefetch_factor: int | None = None,
        seed: int = 0,
        val_dataset: Dataset | None = None,
    ) -> None:
        super().__init__()
        self.dataset = dataset
        self.val_dataset = val_dataset
        self.image_size = image_size
        self.num_classes = num_classes
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor  # batches each worker keeps ready (None: torch's 2)
        self.seed = seed
        self.plan: BatchPlan | None = None

    @property
    def yields_latents(self) -> bool:
        """Whether a batch's x holds raw latents (a latent cache) rather than images."""
        return getattr(self.dataset, "yields_latents", False)

    def configure_batches(self, world_size: int) -> BatchPlan:
        """Fix the per-device batch for `world_size` devices; the trainer must accumulate `plan.accumulate`."""
        self.plan = BatchPlan.derive(self.global_batch_size, world_size, self.micro_batch_size)
        return self.plan

    def steps_per_epoch(self) -> int:
        """Optimizer steps per pass over the data (incomplete global batches are dropped)."""
        return max(1, len(self.dataset) // self.global_batch_size)

    def train_dataloader(self) -> StatefulDataLoader:
        if self.plan is None:
            raise RuntimeError("call configure_batches(world_size) before building the train loader")
        if len(self.dataset) < self.plan.global_batch_size:
            raise ValueError(
                f"the dataset has {len(self.dataset)} images, fewer than one global batch "
                f"(data.global_batch_size={self.plan.global_batch_size})"
            )
        world_size, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        # Cached latents hold several views per image (image, mirror): their sampler also picks one per epoch.
        sampler_class = FlipSampler if getattr(self.dataset, "num_views", 1) > 1 else DistributedSampler
        sampler = sampler_class(
            self.dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=self.seed, drop_last=True
        )
        # A resumed run restores the loader's position before Lightning sets the sampler's epoch for the epoch
        # underway: without this, a run resumed in epoch e >= 1 would replay epoch 0's order from that position.
        sampler.set_epoch(self.trainer.current_epoch if self.trainer else 0)
        return StatefulDataLoader(
            self.dataset,
            batch_size=self.plan.micro_batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
        )

    def val_dataloader(self) -> DataLoader | list:
        """The validation set in order, split over ranks without the padding duplicates `DistributedSampler` adds
        (rank r takes images r, r + world, ...), one micro-batch at a time; [] (no validation) without one."""
        if self.val_dataset is None:
            return []
        if self.plan is None:
            raise RuntimeError("call configure_batches(world_size) before building the validation loader")
        world_size, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = UnrepeatedDistributedSampler(self.val_dataset, num_replicas=world_size, rank=rank, shuffle=False)
        return DataLoader(
            self.val_dataset,
            batch_size=self.plan.micro_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
        )
