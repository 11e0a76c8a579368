"""The identity 'encoder': non-overlapping pixel patches stacked as channels, so stage 2 runs in pixel space.

An image [B, 3, H, W] in [0, 1] is mapped to [-1, 1] and rearranged with `pixel_unshuffle` into
[B, 3 * p * p, H / p, W / p]: each latent position holds one p x p patch, as JiT's patch-16 pixel DiT sees it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class PixelEncoder(nn.Module):
    def __init__(self, image_size: int = 32, patch_size: int = 4, registers: str = "none") -> None:
        super().__init__()
        if registers != "none":
            raise ValueError(
                f"encoder=pixel has no encoder-side registers (registers={registers!r} asks for them): "
                "use registers=diffusion, dsr or none"
            )
        if image_size % patch_size:
            raise ValueError(f"encoder.image_size={image_size} must be divisible by encoder.patch_size={patch_size}")
        self.image_size = image_size
        self.patch_size = patch_size
        grid = image_size // patch_size
        self.latent_shape = (3 * patch_size * patch_size, grid, grid)

    def encode(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, 3 p^2, H/p, W/p] in [-1, 1]."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"PixelEncoder expects {self.image_size}x{self.image_size} images, got {tuple(images.shape[-2:])}; "
                "set encoder.image_size to the data's image size"
            )
        return F.pixel_unshuffle(images * 2 - 1, self.patch_size)

    def normalize(self, z: Tensor) -> Tensor:
        """Pixel latents need no statistics: raw and normalised are the same [-1, 1] patches."""
        return z

    def decode(self, z: Tensor) -> Tensor:
        """[B, 3 p^2, h, w] -> [B, 3, h p, w p] in [0, 1] (unclamped)."""
        return (F.pixel_shuffle(z, self.patch_size) + 1) / 2
