"""What the analysis reads: a frozen encoder's residual stream after each block, a diffusion transformer's block
outputs (through forward hooks), their outlier statistics over many images, and register-neuron discovery on an
encoder's ViT."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from tqdm.auto import tqdm

from dsr.analysis.statistics import OutlierStatistics
from dsr.config import build
from dsr.diffusion.transport import interpolate
from dsr.registers.hooks import ViTAdapter, capture_residual_stream
from dsr.registers.neurons import RegisterNeuronSet, discover_recursive, discover_register_neurons


def build_encoder(node: DictConfig) -> nn.Module:
    """The encoder of a config (`cfg.encoder`) in eval mode, built without latent statistics or decoder: the
    residual stream needs neither, so they need not exist yet. (encoder=pixel has none of these keys.)"""
    node = node.copy()
    for key in ("stats", "decoder", "decoder_weights"):
        if key in node:
            node[key] = None
    return build(node).eval()


def images_of(batch: Any) -> Tensor:
    """The images [B, 3, H, W] of a batch: the tensor itself or the first element of an (x, y) pair."""
    images = batch[0] if isinstance(batch, (tuple, list)) else batch
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"the encoder analysis needs images [B, 3, H, W], got {tuple(images.shape)} (cached latents?): "
            "set data=<an image dataset> (e.g. data=imagenet or data=synthetic)"
        )
    return images


def vit_of(codec: nn.Module) -> nn.Module:
    model = getattr(codec, "model", None)
    if model is None:
        raise ValueError(
            f"{type(codec).__name__} has no ViT to analyse: choose a transformer encoder "
            "(encoder=siglip2_b, siglip2_so400m, dinov2_b_reg, dinov2_b or tiny)"
        )
    return model


@torch.no_grad()
def encoder_hidden_states(
    codec: nn.Module, images: Tensor, layers: Sequence[int] | None = None
) -> tuple[list[Tensor], int, int]:
    """The residual stream after each block of a codec's ViT (before its final norm) on images in [0, 1].

    Args:
        codec: a `RepresentationAutoencoder` (`codec.model` is the Hugging Face / timm ViT, `codec.preprocess`
            its input transform); installed test-time registers stay active.
        images: [B, 3, H, W] in [0, 1].
        layers: block indices (Python-style; default all).

    Returns:
        (one [B, T, C] tensor per layer with every token, the number of prefix tokens (CLS, trained registers),
        the number of suffix tokens (test-time registers)); T = prefix + N patches + suffix.
    """
    model = vit_of(codec)
    pixel_values = codec.preprocess(images.float())
    hidden = capture_residual_stream(model, pixel_values, patches_only=False, layers=layers)
    prefix = ViTAdapter.from_model(model).num_prefix_tokens
    _, h, w = codec.latent_shape
    return hidden, prefix, hidden[0].shape[1] - prefix - h * w


def layer_indices(layers: Sequence[int] | None, num_layers: int, setting: str = "analyze.layers") -> list[int]:
    if layers is None:
        return list(range(num_layers))
    out = []
    for layer in layers:
        if not -num_layers <= int(layer) < num_layers:
            raise ValueError(f"{setting}={list(layers)}: layer {layer} is out of range for {num_layers} layers")
        out.append(int(layer) % num_layers)
    return out


@torch.no_grad()
def encoder_statistics(
    codec: nn.Module,
    batches: Iterable[Any],
    *,
    layers: Sequence[int] | None = None,
    tau: float | None = None,
    top_k: int = 8,
    keep: int = 4,
    progress: bool = True,
) -> OutlierStatistics:
    """Outlier statistics of every (or each listed) block of a codec's ViT over batches of images.

    `batches` yields images [B, 3, H, W] in [0, 1] or (images, labels) pairs (a DataLoader); they are moved to the
    codec's device. Statistics are over patch tokens only (prefix and test-time-register tokens excluded).
    """
    model = vit_of(codec)
    indices = layer_indices(layers, ViTAdapter.from_model(model).num_layers)
    stats = OutlierStatistics(indices, tau=tau, top_k=top_k, keep=keep)
    device = next(model.parameters()).device
    for batch in tqdm(batches, desc="encoder statistics", unit="batch", disable=not progress):
        hidden, prefix, suffix = encoder_hidden_states(codec, images_of(batch).to(device), indices)
        stats.update(hidden, prefix, suffix)
    return stats


class _Pixels:
    """Re-iterable encoder inputs: each pass runs over `loader` and yields `codec.preprocess(images)` on `device`."""

    def __init__(self, loader: Iterable[Any], codec: nn.Module, device: torch.device) -> None:
        self.loader, self.codec, self.device = loader, codec, device

    def __iter__(self) -> Iterator[Tensor]:
        for batch in self.loader:
            yield self.codec.preprocess(images_of(batch).to(self.device).float())


def discover_neurons(
    codec: nn.Module,
    batches: Iterable[Any],
    *,
    rounds: int = 1,
    threshold: float | list[float] = 30.0,
    detect_layer: int | list[int] = -1,
    top_k: int | None | list[int | None] = 10,
    layer_range: Sequence[int] | None | list[Sequence[int] | None] = None,
    sparsity_filter: bool = False,
    num_registers: int = 1,
    model_id: str | None = None,
) -> RegisterNeuronSet:
    """Register-neuron discovery on a codec's plain ViT (any installed test-time registers are lifted meanwhile).

    `batches` is a re-iterable of images in [0, 1] (or (images, labels) pairs, e.g. a DataLoader). One round is
    `discover_register_neurons`; more rounds are `discover_recursive` (then a setting may be a list, one value per
    round). Defaults are the reference's: threshold 30 on the last block, top 10, sparsity filter off.
    """
    if rounds < 1:
        raise ValueError(f"analyze.rounds={rounds}: give 1 (test-time registers) or more (recursive)")
    model = vit_of(codec)
    device = next(model.parameters()).device
    pixels = _Pixels(batches, codec, device)

    def window(value: Any) -> Any:
        if value is None:
            return None
        if len(value) == 2 and all(isinstance(v, int) for v in value):
            return (int(value[0]), int(value[1]))
        return [window(v) for v in value]  # one window per round

    common = dict(threshold=threshold, detect_layer=detect_layer, top_k=top_k, layer_range=window(layer_range))
    registers = getattr(codec, "test_time_registers", None)
    lifted = registers is not None and registers.installed
    if lifted:
        registers.remove()
    try:
        if rounds == 1:
            return discover_register_neurons(
                model, pixels, sparsity_filter=sparsity_filter, model_id=model_id, **common
            )
        return discover_recursive(
            model, pixels, rounds, num_registers=num_registers, sparsity_filter=sparsity_filter, model_id=model_id,
            **common,
        )  # fmt: skip
    finally:
        if lifted:
            registers.install()


# --------------------------------------------------------------------------------------------------------
# Diffusion transformer
# --------------------------------------------------------------------------------------------------------


def backbone_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a LightningDiT (`blocks`) or a DiT-DH (`blocks`, then `head_blocks`)."""
    blocks = getattr(backbone, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(backbone).__name__} has no `blocks`: not a diffusion transformer")
    return [*blocks, *getattr(backbone, "head_blocks", [])]


def prefix_groups(backbone: nn.Module) -> list[dict[str, int]]:
    """The prefix tokens at the start of each block's output (`backbone_blocks` order), by kind and in sequence order.

    LightningDiT / DiT-DH trunk: {"registers": `num_registers`} from block `register_start` on, else 0; DiT-DH head:
    its `head_num_registers` in every head block; JiT: {"registers": R_l, "in_context": L_l} (its `prefix_counts`).
    """
    if hasattr(backbone, "prefix_counts"):
        return [dict(groups) for groups in backbone.prefix_counts()]
    depth = len(backbone.blocks)
    num_registers = int(getattr(backbone, "num_registers", 0) or 0)
    start = int(getattr(backbone, "register_start", 0) or 0)
    counts = [num_registers if i >= start else 0 for i in range(depth)]
    head = getattr(backbone, "head_blocks", None) or []
    counts += [int(getattr(backbone, "head_num_registers", 0) or 0)] * len(head)
    return [{"registers": count} for count in counts]


def register_counts(backbone: nn.Module) -> list[int]:
    """Prefix tokens (diffusion registers, and JiT's in-context class tokens) at the start of each block's output
    (`backbone_blocks` order): the sizes of `prefix_groups` added up."""
    return [sum(groups.values()) for groups in prefix_groups(backbone)]


@torch.no_grad()
def block_outputs(blocks: Sequence[nn.Module], forward: Callable[[], Any]) -> list[Tensor]:
    """The output token tensor [B, T, D] of each of `blocks` (any model's) during one call of `forward()`, read
    with forward hooks. Hooks added earlier run first: registers added by `dsr.registers.plug` are already gone
    from the last block's output (`diffusion_register_counts` says how many each output holds)."""
    captured: dict[int, Tensor] = {}

    def hook_for(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not isinstance(output, Tensor):
                raise TypeError(f"block {i} ({type(module).__name__}) returns a {type(output).__name__}, not tokens")
            captured[i] = output.detach()

        return hook

    handles = [block.register_forward_hook(hook_for(i)) for i, block in enumerate(blocks)]
    try:
        forward()
    finally:
        for handle in handles:
            handle.remove()
    return [captured[i] for i in range(len(blocks))]


@torch.no_grad()
def capture_block_outputs(
    backbone: nn.Module, x_t: Tensor, t: Tensor, y: Tensor, layers: Sequence[int] | None = None
) -> tuple[list[Tensor], list[int]]:
    """Every (or each listed) block's output of a diffusion transformer on one forward pass, with forward hooks.

    Args:
        backbone: a LightningDiT or DiT-DH (run as is: put it in eval mode first).
        x_t: noisy latents [B, C, H, W]; t: times [B]; y: class labels [B].
        layers: block indices in `backbone_blocks` order (default all).

    Returns:
        (one [B, R_l + N, D_l] tensor per block, the register count R_l of each): registers come first.
    """
    blocks = backbone_blocks(backbone)
    indices = layer_indices(layers, len(blocks))
    counts = register_counts(backbone)
    num_patches = math.prod(backbone.grid_size)
    out = block_outputs([blocks[i] for i in indices], lambda: backbone(x_t, t, y))
    for i, x in zip(indices, out, strict=True):
        if x.shape[1] != counts[i] + num_patches:  # the model's register layout changed: never guess
            raise RuntimeError(f"block {i} output has {x.shape[1]} tokens, expected {counts[i]} + {num_patches}")
    return out, [counts[i] for i in indices]


@torch.no_grad()
def dit_statistics(
    backbone: nn.Module,
    latents: Tensor,
    labels: Tensor,
    noise: Tensor,
    t: float,
    *,
    batch_size: int = 32,
    layers: Sequence[int] | None = None,
    tau: float | None = None,
    top_k: int = 8,
    keep: int = 4,
    progress: bool = True,
) -> OutlierStatistics:
    """Outlier statistics of each block of a diffusion transformer on x_t = (1 - t) z + t noise.

    Args:
        backbone: LightningDiT / DiT-DH in eval mode. latents z [n, C, H, W] (normalised, as stage 2 sees them),
        labels [n], noise [n, C, H, W]: moved to the backbone's device batch by batch. t in [0, 1] (1 = noise).

    Prefix tokens (diffusion registers, JiT's in-context class tokens) are excluded (`num_excluded_tokens` of each
    record) and summarised on their own, per kind (`prefix_tokens` of each record: their mean and largest norm, and
    the largest over the patches' median), since sink-like behaviour would show up there.
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"analyze.times: t={t} is outside [0, 1] (t = 0 data, t = 1 noise)")
    indices = layer_indices(layers, len(backbone_blocks(backbone)))
    groups = prefix_groups(backbone)
    stats = OutlierStatistics(indices, tau=tau, top_k=top_k, keep=keep)
    device = next(backbone.parameters()).device
    chunks = list(zip(latents.split(batch_size), labels.split(batch_size), noise.split(batch_size), strict=True))
    for z, y, eps in tqdm(chunks, desc=f"DiT statistics t={t:g}", unit="batch", disable=not progress):
        z, y, eps = z.to(device).float(), y.to(device), eps.to(device).float()
        times = torch.full((len(z),), float(t), device=device)
        x_t = interpolate(z, eps, times)
        hidden, counts = capture_block_outputs(backbone, x_t, times, y, indices)
        stats.update(hidden, counts, 0, prefix_groups=[groups[i] for i in indices])
    return stats
