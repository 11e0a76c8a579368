"""The evaluation of a set of samples: FID, Inception Score, precision and recall against a reference, as the ADM
evaluation suite reports them for the diffusion-transformer papers."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from dsr.metrics.inception import InceptionFeatures, resolve_inception_weights
from dsr.metrics.reference import content_sha256, default_cache_dir, load_images, reference_statistics
from dsr.metrics.scores import FeatureStats, frechet_distance, inception_score, precision_recall
from dsr.utils.devices import resolve_device

log = logging.getLogger(__name__)


def evaluate(
    samples: str | os.PathLike,
    reference: str | os.PathLike,
    inception_weights: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    precision_recall: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict:
    """FID, Inception Score (10 contiguous splits) and k=3 precision/recall of `samples` against `reference`.

    `samples`: npz (`arr_0`, uint8 [N, H, W, 3]) or an image folder. `reference`: see `reference_statistics`.
    Precision/recall are None when disabled or when the reference has no images (a statistics-only file).
    """
    weights = resolve_inception_weights(inception_weights)  # fail before loading anything large
    for name, path in (("samples", samples), ("reference", reference)):
        if not Path(path).exists():
            raise FileNotFoundError(f"{name} not found: {path}")
    device = resolve_device(device)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    extractor = InceptionFeatures(weights).to(device)

    reference_sha256 = content_sha256(reference)
    ref_stats, ref_features = reference_statistics(
        reference,
        extractor,
        cache_dir,
        batch_size,
        device,
        need_features=precision_recall,
        progress=progress,
        reference_sha256=reference_sha256,
    )
    pool, logits = extractor.extract(load_images(samples), batch_size=batch_size, device=device, progress=progress)
    fid = frechet_distance(FeatureStats.from_features(pool), ref_stats)
    is_mean, is_std = inception_score(logits, splits=10)

    precision = recall = None
    if precision_recall:
        if ref_features is None:
            log.warning("reference %s holds no images (statistics only): precision/recall skipped", reference)
        else:
            precision, recall = _precision_recall(ref_features.to(device), pool.to(device))

    return {
        "fid": fid,
        "inception_score_mean": is_mean,
        "inception_score_std": is_std,
        "precision": precision,
        "recall": recall,
        "num_samples": len(pool),
        "reference": str(reference),
        "reference_sha256": reference_sha256,
    }


# `evaluate`'s flag shadows the function inside it.
_precision_recall = precision_recall
