"""JiT (Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise"): a plain transformer on pixel patches
that predicts the clean image, with optional diffusion registers.

The network, as JiT builds it:
- a bottleneck patch embedding: a p x p convolution from the image's 3 channels down to `bottleneck_dim` channels
  (128 for B/L, 256 for H), no bias, then a 1 x 1 convolution up to the width D;
- a fixed 2-D sin-cos absolute position table added to the patch tokens, on top of the 2-D axial RoPE inside every
  attention;
- c = t_emb + y_emb (DiT's sinusoidal time embedding and a class table with a null row) conditions every block by
  adaLN-Zero; the blocks are LightningDiT's with QK-norm, SwiGLU and RMSNorm always on;
- `in_context_len` in-context class tokens (the class embedding y_emb repeated, plus learned positions) join the
  sequence at block `in_context_start` (4 / 8 / 10 of 12 / 24 / 32 for B / L / H); they take identity RoPE rows;
- dropout on the middle half of the blocks (blocks depth/4 <= i < 3 depth/4), on the attention's output projection and
  the MLP's hidden activations (0.2 for H, 0 for B and L; attention-weight dropout is 0 in every JiT config and is not
  offered);
- a final adaLN layer and the linear map back to p x p x 3 patches.

Time and output: JiT counts time the other way (t = 1 is data, z = t x + (1 - t) noise), and its network outputs the
clean image x. The model maps at its boundary: the network sees 1 - t. Its output is already in dsr's terms (a clean-x
prediction, the transport's `prediction: x`), so nothing else changes; the sampler and the loss are the transport's
(`recipe=jit` sets JiT's loss and time distribution, `sampler=jit` its sampler).

Diffusion registers with in-context tokens. Both are prefix tokens with identity RoPE rows, modulated by adaLN like
every token, and both leave before the final layer. Each joins at its own block: registers at `register_start`, the
class tokens at `in_context_start`. The sequence is always [registers; in-context tokens; patches]: registers go to the
very front when they join, and in-context tokens are inserted right after any registers. Since neither kind is rotated,
their order changes nothing in the computation; a fixed order only keeps the bookkeeping (stripping, analysis) simple
whichever joins first. The two are kept apart rather than merged because they do different jobs: the in-context
tokens carry the class (they are JiT's conditioning, already register-like), the registers are class-agnostic learned
tokens that give attention somewhere to go. With `num_registers=0` the model is JiT's network exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dsr.models.dit import (
    DiTBlock,
    FinalLayer,
    init_embedders_and_zero_adaln,
    set_grad_checkpointing,
    unpatchify,
    xavier_linears_,
)
from dsr.models.layers import LabelEmbedder, SinusoidalTimestepEmbedder, sincos_pos_embed_2d
from dsr.models.registers import DiffusionRegisters
from dsr.models.rotary import RotaryTables


class BottleneckPatchEmbed(nn.Module):
    """Images [B, C, H, W] -> tokens [B, h * w, D] through a `bottleneck_dim`-channel linear bottleneck per patch."""

    def __init__(self, input_size: tuple[int, int], patch_size: int, in_channels: int, bottleneck_dim: int,
                 hidden_size: int) -> None:  # fmt: skip
        super().__init__()
        if input_size[0] % patch_size or input_size[1] % patch_size:
            raise ValueError(f"input size {tuple(input_size)} is not divisible by backbone.patch_size={patch_size}")
        self.grid_size = (input_size[0] // patch_size, input_size[1] // patch_size)
        self.proj1 = nn.Conv2d(in_channels, bottleneck_dim, kernel_size=patch_size, stride=patch_size, bias=False)
        self.proj2 = nn.Conv2d(bottleneck_dim, hidden_size, kernel_size=1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj2(self.proj1(x)).flatten(2).transpose(1, 2)


class JiT(nn.Module):
    """JiT on images [B, 3, H, W] in [-1, 1] (defaults: JiT-B/16 at 256 px). See the module docstring."""

    def __init__(
        self,
        input_size: int | tuple[int, int] = 256,
        patch_size: int = 16,
        in_channels: int = 3,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        bottleneck_dim: int = 128,
        in_context_len: int = 32,
        in_context_start: int = 4,
        dropout: float = 0.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        num_registers: int = 0,
        register_start: int = 4,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        input_size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if in_context_len and not 0 <= in_context_start < depth:
            raise ValueError(f"backbone.in_context_start={in_context_start} must lie in [0, depth={depth})")
        if num_registers and not 0 <= register_start < depth:
            raise ValueError(f"backbone.register_start={register_start} must lie in [0, depth={depth})")
        self.in_channels = self.out_channels = in_channels
        self.patch_size = patch_size
        self.depth = depth
        self.in_context_len = in_context_len
        self.in_context_start = in_context_start
        self.num_registers = num_registers
        self.register_start = register_start

        self.t_embedder = SinusoidalTimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.x_embedder = BottleneckPatchEmbed(input_size, patch_size, in_channels, bottleneck_dim, hidden_size)
        self.grid_size: tuple[int, int] = self.x_embedder.grid_size
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, *self.grid_size).unsqueeze(0),
                             persistent=False)  # fmt: skip
        self.in_context_posemb = nn.Parameter(torch.zeros(1, in_context_len, hidden_size)) if in_context_len else None
        self.rope = RotaryTables(hidden_size // num_heads, self.grid_size)
        middle = range(depth // 4, depth // 4 * 3)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, use_qknorm=True, dropout=dropout if i in middle else 0.0)
            for i in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()
        # Built last so that the other parameters draw the same initial values with or without registers.
        self.registers = DiffusionRegisters(num_registers, hidden_size) if num_registers else None
        set_grad_checkpointing(self, grad_checkpointing)

    def initialize_weights(self) -> None:
        """JiT's init: xavier-uniform Linears with zero bias, then DiT's recipe (both patch projections like Linears,
        label table and time MLP N(0, 0.02), adaLN-Zero, a zero output layer) and in-context positions N(0, 0.02)."""
        xavier_linears_(self)
        init_embedders_and_zero_adaln(self, [self.x_embedder.proj1, self.x_embedder.proj2], self.blocks)
        if self.in_context_posemb is not None:
            nn.init.normal_(self.in_context_posemb, std=0.02)

    @property
    def null_class(self) -> int:
        """Label index of the unconditional (null) class used by classifier-free guidance."""
        return self.y_embedder.null_class

    def prefix_counts(self) -> list[dict[str, int]]:
        """The prefix tokens in each block's output, in sequence order: {"registers": R_i, "in_context": L_i}."""
        return [
            {
                "registers": self.num_registers if self.registers is not None and i >= self.register_start else 0,
                "in_context": self.in_context_len if i >= self.in_context_start else 0,
            }
            for i in range(self.depth)
        ]

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """x: [B, C, H, W], t: [B] in dsr's time (0 data, 1 noise), y: [B] (null_class = unconditional) -> the clean
        image x_hat [B, C, H, W]."""
        y_emb = self.y_embedder(y)  # [B, D]
        c = self.t_embedder(1 - t) + y_emb  # JiT's time: 1 is data
        x = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # [B, N, D]
        num_registers = num_in_context = 0
        rope = self.rope.tables(prefixed=False)
        for i, block in enumerate(self.blocks):
            if self.registers is not None and i == self.register_start:
                x = self.registers(x)  # [B, R + ..., D]: registers go first
                num_registers = self.num_registers
            if self.in_context_posemb is not None and i == self.in_context_start:
                tokens = y_emb.unsqueeze(1).expand(-1, self.in_context_len, -1) + self.in_context_posemb
                x = torch.cat([x[:, :num_registers], tokens.to(x.dtype), x[:, num_registers:]], dim=1)
                num_in_context = self.in_context_len
            if i in (self.register_start, self.in_context_start):
                rope = self.rope.with_prefix(num_registers + num_in_context)
            x = block(x, c, rope=rope)
        x = x[:, num_registers + num_in_context :]  # [B, N, D]
        return unpatchify(self.final_layer(x, c), self.patch_size, self.grid_size, self.out_channels)
