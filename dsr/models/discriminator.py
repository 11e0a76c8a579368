"""The GAN discriminator of RAE's decoder training: trainable heads on a frozen DINO ViT-S/8, plus DiffAug.

    images [B, 3, H, W] in [-1, 1] -> bilinear resize to 224 -> ImageNet normalisation
      -> frozen DINO ViT-S/8 (28x28 tokens of 384) -> token features after blocks 2, 5, 8, 11 and the final block
         (before the final LayerNorm), CLS dropped: 5 maps [B, 384, 784]
      -> one head per map: [SN-Conv1d 1x1 -> per-sample norm -> LeakyReLU 0.2]
                           -> residual [SN-Conv1d k=9 circular -> per-sample norm -> LeakyReLU 0.2]: (f(x)+x)/sqrt(2)
                           -> SN-Conv1d 384 -> 1
      -> logits [B, 5 * 784] (heads in the order final, 2, 5, 8, 11, as RAE concatenates them)

Only the heads train; the backbone is frozen and kept out of checkpoints. The "per-sample norm" is RAE's local batch
norm with one sample per group, i.e. instance norm over tokens with an affine (eps 1e-6). The backbone's MLP uses the
tanh approximation of GELU, as RAE's re-implementation of DINO does (DINO itself was trained with the exact GELU).
The losses are the hinge losses of VQGAN; `diff_augment` is DiffAugment as RAE configures it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from dsr.utils.frozen import mark_frozen

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_WEIGHTS_FILE = "dino_vit_small_patch8_224.pth"


# ----------------------------------------------------------------------------------------------------------------------
# DiffAugment
# ----------------------------------------------------------------------------------------------------------------------

NUM_AUGMENT_DRAWS = 7  # per sample: translation (rows, cols), brightness, saturation, contrast, cutout (rows, cols)


def diff_augment(
    x: Tensor,
    rand: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    translation: float = 0.125,
    color: bool = True,
    cutout: float = 0.0,
) -> Tensor:
    """DiffAugment (Zhao et al., 2020) as RAE applies it (probability 1): translation, colour, cutout, in that order.

    Args:
        x: images [B, C, H, W] in [-1, 1].
        rand: uniform draws [B, 7] in [0, 1) (columns: translation rows, cols; brightness; saturation; contrast;
            cutout rows, cols); drawn from `generator` when None. Passing them lets a caller draw for a whole batch
            and augment it in slices.
        translation: shift by up to round(ratio * size) pixels each way, zeros filled in (0: off).
        color: brightness + U(-0.5, 0.5), saturation x U(0, 2), contrast x U(0.5, 1.5), per sample.
        cutout: zero a square of round(ratio * size) pixels at a random centre (0: off, RAE's setting).
    Returns:
        augmented images [B, C, H, W].
    """
    b, _, h, w = x.shape
    if rand is None:
        rand = torch.rand(b, NUM_AUGMENT_DRAWS, generator=generator, device=generator.device if generator else x.device)
    rand = rand.to(device=x.device, dtype=torch.float32)
    if translation > 0:
        delta_h, delta_w = round(h * translation), round(w * translation)
        shift_h = (rand[:, 0] * (2 * delta_h + 1)).floor().long() - delta_h  # [B], uniform on {-delta, ..., delta}
        shift_w = (rand[:, 1] * (2 * delta_w + 1)).floor().long() - delta_w
        # Output pixel (i, j) reads input (i + shift_h, j + shift_w); the 1-pixel zero border stands for "outside".
        rows = (torch.arange(h, device=x.device) + shift_h[:, None] + 1).clamp(0, h + 1)  # [B, H]
        cols = (torch.arange(w, device=x.device) + shift_w[:, None] + 1).clamp(0, w + 1)  # [B, W]
        padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # [B, H + 2, W + 2, C]
        batch = torch.arange(b, device=x.device)[:, None, None]
        x = padded[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if color:
        per_sample = rand[:, 2:5, None, None].to(x.dtype)  # [B, 3, 1, 1]
        x = x + (per_sample[:, 0:1] - 0.5)
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (per_sample[:, 1:2] * 2) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (per_sample[:, 2:3] + 0.5) + mean
    if cutout > 0:
        size_h, size_w = round(h * cutout), round(w * cutout)
        # The window's centre is uniform on the image (plus one position when the size is even), as DiffAugment.
        start_h = (rand[:, 5] * (h + 1 - size_h % 2)).floor().long() - size_h // 2
        start_w = (rand[:, 6] * (w + 1 - size_w % 2)).floor().long() - size_w // 2
        r = torch.arange(h, device=x.device)[None, :] - start_h[:, None]  # [B, H]
        c = torch.arange(w, device=x.device)[None, :] - start_w[:, None]  # [B, W]
        inside = ((r >= 0) & (r < size_h))[:, :, None] & ((c >= 0) & (c < size_w))[:, None, :]  # [B, H, W]
        x = x * (~inside)[:, None].to(x.dtype)
    return x


# ----------------------------------------------------------------------------------------------------------------------
# GAN losses
# ----------------------------------------------------------------------------------------------------------------------


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 * (mean relu(1 - real) + mean relu(1 + fake))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: Tensor) -> Tensor:
    """-mean(fake logits) (RAE calls it "vanilla"; it is the hinge GAN's generator loss)."""
    return -logits_fake.mean()


# ----------------------------------------------------------------------------------------------------------------------
# Discriminator
# ----------------------------------------------------------------------------------------------------------------------


def conv_norm_act(channels: int, kernel_size: int, norm_eps: float) -> nn.Sequential:
    """[B, C, L] -> [B, C, L]: spectral-norm Conv1d (circular padding), per-sample norm over tokens, LeakyReLU 0.2."""
    conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2, padding_mode="circular")
    return nn.Sequential(
        spectral_norm(conv),
        nn.InstanceNorm1d(channels, eps=norm_eps, affine=True),
        nn.LeakyReLU(0.2),
    )


class Residual(nn.Module):
    """(f(x) + x) / sqrt(2): keeps the variance of two independent unit-variance terms at 1."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return (self.fn(x) + x) / math.sqrt(2)


class DiscriminatorHead(nn.Sequential):
    """Token features [B, C, L] -> logits [B, 1, L]."""

    def __init__(self, channels: int, kernel_size: int = 9, norm_eps: float = 1e-6) -> None:
        super().__init__(
            conv_norm_act(channels, 1, norm_eps),
            Residual(conv_norm_act(channels, kernel_size, norm_eps)),
            spectral_norm(nn.Conv1d(channels, 1, kernel_size=1)),
        )


def load_dino_state_dict(path: Path, backbone: nn.Module) -> dict[str, Tensor]:
    """A DINO ViT state dict (DINO's own file, or a timm checkpoint) for `backbone`, with the key part of every qkv
    bias zeroed as RAE does (it has no effect on attention: a constant added to every key shifts each query's scores
    by the same amount) and the position table resampled when the backbone runs at another resolution."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for nested in ("teacher", "state_dict", "model"):  # DINO training checkpoints nest the backbone
        if isinstance(state.get(nested), dict):
            state = state[nested]
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm."))}
    for key in state:
        if key.endswith("attn.qkv.bias"):
            bias = state[key].clone()
            dim = bias.numel() // 3
            bias[dim : 2 * dim] = 0
            state[key] = bias
    pos_embed = backbone.pos_embed
    if "pos_embed" in state and state["pos_embed"].shape != pos_embed.shape:
        grid = backbone.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(grid), num_prefix_tokens=1)
    return state


class DINODiscriminator(nn.Module):
    """Images [B, 3, H, W] in [-1, 1] -> logits [B, (len(taps) + 1) * L], L the backbone's token count.

    Args:
        dino_weights: DINO's `dino_vit_small_patch8_224.pth` (or a timm checkpoint of the same model).
        random_init: a random backbone instead of `dino_weights` (tests only).
        resolution: the resolution images are resized to (224, DINO's).
        patch_size, embed_dim, depth, num_heads: the backbone (timm's `vit_small_patch8_224` by default).
        taps: blocks whose outputs feed a head, besides the final block's.
        kernel_size: of the heads' residual convolution.
        norm_eps: of the heads' per-sample norms.
    """

    def __init__(
        self,
        dino_weights: str | os.PathLike | None = None,
        random_init: bool = False,
        resolution: int = 224,
        patch_size: int = 8,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        taps: Sequence[int] = (2, 5, 8, 11),
        kernel_size: int = 9,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if any(not 0 <= t < depth for t in taps):
            raise ValueError(f"module.discriminator.taps={list(taps)} must index blocks 0..{depth - 1}")
        self.resolution = resolution
        self.taps = tuple(taps)
        self.backbone = timm.create_model(
            "vit_small_patch8_224",
            pretrained=False,
            num_classes=0,
            img_size=resolution,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            act_layer="gelu_tanh",
        )
        if random_init:
            pass
        elif dino_weights is None or not Path(dino_weights).expanduser().is_file():
            raise FileNotFoundError(
                f"discriminator weights not found: module.discriminator.dino_weights={dino_weights}. Set it (or "
                f"$DSR_DINO_DISC_WEIGHTS) to DINO's ViT-S/8 state dict, {DINO_WEIGHTS_FILE} (facebookresearch/dino, "
                "also in RAE's HF collection nyu-visionx/RAE-collections under models/discs/)"
            )
        else:
            path = Path(dino_weights).expanduser()
            self.backbone.load_state_dict(load_dino_state_dict(path, self.backbone))
        mark_frozen(self.backbone)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.heads = nn.ModuleList(
            [DiscriminatorHead(embed_dim, kernel_size, norm_eps) for _ in range(len(self.taps) + 1)]
        )

    def features(self, x: Tensor) -> list[Tensor]:
        """Images [B, 3, H, W] in [-1, 1] -> token features [B, C, L]: the final block's, then each tap's."""
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        x = ((x + 1) / 2 - self.pixel_mean) / self.pixel_std
        last = len(self.backbone.blocks) - 1
        indices = sorted(set(self.taps) | {last})
        outputs = self.backbone.forward_intermediates(
            x, indices=indices, norm=False, output_fmt="NLC", intermediates_only=True
        )
        by_block = dict(zip(indices, outputs, strict=True))
        return [by_block[i].transpose(1, 2) for i in (last, *self.taps)]

    def forward(self, x: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> logits [B, (len(taps) + 1) * L]."""
        return torch.cat([head(f).flatten(1) for head, f in zip(self.heads, self.features(x), strict=True)], dim=1)
