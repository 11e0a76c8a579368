"""The analysis report: `stats.json`, norm maps, PCA images, the max/median plot and a text summary."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dsr.analysis.figures import plot_max_median_ratio, plot_norm_histogram, save_norm_maps, save_pca_images
from dsr.analysis.statistics import OutlierStatistics


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


def summary(records: Sequence[Mapping[str, Any]]) -> str:
    lines = ["layer  max/median  top-1 norm  median norm  top token (image, row, col)"]
    for r in records:
        top = r["top_tokens"][0] if r["top_tokens"] else {}
        where = f"({top.get('image')}, {top.get('row')}, {top.get('col')})" if top else "-"
        ratio, top1, median = r["max_median_ratio"], r["norm_max"], r["norm_median"]
        lines.append(f"{r['layer']:>5}  {ratio:>10.2f}  {top1:>10.2f}  {median:>11.2f}  {where}")
    return "\n".join(lines)
