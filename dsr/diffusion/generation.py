"""Per-index deterministic generation for evaluation: labels, noise and randomness are functions of the image index.

- Labels are class-balanced and depend on the index alone: label(i) = i % num_classes.
- Image i's randomness (its initial noise and, for the SDE sampler, its per-step noise) comes from its own CPU
  generator seeded from (seed, i), so image i is the same whether it is generated alone, in any batch, or on any
  rank. (Bit-exact equality across batch sizes also needs the model's kernels to be batch-invariant, which holds
  on CPU for the tiny test model; on GPUs, different batch sizes may pick different kernels and change the last
  bits, which can move a few pixels by one uint8 step.)
- Work is split into shards of consecutive indices (`shard_ranges`), which `dsr.sample` spreads over ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from dsr.utils.images import to_uint8

SEED_STRIDE = 1_000_003  # image i of seed s uses generator seed s * SEED_STRIDE + i


# -------------------------------------------------------------------------------------------------------
# indices, labels and randomness: functions of the index alone
# -------------------------------------------------------------------------------------------------------


def shard_ranges(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    """Half-open index ranges [s * shard_size, min((s + 1) * shard_size, num_samples)) of every shard s."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [(start, min(start + shard_size, num_samples)) for start in range(0, num_samples, shard_size)]


def labels_for(indices: Sequence[int] | np.ndarray, num_classes: int) -> np.ndarray:
    """Class labels int64 [n] of image indices [n]: label(i) = i % num_classes (balanced over any full cycle)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return np.asarray(indices, dtype=np.int64) % num_classes


def generators_for(indices: Sequence[int] | np.ndarray, seed: int) -> list[torch.Generator]:
    """One CPU generator per image index [n], seeded from (seed, index)."""
    return [torch.Generator().manual_seed((seed * SEED_STRIDE + int(i)) % (2**63)) for i in indices]


def noise_for(
    indices: Sequence[int] | np.ndarray,
    latent_shape: Sequence[int],
    seed: int,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Initial noise float32 [n, *latent_shape] on CPU; row k is the first draw of image indices[k]'s generator.

    Pass `generators` (from `generators_for(indices, seed)`) to keep drawing from them afterwards (the SDE
    sampler's per-step noise continues the same per-image stream); they are advanced by this call.
    """
    if generators is None:
        generators = generators_for(indices, seed)
    if len(generators) != len(indices):
        raise ValueError(f"need one generator per index, got {len(generators)} for {len(indices)}")
    shape = tuple(latent_shape)
    if not generators:
        return torch.empty((0, *shape), dtype=torch.float32)
    return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])


# -------------------------------------------------------------------------------------------------------
# generation
# -------------------------------------------------------------------------------------------------------


def generate_shard(
    module: Any,
    indices: Sequence[int] | np.ndarray,
    *,
    num_classes: int,
    seed: int,
    batch_size: int,
    ema: float | str = "auto",
    progress: Callable[[int], Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate the images of `indices` [n] with `module` (a DiTModule on its device, solver and guidance set).

    Returns images uint8 [n, H, W, 3] and labels int64 [n]. Each image depends only on (module, sampler, seed,
    index): the batching (`batch_size`) does not change it. `ema` picks the weights (`DiTModule.sampling_model`);
    `progress(k)` is called after each batch of k images.
    """
    indices = np.asarray(indices, dtype=np.int64)
    labels = labels_for(indices, num_classes)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = module.device
    chunks = []
    for start in range(0, len(indices), batch_size):
        batch = indices[start : start + batch_size]
        generators = generators_for(batch, seed)
        noise = noise_for(batch, module.latent_shape, seed, generators=generators).to(device)
        y = torch.from_numpy(labels[start : start + batch_size]).to(device)
        images = module.sample(y, noise=noise, generator=generators, ema=ema, progress=False)
        chunks.append(to_uint8(images))
        if progress is not None:
            progress(len(batch))
    if not chunks:
        raise ValueError("generate_shard needs at least one index")
    return np.concatenate(chunks), labels
