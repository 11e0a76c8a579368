"""Stable Diffusion's VAE as a frozen latent codec (SiT's and DiT's input space), through diffusers' AutoencoderKL.

    images [B, 3, H, W] in [0, 1] -> [-1, 1] -> AutoencoderKL encoder -> posterior N(mean, std^2) [B, 4, H/8, W/8]
      -> a sample mean + std * e                                        = `tokens`  (raw latents)
      -> z * 0.18215 (the scalar scale, default), or (z - mu) / sqrt(var + eps) per position with `stats`
                                                                        = `encode`  (what stage 2 sees)
    decode: the inverse normalisation, the AutoencoderKL decoder, [-1, 1] -> [0, 1].

Encoding draws a fresh sample of the posterior every time, as SiT's training does. The latent cache
(`dsr.cache_latents`) stores the posterior itself, mean and standard deviation stacked on the channels
(`cache_shape` = [8, h, w]) for each image and its mirror, and `normalize` draws the sample when the batch is read:
training from the cache then sees latents with the same distribution as encoding online, which a cache of one
fixed sample per image would not give (fast-DiT and REPA cache in the same spirit).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from dsr.encoders.rae import ENCODER_PRECISIONS, from_pretrained, register_latent_stats, seeded_init
from dsr.utils.frozen import keep_frozen_in_eval, mark_frozen

SD_SCALING_FACTOR = 0.18215  # Stable Diffusion's latent scale (unit variance, roughly), as SiT and DiT use it


def load_autoencoder(pretrained: str | None, config: dict | None, seed: int, local_files_only: bool) -> nn.Module:
    """diffusers' AutoencoderKL from a hub id / local directory, or a seeded random one from a config dict."""
    from diffusers import AutoencoderKL  # only this encoder needs diffusers at import time

    if pretrained is None:
        if config is None:
            raise ValueError("encoder.pretrained is null: give encoder.config (an AutoencoderKL config dict)")
        if OmegaConf.is_config(config):  # plain lists and dicts: save_pretrained writes the config as JSON
            config = OmegaConf.to_container(config, resolve=True)
        return seeded_init(lambda: AutoencoderKL(**config), seed)
    return from_pretrained(AutoencoderKL, pretrained, local_files_only)


class StableDiffusionVAE(nn.Module):
    """Images [B, 3, H, W] in [0, 1] <-> SD-VAE latents [B, 4, H/8, W/8]. See the module docstring.

    Args:
        pretrained: hub id (`stabilityai/sd-vae-ft-ema`, or `-mse`) or a local directory; None builds a random
            model from `config` (seeded by `seed`).
        image_size: the data's resolution (256 -> 4 x 32 x 32).
        scaling_factor: the scalar normalisation when `stats` is not given.
        stats: a `dsr.stats` file of per-position mean and variance of the raw latents, used instead of the scale.
        precision: "bf16-mixed" runs the VAE under bf16 autocast on GPUs that support it; "32-true" in float32.
        registers: encoder-side registers; a VAE has none.
        decoder, decoder_weights: only None (the commands that skip the RAE decoders set them so).
    """

    def __init__(
        self,
        pretrained: str | None = "stabilityai/sd-vae-ft-ema",
        image_size: int = 256,
        config: dict | None = None,
        seed: int = 0,
        local_files_only: bool = True,
        scaling_factor: float = SD_SCALING_FACTOR,
        stats: str | None = None,
        eps: float = 1e-5,
        precision: str = "bf16-mixed",
        registers: str = "none",
        decoder: None = None,
        decoder_weights: None = None,
    ) -> None:
        super().__init__()
        if decoder is not None or decoder_weights is not None:  # dsr.stats and dsr.cache_latents set both to null
            raise ValueError("encoder=sd_vae decodes with the VAE's own decoder: leave encoder.decoder(_weights) unset")
        if registers != "none":
            raise ValueError(
                f"encoder=sd_vae has no encoder-side registers (registers={registers!r} asks for them): "
                "use registers=diffusion, dsr or none"
            )
        if precision not in ENCODER_PRECISIONS:
            raise ValueError(f"encoder.precision={precision!r}: choose one of {ENCODER_PRECISIONS}")
        self.vae = mark_frozen(load_autoencoder(pretrained, config, seed, local_files_only))
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if image_size % factor:
            raise ValueError(f"data.image_size={image_size} is not a multiple of the VAE's downsampling {factor}")
        channels = int(self.vae.config.latent_channels)
        self.image_size = image_size
        self.latent_shape: tuple[int, int, int] = (channels, image_size // factor, image_size // factor)
        self.cache_shape: tuple[int, int, int] = (2 * channels, *self.latent_shape[1:])  # posterior mean; std
        self.scaling_factor = scaling_factor
        self.eps = eps
        self.precision = precision
        self.uses_stats = stats is not None
        register_latent_stats(self, stats, self.latent_shape)

    def train(self, mode: bool = True) -> StableDiffusionVAE:
        super().train(mode)
        keep_frozen_in_eval(self)
        return self

    def _run(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        bf16 = self.precision == "bf16-mixed" and x.is_cuda and torch.cuda.is_bf16_supported()
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=bf16):
            return fn(x).float()

    @torch.no_grad()
    def cache_tokens(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> the posterior, mean and standard deviation stacked: [B, 2C, h, w] (float32)."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"the VAE expects {self.image_size}x{self.image_size} images, got {tuple(images.shape[-2:])}; "
                "set data.image_size"
            )

        def posterior(x: Tensor) -> Tensor:
            dist = self.vae.encode(x).latent_dist
            return torch.cat([dist.mean, dist.std], dim=1)

        return self._run(posterior, images.float() * 2 - 1)

    def sample(self, posterior: Tensor) -> Tensor:
        """A draw from a posterior [B, 2C, h, w] (mean; std): raw latents [B, C, h, w]."""
        mean, std = posterior.chunk(2, dim=1)
        # randn of the shape, not randn_like of the (strided) half: the same draw as diffusers' `latent_dist.sample()`
        return mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)

    def tokens(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> raw latents [B, C, h, w]: one fresh sample of the posterior each call."""
        return self.sample(self.cache_tokens(images))

    def normalize(self, z: Tensor) -> Tensor:
        """Raw latents [B, C, h, w], or a cached posterior [B, 2C, h, w] (sampled here), -> normalised latents."""
        if z.shape[1] == self.cache_shape[0]:
            z = self.sample(z)
        if self.uses_stats:
            return (z - self.latent_mean) / torch.sqrt(self.latent_var + self.eps)
        return z * self.scaling_factor

    def denormalize(self, z: Tensor) -> Tensor:
        if self.uses_stats:
            return z * torch.sqrt(self.latent_var + self.eps) + self.latent_mean
        return z / self.scaling_factor

    def encode(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> normalised latents [B, C, h, w]."""
        return self.normalize(self.tokens(images))

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Normalised latents [B, C, h, w] -> images [B, 3, H, W], roughly in [0, 1] (not clamped)."""
        return (self._run(lambda x: self.vae.decode(x).sample, self.denormalize(z.float())) + 1) / 2
