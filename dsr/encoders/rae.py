"""Representation autoencoder: a frozen pretrained ViT encoder, per-position latent statistics, a ViT decoder.

    images [B, 3, H, W] in [0, 1]
      -> resize to the encoder's input size, normalise with its pixel mean/std
      -> frozen encoder -> patch tokens [B, N, C] (CLS and trained registers dropped, final LayerNorm without affine)
      -> [B, C, h, w]                                             = `tokens`   (raw latents)
      -> (z - mean) / sqrt(var + eps), per (c, y, x) position     = `encode`   (what stage 2 sees)
    decode: the inverse normalisation, the decoder, the encoder's pixel normalisation undone -> [B, 3, H, W]

Each encoder family (`siglip2.py`, `dinov2.py`) subclasses `RepresentationAutoencoder` and only says how to load
its Hugging Face model and how to run it to patch tokens. The frozen encoder (and the decoder, in stage 2) are loaded
from their own files and kept out of checkpoints; the statistics travel in them as buffers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsr.registers.neurons import load_register_neurons
from dsr.registers.ttr import TestTimeRegisters
from dsr.utils.files import load_tensors
from dsr.utils.frozen import keep_frozen_in_eval, mark_frozen

log = logging.getLogger(__name__)

ENCODER_REGISTERS = ("none", "trained", "ttr", "recursive_ttr")
ENCODER_PRECISIONS = ("bf16-mixed", "32-true")  # Lightning's names, as trainer.precision spells them
STATS_HINT = (
    "compute them with `python -m dsr.stats encoder=<name> data=<dataset>` or import released ones with dsr.convert"
)
DECODER_HINT = (
    "train one with `python -m dsr.train stage=decoder encoder=<name>`, import a released one with "
    "`python -m dsr.convert decoder ...`, or set encoder.decoder_weights=null to train stage 2 without decoding"
)


def load_stats(path: str | os.PathLike, latent_shape: Sequence[int]) -> dict:
    """A statistics file `{"mean": [C, h, w], "var": [C, h, w], ...}`, checked against the encoder's latent shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder.stats={path} does not exist: {STATS_HINT}")
    stats = load_tensors(path, "encoder.stats")
    for key in ("mean", "var"):
        if key not in stats:
            raise ValueError(f"encoder.stats={path} has no '{key}' entry (keys: {sorted(stats)})")
        if tuple(stats[key].shape) != tuple(latent_shape):
            raise ValueError(
                f"encoder.stats={path}: '{key}' has shape {tuple(stats[key].shape)}, but this encoder's latents are "
                f"{tuple(latent_shape)}; the file belongs to another encoder or resolution"
            )
    return stats


def register_latent_stats(codec: nn.Module, stats: str | None, latent_shape: Sequence[int]) -> None:
    """The buffers `latent_mean` and `latent_var` [C, h, w] of a codec: from a statistics file, or 0 and 1 without
    one. Buffers, so they travel in stage-2 checkpoints."""
    mean, var = torch.zeros(tuple(latent_shape)), torch.ones(tuple(latent_shape))
    if stats is not None:
        loaded = load_stats(stats, latent_shape)
        mean, var = loaded["mean"].float(), loaded["var"].float()
    codec.register_buffer("latent_mean", mean)
    codec.register_buffer("latent_var", var)


def resolve_pretrained(pretrained: str) -> str:
    """A local directory as given, else the hub id (looked up in the Hugging Face cache)."""
    expanded = os.path.expanduser(pretrained)
    if os.path.isdir(expanded):
        return expanded
    if pretrained.startswith(("/", ".", "~")) or pretrained.count("/") > 1:
        raise FileNotFoundError(f"encoder.pretrained={pretrained}: no such directory")
    return pretrained


def from_pretrained(model_class: type, pretrained: str, local_files_only: bool, **kwargs) -> nn.Module:
    """`model_class.from_pretrained` offline by default, with an error that says what to set when it is missing."""
    location = resolve_pretrained(pretrained)
    try:
        return model_class.from_pretrained(location, local_files_only=local_files_only, **kwargs)
    except OSError as err:
        detail = f" ({type(err).__name__}: {str(err).splitlines()[0]})"
        raise FileNotFoundError(missing_pretrained(pretrained) + detail) from None


def hub_cache() -> str:
    """The Hugging Face hub cache that offline loading reads."""
    return os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )


def missing_pretrained(pretrained: str) -> str:
    """What to do when `encoder.pretrained` is neither a local directory nor in the Hugging Face cache."""
    return (
        f"encoder.pretrained={pretrained} was not found locally (looked for a directory of that name and in the "
        f"Hugging Face cache {hub_cache()}). Download it on a machine with internet (`hf download {pretrained}`) and "
        "point HF_HOME at that cache, set encoder.pretrained to a local directory, or allow downloads with "
        "encoder.local_files_only=false."
    )


def pretrained_available(pretrained: str) -> bool:
    """Whether `pretrained` is a local directory or a hub id whose config is in the Hugging Face cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    if os.path.isdir(os.path.expanduser(pretrained)):
        return True
    return isinstance(try_to_load_from_cache(pretrained, "config.json", cache_dir=hub_cache()), str)


class RepresentationAutoencoder(nn.Module):
    """Base of every frozen-encoder codec. Subclasses load `model` and implement `forward_tokens`.

    Args:
        model: the pretrained Hugging Face encoder (frozen here); its config gives the width C and the patch size.
        final_norm: the attribute of `model` holding its final LayerNorm, replaced by one without affine (RAE).
        resolution: the encoder's input resolution in pixels (images are resized to it, bicubic as the reference);
            the latent grid is resolution / patch_size on each side.
        image_size: the data's resolution, which the decoder reproduces.
        pixel_mean, pixel_std: the encoder's own image normalisation.
        decoder: factory `decoder(in_channels=C, grid_size=h)` of the pixel decoder, or None.
        decoder_weights: a file with the decoder's state_dict; None leaves it at its initialisation.
        freeze_decoder: stage 2 keeps the decoder frozen (and out of its checkpoints); stage 1 trains it.
        stats: a statistics file (see `load_stats`); None means mean 0, variance 1.
        noise_tau: decoder-training noise augmentation, sigma ~ U(0, tau) per sample (active in train mode).
        eps: inside the square root of the normalisation, 1e-5 as the reference.
        precision: Lightning's names: "bf16-mixed" runs the encoder under bf16 autocast where the device supports it;
            "32-true" in float32, as the reference.
        registers: encoder-side registers. "none"; "trained" (the checkpoint's own, DINOv2-with-registers: checked);
            "ttr" / "recursive_ttr": test-time registers at the neurons of `ttr_neurons` / `recursive_ttr_neurons`
            (a shipped list name, "siglip2_b" or "siglip2_so400m", or a JSON file from `dsr.analyze`).
        num_test_time_registers: extra tokens appended for test-time registers (dropped at the output).
        dsr_registers: the encoder-side option the paper pairs with this encoder, which `registers=dsr` selects.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        final_norm: str,
        resolution: int,
        image_size: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        decoder: Callable[..., nn.Module] | None = None,
        decoder_weights: str | None = None,
        freeze_decoder: bool = True,
        stats: str | None = None,
        noise_tau: float = 0.0,
        eps: float = 1e-5,
        precision: str = "bf16-mixed",
        registers: str = "none",
        ttr_neurons: str | None = None,
        recursive_ttr_neurons: str | None = None,
        num_test_time_registers: int = 1,
        dsr_registers: str = "none",
    ) -> None:
        super().__init__()
        if precision not in ENCODER_PRECISIONS:
            raise ValueError(f"encoder.precision={precision!r}: choose one of {ENCODER_PRECISIONS}")
        if registers not in ENCODER_REGISTERS or dsr_registers not in ENCODER_REGISTERS:
            raise ValueError(f"encoder.registers={registers!r}: choose one of {ENCODER_REGISTERS}")
        config = model.config
        if resolution % config.patch_size:
            raise ValueError(f"encoder.resolution={resolution} is not a multiple of the patch size {config.patch_size}")
        hidden_size, grid_size = config.hidden_size, resolution // config.patch_size
        setattr(model, final_norm, nn.LayerNorm(hidden_size, eps=config.layer_norm_eps, elementwise_affine=False))
        self.model = mark_frozen(model)
        self.registers = registers
        self.test_time_registers = self._install_registers(registers, ttr_neurons, recursive_ttr_neurons,
                                                           num_test_time_registers)  # fmt: skip
        self.latent_shape: tuple[int, int, int] = (hidden_size, grid_size, grid_size)
        self.resolution = resolution
        self.image_size = image_size
        self.noise_tau = noise_tau
        self.eps = eps
        self.precision = precision
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1))

        register_latent_stats(self, stats, self.latent_shape)

        self.decoder = None if decoder is None else decoder(in_channels=hidden_size, grid_size=grid_size)
        if self.decoder is not None:
            self._check_decoder_size()
            if decoder_weights is not None:
                self._load_decoder(decoder_weights)
            elif freeze_decoder:
                log.warning("encoder.decoder_weights is null: decoded samples will be noise until a decoder is loaded")
            if freeze_decoder:
                mark_frozen(self.decoder)

    def _install_registers(
        self, registers: str, ttr_neurons: str | None, recursive_ttr_neurons: str | None, count: int
    ) -> TestTimeRegisters | None:
        """Check trained registers, or hook test-time registers into the frozen model (after its final-norm swap)."""
        trained = getattr(self.model.config, "num_register_tokens", 0)
        if registers == "trained" and not trained:
            raise ValueError(
                "registers=trained needs an encoder with trained registers (encoder=dinov2_b_reg); "
                "this checkpoint has none: use registers=ttr or registers=none"
            )
        if registers not in ("ttr", "recursive_ttr"):
            return None
        source = ttr_neurons if registers == "ttr" else recursive_ttr_neurons
        if source is None:
            raise ValueError(
                f"registers={registers}: encoder.{registers}_neurons is not set and no list ships for this encoder; "
                f"find one with `python -m dsr.analyze encoder=<name> analyze.discover=true"
                f"{' analyze.rounds=2' if registers == 'recursive_ttr' else ''}` and set "
                f"encoder.{registers}_neurons=<its register_neurons.json>"
            )
        return TestTimeRegisters(self.model, load_register_neurons(source), num_registers=count).install()

    def _check_decoder_size(self) -> None:
        patch = getattr(self.decoder, "patch_size", None)
        if patch is not None and patch * self.latent_shape[1] != self.image_size:
            raise ValueError(
                f"the decoder maps a {self.latent_shape[1]}x{self.latent_shape[1]} grid with patch {patch} to "
                f"{patch * self.latent_shape[1]} px, but the data is {self.image_size} px: set decoder.patch_size="
                f"{self.image_size // self.latent_shape[1]} or data.image_size"
            )

    def _load_decoder(self, path: str) -> None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"encoder.decoder_weights={path} does not exist: {DECODER_HINT}")
        state = load_tensors(path, "encoder.decoder_weights")
        self.decoder.load_state_dict(state)

    def train(self, mode: bool = True) -> RepresentationAutoencoder:
        super().train(mode)
        keep_frozen_in_eval(self)
        return self

    # ---------------------------------------------------------------------------------------------------
    # encoder
    # ---------------------------------------------------------------------------------------------------

    def forward_tokens(self, pixels: Tensor) -> Tensor:
        """Encoder-normalised pixels [B, 3, resolution, resolution] -> patch tokens [B, N, C] (row-major grid)."""
        raise NotImplementedError

    def preprocess(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> the encoder's input: resized (bicubic, no antialias) and normalised."""
        if images.shape[-2:] != (self.resolution, self.resolution):
            images = F.interpolate(images, size=(self.resolution,) * 2, mode="bicubic", align_corners=False)
        return (images - self.pixel_mean) / self.pixel_std

    @torch.no_grad()
    def tokens(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> raw latents [B, C, h, w] (float32)."""
        bf16 = self.precision == "bf16-mixed" and images.is_cuda and torch.cuda.is_bf16_supported()
        with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=bf16):
            tokens = self.forward_tokens(self.preprocess(images.float()))
        channels, height, width = self.latent_shape
        if tokens.shape[1:] != (height * width, channels):
            raise RuntimeError(
                f"the encoder returned tokens {tuple(tokens.shape)}; expected [B, {height * width}, {channels}]"
            )
        return tokens.float().transpose(1, 2).reshape(len(tokens), channels, height, width)

    def augment(self, z: Tensor, level: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
        """Noise augmentation of raw latents [B, C, h, w] for decoder training: z + tau * u * eps with u ~ U(0, 1)
        per sample [B] and eps ~ N(0, I) like z; pass `level` (u) and `noise` (eps) to use draws made elsewhere."""
        if not self.training or self.noise_tau <= 0:
            return z
        if level is None:
            level = torch.rand(len(z), device=z.device)
        if noise is None:
            noise = torch.randn_like(z)
        sigma = self.noise_tau * level.to(z.dtype).view(-1, *(1,) * (z.ndim - 1))
        return z + sigma * noise.to(z.dtype)

    def normalize(self, z: Tensor) -> Tensor:
        return (z - self.latent_mean) / torch.sqrt(self.latent_var + self.eps)

    def denormalize(self, z: Tensor) -> Tensor:
        return z * torch.sqrt(self.latent_var + self.eps) + self.latent_mean

    def encode(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> normalised latents [B, C, h, w]."""
        return self.normalize(self.tokens(images))

    # ---------------------------------------------------------------------------------------------------
    # decoder
    # ---------------------------------------------------------------------------------------------------

    def decode_raw(self, z: Tensor) -> Tensor:
        """Raw latents [B, C, h, w] -> images [B, 3, H, W], roughly in [0, 1] (not clamped)."""
        if self.decoder is None:
            raise RuntimeError("this encoder has no decoder: set `decoder` (and encoder.decoder_weights) to decode")
        return self.decoder(z) * self.pixel_std + self.pixel_mean

    def decode(self, z: Tensor) -> Tensor:
        """Normalised latents [B, C, h, w] -> images [B, 3, H, W], roughly in [0, 1] (not clamped)."""
        return self.decode_raw(self.denormalize(z))


def seeded_init(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """A randomly initialised model that is the same on every machine and every rank."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
