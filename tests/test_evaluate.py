"""Evaluation metrics against independent computations, on a random-init InceptionV3 (see `inception_weights`)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from hydra.core.global_hydra import GlobalHydra
from PIL import Image
from torch_fidelity.metric_isc import isc_features_to_metric

import dsr.evaluate
import dsr.metrics.evaluation
from dsr.metrics.evaluation import evaluate
from dsr.metrics.inception import InceptionFeatures, resolve_inception_weights
from dsr.metrics.reference import load_images, reference_statistics
from dsr.metrics.scores import FeatureStats, frechet_distance, inception_score, precision_recall

REPO = Path(__file__).resolve().parents[1]


def random_images(n: int, seed: int, size: int = 32, low: int = 0, high: int = 256) -> np.ndarray:
    """uint8 [n, size, size, 3]: small, since the extractor resizes everything to 299 anyway."""
    return np.random.default_rng(seed).integers(low, high, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def extractor(inception_weights) -> InceptionFeatures:
    return InceptionFeatures(inception_weights)


@pytest.fixture
def count_extract(monkeypatch):
    """Counts InceptionFeatures.extract calls (i.e. feature computations) while still running them."""
    calls = []
    original = InceptionFeatures.extract

    def counted(self, images, *args, **kwargs):
        calls.append(len(images))
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(InceptionFeatures, "extract", counted)
    return calls


# ----------------------------------------------------------------------------------------------------------------------
# Fréchet distance
# ----------------------------------------------------------------------------------------------------------------------


def closed_form_fid(mu1, sigma1, mu2, sigma2) -> float:
    """Independent reference: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) in float64 with scipy."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * covmean))


def test_frechet_distance_matches_sqrtm_closed_form():
    rng = np.random.default_rng(0)
    d, n = 16, 5000
    a_mix, b_mix = rng.normal(size=(d, d)), rng.normal(size=(d, d)) * 0.5
    a = rng.normal(size=(n, d)) @ a_mix + 1.0
    b = rng.normal(size=(n, d)) @ b_mix - 0.5
    stats_a, stats_b = FeatureStats.from_features(a), FeatureStats.from_features(b)

    # The statistics themselves, computed independently.
    np.testing.assert_allclose(stats_a.mu, a.mean(0))
    np.testing.assert_allclose(stats_a.sigma, (a - a.mean(0)).T @ (a - a.mean(0)) / (n - 1))
    assert stats_a.num_samples == n

    expected = closed_form_fid(stats_a.mu, stats_a.sigma, stats_b.mu, stats_b.sigma)
    assert frechet_distance(stats_a, stats_b) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(stats_a, stats_b) == pytest.approx(frechet_distance(stats_b, stats_a), rel=1e-8)
    assert abs(frechet_distance(stats_a, stats_a)) < 1e-8 * np.trace(stats_a.sigma)


def test_frechet_distance_diagonal_analytic():
    rng = np.random.default_rng(1)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    analytic = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    fid = frechet_distance(FeatureStats(mu1, np.diag(s1), 0), FeatureStats(mu2, np.diag(s2), 0))
    assert fid == pytest.approx(analytic, rel=1e-10)


def test_feature_stats_save_load_roundtrip(tmp_path):
    stats = FeatureStats.from_features(np.random.default_rng(2).normal(size=(50, 8)).astype(np.float32))
    stats.save(tmp_path / "stats.npz")
    loaded = FeatureStats.load(tmp_path / "stats.npz")
    assert loaded.mu.dtype == loaded.sigma.dtype == np.float64
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.num_samples == 50


# ----------------------------------------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------------------------------------


def inception_score_by_hand(logits: np.ndarray, splits: int) -> tuple[float, float]:
    """exp(mean_x KL(p(y|x) || p(y))) per contiguous split; mean and (population) std over splits, in numpy."""
    logits = logits.astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for chunk in np.array_split(p, splits):
        py = chunk.mean(0, keepdims=True)
        kl = np.sum(chunk * (np.log(chunk) - np.log(py)), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_matches_formula():
    logits = torch.from_numpy(np.random.default_rng(3).normal(scale=3.0, size=(200, 20)))
    mean, std = inception_score(logits, splits=10)
    exp_mean, exp_std = inception_score_by_hand(logits.numpy(), 10)
    assert mean == pytest.approx(exp_mean, rel=1e-9)
    assert std == pytest.approx(exp_std, rel=1e-7)


def test_inception_score_contiguous_splits_differ():
    # First half: confident, each sample a different class out of 10 -> IS near 10; second half: uniform -> IS = 1.
    c, half = 10, 100
    confident = np.full((half, c), -20.0)
    confident[np.arange(half), np.arange(half) % c] = 20.0
    logits = torch.from_numpy(np.concatenate([confident, np.zeros((half, c))]))

    mean, std = inception_score(logits, splits=2)
    exp_mean, exp_std = inception_score_by_hand(logits.numpy(), 2)
    assert mean == pytest.approx(exp_mean, rel=1e-9)
    assert std == pytest.approx(exp_std, rel=1e-9)
    assert mean == pytest.approx((10.0 + 1.0) / 2, rel=1e-6)
    assert std == pytest.approx((10.0 - 1.0) / 2, rel=1e-6)
    # Shuffled splits (torch-fidelity's default) would mix the halves and give a much smaller spread.
    shuffled = isc_features_to_metric(logits, splits=2, shuffle=True)
    assert shuffled["inception_score_std"] < 0.5 * std


# ----------------------------------------------------------------------------------------------------------------------
# Precision / recall
# ----------------------------------------------------------------------------------------------------------------------


def precision_recall_brute_force(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019 with full numpy distance matrices: radius = distance to the k-th other neighbour."""

    def dist(a, b):
        return np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0))

    radius_real = np.sort(dist(real, real), axis=1)[:, k]  # column 0 is the point itself
    radius_fake = np.sort(dist(fake, fake), axis=1)[:, k]
    precision = np.mean((dist(fake, real) <= radius_real[None, :]).any(1))
    recall = np.mean((dist(real, fake) <= radius_fake[None, :]).any(1))
    return float(precision), float(recall)


def planted_clusters(n_per: int, centers: list[int], seed: int, d: int = 8) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    points = [rng.normal(size=(n_per, d)) + 100.0 * np.eye(d)[c] for c in centers]
    return torch.from_numpy(np.concatenate(points)).float()


def test_precision_recall_identical_sets():
    real = planted_clusters(50, [0, 1, 2, 3], seed=4)
    assert precision_recall(real, real.clone(), k=3) == (1.0, 1.0)


def test_precision_recall_far_fake_set():
    real = planted_clusters(50, [0, 1, 2, 3], seed=5)
    fake = real + 1000.0
    precision, recall = precision_recall(real, fake, k=3)
    assert precision == 0.0
    assert recall == 0.0


def test_precision_recall_partial_coverage():
    # The fake set is the real clusters 0 and 1 only: all fakes are realistic, half the real manifold is missed.
    real = planted_clusters(50, [0, 1, 2, 3], seed=6)
    fake = real[:100].clone()
    precision, recall = precision_recall(real, fake, k=3)
    assert precision == 1.0
    assert recall == pytest.approx(0.5)


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(7)
    real = rng.normal(size=(120, 6))
    fake = rng.normal(size=(90, 6)) * 1.3 + 0.4
    # Small batches exercise the batched path.
    got = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=3, batch_size=32)
    expected = precision_recall_brute_force(real, fake, k=3)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert got == pytest.approx(expected, abs=1e-6)  # the helper averages in float32


# ----------------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------------


def test_load_images_npz_and_png_folder_agree(tmp_path):
    images = random_images(5, seed=8, size=12)
    np.savez(tmp_path / "images.npz", arr_0=images)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    Image.fromarray(images[0][..., 0]).convert("L").save(tmp_path / "gray.png")  # not in the folder: ignored

    from_npz, from_folder = load_images(tmp_path / "images.npz"), load_images(folder)
    assert from_npz.dtype == from_folder.dtype == np.uint8
    assert from_npz.shape == (5, 12, 12, 3)
    np.testing.assert_array_equal(from_npz, images)
    np.testing.assert_array_equal(from_folder, images)


def test_load_images_grayscale_png_becomes_rgb(tmp_path):
    Image.fromarray(np.full((6, 6), 77, dtype=np.uint8)).save(tmp_path / "a.png")
    loaded = load_images(tmp_path)
    assert loaded.shape == (1, 6, 6, 3) and (loaded == 77).all()


def test_load_images_rejects_bad_input(tmp_path):
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"expected uint8 images \[N, H, W, 3\].*float32"):
        load_images(tmp_path / "float.npz")
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((2, 3, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"expected uint8 images \[N, H, W, 3\].*\(2, 3, 8, 8\)"):
        load_images(tmp_path / "nchw.npz")
    np.savez(tmp_path / "nokey.npz", images=np.zeros((2, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="arr_0"):
        load_images(tmp_path / "nokey.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_images(tmp_path / "missing.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no png/jpg/jpeg images"):
        load_images(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------------------------------
# Inception features, references, caching and the whole evaluation
# ----------------------------------------------------------------------------------------------------------------------


def test_inception_features_shapes(extractor):
    images = random_images(3, seed=9)
    pool, logits = extractor(torch.from_numpy(images).permute(0, 3, 1, 2))
    assert pool.shape == (3, 2048) and logits.shape == (3, 1008)
    assert pool.dtype == logits.dtype == torch.float32
    # The random-init network still separates images (distances are not trivially zero).
    assert (pool[0] - pool[1]).norm() > 1e-3 * pool[0].norm()
    # Batched extraction on NHWC arrays gives the same features.
    batched_pool, batched_logits = extractor.extract(images, batch_size=2)
    torch.testing.assert_close(batched_pool, pool, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched_logits, logits, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_fid_of_set_against_itself_is_zero(tmp_path, inception_weights):
    # The same images as a PNG folder (samples) and as an npz (reference): every distance must vanish.
    images = random_images(10, seed=10)
    np.savez(tmp_path / "reference.npz", arr_0=images)
    (tmp_path / "samples").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "samples" / f"{i:03d}.png")
    metrics = evaluate(
        tmp_path / "samples", tmp_path / "reference.npz", inception_weights, batch_size=5, cache_dir=tmp_path / "c"
    )
    assert abs(metrics["fid"]) < 1e-3
    assert metrics["precision"] == 1.0 and metrics["recall"] == 1.0
    assert metrics["num_samples"] == 10
    assert metrics["inception_score_mean"] >= 1.0
    assert metrics["reference_sha256"] == hashlib.sha256((tmp_path / "reference.npz").read_bytes()).hexdigest()


def test_reference_cache_hit_and_invalidation(tmp_path, extractor, count_extract):
    reference = tmp_path / "ref.npz"
    np.savez(reference, arr_0=random_images(12, seed=11))
    cache = tmp_path / "cache"

    stats, features = reference_statistics(reference, extractor, cache, batch_size=12)
    assert count_extract == [12]
    assert features.shape == (12, 2048) and stats.num_samples == 12
    np.testing.assert_allclose(stats.mu, features.double().mean(0).numpy())

    again, again_features = reference_statistics(reference, extractor, cache, batch_size=12)
    assert count_extract == [12], "second call must come from the cache"
    np.testing.assert_array_equal(again.sigma, stats.sigma)
    torch.testing.assert_close(again_features, features)

    np.savez(reference, arr_0=random_images(12, seed=12))  # same name and size, other content
    changed, _ = reference_statistics(reference, extractor, cache, batch_size=12)
    assert count_extract == [12, 12]
    assert not np.allclose(changed.mu, stats.mu)
    assert len(list(cache.glob("*.npz"))) == 2


def test_reference_folder_cache_invalidation(tmp_path, extractor, count_extract):
    folder = tmp_path / "ref"
    folder.mkdir()
    for i, image in enumerate(random_images(4, seed=13)):
        Image.fromarray(image).save(folder / f"{i}.png")
    reference_statistics(folder, extractor, tmp_path / "cache", need_features=False)
    reference_statistics(folder, extractor, tmp_path / "cache", need_features=False)
    assert count_extract == [4]
    Image.fromarray(random_images(1, seed=14)[0]).save(folder / "0.png")
    reference_statistics(folder, extractor, tmp_path / "cache", need_features=False)
    assert count_extract == [4, 4]


def test_statistics_only_reference_needs_no_features(tmp_path, extractor, count_extract):
    planted = FeatureStats(np.arange(2048.0), np.eye(2048), 7)
    planted.save(tmp_path / "stats.npz")
    stats, features = reference_statistics(tmp_path / "stats.npz", extractor, tmp_path / "cache")
    assert features is None and count_extract == []
    np.testing.assert_array_equal(stats.mu, planted.mu)
    assert stats.num_samples == 7


@pytest.mark.slow
def test_adm_reference_uses_its_mu_sigma(tmp_path, inception_weights, extractor, monkeypatch):
    rng = np.random.default_rng(15)
    ref_images, sample_images = random_images(10, seed=16), random_images(10, seed=17, high=128)
    planted_mu = rng.normal(size=2048)
    planted_sigma = np.diag(rng.uniform(0.01, 0.2, 2048))
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=ref_images, mu=planted_mu, sigma=planted_sigma)
    np.savez(tmp_path / "samples.npz", arr_0=sample_images)

    assert np.array_equal(FeatureStats.from_adm_npz(tmp_path / "VIRTUAL_ref.npz").mu, planted_mu)
    stats, ref_features = reference_statistics(tmp_path / "VIRTUAL_ref.npz", extractor, tmp_path / "cache")
    np.testing.assert_array_equal(stats.mu, planted_mu)
    np.testing.assert_array_equal(stats.sigma, planted_sigma)
    # arr_0 still feeds precision/recall.
    expected_ref_pool, _ = extractor.extract(ref_images)
    torch.testing.assert_close(ref_features, expected_ref_pool, rtol=1e-4, atol=1e-5)

    # FID = frechet_distance(samples' statistics, planted statistics); recorded rather than recomputed, since every
    # 2048-d Fréchet distance costs seconds on a CPU.
    calls = []

    def recorded(a, b):
        calls.append((a, b, frechet_distance(a, b)))
        return calls[-1][2]

    monkeypatch.setattr(dsr.metrics.evaluation, "frechet_distance", recorded)
    metrics = evaluate(
        tmp_path / "samples.npz", tmp_path / "VIRTUAL_ref.npz", inception_weights, cache_dir=tmp_path / "cache"
    )
    ((samples_stats, reference_stats, fid),) = calls
    np.testing.assert_array_equal(reference_stats.mu, planted_mu)
    np.testing.assert_array_equal(reference_stats.sigma, planted_sigma)
    sample_pool, _ = extractor.extract(sample_images)
    np.testing.assert_allclose(samples_stats.mu, sample_pool.double().mean(0).numpy(), rtol=1e-4, atol=1e-6)
    assert metrics["fid"] == fid
    # The planted statistics are far from arr_0's own, so using the wrong ones could not pass unnoticed.
    assert np.abs(FeatureStats.from_features(expected_ref_pool).mu - planted_mu).max() > 1.0
    assert metrics["precision"] is not None and 0.0 <= metrics["precision"] <= 1.0


# ----------------------------------------------------------------------------------------------------------------------
# Missing weights and the CLI
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_weights_env(tmp_path, monkeypatch) -> dict:
    """An environment (also set in this process) in which no Inception weights can be found."""
    torch_home = tmp_path / "torch_home"
    torch_home.mkdir()
    monkeypatch.delenv("DSR_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_missing_weights_fail_fast(no_weights_env, tmp_path):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as error:
        resolve_inception_weights(None)
    assert time.perf_counter() - start < 1.0
    message = str(error.value)
    assert "evaluation.inception_weights" in message and "DSR_INCEPTION_WEIGHTS" in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in message
    assert "weights-inception-2015-12-05-6726825d.pth" in message

    with pytest.raises(FileNotFoundError, match="nope.pth"):
        resolve_inception_weights(tmp_path / "nope.pth")


def test_resolve_weights_order(inception_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("DSR_INCEPTION_WEIGHTS", str(inception_weights))
    assert resolve_inception_weights(None) == inception_weights
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "weights-inception-2015-12-05-6726825d.pth").write_bytes(b"")
    monkeypatch.delenv("DSR_INCEPTION_WEIGHTS")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert resolve_inception_weights(None) == checkpoints / "weights-inception-2015-12-05-6726825d.pth"
    assert resolve_inception_weights(inception_weights) == inception_weights


def run_cli(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dsr.evaluate", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_cli_missing_weights(no_weights_env, tmp_path):
    result = run_cli(["samples=x.npz", "reference=y.npz"], no_weights_env, tmp_path)
    assert result.returncode != 0
    assert "evaluation.inception_weights" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_cli_end_to_end(tmp_path, inception_weights, monkeypatch, capsys):
    # In-process (argv -> Hydra -> config -> evaluate -> JSON) to skip a second cold start of torch and Inception; the
    # `python -m` entry point itself runs in test_cli_missing_weights.
    np.savez(tmp_path / "samples.npz", arr_0=random_images(10, seed=18))
    monkeypatch.setenv("DSR_INCEPTION_WEIGHTS", str(inception_weights))
    monkeypatch.chdir(tmp_path)
    args = ["samples=samples.npz", "reference=samples.npz", "accelerator=cpu", f"cache_dir={tmp_path / 'cache'}"]
    monkeypatch.setattr(sys, "argv", ["dsr.evaluate", *args])
    GlobalHydra.instance().clear()
    try:
        dsr.evaluate.main()
    finally:
        GlobalHydra.instance().clear()
    metrics = json.loads((tmp_path / "samples_metrics.json").read_text())
    assert abs(metrics["fid"]) < 1e-3
    assert metrics["precision"] == 1.0 and metrics["recall"] == 1.0
    assert metrics["num_samples"] == 10
    assert "FID" in capsys.readouterr().out
    # Hydra writes no run folders or logs beside the JSON.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "samples.npz", "samples_metrics.json"]
