"""torch-fidelity's TF1-compatible InceptionV3: its weights from a local file (never downloaded here) and its pool
features and logits."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

# torch_fidelity is imported where it is used: it pulls in torchvision (seconds), and the CLI should report missing
# Inception weights before paying for that.

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
WEIGHTS_ENV = "DSR_INCEPTION_WEIGHTS"
POOL_DIM = 2048
NUM_LOGITS = 1008


def check_images(images: np.ndarray | torch.Tensor, name: str) -> None:
    dtype_ok = images.dtype == (torch.uint8 if isinstance(images, torch.Tensor) else np.uint8)
    if not dtype_ok or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"{name}: expected uint8 images [N, H, W, 3] (NHWC, RGB); got dtype {images.dtype}, shape "
            f"{tuple(images.shape)}"
        )


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
        check_images(images, "images")
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
