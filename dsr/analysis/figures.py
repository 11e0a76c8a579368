"""Figures of token-norm statistics: norm maps, PCA-to-RGB images of patch features, max/median across layers and
norm histograms.

Inputs are token tensors [B, N, C] (e.g. from `dsr.registers.hooks.capture_residual_stream`); prefix / suffix tokens
(CLS, trained or test-time registers) are cut off with `num_prefix_tokens` / `num_suffix_tokens`, and the patch
tokens must fill a square grid (row-major). Figures are drawn with Matplotlib's Agg canvas (no display, no global
pyplot state) and saved as PNG at exactly the requested pixel size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image
from torch import Tensor

from dsr.analysis.outliers import max_median_ratio, patch_tokens
from dsr.utils.images import to_uint8


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


def _finish(fig: Figure, ax, path: Path, dpi: int, title: str | None, legend: bool) -> Path:
    """The common end of the line plots: title, legend, a light grid, a tight layout, saved as PNG at `dpi`."""
    if title:
        ax.set_title(title)
    if legend:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


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
    pixels = to_uint8(rgb)
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
    return _finish(fig, ax, path, dpi, title, legend=True)


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


def plot_sweep(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    best: tuple[float, float] | None = None,
    size: tuple[int, int] = (640, 400),
    dpi: int = 100,
    title: str | None = None,
) -> Path:
    """A sweep's metric against one setting: one line per entry of `series` (label -> (xs, ys)), e.g. FID against the
    guidance scale per EMA; `best` (x, y) is ringed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = _figure(size, dpi)
    ax = fig.add_subplot()
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o", label=label)
    if best is not None:
        ax.plot(*best, marker="o", markersize=14, markerfacecolor="none", markeredgecolor="black", linestyle="none",
                label="best")  # fmt: skip
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _finish(fig, ax, path, dpi, title, legend=True)


def plot_precision_recall(
    points: Mapping[str, tuple[float, float]],
    path: str | Path,
    *,
    size: tuple[int, int] = (520, 480),
    dpi: int = 100,
    title: str | None = None,
) -> Path:
    """Precision against recall, one labelled point per entry (label -> (recall, precision))."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = _figure(size, dpi)
    ax = fig.add_subplot()
    for label, (recall, precision) in points.items():
        ax.plot(recall, precision, marker="o", color="tab:blue")
        ax.annotate(label, (recall, precision), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    return _finish(fig, ax, path, dpi, title, legend=False)
