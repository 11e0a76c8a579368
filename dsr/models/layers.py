"""Building blocks shared by the diffusion transformers: norms, the sin-cos position code, timestep / class
embedders, attention and adaLN modulation (rotary tables: `dsr.models.rotary`).

Conventions follow LightningDiT as used by RAE and the DSR release: RMSNorm (eps 1e-6, fp32 compute),
SwiGLU with hidden width int(2/3 * mlp_ratio * D), EVA-style 2-D axial RoPE (first half of each head's
channels rotates with the row index, second half with the column index, adjacent channels paired),
a Gaussian-Fourier timestep embedding with a frozen random projection, and a class table with one extra
row for the null class used by classifier-free guidance.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import Mlp, SwiGLUPacked
from torch import Tensor, nn

from dsr.models.rotary import apply_rope


class RMSNorm(nn.RMSNorm):
    """RMSNorm computed in (at least) float32 and cast back, so bf16 autocast does not lose the normaliser."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps=eps, elementwise_affine=True)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.to(torch.promote_types(x.dtype, torch.float32))).type_as(x)


def build_norm(dim: int, use_rmsnorm: bool) -> nn.Module:
    """RMSNorm (affine) or the DiT LayerNorm without affine; both use eps 1e-6."""
    return RMSNorm(dim) if use_rmsnorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def build_mlp(dim: int, mlp_ratio: float, use_swiglu: bool, dropout: float = 0.0) -> nn.Module:
    """SwiGLU whose packed first projection splits into (gate, value), or DiT's GELU-tanh MLP. `dropout` acts on the
    hidden activations only (before the output projection), as JiT's SwiGLU has it."""
    if use_swiglu:
        hidden = int(2 / 3 * mlp_ratio * dim)
        # SwiGLUPacked computes fc2(silu(a) * b) with (a, b) = fc1(x).chunk(2): the reference's w12 / w3.
        return SwiGLUPacked(in_features=dim, hidden_features=2 * hidden, drop=(dropout, 0.0))
    return Mlp(dim, int(dim * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"), drop=(dropout, 0.0))


def per_token(m: Tensor, x: Tensor) -> Tensor:
    """A modulation broadcast against tokens x [B, N, D]: one per sample [B, D] becomes [B, 1, D]; one per token
    [B, N, D] (DiT-DH's head) stays as it is."""
    return m.unsqueeze(1) if m.ndim < x.ndim else m


def modulate(x: Tensor, shift: Tensor | None, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift for x [B, N, D], with [B, D] or per-token [B, N, D] modulation."""
    x = x * (1 + per_token(scale, x))
    return x if shift is None else x + per_token(shift, x)


# --------------------------------------------------------------------------------------------------------
# Position codes
# --------------------------------------------------------------------------------------------------------


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> Tensor:
    """Fixed 2-D sin-cos table [grid_h * grid_w, dim] in the MAE/DiT layout (row-major tokens).

    Half of the channels encode the column coordinate, half the row coordinate; each half is
    [sin(pos * omega), cos(pos * omega)] with omega_k = 1 / 10000^(k / (dim / 4)).
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")

    def encode(pos: np.ndarray) -> np.ndarray:
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([encode(cols), encode(rows)], axis=1)
    return torch.from_numpy(table).float()


# --------------------------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------------------------


class GaussianFourierEmbedder(nn.Module):
    """t in [0, 1] -> [sin(2 pi t W), cos(2 pi t W)] -> MLP. W ~ N(0, 1) is fixed at construction and saved."""

    def __init__(self, hidden_size: int, num_frequencies: int = 256) -> None:
        super().__init__()
        self.register_buffer("W", torch.randn(num_frequencies))
        self.mlp = nn.Sequential(
            nn.Linear(2 * num_frequencies, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: Tensor) -> Tensor:
        """t: [B] -> [B, D]."""
        dtype = torch.promote_types(self.W.dtype, torch.float32)  # sin/cos of large angles need >= fp32
        angles = 2 * math.pi * t.to(dtype)[:, None] * self.W.to(dtype)[None, :]
        features = torch.cat([angles.sin(), angles.cos()], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class SinusoidalTimestepEmbedder(nn.Module):
    """DiT's (and SiT's) time embedding: t -> [cos(t f), sin(t f)] with f_k = 10000^(-k / 128), k < 128 -> MLP.

    The frequencies are fixed, so nothing is drawn at construction and nothing is saved beside the MLP."""

    def __init__(self, hidden_size: int, num_features: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        half = num_features // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(num_features, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: Tensor) -> Tensor:
        """t: [B] -> [B, D]."""
        dtype = torch.promote_types(self.freqs.dtype, torch.float32)  # float32 as DiT, float64 in a double model
        angles = t.to(dtype)[:, None] * self.freqs.to(dtype)[None, :]
        features = torch.cat([angles.cos(), angles.sin()], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


TIME_EMBEDDERS = {"gaussian_fourier": GaussianFourierEmbedder, "sinusoidal": SinusoidalTimestepEmbedder}


class LabelEmbedder(nn.Module):
    """Class table with one extra row (index `num_classes`) for the null class of classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def drop_labels(self, y: Tensor, uniform: Tensor) -> Tensor:
        """Replace each label by the null class where `uniform` (U(0, 1) draws, one per label) < dropout_prob."""
        return torch.where(uniform < self.dropout_prob, torch.full_like(y, self.null_class), y)

    def forward(self, y: Tensor) -> Tensor:
        return self.embedding_table(y)


# --------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with optional per-head QK-norm and rotary q/k, through SDPA. `dropout` acts on the
    output projection (JiT's proj_drop)."""

    def __init__(
        self, dim: int, num_heads: int, qk_norm: bool = False, use_rmsnorm: bool = True, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = build_norm(self.head_dim, use_rmsnorm) if qk_norm else nn.Identity()
        self.k_norm = build_norm(self.head_dim, use_rmsnorm) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=True)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x: [B, N, D]; rope: (cos, sin), each [N, head_dim]."""
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k = q.to(v.dtype), k.to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, D)))
