"""The evaluation of a set of samples against a reference: FID, Inception Score, precision and recall as the ADM
evaluation suite reports them for the diffusion-transformer papers, or their proxies (`dsr.metrics.proxy`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from dsr.metrics.features import FeatureNetwork
from dsr.metrics.inception import InceptionFeatures, resolve_inception_weights
from dsr.metrics.reference import content_sha256, default_cache_dir, load_images, load_labels, reference_statistics
from dsr.metrics.scores import FeatureStats, frechet_distance, precision_recall
from dsr.utils.devices import resolve_device

log = logging.getLogger(__name__)


def feature_scores(
    features: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    network: FeatureNetwork,
    reference: FeatureStats,
    reference_features: torch.Tensor | None,
    precision_recall: bool = True,
) -> dict:
    """The scores of samples' features and logits against a reference: the Frechet distance (`network.distance`:
    fid or fd), the network's logit scores (Inception Score; conditional accuracy), and k=3 precision / recall when
    asked and the reference has features (else None). The one computation `evaluate` and the training callback share.
    """
    scores = {network.distance: frechet_distance(FeatureStats.from_features(features), reference)}
    scores.update(network.logit_scores(logits, labels))
    scores["precision"] = scores["recall"] = None
    if precision_recall and reference_features is not None:
        scores["precision"], scores["recall"] = _precision_recall(reference_features, features)
    return scores


def evaluate(
    samples: str | os.PathLike,
    reference: str | os.PathLike,
    inception_weights: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    precision_recall: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    network: FeatureNetwork | None = None,
) -> dict:
    """The scores of `samples` against `reference` in the features of `network` (default: InceptionV3 from
    `inception_weights`, giving FID, Inception Score and k=3 precision / recall; a `ProxyFeatures` gives FD,
    conditional accuracy and precision / recall).

    `samples`: npz (`arr_0`, uint8 [N, H, W, 3]; `arr_1`, the labels they were generated for) or an image folder.
    `reference`: see `reference_statistics`. Precision/recall are None when disabled or when the reference has no
    images (a statistics-only file).
    """
    if network is None:
        network = InceptionFeatures(resolve_inception_weights(inception_weights))  # fails before anything large
    for name, path in (("samples", samples), ("reference", reference)):
        if not Path(path).exists():
            raise FileNotFoundError(f"{name} not found: {path}")
    device = resolve_device(device)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    network = network.to(device)

    reference_sha256 = content_sha256(reference)
    ref_stats, ref_features = reference_statistics(
        reference,
        network,
        cache_dir,
        batch_size,
        device,
        need_features=precision_recall,
        progress=progress,
        reference_sha256=reference_sha256,
    )
    if precision_recall and ref_features is None:
        log.warning("reference %s holds no images (statistics only): precision/recall skipped", reference)
    features, logits = network.extract(load_images(samples), batch_size=batch_size, device=device, progress=progress)
    labels = load_labels(samples)
    scores = feature_scores(features, logits, labels, network, ref_stats, ref_features, precision_recall)
    return {
        **scores,
        "features": network.log_prefix,
        "num_samples": len(features),
        "reference": str(reference),
        "reference_sha256": reference_sha256,
    }


# `evaluate`'s flag shadows the function inside it.
_precision_recall = precision_recall
