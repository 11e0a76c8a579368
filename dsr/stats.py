"""Latent normalisation statistics: the exact per-position mean and variance [C, h, w] of an encoder's latents.

    python -m dsr.stats encoder=siglip2_b data=imagenet [stats.num_images=N] [stats.views=both] [devices=8]

Every image contributes its latent and, with `views=both` (the default), the latent of its mirror image, since
stage 2 trains on randomly flipped images. Moments are accumulated in float64 with Chan et al.'s pairwise update
(count, mean, sum of squared deviations), so the result is the population mean and variance of the whole set,
independent of batch size and order up to rounding; each rank takes indices rank, rank + W, ... (no padding
duplicates) and the ranks' moments are merged the same way. The file `{"mean", "var", "count", ...}` lands at
`paths.latent_stats` (artifacts/<encoder>/stats.pt), where stage-2 configs look for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from dsr.config import build, entry_point
from dsr.utils.files import atomic_write

if TYPE_CHECKING:
    import torch
    from torch import Tensor
    from torch.utils.data import Dataset

# torch, Lightning and the encoders are imported where the run needs them, so `--help` answers without them.

log = logging.getLogger("dsr.stats")


@dataclass
class Moments:
    """Count, mean and sum of squared deviations (M2) of a stream of [..., *shape] samples, in float64."""

    count: int
    mean: Tensor
    m2: Tensor

    @classmethod
    def empty(cls, shape: tuple[int, ...]) -> Moments:
        import torch

        return cls(0, torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64))

    @classmethod
    def of(cls, batch: Tensor) -> Moments:
        """Moments of a batch [B, *shape]."""
        batch = batch.detach().double().cpu()
        mean = batch.mean(0)
        return cls(len(batch), mean, ((batch - mean) ** 2).sum(0))

    def merge(self, other: Moments) -> Moments:
        """Chan et al.'s parallel combination: exact for any split of the data."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / count)
        return Moments(count, mean, m2)

    @property
    def var(self) -> Tensor:
        """Population (biased) variance, as the reference's statistics."""
        return self.m2 / max(self.count, 1)


def latent_moments(
    codec: torch.nn.Module,
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 0,
    views: str = "both",
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> Moments:
    """Moments of `codec.tokens` (raw latents [C, h, w]) over every image of `dataset`."""
    from torch.utils.data import DataLoader

    from dsr.data.views import views_of

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    moments = Moments.empty(tuple(codec.latent_shape))
    for images, _ in tqdm(loader, desc="latent statistics", unit="batch", disable=not progress):
        latents = codec.tokens(views_of(images.to(device), views))
        moments = moments.merge(Moments.of(latents))
    return moments


def gather_moments(fabric, moments: Moments) -> Moments:
    """Merge every rank's moments (in rank order, so every rank gets the same result)."""
    if fabric.world_size == 1:
        return moments
    import torch

    count = fabric.all_gather(torch.tensor(moments.count, dtype=torch.float64, device=fabric.device)).cpu()
    mean = fabric.all_gather(moments.mean.to(fabric.device)).cpu()
    m2 = fabric.all_gather(moments.m2.to(fabric.device)).cpu()
    merged = Moments.empty(tuple(moments.mean.shape))
    for rank in range(fabric.world_size):
        merged = merged.merge(Moments(int(count[rank]), mean[rank], m2[rank]))
    return merged


def save_stats(path: str | Path, moments: Moments, **metadata: object) -> Path:
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"mean": moments.mean.float(), "var": moments.var.float(), "count": moments.count, **metadata}
    atomic_write(path, lambda f: torch.save(payload, f))
    return path


def run(cfg: DictConfig) -> Path:
    from torch.utils.data import Subset

    from dsr.data.views import subset_indices, without_flip
    from dsr.utils.fabric import launch_fabric

    fabric = launch_fabric(cfg.accelerator, cfg.devices)
    codec = build(cfg.encoder).to(fabric.device).eval()
    dataset = build(without_flip(cfg.data.dataset))
    indices = subset_indices(len(dataset), cfg.stats.num_images, cfg.seed)
    mine = Subset(dataset, indices[fabric.global_rank :: fabric.world_size])
    if fabric.global_rank == 0:
        log.info(
            "statistics of %s latents %s over %d images x %s view(s) on %d device(s)",
            cfg.encoder._target_.rsplit(".", 1)[-1],
            tuple(codec.latent_shape),
            len(indices),
            cfg.stats.views,
            fabric.world_size,
        )
    moments = latent_moments(
        codec,
        mine,
        cfg.stats.batch_size,
        cfg.stats.num_workers,
        cfg.stats.views,
        fabric.device,
        progress=fabric.global_rank == 0,
    )
    moments = gather_moments(fabric, moments)
    path = Path(cfg.stats.output)
    if fabric.global_rank == 0:
        save_stats(
            path,
            moments,
            views=cfg.stats.views,
            num_images=len(indices),
            encoder=OmegaConf.to_container(cfg.encoder, resolve=True),
            dataset=OmegaConf.to_container(cfg.data.dataset, resolve=True),
        )
        print(f"latent statistics ({moments.count} latents): {path}", flush=True)
    fabric.barrier()
    return path


@entry_point("stats")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
