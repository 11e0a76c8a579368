"""Sample-quality metrics of class-conditional ImageNet samples: FID, Inception Score, precision and recall.

The numbers follow the ADM evaluation suite (Dhariwal & Nichol, 2021), which the diffusion-transformer papers report:

- FID against the `mu`/`sigma` of an ADM reference batch (e.g. `VIRTUAL_imagenet256_labeled.npz`), which describe the
  whole ImageNet train set; they are never recomputed from the batch's 10k images.
- Inception Score over 10 contiguous splits of the samples (no shuffling).
- Precision and recall (Kynkäänniemi et al., 2019) on Inception pool features with k=3 nearest neighbours, against
  the reference batch's `arr_0` images.

All features come from torch-fidelity's TF1-compatible InceptionV3, whose weights are read from a local file (never
downloaded here). The library is `dsr.metrics`; this module is the command
`python -m dsr.evaluate samples=... reference=...`.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

from omegaconf import DictConfig

from dsr.config import entry_point
from dsr.metrics.evaluation import evaluate
from dsr.metrics.inception import resolve_inception_weights


def _format_table(metrics: dict) -> str:
    rows = [
        ("FID", metrics["fid"]),
        ("Inception Score", metrics["inception_score_mean"]),
        ("  (std over splits)", metrics["inception_score_std"]),
        ("Precision", metrics["precision"]),
        ("Recall", metrics["recall"]),
        ("Samples", metrics["num_samples"]),
    ]
    lines = []
    for name, value in rows:
        text = "-" if value is None else f"{value:d}" if isinstance(value, int) else f"{value:.4f}"
        lines.append(f"{name:<22}{text:>12}")
    return "\n".join(lines)


@entry_point("evaluate")
def main(cfg: DictConfig) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    weights = resolve_inception_weights(cfg.inception_weights)  # missing weights: one line, before anything loads
    metrics = evaluate(
        samples=cfg.samples,
        reference=cfg.reference,
        inception_weights=weights,
        batch_size=cfg.batch_size,
        device=cfg.accelerator,
        precision_recall=cfg.precision_recall,
        cache_dir=cfg.cache_dir,
        progress=sys.stderr.isatty(),
    )
    samples = Path(cfg.samples)
    out = Path(cfg.output) if cfg.output else samples.parent / f"{samples.stem}_metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    # JSON has no NaN; metrics that could not be computed are null.
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    out.write_text(json.dumps(clean, indent=2) + "\n")
    print(_format_table(metrics))
    print(f"metrics written to {out}")
    return metrics


if __name__ == "__main__":
    main()
