"""SiT (Ma et al. 2024, "Scalable Interpolant Transformers"): DiT's architecture trained as a flow, with optional
diffusion registers.

The network is DiT's, as SiT's code builds it: a PatchEmbed plus a fixed sin-cos position table, adaLN-Zero blocks
with LayerNorm without affine (eps 1e-6), multi-head attention with biased qkv, a GELU-tanh MLP, DiT's sinusoidal
timestep embedding with its MLP, a class table with a null row, and a final adaLN layer. So it is dsr's
LightningDiT with SwiGLU, RMSNorm, RoPE and QK-norm off and the sinusoidal time embedding, and the parameters keep
DiT's names (`blocks.i.attn.qkv`, `blocks.i.mlp.fc1`, `t_embedder.mlp.0`, ...), which SiT's checkpoints load into.

`learn_sigma` (SiT's default, kept from DiT) doubles the output channels; SiT drops the second half, and so does
this model, so the released weights load and the interface is dsr's [B, C, H, W] -> [B, C, H, W].

Time and velocity: SiT counts time the other way (t = 1 is data, x_t = t x + (1 - t) noise) and its network
predicts d x_t / dt = x - noise in that time. dsr's convention (`dsr.diffusion.transport`) is t = 0 data, velocity
noise - x. The model maps at its boundary: the network sees 1 - t, and its output is negated, so a SiT checkpoint
is a velocity model in dsr's convention without any change to the transport or the samplers; a SiT trained in
dsr learns the same function either way.

Diffusion registers join at block `register_start` and are dropped before the final layer, as in LightningDiT;
with no RoPE they carry only their sin-cos code. `num_registers=0` is the plain SiT.
"""

from __future__ import annotations

from torch import Tensor

from dsr.models.dit import LightningDiT


class SiT(LightningDiT):
    """SiT on a [B, C, H, W] latent (defaults: SiT-XL/2 on SD-VAE latents of 256 px). See the module docstring."""

    def __init__(
        self,
        input_size: int | tuple[int, int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        num_registers: int = 0,
        register_start: int = 0,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__(
            input_size=input_size,
            patch_size=patch_size,
            in_channels=in_channels,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            class_dropout_prob=class_dropout_prob,
            num_classes=num_classes,
            use_qknorm=False,
            use_swiglu=False,
            use_rope=False,
            use_rmsnorm=False,
            wo_shift=False,
            use_pos_embed=True,
            num_registers=num_registers,
            register_start=register_start,
            time_embedder="sinusoidal",
            out_channels=2 * in_channels if learn_sigma else in_channels,
            grad_checkpointing=grad_checkpointing,
        )
        self.learn_sigma = learn_sigma

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """x: [B, C, H, W], t: [B] in dsr's time (0 data, 1 noise), y: [B] -> dsr's velocity [B, C, H, W]."""
        out = super().forward(x, 1 - t, y)  # SiT's time: 1 is data
        return -out[:, : self.in_channels]  # SiT's velocity points toward data; the sigma half is unused
