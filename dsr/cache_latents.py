"""Write an encoder's latents of a dataset to shards, so long stage-2 runs skip the encoder.

    python -m dsr.cache_latents encoder=siglip2_so400m data=imagenet [cache.views=both] [devices=8]
    python -m dsr.train encoder=siglip2_so400m data=latents ...        # trains from the cache

Each image is centre-cropped as in training (no random flip) and encoded together with its mirror image
(`views=both`), the raw latents stored in float16 by default (see `dsr/data/latents.py` for the layout); an encoder
with a `cache_shape` stores what its `cache_tokens` gives instead (encoder=sd_vae: the posterior's mean and standard
deviation, sampled afresh by `normalize` at every step).
`cache.num_images=N` caches a seeded random subset of N images (in index order), as `stats.num_images` picks one.
Shard s holds images [s * shard_size, (s + 1) * shard_size) of that set and is written by rank s % world_size,
atomically; shards already on disk are skipped, so a crashed run resumes by running the same command again. The
manifest is written last: a cache without one is incomplete and training refuses it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from dsr.config import build, entry_point
from dsr.utils.files import atomic_write, guard_settings, remove_stale_temps, write_manifest

# torch, Lightning and the encoders are imported where the run needs them, so `--help` answers without them.

log = logging.getLogger("dsr.cache_latents")

DTYPES = {"float16": np.float16, "float32": np.float32}


def cached_tokens(codec, images):
    """What the cache stores of a batch: the codec's `cache_tokens` (the SD-VAE's posterior) or its raw latents."""
    return codec.cache_tokens(images) if hasattr(codec, "cache_tokens") else codec.tokens(images)


def encode_shard(codec, dataset, start: int, stop: int, views: str, batch_size: int, num_workers: int, device):
    """Raw latents [n, V, C, h, w] (float32) and labels [n] of images [start, stop)."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from dsr.data.views import views_of

    loader = DataLoader(Subset(dataset, range(start, stop)), batch_size=batch_size, num_workers=num_workers)
    latents, labels = [], []
    for images, y in loader:
        z = cached_tokens(codec, views_of(images.to(device), views)).cpu()
        num_views = len(z) // len(images)
        latents.append(z.reshape(num_views, len(images), *z.shape[1:]).transpose(0, 1))
        labels.append(torch.as_tensor(y))
    return torch.cat(latents).numpy(), torch.cat(labels).numpy().astype(np.int64)


def run(cfg: DictConfig) -> Path:
    if cfg.cache.dtype not in DTYPES:
        raise ValueError(f"cache.dtype={cfg.cache.dtype!r}: choose one of {sorted(DTYPES)}")
    from torch.utils.data import Subset

    from dsr.data.latents import labels_path, latents_path
    from dsr.data.views import subset_indices, without_flip
    from dsr.diffusion.generation import shard_ranges
    from dsr.utils.fabric import launch_fabric

    fabric = launch_fabric(cfg.accelerator, cfg.devices)
    codec = build(cfg.encoder).to(fabric.device).eval()
    dataset = build(without_flip(cfg.data.dataset))
    indices = subset_indices(len(dataset), cfg.cache.num_images, cfg.seed)
    if len(indices) < len(dataset):
        dataset = Subset(dataset, indices)
    num_samples = len(dataset)
    out_dir = Path(cfg.cache.output)
    settings = {
        "num_samples": num_samples,
        **({"subset_seed": int(cfg.seed)} if cfg.cache.num_images is not None else {}),
        "shard_size": int(cfg.cache.shard_size),
        "latent_shape": list(getattr(codec, "cache_shape", codec.latent_shape)),
        "views": ["original", "flipped"] if cfg.cache.views == "both" else ["original"],
        "dtype": cfg.cache.dtype,
        "encoder": OmegaConf.to_container(cfg.encoder, resolve=True),
        "dataset": OmegaConf.to_container(cfg.data.dataset, resolve=True),
    }
    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        guard_settings(out_dir, settings, "cache.output")
    fabric.barrier()

    ranges = shard_ranges(num_samples, cfg.cache.shard_size)
    mine = [s for s in range(len(ranges)) if s % fabric.world_size == fabric.global_rank]
    todo = [s for s in mine if not latents_path(out_dir, s).is_file()]
    remove_stale_temps(path for s in todo for path in (labels_path(out_dir, s), latents_path(out_dir, s)))
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="shard", desc="caching latents",
               disable=fabric.global_rank != 0)  # fmt: skip
    for shard in todo:
        start, stop = ranges[shard]
        latents, labels = encode_shard(
            codec, dataset, start, stop, cfg.cache.views, cfg.cache.batch_size, cfg.cache.num_workers, fabric.device
        )
        # Labels first: a shard counts as done once its latents file exists.
        stored = latents.astype(DTYPES[cfg.cache.dtype])
        atomic_write(labels_path(out_dir, shard), lambda f, a=labels: np.save(f, a))
        atomic_write(latents_path(out_dir, shard), lambda f, a=stored: np.save(f, a))
        bar.update(1)
    bar.close()
    fabric.barrier()
    if fabric.global_rank == 0:
        write_manifest(out_dir, settings)
        print(f"latent cache ({num_samples} images x {len(settings['views'])} views): {out_dir}", flush=True)
    fabric.barrier()
    return out_dir


@entry_point("cache_latents")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
