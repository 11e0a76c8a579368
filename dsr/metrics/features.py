"""What every metric network shares: uint8 images in, (features, logits) out, in batches; and what its logits score.

Two networks implement it: torch-fidelity's InceptionV3 (`inception`: FID and Inception Score, ImageNet) and the
in-project classifier (`proxy`: FD and conditional accuracy on the built-in datasets). Reference statistics,
Frechet distances and precision / recall are computed the same way for both (`reference`, `scores`, `evaluation`).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm


def check_images(images: np.ndarray | torch.Tensor, name: str) -> None:
    dtype_ok = images.dtype == (torch.uint8 if isinstance(images, torch.Tensor) else np.uint8)
    if not dtype_ok or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"{name}: expected uint8 images [N, H, W, 3] (NHWC, RGB); got dtype {images.dtype}, shape "
            f"{tuple(images.shape)}"
        )


class FeatureNetwork(torch.nn.Module):
    """uint8 images [B, 3, H, W] -> (features [B, D], logits [B, K]); subclasses define `forward` and these:

    `distance`: the name of the Frechet distance in its features ("fid", "fd"); `log_prefix`: the callback's metric
    prefix; `cache_tag`: identifies the network in reference-statistics cache names (changes with its weights).
    """

    distance = "fd"
    log_prefix = "features"
    feature_dim = 0
    num_logits = 0

    @property
    def cache_tag(self) -> str:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def logit_scores(self, logits: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
        """Scores of the samples' logits (Inception Score, conditional accuracy, ...); `labels`: the classes the
        samples were generated for, or None when unknown."""
        return {}

    @torch.no_grad()
    def extract(
        self,
        images: np.ndarray | torch.Tensor,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        progress: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images [N, H, W, 3] -> (features [N, D], logits [N, K]) float32 on the CPU, `batch_size` at a time.

        Only one batch at a time is converted to NCHW and moved to `device`, so N can be large.
        """
        check_images(images, "images")
        if device is not None:
            self.to(device)
        self.eval()
        features, logits = [], []
        bar = tqdm(range(0, len(images), batch_size), desc=self.log_prefix, disable=not progress, leave=False)
        for start in bar:
            batch = images[start : start + batch_size]
            batch = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
            feature, logit = self(batch.permute(0, 3, 1, 2).contiguous().to(self.device))
            features.append(feature.float().cpu())
            logits.append(logit.float().cpu())
        if not features:
            return torch.empty(0, self.feature_dim), torch.empty(0, self.num_logits)
        return torch.cat(features), torch.cat(logits)
