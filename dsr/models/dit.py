"""LightningDiT: the stage-2 diffusion transformer of RAE and DSR, with optional diffusion registers.

A DiT with adaLN-Zero blocks (optionally without the shift term), SwiGLU MLPs, RMSNorm, 2-D RoPE,
optional QK-norm, a fixed sin-cos absolute position embedding, a Gaussian-Fourier timestep embedding (DiT's
sinusoidal one as an option) and a class table with a null row for classifier-free guidance. With SwiGLU, RMSNorm
and RoPE off and the sinusoidal time embedding it is DiT's own architecture, which `dsr.models.sit` builds.
It maps a noisy latent x_t [B, C, H, W], its time t [B] (t = 0 data, t = 1 noise) and class labels y [B] to an
output of the same shape as x (a velocity, or clean data under x-prediction; the transport decides).

Diffusion registers (`num_registers` > 0) join the sequence at block `register_start` and are dropped
before the final layer; with `num_registers` = 0 the model is the plain LightningDiT.
"""

from __future__ import annotations

import torch
from timm.layers import PatchEmbed
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dsr.models.layers import (
    TIME_EMBEDDERS,
    Attention,
    LabelEmbedder,
    build_mlp,
    build_norm,
    modulate,
    per_token,
    sincos_pos_embed_2d,
)
from dsr.models.registers import DiffusionRegisters
from dsr.models.rotary import RotaryTables


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero conditioning on c [B, D] (or per token, c [B, N, D]). `dropout`
    (JiT-H's) acts on the attention's output projection and the MLP's hidden activations. With `grad_checkpointing`
    (`set_grad_checkpointing`) a training forward keeps only the block's inputs and recomputes the rest in the
    backward pass: activation memory per block for about one more forward."""

    grad_checkpointing = False

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        use_qknorm: bool = False,
        use_swiglu: bool = True,
        use_rmsnorm: bool = True,
        wo_shift: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = build_norm(hidden_size, use_rmsnorm)
        self.attn = Attention(hidden_size, num_heads, qk_norm=use_qknorm, use_rmsnorm=use_rmsnorm, dropout=dropout)
        self.norm2 = build_norm(hidden_size, use_rmsnorm)
        self.mlp = build_mlp(hidden_size, mlp_ratio, use_swiglu, dropout)
        self.wo_shift = wo_shift
        num_chunks = 4 if wo_shift else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, num_chunks * hidden_size))

    def forward(self, x: Tensor, c: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x: [B, N, D], c: [B, D] or [B, N, D] -> [B, N, D]."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, c, rope, use_reentrant=False)
        return self._forward(x, c, rope)

    def _forward(self, x: Tensor, c: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=-1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + per_token(gate_msa, x) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope=rope)
        x = x + per_token(gate_mlp, x) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """Norm, adaLN (shift, scale) from c [B, D] or per token [B, N, D], then a linear map from tokens to patches."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, use_rmsnorm: bool = True) -> None:
        super().__init__()
        self.norm_final = build_norm(hidden_size, use_rmsnorm)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def set_grad_checkpointing(model: nn.Module, enable: bool = True) -> nn.Module:
    """Turn activation checkpointing on or off in every `DiTBlock` of `model` (each backbone's `grad_checkpointing`
    argument, `backbone.grad_checkpointing=true`); returns the model. The outputs and gradients are unchanged."""
    for module in model.modules():
        if isinstance(module, DiTBlock):
            module.grad_checkpointing = enable
    return model


def unpatchify(x: Tensor, patch_size: int, grid_size: tuple[int, int], channels: int) -> Tensor:
    """Tokens [B, h*w, p*p*C] (row-major grid, each read as (p_row, p_col, channel)) -> [B, C, h*p, w*p]."""
    p, (h, w) = patch_size, grid_size
    x = x.reshape(x.shape[0], h, w, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], channels, h * p, w * p)


def xavier_linears_(model: nn.Module) -> None:
    """Every Linear of `model` xavier-uniform with zero bias, in module order (LightningDiT's and JiT's first pass)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def init_embedders_and_zero_adaln(
    model: nn.Module, patch_projections: list[nn.Conv2d], blocks: list[nn.Module]
) -> None:
    """The DiT recipe shared by LightningDiT, DiT-DH and JiT: patch projections (the convolutions of the patch
    embeddings) initialised like a Linear (xavier, zero bias), label table and time MLP N(0, 0.02), and adaLN-Zero
    (every block starts as the identity, output zero)."""
    for conv in patch_projections:
        w = conv.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for block in [*blocks, model.final_layer]:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    nn.init.zeros_(model.final_layer.linear.weight)
    nn.init.zeros_(model.final_layer.linear.bias)


class LightningDiT(nn.Module):
    """Diffusion transformer on a [B, C, H, W] latent. See the module docstring."""

    def __init__(
        self,
        input_size: int | tuple[int, int] = 16,
        patch_size: int = 1,
        in_channels: int = 768,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        use_qknorm: bool = False,
        use_swiglu: bool = True,
        use_rope: bool = True,
        use_rmsnorm: bool = True,
        wo_shift: bool = False,
        use_pos_embed: bool = True,
        num_registers: int = 0,
        register_start: int = 0,
        time_embedder: str = "gaussian_fourier",
        out_channels: int | None = None,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if num_registers and not 0 <= register_start < depth:
            raise ValueError(f"register_start={register_start} must lie in [0, depth={depth})")
        if time_embedder not in TIME_EMBEDDERS:
            raise ValueError(f"backbone.time_embedder={time_embedder!r}: choose one of {sorted(TIME_EMBEDDERS)}")
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.patch_size = patch_size
        self.depth = depth
        self.num_registers = num_registers
        self.register_start = register_start

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.grid_size: tuple[int, int] = tuple(self.x_embedder.grid_size)
        self.t_embedder = TIME_EMBEDDERS[time_embedder](hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed (not learned) sin-cos table; a buffer rather than a frozen parameter so optimizers never see it.
        pos_embed = sincos_pos_embed_2d(hidden_size, *self.grid_size).unsqueeze(0) if use_pos_embed else None
        self.register_buffer("pos_embed", pos_embed, persistent=False)

        # From `register_start` on, the sequence is [registers; patches]: registers get identity rows.
        self.rope = RotaryTables(hidden_size // num_heads, self.grid_size, num_registers) if use_rope else None
        self.use_rope = use_rope

        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm, wo_shift)
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, use_rmsnorm)
        self.initialize_weights()
        # Built last so that the other parameters draw the same initial values with or without registers.
        self.registers = DiffusionRegisters(num_registers, hidden_size) if num_registers else None
        set_grad_checkpointing(self, grad_checkpointing)

    def initialize_weights(self) -> None:
        xavier_linears_(self)
        init_embedders_and_zero_adaln(self, [self.x_embedder.proj], self.blocks)

    @property
    def null_class(self) -> int:
        """Label index of the unconditional (null) class used by classifier-free guidance."""
        return self.y_embedder.null_class

    def rope_tables(self, with_registers: bool) -> tuple[Tensor, Tensor] | None:
        return self.rope.tables(prefixed=with_registers) if self.rope is not None else None

    def unpatchify(self, x: Tensor) -> Tensor:
        """[B, h*w, p*p*C] -> [B, C, h*p, w*p]."""
        return unpatchify(x, self.patch_size, self.grid_size, self.out_channels)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """x: [B, C, H, W], t: [B] in [0, 1], y: [B] class labels (null_class = unconditional) -> [B, C, H, W]."""
        x = self.x_embedder(x)  # [B, N, D]
        if self.pos_embed is not None:
            x = x + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(y)  # [B, D]
        rope = self.rope_tables(with_registers=False)
        for i, block in enumerate(self.blocks):
            if self.registers is not None and i == self.register_start:
                x = self.registers(x)  # [B, R + N, D]
                rope = self.rope_tables(with_registers=True)
            x = block(x, c, rope=rope)
        if self.registers is not None:
            x = self.registers.strip(x)
        return self.unpatchify(self.final_layer(x, c))
