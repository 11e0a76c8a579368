"""ImageNet from webdataset shards (written by `python -m dsr.data.make_shards`): `data=imagenet_wds`.

The batches are those of `data=imagenet`, (images [B, 3, S, S] float in [0, 1], labels [B] int64): the shards hold
the ADM centre crops already, so a loader worker only decodes, flips at random and converts.

Distribution: rank r of W owns shards r, r + W, ... (every rank reads its own data). Inside a rank, each loader
worker draws shards with replacement from that subset (webdataset's `ResampledShards`), passes their samples through
a shuffle buffer, and batches them. All of a worker's randomness (shard draws, shuffle buffer, flips) is seeded by
(seed, epoch, rank, worker id), so a given epoch's stream does not depend on how the run got there.

An epoch is a step budget, not one pass over every image: `epoch_length` samples (default: all of them), that is
exactly `steps_per_epoch() * accumulate` micro-batches per rank whatever the number of workers (the length is put on
the loader; webdataset's dataset-level `with_epoch` would count per worker). A resampled stream has no position to
save, so unlike `data=imagenet` a run resumed mid-epoch does not continue with the very next batch: it draws the
epoch's stream afresh (deterministic for that epoch) for the rest of the epoch's steps.

Unreadable data never stops training: a sample whose image does not decode, or a shard that is missing or truncated,
is skipped with a warning naming it, and counted (`ShardDataModule.skipped` in the main process; each worker logs its
own running count).
"""

from __future__ import annotations

import logging
import multiprocessing
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import webdataset as wds
from torch.utils.data import default_collate, get_worker_info
from torchvision.transforms import functional as TF

from dsr.data.datamodule import BatchPlan
from dsr.utils import files
from dsr.utils.files import MANIFEST

log = logging.getLogger("dsr.data.webdataset")

_HINT = (
    "set data.root=/path/to/shards (or $IMAGENET_WDS_DIR) to a folder written by "
    "`python -m dsr.data.make_shards source=/path/to/imagenet/train output=/path/to/shards`"
)
# Independent random streams of one worker.
_SHARDS, _BUFFER, _FLIPS = range(3)


def read_manifest(root: str | Path | None) -> dict:
    """The manifest of a complete shard folder; FileNotFoundError saying what to set when there is none."""
    if root is None or str(root) == "":
        raise FileNotFoundError(f"data.root is not set: {_HINT}")
    return files.read_manifest(root, "data.root", _HINT)


class SharedEpoch:
    """The epoch number, in shared memory: set by the main process at the start of each pass, read by every loader
    worker (persistent ones included) when it starts its stream."""

    def __init__(self, epoch: int = 0) -> None:
        self._value = multiprocessing.Value("i", epoch)

    def get(self) -> int:
        return self._value.value

    def set(self, epoch: int) -> None:
        self._value.value = epoch


@dataclass
class StreamSeeds:
    """Seeds of one worker's stream: (seed, epoch, rank, worker id, purpose) -> 31-bit int. Called in the worker."""

    seed: int
    rank: int
    epoch: SharedEpoch

    def __call__(self, purpose: int) -> int:
        worker = get_worker_info()
        return wds.utils.make_seed(self.seed, self.epoch.get(), self.rank, worker.id if worker else 0, purpose)


@dataclass
class ResampledSource:
    """First pipeline stage: a fresh `ResampledShards` over this rank's shards at each pass, so that its seed is the
    epoch's (a reused one would count passes itself, from 0 again after a restart)."""

    urls: list[str]
    seeds: StreamSeeds

    def __call__(self) -> Iterator[dict]:
        # deterministic=True: no pid/time in the seed; the worker and rank are in ours (worker_seed is then unused).
        shards = wds.ResampledShards(self.urls, seed=self.seeds(_SHARDS), worker_seed=lambda: 0, deterministic=True)
        return iter(shards)


@dataclass
class SeededShuffle:
    """webdataset's shuffle buffer, seeded per pass."""

    bufsize: int
    seeds: StreamSeeds

    def __call__(self, samples: Iterator) -> Iterator:
        return wds.shuffle(self.bufsize, seed=self.seeds(_BUFFER))(samples)


@dataclass
class ToTensors:
    """(PIL RGB image, label) -> ([3, S, S] float in [0, 1], label), mirrored with probability 1/2 when `flip`."""

    flip: bool
    seeds: StreamSeeds

    def __call__(self, samples: Iterator) -> Iterator[tuple[torch.Tensor, int]]:
        rng = random.Random(self.seeds(_FLIPS))
        for image, label in samples:
            x = TF.to_tensor(image)
            if self.flip and rng.random() < 0.5:
                x = TF.hflip(x)
            yield x, label


class SkipAndCount:
    """webdataset `handler=`: log the error (naming the shard or sample), count it, and carry on."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        if isinstance(exn, wds.autodecode.DecodingError):  # carries the sample; its message is empty
            what = f"sample {exn.key!r} ({exn.k}) of {exn.url}: {exn.__cause__!r}"
        else:  # webdataset appends the shard's url (and stream) to the exception's args
            what = repr(exn)
        worker = get_worker_info()
        log.warning(
            "skipped unreadable data, %d so far in %s: %s",
            self.count,
            f"loader worker {worker.id}" if worker else "the loader",
            what,
        )
        return True


class EpochLoader(wds.WebLoader):
    """`wds.WebLoader` over one rank's stream, cut to `num_batches` micro-batches per pass (with `len()` for
    Lightning); each pass first publishes its epoch to the workers, whose streams are seeded by it."""

    def __init__(
        self, dataset: wds.DataPipeline, num_batches: int, epoch: SharedEpoch, epoch_of_pass: Callable[[int], int],
        **loader_kwargs,
    ) -> None:  # fmt: skip
        super().__init__(dataset, batch_size=None, **loader_kwargs)  # the pipeline batches
        self.with_epoch(num_batches)
        self.num_batches = num_batches
        self.epoch = epoch
        self.epoch_of_pass = epoch_of_pass
        self.passes = 0

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator:
        return self._epoch()

    def _epoch(self) -> Iterator:
        # A generator: nothing happens until the first batch is asked for (Lightning calls iter() once to check).
        self.epoch.set(self.epoch_of_pass(self.passes))
        self.passes += 1
        yield from super().__iter__()


class ShardDataModule(L.LightningDataModule):
    """Training batches from the shards under `root`, with the interface of `ImageDataModule`."""

    def __init__(
        self,
        root: str | Path | None,
        image_size: int,
        num_classes: int,
        global_batch_size: int,
        micro_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_buffer: int = 5000,
        flip: bool = True,
        epoch_length: int | None = None,
        pin_memory: bool = True,
        prefetch_factor: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.manifest = read_manifest(root)
        self.root = Path(root).expanduser()
        if self.manifest["image_size"] != image_size:
            raise ValueError(
                f"data.image_size={image_size}, but the shards in {self.root} hold {self.manifest['image_size']}px "
                f"crops; set data.image_size={self.manifest['image_size']} or write shards with "
                f"`python -m dsr.data.make_shards image_size={image_size}`"
            )
        if len(self.manifest["classes"]) != num_classes:
            raise ValueError(
                f"data.num_classes={num_classes}, but the shards in {self.root} hold "
                f"{len(self.manifest['classes'])} classes"
            )
        missing = [s["name"] for s in self.manifest["shards"] if not (self.root / s["name"]).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} shards listed in {self.root / MANIFEST} are missing: {missing[:5]}"
            )
        self.urls = [str(self.root / s["name"]) for s in self.manifest["shards"]]
        self.image_size = image_size
        self.num_classes = num_classes
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.flip = flip
        self.epoch_length = self.manifest["num_samples"] if epoch_length is None else epoch_length
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor  # batches each worker keeps ready (None: torch's 2)
        self.seed = seed
        self.plan: BatchPlan | None = None
        self.dataset: wds.DataPipeline | None = None  # this rank's stream, once a loader is built
        self._handler = SkipAndCount()

    @property
    def skipped(self) -> int:
        """Errors skipped by streams iterated in this process (num_workers=0); workers log their own counts."""
        return self._handler.count

    def configure_batches(self, world_size: int) -> BatchPlan:
        """Fix the per-device batch for `world_size` devices; the trainer must accumulate `plan.accumulate`."""
        if len(self.urls) < world_size:  # checked here, before the model is built
            raise ValueError(
                f"{self.root} holds {len(self.urls)} shards, fewer than the {world_size} ranks: every rank needs "
                "shards of its own; write smaller ones (`python -m dsr.data.make_shards samples_per_shard=...`)"
            )
        self.plan = BatchPlan.derive(self.global_batch_size, world_size, self.micro_batch_size)
        return self.plan

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: `epoch_length` samples in whole global batches."""
        return max(1, self.epoch_length // self.global_batch_size)

    def pipeline(self, rank: int, world_size: int, epoch: SharedEpoch) -> wds.DataPipeline:
        """The endless stream of micro-batches (images [B, 3, S, S] in [0, 1], labels [B] int64) of `rank`."""
        if self.plan is None:
            raise RuntimeError("call configure_batches(world_size) before building the train loader")
        seeds = StreamSeeds(self.seed, rank, epoch)
        handler = self._handler
        return wds.DataPipeline(
            ResampledSource(self.urls[rank::world_size], seeds),
            wds.tarfile_to_samples(handler=handler),
            SeededShuffle(self.shuffle_buffer, seeds) if self.shuffle_buffer > 1 else None,
            wds.decode("pil", handler=handler),
            wds.to_tuple(self.manifest["format"], "cls", handler=handler),
            ToTensors(self.flip, seeds),
            wds.batched(self.plan.micro_batch_size, collation_fn=default_collate, partial=False),
        )

    def loader(self, rank: int = 0, world_size: int = 1, epoch: int | Callable[[], int] = 0) -> EpochLoader:
        """Rank `rank`'s loader: `steps_per_epoch() * accumulate` micro-batches per pass. `epoch` is the first pass's
        epoch (later passes count on), or a function giving the current epoch at each pass (the trainer's)."""
        if self.plan is not None and self.plan.world_size != world_size:
            raise RuntimeError(f"configure_batches({self.plan.world_size}) was called, but world_size={world_size}")
        shared = SharedEpoch()
        self.dataset = self.pipeline(rank, world_size, shared)
        epoch_of_pass = (lambda _: epoch()) if callable(epoch) else (lambda n: epoch + n)
        return EpochLoader(
            self.dataset,
            self.steps_per_epoch() * self.plan.accumulate,
            shared,
            epoch_of_pass,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
        )

    def train_dataloader(self) -> EpochLoader:
        trainer = self.trainer
        if trainer is None:
            return self.loader()
        return self.loader(trainer.global_rank, trainer.world_size, epoch=lambda: trainer.current_epoch)

    def val_dataloader(self) -> list:
        return []  # no validation set; Lightning skips validation
