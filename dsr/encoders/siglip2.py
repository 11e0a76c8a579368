"""SigLIP2 vision towers as frozen RAE encoders: SigLIP2-B/16 at 256 px (768-d) and So400M/14 at 224 px (1152-d).

The released FixRes checkpoints (`google/siglip2-base-patch16-256`, `google/siglip2-so400m-patch14-224`) are
SigLIP-architecture models and load into `SiglipVisionModel` (the text tower of a full checkpoint is skipped);
NaFlex checkpoints (`model_type: siglip2`) load into `Siglip2VisionModel` and are fed pre-patchified pixels on a
fixed square grid. SigLIP has no CLS token, so every output token is a patch token. The attention-pooling head is
not built (its output is unused), and `post_layernorm` loses its affine, as in RAE.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import AutoConfig, Siglip2VisionModel, SiglipVisionConfig, SiglipVisionModel

from dsr.encoders.rae import RepresentationAutoencoder, from_pretrained, seeded_init

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def load_siglip(
    pretrained: str | None, config: dict | None, seed: int, local_files_only: bool
) -> SiglipVisionModel | Siglip2VisionModel:
    """The vision tower from a hub id / local directory, or a seeded random one from a config dict."""
    if pretrained is None:
        if config is None:
            raise ValueError(
                "encoder.pretrained is null: give encoder.config (a SiglipVisionConfig dict) for a random model"
            )
        return seeded_init(lambda: SiglipVisionModel(SiglipVisionConfig(**config, vision_use_head=False)), seed)
    model_type = from_pretrained(AutoConfig, pretrained, local_files_only).model_type
    model_class = Siglip2VisionModel if model_type.startswith("siglip2") else SiglipVisionModel
    return from_pretrained(model_class, pretrained, local_files_only, vision_use_head=False)


class SigLIP2(RepresentationAutoencoder):
    """SigLIP / SigLIP2 vision tower -> patch tokens [B, (resolution / patch)^2, hidden].

    Args:
        pretrained: hub id or local directory; None builds a random model from `config` (seeded by `seed`).
        resolution: the encoder's input resolution in pixels; default: the checkpoint's own (required for NaFlex
            checkpoints).
        local_files_only: never download unless set to false.
        Other keywords: see `RepresentationAutoencoder`.
    """

    def __init__(
        self,
        pretrained: str | None = "google/siglip2-base-patch16-256",
        resolution: int | None = None,
        image_size: int = 256,
        config: dict | None = None,
        seed: int = 0,
        local_files_only: bool = True,
        pixel_mean: Sequence[float] = SIGLIP_MEAN,
        pixel_std: Sequence[float] = SIGLIP_STD,
        **codec: object,
    ) -> None:
        model = load_siglip(pretrained, config, seed, local_files_only)
        vision = model.config
        naflex = isinstance(model, Siglip2VisionModel)
        native_size = int(vision.num_patches**0.5) * vision.patch_size if naflex else vision.image_size
        resolution = resolution or native_size
        super().__init__(
            model,
            final_norm="post_layernorm",
            resolution=resolution,
            image_size=image_size,
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
            **codec,
        )
        self.patch_size = vision.patch_size
        self.naflex = naflex
        self.interpolate_pos_encoding = resolution != native_size

    def forward_tokens(self, pixels: Tensor) -> Tensor:
        if not self.naflex:
            return self.model(
                pixel_values=pixels, interpolate_pos_encoding=self.interpolate_pos_encoding
            ).last_hidden_state
        # NaFlex input: row-major patches, each flattened as (p_row, p_col, channel), all valid (no padding).
        batch, channels, height, width = pixels.shape
        p = self.patch_size
        patches = pixels.reshape(batch, channels, height // p, p, width // p, p).permute(0, 2, 4, 3, 5, 1)
        patches = patches.reshape(batch, (height // p) * (width // p), p * p * channels)
        mask = pixels.new_ones(patches.shape[:2], dtype=torch.long)
        shapes = torch.tensor([[height // p, width // p]], device=pixels.device).expand(batch, 2)
        return self.model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes).last_hidden_state
