"""torch-fidelity's TF1-compatible InceptionV3: its weights from a local file (never downloaded here) and its pool
features and logits."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch

from dsr.metrics.features import FeatureNetwork
from dsr.utils.files import sha256_file

# torch_fidelity is imported where it is used: it pulls in torchvision (seconds), and the CLI should report missing
# Inception weights before paying for that.

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
WEIGHTS_ENV = "DSR_INCEPTION_WEIGHTS"
POOL_DIM = 2048
NUM_LOGITS = 1008


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


@lru_cache(maxsize=8)
def _weights_sha256(path: str, size: int, mtime_ns: int) -> str:
    # Keyed on size and mtime too, so a replaced file is re-hashed; hashing ~100 MB once per process is enough.
    return sha256_file(path).hexdigest()


class InceptionFeatures(FeatureNetwork):
    """torch-fidelity's TF1-compatible InceptionV3, returning (pool features, unbiased logits), loaded from a file."""

    distance = "fid"
    log_prefix = "fid"
    feature_dim = POOL_DIM
    num_logits = NUM_LOGITS

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
    def cache_tag(self) -> str:
        stat = self.weights_path.stat()
        return f"inception-{_weights_sha256(str(self.weights_path.resolve()), stat.st_size, stat.st_mtime_ns)[:12]}"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images [B, 3, H, W] (any H, W: resized to 299 inside) -> float32 (pool [B, 2048], logits [B, 1008])."""
        self.net.eval()
        pool, logits = self.net(images.to(self.device))
        return pool.float(), logits.float()

    def logit_scores(self, logits: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
        from dsr.metrics.scores import inception_score

        mean, std = inception_score(logits, splits=min(10, len(logits)))
        return {"inception_score_mean": mean, "inception_score_std": std}
