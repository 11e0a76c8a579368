"""Sample-quality metrics of class-conditional ImageNet samples: FID, Inception Score, precision and recall.

The numbers follow the ADM evaluation suite (Dhariwal & Nichol, 2021), which the diffusion-transformer papers report:

- FID against the `mu`/`sigma` of an ADM reference batch (e.g. `VIRTUAL_imagenet256_labeled.npz`), which describe the
  whole ImageNet train set; they are never recomputed from the batch's 10k images.
- Inception Score over 10 contiguous splits of the samples (no shuffling).
- Precision and recall (Kynkäänniemi et al., 2019) on Inception pool features with k=3 nearest neighbours, against
  the reference batch's `arr_0` images.

All features come from torch-fidelity's TF1-compatible InceptionV3, whose weights are read from a local file (never
downloaded here). Library functions come first; `python -m dsr.evaluate samples=... reference=...` is the CLI.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from tqdm.auto import tqdm

from dsr.utils.files import atomic_write

# torch_fidelity is imported where it is used: it pulls in torchvision (seconds), and the CLI should report missing
# Inception weights before paying for that.

log = logging.getLogger(__name__)

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
WEIGHTS_ENV = "DSR_INCEPTION_WEIGHTS"
CACHE_ENV = "DSR_CACHE"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
POOL_DIM = 2048
NUM_LOGITS = 1008


# ----------------------------------------------------------------------------------------------------------------------
# Inception weights and features
# ----------------------------------------------------------------------------------------------------------------------


def resolve_inception_weights(path: str | os.PathLike | None) -> Path:
    """Locate the torch-fidelity InceptionV3 weights: `path`, else $DSR_INCEPTION_WEIGHTS, else the torch hub cache.

    Evaluation never downloads: a missing file fails here, at start-up, rather than after sampling or in an offline
    cluster job halfway through feature extraction.
    """
    tried: list[str] = []
    if path:
        candidates = [("evaluation.inception_weights", Path(path))]
    elif os.environ.get(WEIGHTS_ENV):
        candidates = [(f"${WEIGHTS_ENV}", Path(os.environ[WEIGHTS_ENV]))]
    else:
        # torch.hub.get_dir() honours $TORCH_HOME (default ~/.cache/torch); torch-fidelity downloads to checkpoints/.
        candidates = [("torch hub cache", Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE)]
    for source, candidate in candidates:
        candidate = candidate.expanduser()
        if candidate.is_file():
            return candidate
        tried.append(f"{candidate} ({source})")
    raise FileNotFoundError(
        "InceptionV3 weights for evaluation not found. Tried: "
        + "; ".join(tried)
        + f". Set `evaluation.inception_weights` (CLI: inception_weights=/path/to/{INCEPTION_WEIGHTS_FILE}) or the "
        f"environment variable {WEIGHTS_ENV}, or place the file in $TORCH_HOME/hub/checkpoints/. "
        f"Get {INCEPTION_WEIGHTS_FILE} from the torch-fidelity v0.2.0 release: {INCEPTION_WEIGHTS_URL}"
    )


class InceptionFeatures(torch.nn.Module):
    """torch-fidelity's TF1-compatible InceptionV3, returning (pool features, unbiased logits), loaded from a file."""

    def __init__(self, weights_path: str | os.PathLike):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        super().__init__()
        self.weights_path = Path(weights_path)
        # Passing the path makes torch-fidelity torch.load it instead of fetching it through torch.hub.
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat",
            ["2048", "logits_unbiased"],
            feature_extractor_weights_path=str(self.weights_path),
        )
        self.eval()

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images [B, 3, H, W] (any H, W: resized to 299 inside) -> float32 (pool [B, 2048], logits [B, 1008])."""
        self.net.eval()
        pool, logits = self.net(images.to(self.device))
        return pool.float(), logits.float()

    @torch.no_grad()
    def extract(
        self,
        images: np.ndarray | torch.Tensor,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        progress: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images [N, H, W, 3] -> (pool [N, 2048], logits [N, 1008]) float32 on the CPU, `batch_size` at a time.

        Only one batch at a time is converted to NCHW and moved to `device`, so N can be large.
        """
        _check_images(images, "images")
        if device is not None:
            self.to(device)
        pools, logits = [], []
        for start in tqdm(range(0, len(images), batch_size), desc="inception", disable=not progress, leave=False):
            batch = images[start : start + batch_size]
            batch = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
            pool, logit = self(batch.permute(0, 3, 1, 2).contiguous())
            pools.append(pool.cpu())
            logits.append(logit.cpu())
        if not pools:
            return torch.empty(0, POOL_DIM), torch.empty(0, NUM_LOGITS)
        return torch.cat(pools), torch.cat(logits)


# ----------------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------------


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


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """||mu_a - mu_b||^2 + Tr(sigma_a + sigma_b - 2 (sigma_a sigma_b)^(1/2)), via torch-fidelity."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    # torch-fidelity asserts equal dtypes; FeatureStats holds float64 throughout.
    stat_a = {"mu": a.mu.astype(np.float64), "sigma": a.sigma.astype(np.float64)}
    stat_b = {"mu": b.mu.astype(np.float64), "sigma": b.sigma.astype(np.float64)}
    return float(fid_statistics_to_metric(stat_a, stat_b, verbose=False)[KEY_METRIC_FID])


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


# ----------------------------------------------------------------------------------------------------------------------
# Images, references and caching
# ----------------------------------------------------------------------------------------------------------------------


def _check_images(images: np.ndarray | torch.Tensor, name: str) -> None:
    dtype_ok = images.dtype == (torch.uint8 if isinstance(images, torch.Tensor) else np.uint8)
    if not dtype_ok or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"{name}: expected uint8 images [N, H, W, 3] (NHWC, RGB); got dtype {images.dtype}, shape "
            f"{tuple(images.shape)}"
        )


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_images(path: str | os.PathLike) -> np.ndarray:
    """An `.npz` (key `arr_0`, ADM's sample format) or a folder of png/jpg/jpeg (sorted by name) -> uint8 [N, H, W, 3].

    The whole array is held in memory (50k samples at 256^2 are ~10 GB).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"images not found: {path}")
    if path.is_dir():
        files = _image_files(path)
        if not files:
            raise ValueError(f"{path}: no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images in this folder")
        images = []
        for file in files:
            with Image.open(file) as image:
                images.append(np.asarray(image.convert("RGB")))
        sizes = {im.shape for im in images}
        if len(sizes) > 1:
            raise ValueError(f"{path}: images must share one size; found {sorted(sizes)}")
        return np.stack(images)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: expected an .npz file (key arr_0) or a folder of images")
    with np.load(path) as f:
        if "arr_0" not in f.files:
            raise ValueError(f"{path}: expected key 'arr_0' holding uint8 images [N, H, W, 3]; keys are {f.files}")
        images = f["arr_0"]
    _check_images(images, str(path))
    return images


def _sha256_file(path: Path, digest: hashlib._Hash | None = None) -> hashlib._Hash:
    digest = digest or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest


def content_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes; for a folder, of its sorted image names and their bytes."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"not found: {path}")
    if path.is_dir():
        digest = hashlib.sha256()
        for file in _image_files(path):
            digest.update(file.name.encode() + b"\0")
            _sha256_file(file, digest)
        return digest.hexdigest()
    return _sha256_file(path).hexdigest()


@lru_cache(maxsize=8)
def _weights_sha256(path: str, size: int, mtime_ns: int) -> str:
    # Keyed on size and mtime too, so a replaced file is re-hashed; hashing ~100 MB once per process is enough.
    return _sha256_file(Path(path)).hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dsr" / "fid")


def reference_statistics(
    reference: str | os.PathLike,
    extractor: InceptionFeatures,
    cache_dir: str | os.PathLike,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    need_features: bool = True,
    progress: bool = False,
    reference_sha256: str | None = None,
) -> tuple[FeatureStats, torch.Tensor | None]:
    """FID statistics of a reference and, when it has images, their pool features [N, 2048] for precision/recall.

    The reference is one of
    (a) an npz with `mu`/`sigma` (an ADM reference batch, or a file written by `FeatureStats.save`): those are the FID
        statistics; an `arr_0` in it provides the precision/recall features;
    (b) an npz with only `arr_0`, or a folder of images: statistics are computed from the images.
    Computed features and statistics are cached in `cache_dir` under the reference's content hash and the Inception
    weights' hash, so an edited reference or other weights never reuse a stale entry. Features are [N, 2048] float32
    on the CPU, or None when the reference has no images or `need_features` is false (for case (a)).
    `reference_sha256`: the reference's `content_sha256` if the caller already has it (saves hashing it twice).
    """
    reference = Path(reference)
    if not reference.exists():
        raise FileNotFoundError(f"reference not found: {reference}")
    stats: FeatureStats | None = None
    has_images = True
    if reference.is_file() and reference.suffix == ".npz":
        with np.load(reference) as f:
            keys = set(f.files)
        if {"mu", "sigma"} <= keys:
            stats = FeatureStats.load(reference)
            has_images = "arr_0" in keys
            if not (need_features and has_images):
                return stats, None

    weights = extractor.weights_path.stat()
    weights_hash = _weights_sha256(str(extractor.weights_path.resolve()), weights.st_size, weights.st_mtime_ns)
    reference_sha256 = reference_sha256 or content_sha256(reference)
    cache_file = Path(cache_dir) / f"ref-{reference_sha256[:24]}-inception-{weights_hash[:12]}.npz"
    if cache_file.is_file():
        log.info("reference features from cache %s", cache_file)
        with np.load(cache_file) as f:
            features = torch.from_numpy(f["features"])
            cached_stats = FeatureStats(f["mu"], f["sigma"], int(f["num_samples"]))
    else:
        features, _ = extractor.extract(load_images(reference), batch_size=batch_size, device=device, progress=progress)
        cached_stats = FeatureStats.from_features(features)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # Written atomically, so an interrupted run never leaves a truncated cache entry behind.
        atomic_write(
            cache_file,
            lambda f: np.savez(
                f, features=features.numpy(), mu=cached_stats.mu, sigma=cached_stats.sigma, num_samples=len(features)
            ),
        )
    # Statistics stored in the reference (ADM: the whole train set) take precedence over those of its arr_0.
    return (stats if stats is not None else cached_stats), (features if need_features else None)


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------


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


# An absolute path (the repository's conf/, as "../conf" would be) also works when `main` is called in-process.
@hydra.main(config_path=str(Path(__file__).resolve().parents[1] / "conf"), config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        weights = resolve_inception_weights(cfg.inception_weights)
    except FileNotFoundError as error:
        # A plain message and exit status 1, rather than Hydra's traceback for a setup problem.
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    metrics = evaluate(
        samples=cfg.samples,
        reference=cfg.reference,
        inception_weights=weights,
        batch_size=cfg.batch_size,
        device=cfg.device,
        precision_recall=cfg.precision_recall,
        cache_dir=cfg.cache_dir,
        progress=sys.stderr.isatty(),
    )
    samples = Path(cfg.samples)
    out = Path(cfg.out) if cfg.out else samples.parent / f"{samples.stem}_metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    # JSON has no NaN; metrics that could not be computed are null.
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    out.write_text(json.dumps(clean, indent=2) + "\n")
    print(_format_table(metrics))
    print(f"metrics written to {out}")
    return metrics


if __name__ == "__main__":
    main()
