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

from dsr.models.dit import DiTBlock, FinalLayer, init_embedders_and_zero_adaln, set_grad_checkpointing, unpatchify
from dsr.models.layers import GaussianFourierEmbedder, LabelEmbedder, sincos_pos_embed_2d
from dsr.models.registers import DiffusionRegisters
from dsr.models.rotary import RotaryTables


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
        grad_checkpointing: bool = False,
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
            DiTBlock(head_hidden_size, head_num_heads, mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm, wo_shift)
            for _ in range(head_depth)
        )
        self.final_layer = FinalLayer(head_hidden_size, patch_size, self.out_channels, use_rmsnorm)

        self.use_rope = use_rope
        # From `register_start` on, the trunk sequence is [registers; patches]: registers get identity rows. The
        # head's sequence is [head registers; patches] throughout.
        self.rope = RotaryTables(hidden_size // num_heads, self.grid_size, num_registers) if use_rope else None
        self.head_rope = (
            RotaryTables(head_hidden_size // head_num_heads, self.grid_size, head_num_registers) if use_rope else None
        )

        self.initialize_weights()
        # Built last so that the other parameters draw the same initial values with or without registers.
        self.registers = DiffusionRegisters(num_registers, hidden_size) if num_registers else None
        self.head_registers = DiffusionRegisters(head_num_registers, head_hidden_size) if head_num_registers else None
        set_grad_checkpointing(self, grad_checkpointing)

    def initialize_weights(self) -> None:
        """The reference's init: no global xavier pass, so attention, MLP and s_projector keep PyTorch's default."""
        init_embedders_and_zero_adaln(
            self, [self.s_embedder.proj, self.x_embedder.proj], [*self.blocks, *self.head_blocks]
        )

    @property
    def null_class(self) -> int:
        """Label index of the unconditional (null) class used by classifier-free guidance."""
        return self.y_embedder.null_class

    def rope_tables(self, with_registers: bool) -> tuple[Tensor, Tensor] | None:
        return self.rope.tables(prefixed=with_registers) if self.rope is not None else None

    def head_rope_tables(self) -> tuple[Tensor, Tensor] | None:
        return self.head_rope.tables(prefixed=True) if self.head_rope is not None else None

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
        rope = self.rope_tables(with_registers=False)
        for i, block in enumerate(self.blocks):
            if self.registers is not None and i == self.register_start:
                s = self.registers(s)  # [B, R + N, D_s]
                rope = self.rope_tables(with_registers=True)
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
            h = block(h, s, rope=self.head_rope_tables())
        if self.head_registers is not None:
            h, s = self.head_registers.strip(h), self.head_registers.strip(s)  # [B, N, D_x] each
        return self.unpatchify(self.final_layer(h, s))
