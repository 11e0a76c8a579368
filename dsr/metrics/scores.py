"""FID, Inception Score (10 contiguous splits) and k-NN precision / recall (Kynkäänniemi et al., 2019)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class FeatureStats:
    """Gaussian statistics of a feature set: mu float64 [D], sigma float64 [D, D] (D = 2048 for Inception pool).

    `num_samples` is 0 when unknown (ADM reference batches do not record it).
    """

    mu: np.ndarray
    sigma: np.ndarray
    num_samples: int

    def __post_init__(self) -> None:
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        self.num_samples = int(self.num_samples)
        d = self.mu.shape[0] if self.mu.ndim == 1 else -1
        if self.mu.ndim != 1 or self.sigma.shape != (d, d):
            raise ValueError(f"expected mu [D] and sigma [D, D]; got {self.mu.shape} and {self.sigma.shape}")

    @classmethod
    def from_features(cls, features: torch.Tensor | np.ndarray) -> FeatureStats:
        """Features [N, D] (N >= 2) -> their float64 mean and unbiased covariance."""
        features = features.numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
        features = features.astype(np.float64)
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"expected features [N >= 2, D]; got shape {features.shape}")
        return cls(features.mean(axis=0), np.cov(features, rowvar=False), len(features))

    def save(self, path: str | os.PathLike) -> None:
        np.savez(path, mu=self.mu, sigma=self.sigma, num_samples=np.int64(self.num_samples))

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        with np.load(path) as f:
            return cls(f["mu"], f["sigma"], int(f["num_samples"]) if "num_samples" in f.files else 0)

    @classmethod
    def from_adm_npz(cls, path: str | os.PathLike) -> FeatureStats:
        """The `mu`/`sigma` of an ADM reference batch (statistics of the whole train set, not of its `arr_0`)."""
        with np.load(path) as f:
            missing = {"mu", "sigma"} - set(f.files)
            if missing:
                raise ValueError(f"{path}: not an ADM reference batch, missing keys {sorted(missing)}")
            return cls(f["mu"], f["sigma"], 0)


class FrechetDisagreement(ValueError):
    """The two computations of a Frechet distance disagree: a matrix square root went wrong, so no number is given."""


# Agreement required of the two computations: max(relative, absolute).
FRECHET_RTOL, FRECHET_ATOL = 1e-3, 1e-6


def frechet_distance_eigh(a: FeatureStats, b: FeatureStats) -> float:
    """The Frechet distance in float64 through symmetric eigendecompositions only:
    Tr(sqrt(S_a S_b)) = Tr(sqrt(S_a^(1/2) S_b S_a^(1/2))), whose argument is symmetric positive semi-definite."""
    vals, vecs = np.linalg.eigh(a.sigma)
    root = (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T
    inner = root @ b.sigma @ root
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * tr_covmean)


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """||mu_a - mu_b||^2 + Tr(sigma_a + sigma_b - 2 (sigma_a sigma_b)^(1/2)), via torch-fidelity, cross-checked.

    torch-fidelity takes the eigenvalues of the non-symmetric product S_a S_b; `frechet_distance_eigh` computes the
    same trace from symmetric matrices. A disagreement above max(1e-3 relative, 1e-6 absolute) raises
    `FrechetDisagreement` (a matrix square root that silently went wrong on some BLAS builds once made FID read ~20
    instead of ~5), so a broken number is never reported.
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature statistics of different dimensions: {a.mu.shape[0]} and {b.mu.shape[0]}")
    # torch-fidelity asserts equal dtypes; FeatureStats holds float64 throughout.
    stat_a = {"mu": a.mu.astype(np.float64), "sigma": a.sigma.astype(np.float64)}
    stat_b = {"mu": b.mu.astype(np.float64), "sigma": b.sigma.astype(np.float64)}
    value = float(fid_statistics_to_metric(stat_a, stat_b, verbose=False)[KEY_METRIC_FID])
    check = frechet_distance_eigh(a, b)
    if not (np.isfinite(value) and abs(value - check) <= max(FRECHET_RTOL * abs(check), FRECHET_ATOL)):
        raise FrechetDisagreement(
            f"the Frechet distance is {value!r} by torch-fidelity (eigenvalues of S1 S2) but {check!r} by a symmetric "
            "eigendecomposition (float64): the linear algebra of this build is not trustworthy here; check the "
            "numpy / scipy BLAS (e.g. OPENBLAS_CORETYPE, MKL_CBWR) before reporting either number"
        )
    return value


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Logits [N, C] -> (mean, std) over `splits` contiguous splits of exp(E_x KL(p(y|x) || p(y))).

    Contiguous (unshuffled) splits as in ADM's evaluator; torch-fidelity shuffles by default.
    """
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    if logits.ndim != 2 or len(logits) < splits:
        raise ValueError(f"expected logits [N >= splits={splits}, C]; got shape {tuple(logits.shape)}")
    out = isc_features_to_metric(logits.cpu(), splits=splits, shuffle=False)
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, batch_size: int = 2000) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) of fake [M, D] against real [N, D] features.

    Precision: share of fake samples inside some real sample's k-NN ball (radius = distance to its k-th nearest real
    neighbour); recall: the same with the roles swapped. k=3 on Inception pool features as ADM. torch-fidelity's own
    PRC metric is tied to VGG16 features, so its feature-level helper is called directly (in batches of `batch_size`).
    """
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected real [N, D] and fake [M, D]; got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    # The helper's convention: features_1 is generated, features_2 is real. Its batched variant keeps memory at
    # [batch_size, max(N, M)] distances (float32, like ADM's features) instead of the full N x M matrix.
    precision, recall = calculate_precision_recall_part(
        fake.float(), real.float(), neighborhood=k, batch_size=batch_size
    )
    return float(precision), float(recall)
