"""Cached encoder latents: shards written by `python -m dsr.cache_latents`, read back as a map-style dataset.

Layout of a cache directory:

    manifest.json                 num_samples, shard_size, latent_shape, views, dtype, encoder and dataset configs
    latents_00000.npy ...         [n, V, C, h, w] raw latents (before normalisation) of images [s * shard_size, ...)
    labels_00000.npy ...          [n] int64 class labels

View 0 is the image as loaded (centre-cropped), view 1 (when cached) its mirror image. The latents are raw, so
new statistics need no new cache. Shards are memory-mapped: a worker touches only the rows it reads.

`CachedLatents[i]` is (raw latents [C, h, w], label) of image i's first view; `CachedLatents[(i, v)]` its view v.
Like every dataset here it yields (x, y) pairs; `yields_latents` tells stage 2 that x needs normalising, not
encoding. `FlipSampler` is the
`DistributedSampler` for it: each epoch it picks one view per image from a generator keyed by (seed, epoch), the
cached counterpart of a random horizontal flip that stays exactly reproducible on resume.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset, DistributedSampler

from dsr.config import rename_keys
from dsr.utils import files

_HINT = "write a cache with `python -m dsr.cache_latents encoder=<name> data=<dataset>` or set data.dataset.root"


def latents_path(root: str | Path, shard: int) -> Path:
    return Path(root) / f"latents_{shard:05d}.npy"


def labels_path(root: str | Path, shard: int) -> Path:
    return Path(root) / f"labels_{shard:05d}.npy"


def read_manifest(root: str | Path) -> dict:
    return files.read_manifest(root, "data.dataset.root", _HINT)


class CachedLatents(Dataset):
    """Items `{"latents": float32 [C, h, w], "y": int}` from a latent cache directory."""

    yields_latents = True  # x is raw latents (stage 2 normalises them) rather than images (which it encodes)

    def __init__(self, root: str | None) -> None:
        if root is None:
            raise FileNotFoundError(f"data.dataset.root is not set; {_HINT}")
        self.root = Path(root).expanduser()
        self.manifest = read_manifest(self.root)
        self.num_samples = int(self.manifest["num_samples"])
        self.shard_size = int(self.manifest["shard_size"])
        self.num_views = len(self.manifest["views"])
        self.latent_shape = tuple(self.manifest["latent_shape"])
        self._shards: dict[int, np.ndarray] = {}
        num_shards = -(-self.num_samples // self.shard_size)
        # Every shard's header is read now (memory maps, no data): a missing, truncated or foreign shard fails at
        # start-up naming the file, not in a loader worker hours into the run.
        for shard in range(num_shards):
            rows = min(self.shard_size, self.num_samples - shard * self.shard_size)
            self._open(latents_path(self.root, shard), (rows, self.num_views, *self.latent_shape))  # dropped: closed
        self.labels = np.concatenate([self._open(labels_path(self.root, s), None) for s in range(num_shards)])
        if len(self.labels) != self.num_samples:
            raise ValueError(f"data.dataset.root={self.root}: the label shards hold {len(self.labels)} labels for "
                             f"{self.num_samples} latents; re-run dsr.cache_latents to rewrite the cache")  # fmt: skip

    def _open(self, path: Path, shape: tuple[int, ...] | None) -> np.ndarray:
        """A shard as a read-only memory map, checked against the shape the manifest gives (None: any)."""
        if not path.is_file():
            raise FileNotFoundError(f"data.dataset.root={self.root}: {path.name} is missing; re-run dsr.cache_latents")
        try:
            array = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as error:  # a header or a body cut short, or not an .npy file
            raise ValueError(
                f"data.dataset.root={self.root}: {path.name} is truncated or damaged ({error}); re-run "
                "dsr.cache_latents to rewrite it"
            ) from None
        if shape is not None and tuple(array.shape) != shape:
            raise ValueError(
                f"data.dataset.root={self.root}: {path.name} holds an array of shape {tuple(array.shape)}, the "
                f"manifest promises {shape}: written by another encoder or cache; re-run dsr.cache_latents"
            )
        return array

    def __len__(self) -> int:
        return self.num_samples

    def _shard(self, shard: int) -> np.ndarray:
        if shard not in self._shards:  # opened when first read (one map per shard a process reads)
            self._shards[shard] = np.load(latents_path(self.root, shard), mmap_mode="r")
        return self._shards[shard]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, view = key if isinstance(key, tuple) else (key, 0)
        shard, row = divmod(int(index), self.shard_size)
        # A copy: the shards are read-only memory maps.
        latents = torch.from_numpy(np.array(self._shard(shard)[row, view], dtype=np.float32))
        return latents, int(self.labels[index])

    def check_encoder(self, encoder: Mapping, latent_shape: tuple[int, ...]) -> None:
        """Fail at start-up if the cache was written by another encoder (or other encoder settings)."""
        if tuple(latent_shape) != self.latent_shape:
            raise ValueError(
                f"data.dataset.root={self.root} holds latents of shape {self.latent_shape}, but the encoder makes "
                f"{tuple(latent_shape)}: cache this encoder's latents or choose the matching encoder"
            )
        stored = rename_keys("train", OmegaConf.create({"encoder": self.manifest.get("encoder", {})}), warn=False)
        cached = OmegaConf.to_container(stored.encoder)
        keys = ("_target_", "pretrained", "resolution", "config", "registers")
        differ = [k for k in keys if k in cached and k in encoder and cached[k] != encoder[k]]
        if differ:
            raise ValueError(
                f"data.dataset.root={self.root} was cached with another encoder (differs in {', '.join(differ)}); "
                "cache this encoder's latents or choose the matching encoder"
            )


class FlipSampler(DistributedSampler):
    """Yields (index, view): the distributed shuffle of the indices, each with a view drawn per (seed, epoch)."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        views = torch.randint(self.dataset.num_views, (len(self.dataset),), generator=generator)
        for index in super().__iter__():
            yield index, int(views[index])
