"""Outlier-token metrics for token tensors [B, N, C] (one per layer of an encoder or a DiT).

High-norm ("outlier") tokens are the few tokens whose residual-stream norm is many times that of the rest
(Darcet et al. 2024). Every metric here works on patch tokens only: prefix tokens (CLS, trained registers) and
suffix tokens (test-time registers) are cut off first with `num_prefix_tokens` / `num_suffix_tokens`, because
registers carry high norms by design. Norms are computed in float32.

Per-image metrics return one value per batch element [B]; `layer_statistics` aggregates them over the batch
by the mean (and reports the max) so that every image counts once whatever its outliers.

Outliers must be measured on the residual stream before the encoder's final LayerNorm: after a LayerNorm without
affine every token has norm ~sqrt(C), so outliers are invisible in `last_hidden_state`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "fraction_above",
    "grid_position",
    "layer_statistics",
    "massive_activation_ratio",
    "max_median_ratio",
    "patch_tokens",
    "relative_fraction_above",
    "token_norms",
    "topk_norms",
]


def patch_tokens(x: Tensor, num_prefix_tokens: int = 0, num_suffix_tokens: int = 0) -> Tensor:
    """Drop prefix (CLS, trained registers) and suffix (test-time registers) tokens: [B, N, C] -> [B, N_p, C]."""
    if x.ndim != 3:
        raise ValueError(f"expected a token tensor [B, N, C], got shape {tuple(x.shape)}")
    if num_prefix_tokens < 0 or num_suffix_tokens < 0:
        raise ValueError("num_prefix_tokens and num_suffix_tokens must be >= 0")
    end = x.shape[1] - num_suffix_tokens
    if end <= num_prefix_tokens:
        raise ValueError(
            f"no patch tokens left: N={x.shape[1]}, num_prefix_tokens={num_prefix_tokens}, "
            f"num_suffix_tokens={num_suffix_tokens}"
        )
    return x[:, num_prefix_tokens:end]


def token_norms(x: Tensor, num_prefix_tokens: int = 0, num_suffix_tokens: int = 0) -> Tensor:
    """L2 norm of every patch token over channels, in float32: [B, N, C] -> [B, N_p]."""
    return patch_tokens(x, num_prefix_tokens, num_suffix_tokens).float().norm(dim=-1)


def _median(norms: Tensor) -> Tensor:
    """Per-image median [B] of norms [B, N]; the mean of the two middle values when N is even.

    (`torch.median` returns the lower middle value, which biases ratios for small even N such as a 4x4 grid;
    `torch.quantile` refuses inputs above 16M elements.)
    """
    norms = norms.float()
    n = norms.shape[-1]
    lower = norms.kthvalue((n + 1) // 2, dim=-1).values
    return lower if n % 2 else 0.5 * (lower + norms.kthvalue(n // 2 + 1, dim=-1).values)


def max_median_ratio(x: Tensor, num_prefix_tokens: int = 0, num_suffix_tokens: int = 0) -> Tensor:
    """rho_max per image: max_i ||x_i|| / median_i ||x_i|| over patch tokens. [B, N, C] -> [B]."""
    norms = token_norms(x, num_prefix_tokens, num_suffix_tokens)
    return norms.amax(dim=-1) / _median(norms).clamp_min(torch.finfo(torch.float32).tiny)


def fraction_above(x: Tensor, tau: float, num_prefix_tokens: int = 0, num_suffix_tokens: int = 0) -> Tensor:
    """Per image, the fraction of patch tokens with norm strictly above the absolute threshold tau. [B]."""
    return (token_norms(x, num_prefix_tokens, num_suffix_tokens) > tau).float().mean(dim=-1)


def relative_fraction_above(x: Tensor, kappa: float, num_prefix_tokens: int = 0, num_suffix_tokens: int = 0) -> Tensor:
    """Per image, the fraction of patch tokens with norm above kappa times that image's median norm. [B]."""
    norms = token_norms(x, num_prefix_tokens, num_suffix_tokens)
    return (norms > kappa * _median(norms)[:, None]).float().mean(dim=-1)


def topk_norms(x: Tensor, k: int, num_prefix_tokens: int = 0, num_suffix_tokens: int = 0) -> tuple[Tensor, Tensor]:
    """The k largest patch-token norms per image and their indices among the patch tokens.

    Returns (values [B, k] descending, indices [B, k]); indices count from the first patch token.
    """
    norms = token_norms(x, num_prefix_tokens, num_suffix_tokens)
    values, indices = norms.topk(min(k, norms.shape[1]), dim=-1)
    return values, indices


def grid_position(index: int, num_patches: int) -> tuple[int, int] | None:
    """(row, col) of patch `index` on a square row-major grid of `num_patches` tokens; None if not square."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        return None
    return divmod(int(index), side)


def massive_activation_ratio(x: Tensor, num_prefix_tokens: int = 0, num_suffix_tokens: int = 0) -> Tensor:
    """Channel-level outliers per image: max_{i,d} |x_id| / median_{i,d} |x_id| over patch tokens. [B]."""
    a = patch_tokens(x, num_prefix_tokens, num_suffix_tokens).float().abs().flatten(1)
    return a.amax(dim=-1) / _median(a).clamp_min(torch.finfo(torch.float32).tiny)


def layer_statistics(
    hidden_states: Sequence[Tensor],
    *,
    num_prefix_tokens: int = 0,
    num_suffix_tokens: int = 0,
    tau: float | None = None,
    kappas: Sequence[float] = (3.0, 5.0),
    top_k: int = 4,
) -> list[dict[str, Any]]:
    """Outlier statistics for each layer's tokens, as JSON-ready records (plain floats, ints and lists).

    Args:
        hidden_states: one tensor [B, N, C] per layer (e.g. the residual stream after every block).
        num_prefix_tokens / num_suffix_tokens: tokens excluded at the start / end of the sequence.
        tau: absolute norm threshold for `fraction_above_tau` (omitted when None).
        kappas: relative thresholds for `fraction_above_{kappa}x_median`.
        top_k: how many of the largest patch tokens (over the whole batch) to list in `top_tokens`.

    Each record holds `layer`, `num_images`, `num_patches`, the per-image max/median ratio aggregated as its mean
    over images (`max_median_ratio`) and its max (`max_median_ratio_max`), the mean of top-k/median (k = 1% of
    patches, at least 1), the token-norm median (mean over images) and max (over the batch), fractions above the
    thresholds (means over images), the massive-activation ratio (mean), the mean norm of the excluded tokens
    relative to the patch median (`excluded_norm_ratio`, None when nothing is excluded), and `top_tokens`: the
    `top_k` largest patch tokens as {image, index, row, col, norm} (row/col None when the patches are no square).
    """
    records = []
    for layer, x in enumerate(hidden_states):
        norms = token_norms(x, num_prefix_tokens, num_suffix_tokens)  # [B, N_p]
        num_images, num_patches = norms.shape
        median = _median(norms)  # [B]
        rho = norms.amax(dim=-1) / median
        k_frac = max(1, math.ceil(0.01 * num_patches))
        rho_topk = norms.topk(k_frac, dim=-1).values.mean(dim=-1) / median

        record: dict[str, Any] = {
            "layer": layer,
            "num_images": num_images,
            "num_patches": num_patches,
            "max_median_ratio": rho.mean().item(),
            "max_median_ratio_max": rho.max().item(),
            "topk_median_ratio": rho_topk.mean().item(),
            "norm_median": median.mean().item(),
            "norm_max": norms.max().item(),
            "massive_activation_ratio": massive_activation_ratio(x, num_prefix_tokens, num_suffix_tokens).mean().item(),
        }
        if tau is not None:
            record["tau"] = float(tau)
            record["fraction_above_tau"] = (norms > tau).float().mean().item()
        for kappa in kappas:
            record[f"fraction_above_{kappa:g}x_median"] = (norms > kappa * median[:, None]).float().mean().item()

        excluded = [x[:, :num_prefix_tokens], x[:, x.shape[1] - num_suffix_tokens :]]
        excluded = torch.cat(excluded, dim=1).float().norm(dim=-1)  # [B, prefix + suffix]
        record["excluded_norm_ratio"] = (
            (excluded.mean(dim=-1) / median).mean().item() if excluded.shape[1] > 0 else None
        )

        values, flat = norms.flatten().topk(min(top_k, norms.numel()))
        top = []
        for value, index in zip(values.tolist(), flat.tolist(), strict=True):
            image, patch = divmod(index, num_patches)
            row_col = grid_position(patch, num_patches)
            top.append(
                {
                    "image": image,
                    "index": patch,
                    "row": None if row_col is None else row_col[0],
                    "col": None if row_col is None else row_col[1],
                    "norm": value,
                }
            )
        record["top_tokens"] = top
        records.append(record)
    return records
