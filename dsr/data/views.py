"""Which images a pass over a dataset sees: seeded subsets, the random flip turned off, and explicit mirror views
(latent statistics and latent caches cover every image and its mirror, since stage 2 trains on flipped images)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, open_dict
from torch import Tensor

VIEWS = ("original", "both")


def views_of(images: Tensor, views: str) -> Tensor:
    """[B, 3, H, W] -> [B * V, 3, H, W]: the images, and with `both` their horizontal mirrors."""
    if views not in VIEWS:
        raise ValueError(f"stats.views={views!r}: choose one of {VIEWS}")
    return torch.cat([images, images.flip(-1)]) if views == "both" else images


def subset_indices(size: int, num_images: int | None, seed: int) -> list[int]:
    """All indices, or a seeded random subset of `num_images` of them (sorted): what `num_images` means in every
    command that reads part of a dataset (stats, cache_latents, analyze)."""
    if num_images is None or num_images >= size:
        return list(range(size))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(size, generator=generator)[:num_images].tolist())


def without_flip(dataset_node: DictConfig) -> DictConfig:
    """The dataset config with its random flip off: the views are chosen explicitly here."""
    node = dataset_node.copy()
    if "flip" in node:
        with open_dict(node):
            node.flip = False
    return node
