"""Parameter and forward-FLOP counts of a backbone, measured on the meta device (no memory, no compute)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


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


def register_overhead(backbone: Callable[..., nn.Module], latent_shape: tuple[int, int, int]) -> dict[str, float]:
    """Parameters (M) and forward GFLOPs with the configured registers and without any."""
    channels, height, width = latent_shape
    stats: dict[str, float] = {}
    for tag, overrides in (("with_registers", {}), ("without_registers", {"num_registers": 0})):
        with torch.device("meta"):
            model = backbone(in_channels=channels, input_size=(height, width), **overrides)
        stats[f"params_M_{tag}"] = count_parameters(model) / 1e6
        stats[f"gflops_{tag}"] = forward_flops(model, latent_shape) / 1e9
    stats["params_overhead_pct"] = 100 * (stats["params_M_with_registers"] / stats["params_M_without_registers"] - 1)
    stats["gflops_overhead_pct"] = 100 * (stats["gflops_with_registers"] / stats["gflops_without_registers"] - 1)
    return stats
