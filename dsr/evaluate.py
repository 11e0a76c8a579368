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

Without Inception or ImageNet, `features=proxy data=digits` (or `data=synthetic`) scores samples of the built-in
datasets in the features of an in-project classifier instead: FD, conditional accuracy (the share of samples
classified as the class they were generated for), precision and recall, against the data's held-out split.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from dsr.config import build, entry_point

if TYPE_CHECKING:
    from dsr.metrics.proxy import ProxyFeatures

# torch and the feature networks are imported where the run needs them, so `--help` answers without them.

FEATURES = ("inception", "proxy")


ROWS = [
    ("fid", "FID"),
    ("fd", "FD (proxy features)"),
    ("inception_score_mean", "Inception Score"),
    ("inception_score_std", "  (std over splits)"),
    ("conditional_accuracy", "Conditional accuracy"),
    ("precision", "Precision"),
    ("recall", "Recall"),
    ("num_samples", "Samples"),
]


def _format_table(metrics: dict) -> str:
    lines = []
    for key, name in ROWS:
        if key not in metrics:
            continue
        value = metrics[key]
        text = "-" if value is None else f"{value:d}" if isinstance(value, int) else f"{value:.4f}"
        lines.append(f"{name:<22}{text:>12}")
    return "\n".join(lines)


def proxy_network(cfg: DictConfig) -> tuple[ProxyFeatures, str]:
    """features=proxy: the classifier of the configured data (trained and cached on first use) and its held-out
    reference."""
    from dsr.metrics.proxy import proxy_for

    if cfg.get("data") is None:
        raise ValueError("features=proxy needs the data the samples imitate: add data=digits or data=synthetic")
    proxy = proxy_for(build(cfg.data.dataset), cfg.proxy_dir, progress=sys.stderr.isatty())
    return proxy.network, str(proxy.reference)


@entry_point("evaluate")
def main(cfg: DictConfig) -> dict:
    from dsr.metrics.evaluation import evaluate
    from dsr.metrics.inception import InceptionFeatures, resolve_inception_weights

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if cfg.features not in FEATURES:
        raise ValueError(f"features={cfg.features!r}: choose one of {FEATURES}")
    if cfg.features == "proxy":
        network, reference = proxy_network(cfg)
        if cfg.reference is not None and str(cfg.reference) != reference:
            raise ValueError(
                f"features=proxy measures against the data's held-out split ({reference}): drop reference="
            )
    else:
        if cfg.reference is None:
            raise ValueError("reference is not set: reference=<ADM reference batch, image folder or statistics .npz>")
        # Missing weights: one line, before anything loads.
        network, reference = InceptionFeatures(resolve_inception_weights(cfg.inception_weights)), cfg.reference
    metrics = evaluate(
        samples=cfg.samples,
        reference=reference,
        batch_size=cfg.batch_size,
        device=cfg.accelerator,
        precision_recall=cfg.precision_recall,
        cache_dir=cfg.cache_dir,
        progress=sys.stderr.isatty(),
        network=network,
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
