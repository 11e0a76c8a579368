"""The stage-1 pixel decoder: a ViT that maps frozen-encoder latents back to images (RAE's MAE-style decoder).

    z [B, C, h, w] -> tokens [B, h*w, C] (row-major) -> decoder_embed (Linear C -> D)
      -> bilinear resize of the token grid if it is not the configured h x w
      -> prepend a trainable CLS token (zero init) -> + fixed 2-D sin-cos table (zero row for the CLS)
      -> depth x pre-LN ViT block (LN -> MHSA -> residual, LN -> MLP(GELU) -> residual)
      -> decoder_norm -> decoder_pred (Linear D -> p*p*3) -> drop the CLS -> unpatchify
      -> x [B, 3, h*p, w*p] in the encoder's normalised pixel space.

Sizes (RAE's configs, with C = 768 and a 16x16 grid): ViT-B 768 wide, 12 blocks, 12 heads, MLP 3072 (86.2M params);
ViT-L 1024, 24, 16, 4096 (303.9M); ViT-XL 1152, 28, 16, 4096 (415.1M). The sin-cos table is recomputed from the
sizes (a non-persistent buffer, so it is never in a state_dict); the reference stores it as a frozen parameter,
which `from_reference_state_dict` checks and drops.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from dsr.models.layers import sincos_pos_embed_2d

# The reference (a vendored Hugging Face ViTMAE decoder) stores the fixed table as a frozen parameter.
REFERENCE_POS_EMBED = "decoder_pos_embed"


def mae_sincos_table(dim: int, grid_size: int) -> Tensor:
    """The MAE decoder's fixed position table [1 + grid_size**2, dim]: a zero CLS row, then the shared 2-D sin-cos
    table of the row-major grid (`dsr.models.layers.sincos_pos_embed_2d`, the same layout)."""
    if dim % 4:
        raise ValueError(f"decoder.hidden_size={dim}: the 2-D sin-cos table needs a multiple of 4")
    table = sincos_pos_embed_2d(dim, grid_size, grid_size)
    return torch.cat([table.new_zeros(1, dim), table])


class ViTDecoder(nn.Module):
    """Latents [B, C, h, w] -> pixels [B, 3, h * patch_size, w * patch_size] (encoder-normalised pixel space).

    Args:
        in_channels: C, the encoder's token width.
        grid_size: h = w, the latent grid the decoder is built for (other grids are resized to it).
        patch_size: pixels per token side (16: 16x16 tokens -> 256 px).
        hidden_size, depth, num_heads, mlp_dim: the transformer's width, blocks, heads and MLP width.
        layer_norm_eps: every LayerNorm's eps (1e-12, the Hugging Face ViT default the reference inherits).
    """

    def __init__(
        self,
        in_channels: int,
        grid_size: int,
        patch_size: int = 16,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_dim: int = 4096,
        layer_norm_eps: float = 1e-12,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"decoder.hidden_size={hidden_size} is not divisible by decoder.num_heads={num_heads}")
        mlp_ratio = mlp_dim / hidden_size
        if int(hidden_size * mlp_ratio) != mlp_dim:  # timm derives the MLP width from the ratio
            raise ValueError(f"decoder.mlp_dim={mlp_dim} cannot be expressed as a ratio of hidden_size={hidden_size}")
        self.in_channels = in_channels
        self.grid_size = grid_size
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.depth = depth

        self.decoder_embed = nn.Linear(in_channels, hidden_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.register_buffer("pos_embed", mae_sincos_table(hidden_size, grid_size)[None], persistent=False)
        norm_layer = partial(nn.LayerNorm, eps=layer_norm_eps)
        # timm's pre-LN block (qkv bias, exact GELU, SDPA attention) is the Hugging Face ViTMAELayer.
        self.blocks = nn.ModuleList(
            Block(hidden_size, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, act_layer=nn.GELU, norm_layer=norm_layer)
            for _ in range(depth)
        )
        self.decoder_norm = norm_layer(hidden_size)
        self.decoder_pred = nn.Linear(hidden_size, patch_size * patch_size * 3)

    @property
    def last_layer(self) -> nn.Parameter:
        """The weight the adaptive GAN weight is measured on (VQGAN style): decoder_pred.weight."""
        return self.decoder_pred.weight

    def resize_tokens(self, x: Tensor, height: int, width: int) -> Tensor:
        """Embedded tokens [B, height*width, D] -> [B, grid_size**2, D], bilinear on the grid as the reference."""
        if (height, width) == (self.grid_size, self.grid_size):
            return x
        grid = x.transpose(1, 2).reshape(len(x), -1, height, width)
        grid = F.interpolate(grid, size=(self.grid_size, self.grid_size), mode="bilinear", align_corners=False)
        return grid.flatten(2).transpose(1, 2)

    def unpatchify(self, x: Tensor) -> Tensor:
        """[B, h*w, p*p*3], each token's outputs read as (p_row, p_col, channel) -> [B, 3, h*p, w*p]."""
        p, side = self.patch_size, self.grid_size
        x = x.reshape(len(x), side, side, p, p, 3)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(len(x), 3, side * p, side * p)

    def forward(self, z: Tensor) -> Tensor:
        """z [B, C, h, w] -> x [B, 3, grid_size * p, grid_size * p]."""
        _, _, height, width = z.shape
        x = self.decoder_embed(z.flatten(2).transpose(1, 2))
        x = self.resize_tokens(x, height, width)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return self.unpatchify(x[:, 1:])


# --------------------------------------------------------------------------------------------------------
# Reference checkpoints
# --------------------------------------------------------------------------------------------------------


def reference_key_map(depth: int) -> dict[str, str]:
    """RAE decoder state_dict key (Hugging Face ViTMAE layout) -> `ViTDecoder` key.

    The reference's separate `query`, `key` and `value` projections of block i all map to `blocks.i.attn.qkv.*`:
    they are concatenated along dim 0 in that order (see `from_reference_state_dict`). The reference's
    `decoder_pos_embed` has no counterpart (the table is recomputed here).
    """
    mapping = {
        "decoder_embed.weight": "decoder_embed.weight",
        "decoder_embed.bias": "decoder_embed.bias",
        "trainable_cls_token": "cls_token",
        "decoder_norm.weight": "decoder_norm.weight",
        "decoder_norm.bias": "decoder_norm.bias",
        "decoder_pred.weight": "decoder_pred.weight",
        "decoder_pred.bias": "decoder_pred.bias",
    }
    per_block = {
        "attention.attention.query": "attn.qkv",
        "attention.attention.key": "attn.qkv",
        "attention.attention.value": "attn.qkv",
        "attention.output.dense": "attn.proj",
        "layernorm_before": "norm1",
        "layernorm_after": "norm2",
        "intermediate.dense": "mlp.fc1",
        "output.dense": "mlp.fc2",
    }
    for i in range(depth):
        for ref, ours in per_block.items():
            for param in ("weight", "bias"):
                mapping[f"decoder_layers.{i}.{ref}.{param}"] = f"blocks.{i}.{ours}.{param}"
    return mapping


def from_reference_state_dict(state_dict: Mapping[str, Tensor], decoder: ViTDecoder) -> dict[str, Tensor]:
    """A reference decoder state_dict (prefixes already stripped) -> a strict-loadable `decoder` state_dict.

    Every reference key must be mapped (or be the fixed table, which must equal ours to 1e-4: a mismatch means the
    config describes another decoder); a missing or unexpected key raises a KeyError that lists them.
    """
    mapping = reference_key_map(decoder.depth)
    unexpected = sorted(set(state_dict) - set(mapping) - {REFERENCE_POS_EMBED})
    missing = sorted(set(mapping) - set(state_dict))
    if unexpected or missing:
        raise KeyError(f"not a ViTDecoder of depth {decoder.depth}: unexpected keys {unexpected}, missing {missing}")
    if REFERENCE_POS_EMBED in state_dict:
        table = state_dict[REFERENCE_POS_EMBED].float().reshape(decoder.pos_embed.shape)
        if not torch.allclose(table, decoder.pos_embed.cpu(), atol=1e-4):
            raise ValueError("the reference's decoder_pos_embed differs from this decoder's sin-cos table")
    converted: dict[str, list[Tensor]] = {}
    for ref, ours in mapping.items():  # insertion order: query, key, value
        converted.setdefault(ours, []).append(state_dict[ref])
    out = {key: torch.cat(parts) if len(parts) > 1 else parts[0] for key, parts in converted.items()}
    out["cls_token"] = out["cls_token"].reshape(1, 1, -1)
    return out
