"""DiT-DH: a LightningDiT trunk with a wide, shallow DDT head (RAE's "DiTwDDTHead"), with optional diffusion registers.

The trunk reads the noisy latent x_t [B, C, H, W] as tokens s (a PatchEmbed plus the fixed sin-cos position table)
and runs `depth` LightningDiT blocks of width D_s conditioned on c = SiLU(t_emb + y_emb). Its output is handed off
as s <- Linear_{D_s -> D_x}(SiLU(s + t_emb)). The head re-embeds the same x_t with a second PatchEmbed of width D_x
(no absolute position embedding) and runs `head_depth` blocks whose adaLN is per token: token i takes its shift,
scale and gate from SiLU(s_i). The final layer is modulated per token by s as well, so the trunk never writes the
output directly; it only steers the head. t = 0 is data and t = 1 noise; the output has the shape of x.

Diffusion registers follow the DSR release. A bank of `num_registers` tokens of width D_s joins the trunk at block
`register_start` (identity RoPE rows). A second bank of `head_num_registers` tokens of width D_x is prepended to the
head's input (identity RoPE rows). The trunk's registers are *not* dropped at the hand-off: they pass through
SiLU(s + t_emb) and the projection like the patch tokens, and head register j is modulated by trunk register j's
output. Both banks are dropped (from the head tokens and from s) before the final layer. So the release needs
`head_num_registers == num_registers`; `head_num_registers = 0` is also allowed here, and then the trunk registers
are dropped at the hand-off instead.
"""

from __future__ import annotations

import torch.nn.functional as F
from timm.layers import PatchEmbed
from torch import Tensor, nn

from dsr.models.dit import DiTBlock, FinalLayer, init_embedders_and_zero_adaln, unpatchify
from dsr.models.layers import (
    GaussianFourierEmbedder,
    LabelEmbedder,
    rope_axial_2d,
    rope_with_prefix,
    sincos_pos_embed_2d,
)
from dsr.registers.diffusion import DiffusionRegisters


def modulate_tokens(x: Tensor, shift: Tensor | None, scale: Tensor) -> Tensor:
    """Per-token adaLN: x * (1 + scale) + shift, all [B, N, D]."""
    x = x * (1 + scale)
    return x if shift is None else x + shift


class HeadBlock(DiTBlock):
    """The DDT head's block: a `DiTBlock` whose condition is per token, c [B, N, D] instead of [B, D]."""

    def forward(self, x: Tensor, c: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x: [B, N, D], c: [B, N, D] -> [B, N, D]."""
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=-1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate_tokens(self.norm1(x), shift_msa, scale_msa), rope=rope)
        x = x + gate_mlp * self.mlp(modulate_tokens(self.norm2(x), shift_mlp, scale_mlp))
        return x


class HeadFinalLayer(FinalLayer):
    """`FinalLayer` with per-token (shift, scale): x [B, N, D], c [B, N, D] -> [B, N, p * p * C]."""

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate_tokens(self.norm_final(x), shift, scale))


class DiTDH(nn.Module):
    """LightningDiT trunk + wide shallow DDT head on a [B, C, H, W] latent. See the module docstring.

    Defaults are DiT-DH-XL: trunk 1152 wide, 28 deep, 16 heads; head 2048 wide, 2 deep, 16 heads.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = 16,
        patch_size: int = 1,
        in_channels: int = 768,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        head_hidden_size: int = 2048,
        head_depth: int = 2,
        head_num_heads: int = 16,
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
        head_num_registers: int | None = None,
    ) -> None:
        super().__init__()
        head_num_registers = num_registers if head_num_registers is None else head_num_registers
        if num_registers and not 0 <= register_start < depth:
            raise ValueError(f"register_start={register_start} must lie in [0, depth={depth})")
        if head_num_registers not in (0, num_registers):
            raise ValueError(
                f"head_num_registers={head_num_registers} must equal num_registers={num_registers} (each head register "
                "is modulated by the trunk register at the same position) or be 0"
            )
        self.in_channels = self.out_channels = in_channels
        self.patch_size = patch_size
        self.depth = depth
        self.head_depth = head_depth
        self.num_registers = num_registers
        self.register_start = register_start
        self.head_num_registers = head_num_registers

        # Trunk ("encoder" in the reference): tokens s of width D_s.
        self.s_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.grid_size: tuple[int, int] = tuple(self.s_embedder.grid_size)
        self.t_embedder = GaussianFourierEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        pos_embed = sincos_pos_embed_2d(hidden_size, *self.grid_size).unsqueeze(0) if use_pos_embed else None
        self.register_buffer("pos_embed", pos_embed, persistent=False)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm, wo_shift)
            for _ in range(depth)
        )
        self.s_projector = (
            nn.Linear(hidden_size, head_hidden_size) if hidden_size != head_hidden_size else nn.Identity()
        )

        # Head ("decoder" in the reference): tokens x of width D_x, re-embedded from x_t, no absolute position code.
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, head_hidden_size, bias=True)
        self.head_blocks = nn.ModuleList(
            HeadBlock(head_hidden_size, head_num_heads, mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm, wo_shift)
            for _ in range(head_depth)
        )
        self.final_layer = HeadFinalLayer(head_hidden_size, patch_size, self.out_channels, use_rmsnorm)

        self.use_rope = use_rope
        if use_rope:
            cos, sin = rope_axial_2d(hidden_size // num_heads, *self.grid_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
            # From `register_start` on, the trunk sequence is [registers; patches]: registers get identity rows.
            cos_r, sin_r = rope_with_prefix(cos, sin, num_registers)
            self.register_buffer("rope_cos_registers", cos_r, persistent=False)
            self.register_buffer("rope_sin_registers", sin_r, persistent=False)
            # The head's sequence is [head registers; patches] throughout.
            head_cos, head_sin = rope_axial_2d(head_hidden_size // head_num_heads, *self.grid_size)
            head_cos, head_sin = rope_with_prefix(head_cos, head_sin, head_num_registers)
            self.register_buffer("head_rope_cos", head_cos, persistent=False)
            self.register_buffer("head_rope_sin", head_sin, persistent=False)

        self.initialize_weights()
        # Built last so that the other parameters draw the same initial values with or without registers.
        self.registers = DiffusionRegisters(num_registers, hidden_size) if num_registers else None
        self.head_registers = DiffusionRegisters(head_num_registers, head_hidden_size) if head_num_registers else None

    def initialize_weights(self) -> None:
        """The reference's init: no global xavier pass, so attention, MLP and s_projector keep PyTorch's default."""
        init_embedders_and_zero_adaln(self, [self.s_embedder, self.x_embedder], [*self.blocks, *self.head_blocks])

    @property
    def null_class(self) -> int:
        """Label index of the unconditional (null) class used by classifier-free guidance."""
        return self.y_embedder.null_class

    def trunk_rope(self, with_registers: bool) -> tuple[Tensor, Tensor] | None:
        if not self.use_rope:
            return None
        if with_registers:
            return self.rope_cos_registers, self.rope_sin_registers
        return self.rope_cos, self.rope_sin

    def head_rope(self) -> tuple[Tensor, Tensor] | None:
        return (self.head_rope_cos, self.head_rope_sin) if self.use_rope else None

    def unpatchify(self, x: Tensor) -> Tensor:
        """[B, h*w, p*p*C] -> [B, C, h*p, w*p]."""
        return unpatchify(x, self.patch_size, self.grid_size, self.out_channels)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """x: [B, C, H, W], t: [B] in [0, 1], y: [B] class labels (null_class = unconditional) -> [B, C, H, W]."""
        t_emb = self.t_embedder(t)  # [B, D_s]
        c = F.silu(t_emb + self.y_embedder(y))  # [B, D_s]

        # Trunk.
        s = self.s_embedder(x)  # [B, N, D_s]
        if self.pos_embed is not None:
            s = s + self.pos_embed.to(s.dtype)
        rope = self.trunk_rope(with_registers=False)
        for i, block in enumerate(self.blocks):
            if self.registers is not None and i == self.register_start:
                s = self.registers(s)  # [B, R + N, D_s]
                rope = self.trunk_rope(with_registers=True)
            s = block(s, c, rope=rope)
        if self.registers is not None and self.head_registers is None:
            s = self.registers.strip(s)

        # Hand-off: the time embedding joins every token (registers included), then the projection to the head width.
        s = self.s_projector(F.silu(s + t_emb.unsqueeze(1)))  # [B, R + N, D_x]

        # Head, conditioned per token by s.
        h = self.x_embedder(x)  # [B, N, D_x]
        if self.head_registers is not None:
            h = self.head_registers(h)  # [B, R + N, D_x]
        for block in self.head_blocks:
            h = block(h, s, rope=self.head_rope())
        if self.head_registers is not None:
            h, s = self.head_registers.strip(h), self.head_registers.strip(s)  # [B, N, D_x] each
        return self.unpatchify(self.final_layer(h, s))
