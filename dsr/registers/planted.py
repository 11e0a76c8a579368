"""Register neurons planted by hand: a ViT whose outlier tokens, and the neuron that writes them, are known.

A real register neuron (an MLP neuron in a middle block of SigLIP2 or DINOv2) fires hugely on a few patches and
writes a high-norm vector into their residual stream. `plant_neuron` makes one MLP neuron of a small ViT do exactly
that: it reads one direction of its block's normalised input, fires where the reading passes a threshold, and
writes a fixed vector per unit of activation. `plant_outlier_neuron` picks the direction at random and sets the
threshold and the write's norm from the model's own tokens on given images, so that a chosen share of patches
become outliers of a chosen strength (their residual norm over the median patch norm). The tests and the
small-scale study use it; discovery (`dsr.registers.neurons`) should find the neuron and test-time registers
(`dsr.registers.ttr`) should move its activity off the patches.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dsr.registers.hooks import ViTAdapter, capture_residual_stream
from dsr.registers.neurons import RegisterNeuron

__all__ = ["plant_neuron", "plant_outlier_neuron", "silence_neuron"]


@torch.no_grad()
def plant_neuron(mlp: nn.Module, neuron: int, read: Tensor, bias: float, write: Tensor) -> None:
    """MLP hidden unit `neuron` of `mlp` (fc1 -> GELU -> fc2) computes GELU(read . x + bias) and writes `write` per
    unit of activation into the residual stream, nothing else."""
    mlp.fc1.weight[neuron] = read.to(mlp.fc1.weight)
    mlp.fc1.bias[neuron] = bias
    mlp.fc2.weight[:, neuron] = write.to(mlp.fc2.weight)


@torch.no_grad()
def silence_neuron(model: nn.Module, layer: int, neuron: int) -> None:
    """MLP neuron `neuron` of block `layer` still fires but writes nothing: the clean twin of a planted model."""
    ViTAdapter.from_model(model).blocks[layer].mlp.fc2.weight[:, neuron] = 0


@torch.no_grad()
def plant_outlier_neuron(
    model: nn.Module,
    pixel_values: Tensor,
    *,
    layer: int,
    neuron: int,
    share: float = 0.1,
    strength: float = 10.0,
    seed: int = 0,
) -> RegisterNeuron:
    """Make MLP neuron `neuron` of block `layer` write outlier tokens on about `share` of the patches of images like
    `pixel_values` (in the model's input normalisation), each with a residual norm of about `strength` times the
    median patch norm after that block. Returns the neuron, for `RegisterNeuronSet` / test-time registers."""
    if not 0 < share < 1:
        raise ValueError(f"share={share}: the fraction of patches that fire must be in (0, 1)")
    adapter = ViTAdapter.from_model(model)
    layer = adapter.layer_index(layer, "layer")
    mlp = adapter.blocks[layer].mlp
    g = torch.Generator().manual_seed(seed)
    width = mlp.fc1.in_features
    read = torch.randn(width, generator=g)
    read /= read.norm()
    write = torch.randn(width, generator=g)
    write /= write.norm()

    inputs: list[Tensor] = []
    handle = mlp.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
    try:
        residual = capture_residual_stream(model, pixel_values, layers=[layer])[0]
    finally:
        handle.remove()
    patches = slice(adapter.num_prefix_tokens, adapter.num_prefix_tokens + residual.shape[1])
    reading = (inputs[0][:, patches].float() @ read).flatten()
    threshold = torch.quantile(reading, 1 - share).item()
    excess = (reading[reading > threshold] - threshold).mean().item()
    gain = 3.0 / max(excess, 1e-6)  # a typical firing patch reaches GELU(3) ~ 3: off or clearly on
    activation = torch.nn.functional.gelu(gain * (reading - threshold))
    typical = activation[reading > threshold].median().item()
    median_norm = residual.float().norm(dim=-1).median().item()
    plant_neuron(mlp, neuron, gain * read, -gain * threshold, write * strength * median_norm / max(typical, 1e-6))
    return RegisterNeuron(layer=layer, neuron=neuron, score=math.nan)
