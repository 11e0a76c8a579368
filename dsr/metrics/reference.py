"""Sample and reference image sets (npz or folders), content hashes, and reference statistics with their cache.

FID is measured against the `mu`/`sigma` stored in an ADM reference batch (e.g. `VIRTUAL_imagenet256_labeled.npz`),
which describe the whole ImageNet train set; they are never recomputed from the batch's 10k images.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dsr.metrics.features import FeatureNetwork, check_images
from dsr.metrics.scores import FeatureStats
from dsr.utils.files import atomic_write, sha256_file

log = logging.getLogger(__name__)

CACHE_ENV = "DSR_CACHE"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


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
    check_images(images, str(path))
    return images


def load_labels(path: str | os.PathLike) -> torch.Tensor | None:
    """The labels `arr_1` [N] stored beside the images of a samples npz (as `dsr.sample` writes it), else None."""
    path = Path(path)
    if path.is_file() and path.suffix == ".npz":
        with np.load(path) as f:
            if "arr_1" in f.files:
                return torch.from_numpy(f["arr_1"].astype(np.int64))
    return None


def content_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes; for a folder, of its sorted image names and their bytes."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"not found: {path}")
    if path.is_dir():
        digest = hashlib.sha256()
        for file in _image_files(path):
            digest.update(file.name.encode() + b"\0")
            sha256_file(file, digest)
        return digest.hexdigest()
    return sha256_file(path).hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dsr" / "fid")


def reference_statistics(
    reference: str | os.PathLike,
    extractor: FeatureNetwork,
    cache_dir: str | os.PathLike,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    need_features: bool = True,
    progress: bool = False,
    reference_sha256: str | None = None,
) -> tuple[FeatureStats, torch.Tensor | None]:
    """Feature statistics of a reference and, when it has images, its features [N, D] for precision/recall.

    The reference is one of
    (a) an npz with `mu`/`sigma` (an ADM reference batch, or a file written by `FeatureStats.save`): those are the FID
        statistics; an `arr_0` in it provides the precision/recall features;
    (b) an npz with only `arr_0`, or a folder of images: statistics are computed from the images.
    Computed features and statistics are cached in `cache_dir` under the reference's content hash and the network's
    `cache_tag` (its weights' hash), so an edited reference or other weights never reuse a stale entry. Features are
    [N, D] float32 on the CPU, or None when the reference has no images or `need_features` is false (for case (a)).
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

    reference_sha256 = reference_sha256 or content_sha256(reference)
    cache_file = Path(cache_dir) / f"ref-{reference_sha256[:24]}-{extractor.cache_tag}.npz"
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
