"""Outlier statistics accumulated over many images, batch by batch, merged exactly."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from dsr.analysis.outliers import layer_statistics, patch_tokens

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
        self._prefix: list[dict[str, dict[str, Any]]] = [{} for _ in self.layers]

    def update(
        self,
        hidden_states: Sequence[Tensor],
        num_prefix_tokens: int | Sequence[int] = 0,
        num_suffix_tokens: int | Sequence[int] = 0,
        prefix_groups: Sequence[Mapping[str, int]] | None = None,
    ) -> None:
        """Add one batch: `hidden_states` holds [B, T_l, C_l] per layer (same B); counts are ints or per layer.

        `prefix_groups` names the excluded prefix tokens of each layer by kind, in sequence order (e.g. {"registers":
        36, "in_context": 32}); their norms are then summarised per kind (`prefix_tokens` of the records)."""
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
            patch_norms = patches.norm(dim=-1)
            self._norms[i].append(patch_norms.cpu())
            if prefix_groups is not None:
                self._add_prefix(i, x, prefix_groups[i], patch_norms)
            room = self.keep - sum(len(k) for k in self._kept[i])
            if room > 0:
                self._kept[i].append(patches[:room].cpu())
        self.num_images += batch

    def _add_prefix(self, i: int, x: Tensor, groups: Mapping[str, int], patch_norms: Tensor) -> None:
        """Accumulate the norms of each kind of prefix token of layer i (x [B, T, C], prefix kinds in order)."""
        if sum(groups.values()) > x.shape[1]:
            raise ValueError(f"layer {self.layers[i]}: prefix groups {dict(groups)} exceed its {x.shape[1]} tokens")
        median = patch_norms.median(dim=1).values  # [B]
        start = 0
        for name, count in groups.items():
            if count:
                norms = x[:, start : start + count].float().norm(dim=-1)  # [B, count]
                acc = self._prefix[i].setdefault(name, {"count": count, "sum": 0.0, "n": 0, "max": 0.0, "ratio": 0.0})
                acc["sum"] += float(norms.sum())
                acc["n"] += norms.numel()
                acc["max"] = max(acc["max"], float(norms.max()))
                acc["ratio"] = max(acc["ratio"], float((norms.max(dim=1).values / median.clamp_min(1e-12)).max()))
            start += count

    def records(self) -> list[dict[str, Any]]:
        """The per-layer records over every image so far (JSON-ready)."""
        if not self.num_images:
            raise ValueError("no images were analysed")
        out = []
        for parts, excluded in zip(self._parts, self._excluded, strict=True):
            record = merge_layer_records(parts, self.top_k)
            record["num_excluded_tokens"] = excluded
            prefix = self._prefix[len(out)]
            if prefix:
                record["prefix_tokens"] = {
                    name: {"count": a["count"], "mean_norm": a["sum"] / a["n"], "max_norm": a["max"],
                           "max_over_patch_median": a["ratio"]}
                    for name, a in prefix.items()
                }  # fmt: skip
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
