"""The interface every encoder offers to stage 2: images in, latents out, and back."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class LatentCodec(Protocol):
    """Images [B, 3, H, W] in [0, 1] <-> latents [B, C, h, w]. Stage 2 never sees more than this.

    A codec whose encoding is random may also offer `cache_tokens(images)` and `cache_shape`: what `dsr.cache_latents`
    stores instead of one draw (the SD-VAE's posterior mean and standard deviation), which `normalize` then samples.
    """

    latent_shape: tuple[int, int, int]  # (C, h, w)
    image_size: int

    def encode(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, C, h, w] (normalised latents)."""
        ...

    def normalize(self, z: Tensor) -> Tensor:
        """Raw latents [B, C, h, w] (as a latent cache stores them) -> normalised latents, as `encode` returns them."""
        ...

    def decode(self, z: Tensor) -> Tensor:
        """[B, C, h, w] -> [B, 3, H, W], roughly in [0, 1] (clamp before saving)."""
        ...
