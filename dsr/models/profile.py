"""Parameter and forward-FLOP counts of a backbone: measured on the meta device (no memory, no compute), or by
formula from the sizes alone.

FLOPs are 2 per multiply-accumulate of every matmul: Linear layers, the patch embedding (a convolution), and the
attention's scores q k^T and weighted sum of values. Norms, activations, RoPE, softmax and additions are not counted.
This is the convention of `torch.utils.flop_counter`, which `forward_flops` measures and `analytic_forward_flops`
reproduces exactly.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from hydra.utils import get_class
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dsr.models.ddt import DiTDH
from dsr.models.dit import LightningDiT
from dsr.models.jit import JiT
from dsr.models.sit import SiT

# GaussianFourierEmbedder's default: sin and cos of 256 random frequencies feed the time MLP; DiT's sinusoidal
# embedding (SiT) feeds it cos and sin of 128.
FOURIER_FEATURES = 2 * 256
SINUSOIDAL_FEATURES = 256


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def forward_flops(model: nn.Module, latent_shape: tuple[int, int, int]) -> int:
    """FLOPs (2 per multiply-accumulate) of one forward pass on a single latent [1, C, h, w]."""
    model = model.to("meta")
    x = torch.zeros((1, *latent_shape), device="meta")
    t = torch.zeros(1, device="meta")
    y = torch.zeros(1, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(x, t, y)
    return counter.get_total_flops()


def _no_registers(backbone: Callable[..., nn.Module]) -> dict[str, int]:
    """Overrides that build `backbone` without any diffusion registers (trunk and, for DiT-DH, head)."""
    overrides = {"num_registers": 0}
    func = backbone.func if isinstance(backbone, functools.partial) else backbone
    if "head_num_registers" in inspect.signature(func).parameters:
        overrides["head_num_registers"] = 0
    return overrides


def register_overhead(backbone: Callable[..., nn.Module], latent_shape: tuple[int, int, int]) -> dict[str, float]:
    """Parameters (M) and forward GFLOPs with the configured registers and without any."""
    channels, height, width = latent_shape
    stats: dict[str, float] = {}
    for tag, overrides in (("with_registers", {}), ("without_registers", _no_registers(backbone))):
        with torch.device("meta"):
            model = backbone(in_channels=channels, input_size=(height, width), **overrides)
        stats[f"params_M_{tag}"] = count_parameters(model) / 1e6
        stats[f"gflops_{tag}"] = forward_flops(model, latent_shape) / 1e9
    stats["params_overhead_pct"] = 100 * (stats["params_M_with_registers"] / stats["params_M_without_registers"] - 1)
    stats["gflops_overhead_pct"] = 100 * (stats["gflops_with_registers"] / stats["gflops_without_registers"] - 1)
    return stats


# --------------------------------------------------------------------------------------------------------
# FLOPs by formula
# --------------------------------------------------------------------------------------------------------


# The constructor arguments the forward FLOPs depend on (in_channels and input_size come from the latent shape).
FLOP_ARGUMENTS = (
    "patch_size",
    "hidden_size",
    "depth",
    "mlp_ratio",
    "use_swiglu",
    "wo_shift",
    "num_registers",
    "register_start",
    "head_hidden_size",
    "head_depth",
    "head_num_registers",
    "time_embedder",
    "out_channels",
    "learn_sigma",
    "bottleneck_dim",
    "in_context_len",
    "in_context_start",
)


def _backbone_arguments(backbone: Any) -> tuple[type, dict[str, Any]]:
    """(class, its FLOP-relevant constructor arguments, defaults filled in) of a `_partial_` factory or a config."""
    if isinstance(backbone, functools.partial):
        cls, given = backbone.func, dict(backbone.keywords)
    elif isinstance(backbone, Mapping) or hasattr(backbone, "_target_"):
        cls, given = get_class(backbone["_target_"]), backbone
    elif isinstance(backbone, type):
        cls, given = backbone, {}
    else:
        raise TypeError(f"expected a backbone class, factory (functools.partial) or config, got {type(backbone)}")
    if not (isinstance(cls, type) and issubclass(cls, (LightningDiT, DiTDH, JiT))):
        name = getattr(cls, "__name__", cls)
        raise TypeError(f"analytic FLOPs know LightningDiT, DiTDH and JiT (and SiT, a LightningDiT), not {name}")
    if isinstance(backbone, functools.partial) and backbone.args:
        raise ValueError("give the backbone factory's arguments by keyword")
    parameters = inspect.signature(cls).parameters
    # Reading only these keys leaves unrelated interpolations (num_classes: ${data.num_classes}) unresolved.
    return cls, {
        name: given[name] if name in given else parameters[name].default
        for name in FLOP_ARGUMENTS
        if name in parameters
    }


def _block_macs(tokens: int, width: int, mlp_ratio: float, use_swiglu: bool, wo_shift: bool, cond_rows: int) -> int:
    """Multiply-accumulates of one block on `tokens` tokens; its adaLN Linear runs on `cond_rows` condition rows
    (1 for a per-sample condition, `tokens` for the DDT head's per-token one)."""
    if use_swiglu:
        hidden = int(2 / 3 * mlp_ratio * width)
        mlp = width * 2 * hidden + hidden * width  # packed (gate, value) projection, then the output projection
    else:
        mlp = 2 * width * int(width * mlp_ratio)
    qkv_proj = width * 3 * width + width * width
    attention = 2 * tokens * tokens * width  # q k^T and attn @ v, summed over heads
    ada_ln = cond_rows * width * (4 if wo_shift else 6) * width
    return tokens * (qkv_proj + mlp) + attention + ada_ln


def analytic_forward_flops(backbone: Any, latent_shape: tuple[int, int, int]) -> int:
    """FLOPs (2 per multiply-accumulate) of one forward pass on a single latent [1, C, h, w], from the sizes alone.

    `backbone` is a LightningDiT / DiTDH factory (`functools.partial`, as the `backbone` config group builds), its
    config (a mapping with `_target_`), or the class itself (default sizes). `in_channels` and `input_size` come from
    `latent_shape`, as when the stage builds the backbone. Equals `forward_flops` of the built model.
    """
    cls, a = _backbone_arguments(backbone)
    if issubclass(cls, JiT):
        return _jit_forward_flops(a, latent_shape)
    channels, height, width = latent_shape
    p = a["patch_size"]
    tokens = (height // p) * (width // p)
    patch_dim = channels * p * p
    # SiT fixes DiT's GELU MLP and the shift term (not constructor arguments there).
    mlp = dict(mlp_ratio=a["mlp_ratio"], use_swiglu=a.get("use_swiglu", False), wo_shift=a.get("wo_shift", False))
    d = a["hidden_size"]
    registers = a["num_registers"]

    # Trunk: patch embedding, time MLP (the label embedding is a lookup), blocks on per-sample c.
    sinusoidal = a.get("time_embedder") == "sinusoidal" or issubclass(cls, SiT)
    macs = tokens * patch_dim * d + (SINUSOIDAL_FEATURES if sinusoidal else FOURIER_FEATURES) * d + d * d
    for i in range(a["depth"]):
        n = tokens + (registers if registers and i >= a["register_start"] else 0)
        macs += _block_macs(n, d, cond_rows=1, **mlp)
    if issubclass(cls, LightningDiT):
        out_channels = 2 * channels if a.get("learn_sigma") else a.get("out_channels") or channels
        macs += 2 * d * d + tokens * d * out_channels * p * p  # final adaLN on c, final linear
        return 2 * macs

    head_registers = registers if a["head_num_registers"] is None else a["head_num_registers"]
    d_head = a["head_hidden_size"]
    n_head = tokens + head_registers  # trunk registers reach the head only when the head has its own bank
    if d != d_head:
        macs += n_head * d * d_head  # s_projector
    macs += tokens * patch_dim * d_head  # x_embedder
    for _ in range(a["head_depth"]):
        macs += _block_macs(n_head, d_head, cond_rows=n_head, **mlp)
    macs += tokens * 2 * d_head * d_head + tokens * d_head * patch_dim  # per-token final adaLN, final linear
    return 2 * macs


def _jit_forward_flops(a: Mapping[str, Any], image_shape: tuple[int, int, int]) -> int:
    """JiT on an image [1, C, H, W]: the bottleneck patch embedding, the sinusoidal time MLP, blocks whose sequence
    grows by the in-context tokens and the registers from their start blocks on, the final adaLN and linear."""
    channels, height, width = image_shape
    p, d = a["patch_size"], a["hidden_size"]
    tokens = (height // p) * (width // p)
    patch_dim = channels * p * p
    macs = tokens * (patch_dim * a["bottleneck_dim"] + a["bottleneck_dim"] * d) + SINUSOIDAL_FEATURES * d + d * d
    for i in range(a["depth"]):
        n = tokens + (a["in_context_len"] if i >= a["in_context_start"] else 0)
        n += a["num_registers"] if a["num_registers"] and i >= a["register_start"] else 0
        macs += _block_macs(n, d, a["mlp_ratio"], use_swiglu=True, wo_shift=False, cond_rows=1)
    macs += 2 * d * d + tokens * d * patch_dim  # final adaLN on c, final linear
    return 2 * macs
