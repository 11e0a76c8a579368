"""Outlier-token analysis: per-layer token-norm statistics of a frozen ViT encoder or a diffusion transformer,
norm maps, PCA-to-RGB images of patch features, max/median across layers, and register-neuron discovery.

    python -m dsr.analyze encoder=siglip2_b data=imagenet [analyze.num_images=64]         # the plain encoder
    python -m dsr.analyze encoder=siglip2_b registers=ttr                                  # with test-time registers
    python -m dsr.analyze encoder=siglip2_b analyze.discover=true [analyze.rounds=2]       # + register neurons
    python -m dsr.analyze analyze.target=dit analyze.ckpt=outputs/<run>/checkpoints/last.ckpt [analyze.times=[0.5]]

`target=encoder` runs the encoder as configured (with `registers=ttr` its hooks are active) on a seeded subset of
the configured data and writes, under `analyze.out_dir` (default `${paths.latent_dir}/analysis`): `stats.json`
(per-layer records of `dsr.registers.outliers.layer_statistics`, over patch tokens of the residual stream before
the final norm), `norm_maps/imageXX/norm_layerYY.png`, `pca/pcaXXX.png` (last analysed layer), `max_median.png`
and `norm_histogram.png` (patch norms at `analyze.detect_layer`, to place the discovery threshold). With
`analyze.discover=true` it also finds register neurons on the plain encoder and writes `register_neurons.json`.

`target=dit` loads a training checkpoint (EMA weights by default), encodes images with its own encoder, noises
them at each of `analyze.times` (t = 0 data, t = 1 noise; fixed seeded noise, the images' labels) and does the same
per time for every block's output (diffusion-register tokens excluded), under `<run dir>/analysis/<checkpoint>/tX.XX`
plus a `max_median.png` with one line per time.

Inputs of the figure functions are token tensors [B, N, C] (e.g. from `dsr.registers.ttr.capture_residual_stream`);
prefix / suffix tokens (CLS, trained or test-time registers) are cut off with `num_prefix_tokens` /
`num_suffix_tokens`, and the patch tokens must fill a square grid (row-major). Figures are drawn with Matplotlib's
Agg canvas (no display, no global pyplot state) and saved as PNG at exactly the requested pixel size.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from dsr.registers.outliers import layer_statistics, max_median_ratio, patch_tokens
from dsr.registers.ttr import (
    NoOutliersError,
    RegisterNeuronSet,
    ViTAdapter,
    capture_residual_stream,
    discover_recursive,
    discover_register_neurons,
)
from dsr.train import build

log = logging.getLogger("dsr.analyze")

__all__ = [
    "OutlierStatistics",
    "analyze_dit",
    "analyze_encoder",
    "backbone_blocks",
    "build_encoder",
    "capture_block_outputs",
    "dit_statistics",
    "discover_neurons",
    "encoder_hidden_states",
    "encoder_statistics",
    "merge_layer_records",
    "norm_grid",
    "pca_rgb",
    "plot_max_median_ratio",
    "plot_norm_histogram",
    "register_counts",
    "run",
    "save_norm_maps",
    "save_pca_images",
    "save_report",
]


def _grid_side(num_patches: int) -> int:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(
            f"{num_patches} patch tokens do not fill a square grid; check num_prefix_tokens / num_suffix_tokens"
        )
    return side


def _figure(size: tuple[int, int], dpi: int) -> Figure:
    """A figure of exactly size = (width, height) pixels at `dpi`, on the Agg canvas."""
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def norm_grid(x: Tensor, num_prefix_tokens: int = 0, num_suffix_tokens: int = 0) -> Tensor:
    """Patch-token norms laid out on the patch grid: [B, N, C] -> [B, h, w] (float32)."""
    norms = patch_tokens(x, num_prefix_tokens, num_suffix_tokens).float().norm(dim=-1)
    side = _grid_side(norms.shape[1])
    return norms.reshape(-1, side, side)


def save_norm_maps(
    hidden_states: Sequence[Tensor],
    out_dir: str | Path,
    *,
    image_index: int = 0,
    num_prefix_tokens: int = 0,
    num_suffix_tokens: int = 0,
    size: tuple[int, int] = (360, 300),
    dpi: int = 100,
    name: str = "norm_layer",
    layers: Sequence[int] | None = None,
) -> list[Path]:
    """One heat-map PNG per layer of the token norms of image `image_index` on the patch grid.

    Files are `{out_dir}/{name}{layer:02d}.png`, `size` = (width, height) pixels; titles give the layer and its
    max/median norm ratio. Each map has its own colour scale (the colour bar), since norms grow with depth.
    `layers` gives the layer index of each tensor (default 0, 1, ...), for a subset of the layers.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = range(len(hidden_states)) if layers is None else layers
    if len(layers) != len(hidden_states):
        raise ValueError(f"{len(hidden_states)} tensors but {len(layers)} layer indices")
    paths = []
    for layer, x in zip(layers, hidden_states, strict=True):
        tokens = x[image_index : image_index + 1]
        grid = norm_grid(tokens, num_prefix_tokens, num_suffix_tokens)[0]
        ratio = max_median_ratio(tokens, num_prefix_tokens, num_suffix_tokens).item()
        fig = _figure(size, dpi)
        ax = fig.add_subplot()
        im = ax.imshow(grid.cpu().numpy(), cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax, label="token norm")
        ax.set_title(f"layer {layer}: max/median {ratio:.2f}")
        ax.set_xticks([])
        ax.set_yticks([])
        path = out_dir / f"{name}{layer:02d}.png"
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    return paths


def pca_rgb(features: Tensor, num_prefix_tokens: int = 0, num_suffix_tokens: int = 0) -> Tensor:
    """Patch features projected on their first 3 principal components, as RGB images [B, 3, h, w] in [0, 1].

    The components are fitted on all patch tokens of the batch together (exact eigen-decomposition of the
    C x C covariance), so colours are comparable across images; each component is min-max scaled over the batch.
    `features` is [B, N, C] (or [N, C] for one image).
    """
    if features.ndim == 2:
        features = features[None]
    x = patch_tokens(features, num_prefix_tokens, num_suffix_tokens).double()
    b, n, c = x.shape
    if c < 3:
        raise ValueError(f"PCA to RGB needs at least 3 channels, got {c}")
    side = _grid_side(n)
    flat = x.reshape(b * n, c)
    flat = flat - flat.mean(dim=0)
    _, eigvecs = torch.linalg.eigh(flat.T @ flat)  # ascending eigenvalues
    proj = flat @ eigvecs[:, -3:].flip(-1)  # [B * N, 3], first component first
    lo, hi = proj.amin(dim=0), proj.amax(dim=0)
    rgb = (proj - lo) / (hi - lo).clamp_min(1e-12)
    return rgb.reshape(b, side, side, 3).permute(0, 3, 1, 2).float()


def save_pca_images(
    features: Tensor,
    out_dir: str | Path,
    *,
    num_prefix_tokens: int = 0,
    num_suffix_tokens: int = 0,
    scale: int = 16,
    name: str = "pca",
) -> list[Path]:
    """PCA-to-RGB PNGs `{out_dir}/{name}{b:03d}.png`, one per image, each patch drawn as scale x scale pixels."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rgb = pca_rgb(features, num_prefix_tokens, num_suffix_tokens)
    rgb = F.interpolate(rgb, scale_factor=scale, mode="nearest")
    pixels = (rgb * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    paths = []
    for b, image in enumerate(pixels):
        path = out_dir / f"{name}{b:03d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def plot_max_median_ratio(
    series: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    size: tuple[int, int] = (640, 400),
    dpi: int = 100,
    log_scale: bool = True,
    title: str | None = None,
    layers: Sequence[int] | None = None,
) -> Path:
    """Line plot of the patch max/median norm ratio against layer, one line per entry (e.g. none / TTR / recursive).

    `series` maps a label to one value per layer (e.g. `[r["max_median_ratio"] for r in layer_statistics(...)]`);
    `layers` gives the layer index of each value (default 0, 1, ...).
    A dashed line marks ratio 1; the y axis is logarithmic by default since outliers reach 10-100x.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = _figure(size, dpi)
    ax = fig.add_subplot()
    for label, values in series.items():
        xs = range(len(values)) if layers is None else list(layers)[: len(values)]
        ax.plot(xs, list(values), marker="o", label=label)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("patch-token norm max / median")
    if title:
        ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


def plot_norm_histogram(
    norms: Tensor,
    path: str | Path,
    *,
    threshold: float | None = None,
    bins: int = 100,
    size: tuple[int, int] = (640, 400),
    dpi: int = 100,
    title: str | None = None,
) -> Path:
    """Histogram of patch-token norms (any shape, flattened) with a log count axis and an optional threshold line.

    Outliers form a second mode far right of the bulk; a discovery threshold belongs in the valley between.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = norms.detach().float().flatten().cpu().numpy()
    fig = _figure(size, dpi)
    ax = fig.add_subplot()
    ax.hist(values, bins=bins, color="tab:blue", log=True)
    if threshold is not None:
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:g}")
        ax.legend()
    ax.set_xlabel("patch-token norm")
    ax.set_ylabel("tokens")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


# --------------------------------------------------------------------------------------------------------
# Statistics over many images, batch by batch
# --------------------------------------------------------------------------------------------------------

_SAME_KEYS = ("layer", "num_patches", "tau")
_MAX_KEYS = ("max_median_ratio_max", "norm_max")


def merge_layer_records(parts: Sequence[tuple[int, Mapping[str, Any]]], top_k: int) -> dict[str, Any]:
    """One layer's `layer_statistics` records of disjoint image batches, merged into the record of their union.

    `parts` are (index of the batch's first image, record). Per-image averages (every other numeric key) are
    averaged weighted by each batch's `num_images`, which is exact since every image has the same number of
    patches; `*_max` keys take the maximum, `num_images` the sum; `top_tokens` are re-ranked over all batches (image
    indices made global) and cut to `top_k`. A key that is None in some batches averages over the others.
    """
    if not parts:
        raise ValueError("no records to merge")
    first = parts[0][1]
    merged: dict[str, Any] = {}
    total = sum(int(record["num_images"]) for _, record in parts)
    for key in first:
        values = [record[key] for _, record in parts]
        if key in _SAME_KEYS:
            if any(v != values[0] for v in values):
                raise ValueError(f"records disagree on {key}: {sorted(set(values))}")
            merged[key] = values[0]
        elif key == "num_images":
            merged[key] = total
        elif key in _MAX_KEYS:
            merged[key] = max(values)
        elif key == "top_tokens":
            tokens = [{**tok, "image": tok["image"] + offset} for offset, record in parts for tok in record[key]]
            merged[key] = sorted(tokens, key=lambda tok: -tok["norm"])[:top_k]
        else:
            weighted = [(v, int(record["num_images"])) for (_, record), v in zip(parts, values, strict=True)]
            weighted = [(v, n) for v, n in weighted if v is not None]
            count = sum(n for _, n in weighted)
            merged[key] = sum(v * n for v, n in weighted) / count if count else None
    return merged


class OutlierStatistics:
    """Per-layer outlier statistics accumulated over batches, plus what the figures need.

    `update` takes one token tensor [B, T, C] per analysed layer and the number of tokens to exclude at the start
    (CLS, trained or diffusion registers) and end (test-time registers) of each; `records()` gives the per-layer
    `layer_statistics` records of all images seen (merged exactly, see `merge_layer_records`) with
    `num_excluded_tokens` added. It keeps the patch-token norms of every image ([n, N] per layer, for histograms)
    and the patch tokens of the first `keep` images ([keep, N, C] per layer, for norm maps and PCA), on the CPU.
    """

    def __init__(
        self,
        layers: Sequence[int],
        *,
        tau: float | None = None,
        kappas: Sequence[float] = (3.0, 5.0),
        top_k: int = 8,
        keep: int = 4,
    ) -> None:
        self.layers = [int(i) for i in layers]
        self.tau = tau
        self.kappas = tuple(kappas)
        self.top_k = top_k
        self.keep = keep
        self.num_images = 0
        self._parts: list[list[tuple[int, dict[str, Any]]]] = [[] for _ in self.layers]
        self._norms: list[list[Tensor]] = [[] for _ in self.layers]
        self._kept: list[list[Tensor]] = [[] for _ in self.layers]
        self._excluded: list[int | None] = [None] * len(self.layers)

    def update(
        self,
        hidden_states: Sequence[Tensor],
        num_prefix_tokens: int | Sequence[int] = 0,
        num_suffix_tokens: int | Sequence[int] = 0,
    ) -> None:
        """Add one batch: `hidden_states` holds [B, T_l, C_l] per layer (same B); counts are ints or per layer."""
        if len(hidden_states) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} layers, got {len(hidden_states)}")
        n = len(self.layers)
        prefix = [num_prefix_tokens] * n if isinstance(num_prefix_tokens, int) else list(num_prefix_tokens)
        suffix = [num_suffix_tokens] * n if isinstance(num_suffix_tokens, int) else list(num_suffix_tokens)
        batch = hidden_states[0].shape[0]
        for i, x in enumerate(hidden_states):
            (record,) = layer_statistics(
                [x], num_prefix_tokens=prefix[i], num_suffix_tokens=suffix[i], tau=self.tau, kappas=self.kappas,
                top_k=self.top_k,
            )  # fmt: skip
            record["layer"] = self.layers[i]
            self._parts[i].append((self.num_images, record))
            excluded = prefix[i] + suffix[i]
            if self._excluded[i] not in (None, excluded):
                raise ValueError(f"layer {self.layers[i]}: {excluded} excluded tokens, earlier {self._excluded[i]}")
            self._excluded[i] = excluded
            patches = patch_tokens(x, prefix[i], suffix[i]).float()
            self._norms[i].append(patches.norm(dim=-1).cpu())
            room = self.keep - sum(len(k) for k in self._kept[i])
            if room > 0:
                self._kept[i].append(patches[:room].cpu())
        self.num_images += batch

    def records(self) -> list[dict[str, Any]]:
        """The per-layer records over every image so far (JSON-ready)."""
        if not self.num_images:
            raise ValueError("no images were analysed")
        out = []
        for parts, excluded in zip(self._parts, self._excluded, strict=True):
            record = merge_layer_records(parts, self.top_k)
            record["num_excluded_tokens"] = excluded
            out.append(record)
        return out

    def norms(self, layer: int) -> Tensor:
        """Patch-token norms [n, N] of every image at `layer` (a layer index, as in `layers`)."""
        return torch.cat(self._norms[self.layers.index(layer)])

    def kept(self) -> list[Tensor]:
        """Patch tokens [keep, N, C] of the first `keep` images, one tensor per layer."""
        return [torch.cat(k) if k else torch.empty(0) for k in self._kept]

    def max_median(self) -> list[float]:
        """The mean per-image max/median patch-norm ratio of each layer."""
        return [r["max_median_ratio"] for r in self.records()]


def _images_of(batch: Any) -> Tensor:
    """The image tensor of a batch: the tensor itself or the first element of an (images, labels) pair."""
    if isinstance(batch, dict):
        raise ValueError(
            "the data yields cached latents, not images; the encoder analysis needs images: "
            "set data=<an image dataset> (e.g. data=imagenet or data=synthetic)"
        )
    return batch[0] if isinstance(batch, (tuple, list)) else batch


# --------------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------------


def _vit_of(codec: nn.Module) -> nn.Module:
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
    model = _vit_of(codec)
    pixel_values = codec.preprocess(images.float())
    hidden = capture_residual_stream(model, pixel_values, patches_only=False, layers=layers)
    prefix = ViTAdapter.from_model(model).num_prefix_tokens
    _, h, w = codec.latent_shape
    return hidden, prefix, hidden[0].shape[1] - prefix - h * w


def _layer_indices(layers: Sequence[int] | None, num_layers: int, setting: str = "analyze.layers") -> list[int]:
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
    model = _vit_of(codec)
    indices = _layer_indices(layers, ViTAdapter.from_model(model).num_layers)
    stats = OutlierStatistics(indices, tau=tau, top_k=top_k, keep=keep)
    device = next(model.parameters()).device
    for batch in tqdm(batches, desc="encoder statistics", unit="batch", disable=not progress):
        hidden, prefix, suffix = encoder_hidden_states(codec, _images_of(batch).to(device), indices)
        stats.update(hidden, prefix, suffix)
    return stats


class _Pixels:
    """Re-iterable encoder inputs: each pass runs over `loader` and yields `codec.preprocess(images)` on `device`."""

    def __init__(self, loader: Iterable[Any], codec: nn.Module, device: torch.device) -> None:
        self.loader, self.codec, self.device = loader, codec, device

    def __iter__(self) -> Iterator[Tensor]:
        for batch in self.loader:
            yield self.codec.preprocess(_images_of(batch).to(self.device).float())


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
    model = _vit_of(codec)
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


def register_counts(backbone: nn.Module) -> list[int]:
    """Diffusion-register tokens at the start of each block's output (`backbone_blocks` order).

    LightningDiT / DiT-DH trunk: `num_registers` from block `register_start` on, else 0; DiT-DH head: its
    `head_num_registers` in every head block.
    """
    depth = len(backbone.blocks)
    num_registers = int(getattr(backbone, "num_registers", 0) or 0)
    start = int(getattr(backbone, "register_start", 0) or 0)
    counts = [num_registers if i >= start else 0 for i in range(depth)]
    head = getattr(backbone, "head_blocks", None) or []
    return counts + [int(getattr(backbone, "head_num_registers", 0) or 0)] * len(head)


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
    indices = _layer_indices(layers, len(blocks))
    counts = register_counts(backbone)
    num_patches = math.prod(backbone.grid_size)
    captured: dict[int, Tensor] = {}

    def hook_for(i: int):
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            captured[i] = output.detach()

        return hook

    handles = [blocks[i].register_forward_hook(hook_for(i)) for i in indices]
    try:
        backbone(x_t, t, y)
    finally:
        for handle in handles:
            handle.remove()
    out = [captured[i] for i in indices]
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

    Diffusion-register tokens are excluded (`num_excluded_tokens` of each record).
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"analyze.times: t={t} is outside [0, 1] (t = 0 data, t = 1 noise)")
    indices = _layer_indices(layers, len(backbone_blocks(backbone)))
    stats = OutlierStatistics(indices, tau=tau, top_k=top_k, keep=keep)
    device = next(backbone.parameters()).device
    chunks = list(zip(latents.split(batch_size), labels.split(batch_size), noise.split(batch_size), strict=True))
    for z, y, eps in tqdm(chunks, desc=f"DiT statistics t={t:g}", unit="batch", disable=not progress):
        z, y, eps = z.to(device).float(), y.to(device), eps.to(device).float()
        times = torch.full((len(z),), float(t), device=device)
        x_t = (1.0 - t) * z + t * eps
        hidden, counts = capture_block_outputs(backbone, x_t, times, y, indices)
        stats.update(hidden, counts, 0)
    return stats


# --------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------


def save_report(
    stats: OutlierStatistics,
    out_dir: str | Path,
    *,
    label: str,
    metadata: Mapping[str, Any] | None = None,
    num_maps: int = 4,
    histogram_layer: int | None = None,
    threshold: float | None = None,
    title: str | None = None,
) -> dict[str, Any]:
    """Write `stats.json`, norm maps of the first `num_maps` images, PCA images and the max/median plot.

    `stats.json` is {"metadata": ..., "layers": [per-layer records]}. With `histogram_layer` (one of `stats.layers`)
    also `norm_histogram.png` of that layer's patch norms, marked at `threshold`. Returns the paths written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = stats.records()
    stats_path = out_dir / "stats.json"
    stats_path.write_text(json.dumps({"metadata": dict(metadata or {}), "layers": records}, indent=2) + "\n")
    kept = stats.kept()
    maps = []
    for b in range(min(num_maps, len(kept[0]))):
        maps += save_norm_maps([k[b : b + 1] for k in kept], out_dir / "norm_maps" / f"image{b:02d}",
                               layers=stats.layers)  # fmt: skip
    pca = save_pca_images(kept[-1][:num_maps], out_dir / "pca") if num_maps and len(kept[-1]) else []
    ratios = [r["max_median_ratio"] for r in records]
    plot = plot_max_median_ratio({label: ratios}, out_dir / "max_median.png", title=title, layers=stats.layers)
    paths: dict[str, Any] = {"stats": stats_path, "norm_maps": maps, "pca": pca, "max_median": plot}
    if histogram_layer is not None and histogram_layer in stats.layers:
        paths["histogram"] = plot_norm_histogram(
            stats.norms(histogram_layer), out_dir / "norm_histogram.png", threshold=threshold,
            title=f"{label}: patch norms at layer {histogram_layer}",
        )  # fmt: skip
    return paths


def _summary(records: Sequence[Mapping[str, Any]]) -> str:
    lines = ["layer  max/median  top-1 norm  median norm  top token (image, row, col)"]
    for r in records:
        top = r["top_tokens"][0] if r["top_tokens"] else {}
        where = f"({top.get('image')}, {top.get('row')}, {top.get('col')})" if top else "-"
        ratio, top1, median = r["max_median_ratio"], r["norm_max"], r["norm_median"]
        lines.append(f"{r['layer']:>5}  {ratio:>10.2f}  {top1:>10.2f}  {median:>11.2f}  {where}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _loader(data: DictConfig, num_images: int | None, batch_size: int, num_workers: int, seed: int) -> DataLoader:
    """A seeded subset of `num_images` of the dataset (all with None), random flips off, in a fixed order."""
    from dsr.stats import subset_indices, without_flip

    dataset = build(without_flip(data.dataset))
    indices = subset_indices(len(dataset), num_images, seed)
    return DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers)


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _first_round(value: Any) -> Any:
    """A discovery setting's value for the first round (settings may hold one value per round)."""
    return value[0] if isinstance(value, list) else value


def build_encoder(node: DictConfig) -> nn.Module:
    """The encoder of a config (`cfg.encoder`) in eval mode, built without latent statistics or decoder: the
    residual stream needs neither, so they need not exist yet. (encoder=pixel has none of these keys.)"""
    node = node.copy()
    for key in ("stats", "decoder", "decoder_weights"):
        if key in node:
            node[key] = None
    return build(node).eval()


def analyze_encoder(cfg: DictConfig) -> Path:
    """`analyze.target=encoder`: statistics and figures of the configured encoder, and optionally discovery."""
    a = cfg.analyze
    device = _device(a.device)
    codec = build_encoder(cfg.encoder).to(device)
    model = _vit_of(codec)
    num_layers = ViTAdapter.from_model(model).num_layers
    layers = _layer_indices(_plain(a.layers), num_layers)
    detect = _layer_indices([_first_round(_plain(a.detect_layer))], num_layers, "analyze.detect_layer")[0]
    if detect not in layers:
        layers = sorted({*layers, detect})  # the histogram at the detection layer guides the threshold
    latent_dir = Path(cfg.paths.latent_dir)
    out_dir = Path(a.out_dir) if a.out_dir else latent_dir / "analysis"
    registers = getattr(codec, "registers", "none")
    label = latent_dir.name

    loader = _loader(cfg.data, a.num_images, a.batch_size, a.num_workers, a.seed)
    log.info("outlier statistics of %s (registers=%s) over %d images on %s", label, registers,
             len(loader.dataset), device)  # fmt: skip
    stats = encoder_statistics(codec, loader, layers=layers, tau=a.tau, top_k=a.top_k_tokens, keep=a.num_maps)
    metadata = {
        "target": "encoder",
        "encoder": _plain(cfg.encoder.get("pretrained")) or cfg.encoder._target_,
        "registers": registers,
        "model_id": ViTAdapter.from_model(model).model_id(),
        "num_images": stats.num_images,
        "seed": a.seed,
        "data": _plain(cfg.data.dataset.get("_target_")),
        "tau": a.tau,
    }
    paths = save_report(stats, out_dir, label=label, metadata=metadata, num_maps=a.num_maps,
                        histogram_layer=detect, threshold=_first_round(_plain(a.threshold)) if a.discover else None,
                        title=f"{label}: patch-token norm max / median")  # fmt: skip
    print(_summary(stats.records()), flush=True)
    print(f"outlier statistics: {paths['stats']}\nfigures:            {out_dir}", flush=True)

    if a.discover:
        count = a.discover_num_images or a.num_images
        batches = _loader(cfg.data, count, a.batch_size, a.num_workers, a.seed)
        try:
            found = discover_neurons(
                codec, batches, rounds=a.rounds, threshold=_plain(a.threshold), detect_layer=_plain(a.detect_layer),
                top_k=_plain(a.top_k), layer_range=_plain(a.layer_range), sparsity_filter=a.sparsity_filter,
                num_registers=int(cfg.encoder.get("num_test_time_registers", 1) or 1),
            )  # fmt: skip
        except NoOutliersError as err:
            norms = stats.norms(detect)
            raise NoOutliersError(
                f"{err}. Set analyze.threshold below the outliers' norms: at layer {detect} the patch norms have "
                f"median {norms.median():.1f}, 99th percentile {norms.flatten().quantile(0.99):.1f} and maximum "
                f"{norms.max():.1f} (histogram: {paths.get('histogram')})"
            ) from None
        found.metadata.update(encoder=metadata["encoder"], num_images=len(batches.dataset), seed=a.seed)
        neurons_path = found.save(out_dir / "register_neurons.json").resolve()
        option = "ttr" if a.rounds == 1 else "recursive_ttr"
        top = ", ".join(f"({n.layer}, {n.neuron})" for n in found[:5])
        print(
            f"register neurons (layer, neuron), best first: {top}{' ...' if len(found) > 5 else ''}\n"
            f"register neurons: {neurons_path}\n"
            f"use them with:    registers={option} encoder.{option}_neurons={neurons_path}",
            flush=True,
        )
    return out_dir


def _run_dir_of(ckpt: Path) -> Path:
    """`outputs/<run>` for `outputs/<run>/checkpoints/<name>.ckpt`, else the checkpoint's folder."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def analyze_dit(cfg: DictConfig) -> Path:
    """`analyze.target=dit`: statistics and figures of a checkpoint's DiT blocks at each of `analyze.times`."""
    from dsr.lightning.dit_module import DiTModule

    a = cfg.analyze
    if not a.ckpt:
        raise ValueError(
            "analyze.target=dit needs analyze.ckpt=<a dsr.train checkpoint, e.g. outputs/<run>/checkpoints/last.ckpt>"
        )
    ckpt = Path(a.ckpt).expanduser()
    if not ckpt.is_file():
        raise FileNotFoundError(f"analyze.ckpt={a.ckpt} does not exist")
    times = [float(t) for t in (_plain(a.times) if isinstance(_plain(a.times), list) else [a.times])]
    for t in times:
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"analyze.times={times}: every t must lie in [0, 1] (t = 0 data, t = 1 noise)")
    if a.data_source not in ("checkpoint", "config"):
        raise ValueError(f"analyze.data_source={a.data_source!r}: choose checkpoint or config")
    device = _device(a.device)
    module = DiTModule.from_checkpoint(ckpt).to(device).eval()
    backbone = module.ema.module if a.use_ema else module.backbone
    layers = _layer_indices(_plain(a.layers), len(backbone_blocks(backbone)))
    out_dir = Path(a.out_dir) if a.out_dir else _run_dir_of(ckpt) / "analysis" / ckpt.stem

    data = OmegaConf.create(module.run_config["data"]) if a.data_source == "checkpoint" else cfg.data
    loader = _loader(data, a.num_images, a.batch_size, a.num_workers, a.seed)
    latents, labels = [], []
    for batch in tqdm(loader, desc="encoding", unit="batch"):
        if isinstance(batch, dict):
            batch = {k: v.to(device) for k, v in batch.items()}
        else:
            batch = [batch[0].to(device), batch[1].to(device)]
        z, y = module.latents(batch)
        latents.append(z.cpu())
        labels.append(y.cpu())
    latents, labels = torch.cat(latents), torch.cat(labels)
    generator = torch.Generator().manual_seed(int(a.seed))
    noise = torch.randn(latents.shape, generator=generator)  # the same noise at every t: times are comparable

    checkpoint_step = torch.load(ckpt, map_location="cpu", weights_only=False).get("global_step")
    series = {}
    for t in times:
        stats = dit_statistics(backbone, latents, labels, noise, t, batch_size=a.batch_size, layers=layers,
                               tau=a.tau, top_k=a.top_k_tokens, keep=a.num_maps)  # fmt: skip
        metadata = {
            "target": "dit",
            "ckpt": str(ckpt),
            "global_step": checkpoint_step,
            "use_ema": bool(a.use_ema),
            "t": t,
            "num_images": stats.num_images,
            "seed": a.seed,
            "num_registers": int(getattr(backbone, "num_registers", 0) or 0),
            "register_start": int(getattr(backbone, "register_start", 0) or 0),
            "tau": a.tau,
        }
        paths = save_report(stats, out_dir / f"t{t:.2f}", label=f"t={t:g}", metadata=metadata,
                            num_maps=a.num_maps, title=f"{ckpt.stem}, t={t:g}")  # fmt: skip
        series[f"t={t:g}"] = stats.max_median()
        print(f"t={t:g}\n{_summary(stats.records())}\noutlier statistics: {paths['stats']}", flush=True)
    plot = plot_max_median_ratio(series, out_dir / "max_median.png", title=f"{ckpt.stem}: DiT block outputs",
                                 layers=layers)  # fmt: skip
    print(f"max/median over times: {plot}\nfigures:               {out_dir}", flush=True)
    return out_dir


def run(cfg: DictConfig) -> Path:
    """Run the analysis `cfg.analyze.target` asks for; returns the output folder."""
    target = cfg.analyze.target
    if target == "encoder":
        return analyze_encoder(cfg)
    if target == "dit":
        return analyze_dit(cfg)
    raise ValueError(f"analyze.target={target!r}: choose encoder or dit")


@hydra.main(version_base="1.3", config_path="../conf", config_name="analyze")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
