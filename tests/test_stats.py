"""Latent statistics (`dsr.stats`) and the latent cache (`dsr.cache_latents`, `dsr.data.latents`), through their
real entry points on the tiny encoder and synthetic images, against float64 re-computations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose_script
from hydra.utils import instantiate

from dsr.data.latents import CachedLatents, FlipSampler
from dsr.data.views import subset_indices
from dsr.stats import Moments

TINY_DATA = ["encoder=tiny", "decoder=tiny", "data=synthetic", "data.dataset.num_samples=40", "accelerator=cpu",
             "devices=1"]  # fmt: skip


def all_latents(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image's raw latent and its mirror's, computed directly: [N, 2, C, h, w] and labels [N]."""
    codec = instantiate(cfg.encoder).eval()
    dataset = instantiate(cfg.data.dataset)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    return torch.stack([codec.tokens(images), codec.tokens(images.flip(-1))], dim=1), labels


def test_moments_merge_is_exact_for_any_split():
    data = torch.randn(97, 3, 2, 2, dtype=torch.float64) * 5 + 100  # a large mean: naive sums would lose digits
    moments = Moments.empty((3, 2, 2))
    for chunk in torch.split(data, [1, 30, 2, 64]):
        moments = moments.merge(Moments.of(chunk))
    rank_a = Moments.of(data[::2]).merge(Moments.of(data[1::2]))
    for m in (moments, rank_a):
        assert m.count == 97
        torch.testing.assert_close(m.mean, data.mean(0), atol=1e-12, rtol=0)
        torch.testing.assert_close(m.var, data.var(0, unbiased=False), atol=1e-10, rtol=0)


def test_subset_is_seeded_and_sorted():
    assert subset_indices(10, None, 0) == list(range(10))
    a, b = subset_indices(1000, 50, 3), subset_indices(1000, 50, 3)
    assert a == b and a == sorted(a) and len(set(a)) == 50 and a != subset_indices(1000, 50, 4)


def test_stats_script_matches_a_float64_recomputation(tmp_path):
    from dsr.stats import run

    out = tmp_path / "stats.pt"
    cfg = compose_script("stats", [*TINY_DATA, f"stats.output={out}", "stats.batch_size=7"])
    run(cfg)
    stats = torch.load(out, weights_only=False)
    latents, _ = all_latents(cfg)
    flat = latents.double().flatten(0, 1)  # both views of every image
    assert stats["count"] == 80 and stats["views"] == "both" and stats["num_images"] == 40
    torch.testing.assert_close(stats["mean"].double(), flat.mean(0), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(stats["var"].double(), flat.var(0, unbiased=False), atol=1e-6, rtol=1e-5)

    # The stage-2 encoder reads the file; its normalised latents are standardised per position.
    codec = instantiate(cfg.encoder, stats=str(out))
    z = codec.normalize(latents.flatten(0, 1))
    torch.testing.assert_close(z.mean(0), torch.zeros_like(z[0]), atol=1e-4, rtol=0)
    var = stats["var"].double()
    torch.testing.assert_close(z.var(0, unbiased=False).double(), var / (var + 1e-5), atol=1e-5, rtol=0)


def test_latent_cache_reads_back_both_views(tmp_path):
    from dsr.cache_latents import run

    out = tmp_path / "cache"
    cfg = compose_script("cache_latents", [*TINY_DATA, f"cache.output={out}", "cache.shard_size=16",
                                           "cache.dtype=float32", "cache.batch_size=5"])  # fmt: skip
    run(cfg)
    dataset = CachedLatents(str(out))
    latents, labels = all_latents(cfg)
    assert len(dataset) == 40 and dataset.num_views == 2 and dataset.latent_shape == tuple(latents.shape[2:])
    for i in (0, 15, 16, 39):  # across shard boundaries
        for view in (0, 1):
            item_latents, item_y = dataset[(i, view)]
            torch.testing.assert_close(item_latents, latents[i, view], atol=1e-5, rtol=1e-5)
            assert item_y == labels[i]
    # A second run finds every shard and rewrites nothing; other settings are refused.
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("latents_*.npy")}
    run(cfg)
    assert before == {p.name: p.stat().st_mtime_ns for p in out.glob("latents_*.npy")}
    # A run killed mid-write leaves a shard without its latents and the temp files; the rerun writes that shard
    # alone and leaves no temp file behind.
    names = sorted(p.name for p in out.iterdir())
    (out / "latents_00002.npy").unlink()
    (out / "latents_00002.npy.tmp-12345").write_bytes(b"half an array")
    (out / "labels_00002.npy.tmp-12345").write_bytes(b"half an array")
    run(cfg)
    assert sorted(p.name for p in out.iterdir()) == names
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("latents_*.npy")}
    assert after.pop("latents_00002.npy") > before.pop("latents_00002.npy") and after == before
    rewritten = torch.from_numpy(np.load(out / "latents_00002.npy"))
    torch.testing.assert_close(rewritten, latents[32:].to(rewritten.dtype), atol=1e-5, rtol=1e-5)
    cfg_other = compose_script("cache_latents", [*TINY_DATA, f"cache.output={out}", "cache.shard_size=8"])
    with pytest.raises(ValueError, match="differ in: dtype, shard_size"):
        run(cfg_other)
    # The manifest names the encoder: another encoder's settings are refused at start-up.
    dataset.check_encoder(dict(cfg.encoder), latents.shape[2:])
    with pytest.raises(ValueError, match="another encoder"):
        dataset.check_encoder({**cfg.encoder, "pretrained": "google/siglip2-base-patch16-256"}, latents.shape[2:])


def test_flip_sampler_draws_one_view_per_image_per_epoch(tmp_path):
    class Fake:
        num_views = 2

        def __len__(self):
            return 64

    sampler = FlipSampler(Fake(), num_replicas=2, rank=0, shuffle=True, seed=3)
    other = FlipSampler(Fake(), num_replicas=2, rank=1, shuffle=True, seed=3)
    first = list(sampler)
    assert first == list(sampler)  # a pure function of (seed, epoch): exact on resume
    indices = [i for i, _ in first] + [i for i, _ in other]
    assert sorted(indices) == list(range(64))  # the two ranks split the images
    views = np.array([v for _, v in first])
    assert 0.2 < views.mean() < 0.8
    sampler.set_epoch(1)
    assert [v for _, v in sorted(sampler)] != [v for _, v in sorted(first)]


@pytest.mark.slow
def test_two_ranks_reduce_to_the_single_process_statistics(tmp_path):
    """`devices=2` on the CPU (gloo): each rank takes every other image and the moments are merged across ranks."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    outputs = {}
    for devices in (1, 2):
        outputs[devices] = tmp_path / f"stats_{devices}.pt"
        result = subprocess.run(
            [sys.executable, "-m", "dsr.stats", *TINY_DATA[:-1], f"devices={devices}",
             f"stats.output={outputs[devices]}", "stats.batch_size=6"],
            check=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(repo)}, timeout=300, capture_output=True,
            text=True,
        )  # fmt: skip
        assert f"on {devices} device(s)" in result.stdout + result.stderr
    one, two = (torch.load(outputs[d], weights_only=False) for d in (1, 2))
    assert one["count"] == two["count"] == 80
    torch.testing.assert_close(two["mean"], one["mean"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(two["var"], one["var"], atol=1e-6, rtol=1e-5)
