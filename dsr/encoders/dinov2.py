"""DINOv2-B as a frozen RAE encoder, with its 4 trained registers (`facebook/dinov2-with-registers-base`) or
without (`facebook/dinov2-base`): patch 14 at 224 px -> a 16x16 grid of 768-d tokens.

The CLS token and the trained registers are dropped at the output (the registers did their work inside the
network), and the final `layernorm` loses its affine, as in RAE. Position embeddings are interpolated by the model.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from transformers import AutoConfig, Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from dsr.encoders.rae import RepresentationAutoencoder, from_pretrained, seeded_init

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_dinov2(
    pretrained: str | None, config: dict | None, seed: int, local_files_only: bool
) -> Dinov2Model | Dinov2WithRegistersModel:
    """The model from a hub id / local directory, or a seeded random one from a config dict (with
    `num_register_tokens` > 0 it is the registers variant)."""
    if pretrained is None:
        if config is None:
            raise ValueError(
                "encoder.pretrained is null: give encoder.config (a DINOv2 config dict) for a random model"
            )
        if config.get("num_register_tokens", 0):
            return seeded_init(lambda: Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**config)), seed)
        return seeded_init(lambda: Dinov2Model(Dinov2Config(**config)), seed)
    model_type = from_pretrained(AutoConfig, pretrained, local_files_only).model_type
    model_class = Dinov2WithRegistersModel if model_type == "dinov2_with_registers" else Dinov2Model
    return from_pretrained(model_class, pretrained, local_files_only)


class DINOv2(RepresentationAutoencoder):
    """DINOv2 -> patch tokens [B, (resolution / 14)^2, 768]; CLS and trained registers removed.

    Args:
        pretrained: hub id or local directory; None builds a random model from `config` (seeded by `seed`).
        resolution: the encoder's input resolution in pixels (224 for 256 px images, as RAE).
        Other keywords: see `SigLIP2` and `RepresentationAutoencoder`.
    """

    def __init__(
        self,
        pretrained: str | None = "facebook/dinov2-with-registers-base",
        resolution: int = 224,
        image_size: int = 256,
        config: dict | None = None,
        seed: int = 0,
        local_files_only: bool = True,
        pixel_mean: Sequence[float] = IMAGENET_MEAN,
        pixel_std: Sequence[float] = IMAGENET_STD,
        **codec: object,
    ) -> None:
        model = load_dinov2(pretrained, config, seed, local_files_only)
        super().__init__(
            model,
            final_norm="layernorm",
            resolution=resolution,
            image_size=image_size,
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
            **codec,
        )
        self.num_prefix_tokens = 1 + getattr(model.config, "num_register_tokens", 0)

    def forward_tokens(self, pixels: Tensor) -> Tensor:
        return self.model(pixel_values=pixels).last_hidden_state[:, self.num_prefix_tokens :]
