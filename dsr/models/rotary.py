"""2-D axial rotary position tables (EVA-style RoPE), with identity rows for prefix tokens.

Every backbone that rotates q/k builds one `RotaryTables` per attention width: the plain table for a sequence of
patch tokens, and the same table behind `num_prefix` identity rows (cos 1, sin 0) for a sequence that starts with
prefix tokens such as diffusion registers or in-context class tokens, which so stay position-free.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def rope_axial_2d(head_dim: int, grid_h: int, grid_w: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """EVA-style 2-D axial rotary tables: (cos, sin), each [grid_h * grid_w, head_dim].

    With a = head_dim / 2 channels per axis and frequencies f_k = theta^(-2k / a), k < a / 2, each
    repeated for an adjacent channel pair; channels [0, a) rotate with the row index, [a, 2a) with the column.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    axis_dim = head_dim // 2
    freqs = theta ** (-torch.arange(0, axis_dim, 2, dtype=torch.float64)[: axis_dim // 2] / axis_dim)
    rows = torch.arange(grid_h, dtype=torch.float64)[:, None] * freqs  # [h, a/2]
    cols = torch.arange(grid_w, dtype=torch.float64)[:, None] * freqs  # [w, a/2]
    rows = rows.repeat_interleave(2, dim=-1)[:, None, :].expand(grid_h, grid_w, axis_dim)
    cols = cols.repeat_interleave(2, dim=-1)[None, :, :].expand(grid_h, grid_w, axis_dim)
    angles = torch.cat([rows, cols], dim=-1).reshape(grid_h * grid_w, head_dim)
    return angles.cos().float(), angles.sin().float()


def rope_with_prefix(cos: Tensor, sin: Tensor, num_prefix: int) -> tuple[Tensor, Tensor]:
    """Prepend `num_prefix` identity rows (cos 1, sin 0): prefix tokens such as registers stay unrotated."""
    if num_prefix == 0:
        return cos, sin
    return (
        torch.cat([cos.new_ones(num_prefix, cos.shape[1]), cos]),
        torch.cat([sin.new_zeros(num_prefix, sin.shape[1]), sin]),
    )


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin). x: [B, H, N, d]."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class RotaryTables(nn.Module):
    """RoPE tables of a `grid_size` token grid: `tables(prefixed=False)` -> (cos, sin) [h * w, head_dim];
    `tables(prefixed=True)` -> the same behind `num_prefix` identity rows, [num_prefix + h * w, head_dim].

    Buffers, not parameters, and not saved: they are recomputed from the configuration."""

    def __init__(self, head_dim: int, grid_size: tuple[int, int], num_prefix: int = 0, theta: float = 10000.0) -> None:
        super().__init__()
        self.num_prefix = num_prefix
        cos, sin = rope_axial_2d(head_dim, *grid_size, theta=theta)
        prefixed_cos, prefixed_sin = rope_with_prefix(cos, sin, num_prefix)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.register_buffer("prefixed_cos", prefixed_cos, persistent=False)
        self.register_buffer("prefixed_sin", prefixed_sin, persistent=False)

    def tables(self, prefixed: bool) -> tuple[Tensor, Tensor]:
        return (self.prefixed_cos, self.prefixed_sin) if prefixed else (self.cos, self.sin)

    def with_prefix(self, num_prefix: int) -> tuple[Tensor, Tensor]:
        """The table behind any number of identity rows, for sequences whose prefix grows block by block (JiT's
        in-context tokens and diffusion registers joining at different blocks)."""
        return rope_with_prefix(self.cos, self.sin, num_prefix)
