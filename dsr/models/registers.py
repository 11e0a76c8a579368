"""Diffusion registers: learned tokens that join the DiT's sequence part-way and leave before the output.

As the DSR release builds them: a bank of `num_registers` learned tokens with distinct random
(standard normal) init, plus a fixed 2-D sin-cos code on a small grid (6x6 for 36) so that each register
also differs by position. They are prepended at block `register_start`, take identity rotary angles
(RoPE rotates patch tokens only), are modulated by adaLN like every token, and are dropped before the
final layer, so the model's output and its inference interface do not change.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dsr.models.layers import sincos_pos_embed_2d


def register_grid(num_registers: int) -> tuple[int, int]:
    """The smallest near-square grid holding `num_registers` codes (6x6 for 36; 2x3 for 5)."""
    rows = max(1, math.isqrt(num_registers))
    cols = math.ceil(num_registers / rows)
    return rows, cols


class DiffusionRegisters(nn.Module):
    """A bank of learned register tokens [1, R, D] plus their fixed sin-cos code."""

    def __init__(self, num_registers: int, hidden_size: int) -> None:
        super().__init__()
        if num_registers <= 0:
            raise ValueError(f"num_registers must be positive, got {num_registers}")
        self.num_registers = num_registers
        rows, cols = register_grid(num_registers)
        code = sincos_pos_embed_2d(hidden_size, rows, cols)[:num_registers]
        self.register_buffer("pos_code", code.unsqueeze(0), persistent=False)
        self.tokens = nn.Parameter(torch.randn(1, num_registers, hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        """Prepend the registers to the sequence: [B, N, D] -> [B, R + N, D]."""
        registers = (self.tokens + self.pos_code).to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([registers, x], dim=1)

    def strip(self, x: Tensor) -> Tensor:
        """Drop the registers: [B, R + N, D] -> [B, N, D]."""
        return x[:, self.num_registers :]
