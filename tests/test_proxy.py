"""Quality measurable on a CPU: the digits, the proxy classifier, and the Frechet distance it feeds.

The metric is judged by effects planted where the answer is known: held-out real digits score close to the
training digits, while noise, one repeated digit, an untrained model and a model that drops half the classes each
score far worse. The Frechet distance is checked against closed forms and against a second, symmetric computation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import compose_train

from dsr.data.digits import Digits, split_indices
from dsr.data.synthetic import SyntheticShapes
from dsr.metrics.evaluation import evaluate
from dsr.metrics.features import FeatureNetwork
from dsr.metrics.proxy import dataset_arrays, proxy_for
from dsr.metrics.scores import FeatureStats, FrechetDisagreement, frechet_distance, frechet_distance_eigh

DIGITS_16 = ["data.image_size=16"]  # 4x4 tokens of 48 channels: the size a CPU test trains in a minute

# ------------------------------------------------------------------------------------------------------------------
# data=digits
# ------------------------------------------------------------------------------------------------------------------


def test_digits_are_deterministic_per_index_and_their_split_is_stratified_and_disjoint():
    from sklearn.datasets import load_digits

    raw = load_digits()
    splits = split_indices(0)
    train, heldout = splits["train"], splits["heldout"]
    assert len(train) == 1437 and len(heldout) == 360
    assert not set(train) & set(heldout) and sorted([*train, *heldout]) == list(range(1797))
    for k in range(10):  # each class keeps its share in both splits (to one image)
        share = (raw.target == k).sum() * 0.2
        assert abs((raw.target[heldout] == k).sum() - share) <= 1
    assert not np.array_equal(split_indices(1)["heldout"], heldout)

    native, large = Digits("heldout", image_size=8), Digits("heldout", image_size=20)
    image, label = native[5]
    assert label == raw.target[heldout[5]]
    torch.testing.assert_close(image, torch.from_numpy(raw.images[heldout[5]] / 16.0).float().expand(3, 8, 8))
    again, _ = Digits("heldout", image_size=20)[5]
    assert large[5][0].shape == (3, 20, 20) and torch.equal(large[5][0], again)
    assert torch.equal(large[5][0][0], large[5][0][2])  # grey on three channels
    assert Digits("train", 32).heldout().split == "heldout"
    with pytest.raises(ValueError, match="data.num_classes=10"):
        Digits(num_classes=8)


def test_data_digits_composes_without_flips():
    cfg = compose_train(["experiment=quickstart_digits"], None)
    assert cfg.data.dataset._target_ == "dsr.data.digits.Digits" and cfg.data.num_classes == 10
    assert "flip" not in cfg.data.dataset


# ------------------------------------------------------------------------------------------------------------------
# the proxy classifier
# ------------------------------------------------------------------------------------------------------------------


def _heldout_accuracy(proxy) -> float:
    with np.load(proxy.reference) as f:
        images, labels = f["arr_0"], f["arr_1"]
    _, logits = proxy.network.extract(images)
    return float((logits.argmax(1).numpy() == labels).mean())


def test_the_proxy_classifier_is_accurate_on_held_out_data(digits_proxy, proxy_dir):
    assert _heldout_accuracy(digits_proxy) == pytest.approx(digits_proxy.heldout_accuracy)
    assert digits_proxy.heldout_accuracy >= 0.97
    shapes = proxy_for(SyntheticShapes(2048, image_size=32, num_classes=16), proxy_dir)
    assert shapes.heldout_accuracy >= 0.99 and _heldout_accuracy(shapes) == pytest.approx(shapes.heldout_accuracy)


def test_the_proxy_classifier_is_cached_by_content(digits_proxy, proxy_dir):
    weights = digits_proxy.folder / "proxy.pt"
    stamp = weights.stat().st_mtime_ns
    again = proxy_for(Digits("train", image_size=16), proxy_dir)
    assert again.folder == digits_proxy.folder and weights.stat().st_mtime_ns == stamp  # loaded, not retrained
    images = np.zeros((4, 8, 8, 3), np.uint8)
    assert again.network.cache_tag == digits_proxy.network.cache_tag
    for network in (again.network, digits_proxy.network):
        torch.testing.assert_close(network.extract(images)[0], digits_proxy.network.extract(images)[0])
    # Other pixels are other data: another fingerprint, so another classifier.
    from dsr.metrics.proxy import _fingerprint

    labels = np.arange(4)
    assert _fingerprint(images, labels) != _fingerprint(images + 1, labels)


# ------------------------------------------------------------------------------------------------------------------
# the metric's sanity, on digits
# ------------------------------------------------------------------------------------------------------------------


def _score(proxy, images: np.ndarray, labels: np.ndarray, tmp_path, name: str) -> dict:
    path = tmp_path / f"{name}.npz"
    np.savez(path, arr_0=images, arr_1=labels)
    return evaluate(path, proxy.reference, network=proxy.network, cache_dir=tmp_path / "cache")


def test_the_proxy_metrics_separate_real_digits_from_planted_failures(digits_proxy, tmp_path):
    train_images, train_labels = dataset_arrays(Digits("train", image_size=16))
    heldout = np.load(digits_proxy.reference)["arr_1"]
    rng = np.random.default_rng(0)

    def real(seed: int, classes_of=lambda y: y) -> tuple[np.ndarray, np.ndarray]:
        """One training digit per held-out label, of class classes_of(label): a generator that imitates the data."""
        g = np.random.default_rng(seed)
        picks = [g.choice(np.flatnonzero(train_labels == classes_of(y))) for y in heldout]
        return train_images[picks], heldout

    fair = [_score(digits_proxy, *real(seed), tmp_path, f"real{seed}") for seed in range(3)]
    fds = np.array([s["fd"] for s in fair])
    assert fds.max() < 2.0 and fds.std() < 0.5  # small and stable across draws
    assert min(s["conditional_accuracy"] for s in fair) > 0.97

    noise = rng.integers(0, 256, (360, 16, 16, 3), dtype=np.uint8)
    repeated = np.repeat(train_images[:1], 360, axis=0)
    module = _untrained_model()
    from dsr.diffusion.generation import generate_shard

    untrained, untrained_labels = generate_shard(module, np.arange(360), num_classes=10, seed=0, batch_size=120)
    for name, images, labels in [("noise", noise, heldout), ("repeated", repeated, heldout),
                                 ("untrained", untrained, untrained_labels)]:  # fmt: skip
        assert _score(digits_proxy, images, labels, tmp_path, name)["fd"] > 20 * fds.max(), name

    # Mode drop: asked for class y, it draws a digit of class y mod 5 (half the classes never appear).
    dropped = _score(digits_proxy, *real(0, classes_of=lambda y: y % 5), tmp_path, "dropped")
    assert dropped["fd"] > 5 * fds.max()
    assert dropped["recall"] < fair[0]["recall"] - 0.2
    assert 0.4 < dropped["conditional_accuracy"] < 0.6


def _untrained_model():
    from dsr.config import build

    cfg = compose_train(["experiment=quickstart_digits", *DIGITS_16, "sampler.solver.num_steps=4"], None)
    torch.manual_seed(0)
    return build(cfg.module).eval()


# ------------------------------------------------------------------------------------------------------------------
# the Frechet distance: closed forms, and the cross-check that refuses a broken square root
# ------------------------------------------------------------------------------------------------------------------


def _gaussian_pair(dim: int, eigenvalues: tuple[np.ndarray, np.ndarray], seed: int = 0):
    """Two Gaussians whose covariances share an eigenbasis, so Tr((S1 S2)^(1/2)) = sum sqrt(a_i b_i) exactly."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    a, b = eigenvalues
    stats = [FeatureStats(rng.normal(size=dim), (basis * e) @ basis.T, 0) for e in (a, b)]
    closed = float(((stats[0].mu - stats[1].mu) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    return stats, closed


class _PlantedFeatures(FeatureNetwork):
    """Returns a planted feature row per image, the image's index read from its first two pixels."""

    distance = "fd"
    log_prefix = "planted"

    def __init__(self, table: np.ndarray) -> None:
        super().__init__()
        self.table = torch.from_numpy(table)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a device to live on
        self.feature_dim = table.shape[1]

    @property
    def cache_tag(self) -> str:
        return "planted"

    def forward(self, images):
        index = images[:, 0, 0, 0].long() + 256 * images[:, 1, 0, 0].long()
        return self.table[index], torch.zeros(len(images), 2)


def _with_exact_moments(stats: FeatureStats, n: int, seed: int) -> np.ndarray:
    """n feature rows whose sample mean and (unbiased) covariance are exactly `stats`' mu and sigma."""
    z = np.random.default_rng(seed).normal(size=(n, len(stats.mu)))
    z -= z.mean(axis=0)
    vals, vecs = np.linalg.eigh(np.cov(z, rowvar=False))
    white = z @ vecs @ np.diag(vals**-0.5) @ vecs.T
    vals, vecs = np.linalg.eigh(stats.sigma)
    return stats.mu + white @ (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def test_fd_through_the_proxy_path_equals_the_closed_form_for_gaussians(tmp_path):
    dim, n = 8, 400
    rng = np.random.default_rng(1)
    (ref, gen), closed = _gaussian_pair(dim, (rng.uniform(0.5, 3, dim), rng.uniform(0.5, 3, dim)))
    table = np.concatenate([_with_exact_moments(gen, n, 2), _with_exact_moments(ref, n, 3)])
    images = np.zeros((2 * n, 2, 2, 3), np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = np.arange(2 * n) % 256, np.arange(2 * n) // 256
    np.savez(tmp_path / "gen.npz", arr_0=images[:n])
    np.savez(tmp_path / "ref.npz", arr_0=images[n:])
    scores = evaluate(tmp_path / "gen.npz", tmp_path / "ref.npz", network=_PlantedFeatures(table),
                      cache_dir=tmp_path / "cache", precision_recall=False)  # fmt: skip
    assert scores["fd"] == pytest.approx(closed, rel=1e-6)  # the features pass through float32, as Inception's
    assert frechet_distance(gen, ref) == pytest.approx(closed, rel=1e-9)


def test_the_frechet_distance_of_near_singular_covariances_is_right_or_refused(monkeypatch, tmp_path):
    dim = 64
    a = np.geomspace(1.0, 1e-14, dim)  # near-singular: the smallest eigenvalues are at float64's noise
    a[-8:] = 0.0  # and some exactly singular, as with fewer images than features
    b = np.geomspace(2.0, 1e-12, dim)
    (s1, s2), closed = _gaussian_pair(dim, (a, b))
    assert frechet_distance_eigh(s1, s2) == pytest.approx(closed, rel=1e-7, abs=1e-9)
    assert frechet_distance(s1, s2) == pytest.approx(closed, rel=1e-3, abs=1e-6)

    # A square root gone wrong (as on some BLAS builds): torch-fidelity's eigenvalues come out scaled.
    import torch_fidelity.metric_fid as metric_fid

    class BrokenLinalg:
        def __getattr__(self, name):
            return getattr(np.linalg, name)

        @staticmethod
        def eigvals(m):
            return np.linalg.eigvals(m) * 1.5

    class BrokenNumpy:
        linalg = BrokenLinalg()

        def __getattr__(self, name):
            return getattr(np, name)

    monkeypatch.setattr(metric_fid, "np", BrokenNumpy())
    with pytest.raises(FrechetDisagreement, match="symmetric eigendecomposition"):
        frechet_distance(s1, s2)
    # Inside dsr.evaluate the same refusal ends the evaluation instead of writing a number.
    table = np.concatenate([_with_exact_moments(FeatureStats(np.zeros(4), np.eye(4), 0), 50, s) for s in (0, 1)])
    images = np.zeros((100, 2, 2, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(100)
    np.savez(tmp_path / "gen.npz", arr_0=images[:50])
    np.savez(tmp_path / "ref.npz", arr_0=images[50:])
    with pytest.raises(FrechetDisagreement):
        evaluate(tmp_path / "gen.npz", tmp_path / "ref.npz", network=_PlantedFeatures(table),
                 cache_dir=tmp_path / "cache", precision_recall=False)  # fmt: skip


# ------------------------------------------------------------------------------------------------------------------
# a model that learns: trained on digits for a fixed budget, scored in training and offline alike
# ------------------------------------------------------------------------------------------------------------------

QUALITY_STEPS, QUALITY_SAMPLES = 1200, 300


@pytest.mark.slow
def test_a_tiny_model_trained_on_digits_generates_the_digits_it_is_asked_for(run_train, digits_proxy, proxy_dir,
                                                                              tmp_path):  # fmt: skip
    """~70 s on 2 cores. A broken loss, sampler or conditioning leaves conditional accuracy near chance (0.1)."""
    import csv

    from helpers import compose_script

    from dsr import sample

    overrides = ["experiment=quickstart_digits", *DIGITS_16, "data.global_batch_size=64",
                 f"trainer.max_steps={QUALITY_STEPS}", f"callbacks.fid.every_n_steps={QUALITY_STEPS}",
                 f"callbacks.fid.num_samples={QUALITY_SAMPLES}", "sampler.guidance.scale=3.0",
                 f"evaluation.proxy_dir={proxy_dir}", f"callbacks.fid.cache_dir={tmp_path / 'cache'}",
                 "callbacks.sample_grid.every_n_steps=0", "callbacks.checkpoint.every_n_train_steps=0",
                 "trainer.enable_progress_bar=false"]  # fmt: skip
    _, run_dir = run_train(overrides, name="digits")
    logged = [r for r in csv.DictReader(open(run_dir / "logs" / "metrics.csv")) if r.get("proxy/fd")]
    assert len(logged) == 1
    fd, accuracy = float(logged[0]["proxy/fd"]), float(logged[0]["proxy/conditional_accuracy"])
    assert accuracy > 0.8, accuracy  # measured 0.9x; chance is 0.1

    # Offline, as a user scores a checkpoint: dsr.sample the same images, dsr.evaluate them with features=proxy.
    cfg = compose_script("sample", [f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", f"num_samples={QUALITY_SAMPLES}",
                                    "sampler.solver.num_steps=25", "sampler.guidance.scale=3.0", "accelerator=cpu",
                                    f"output={tmp_path / 'samples'}"])  # fmt: skip
    samples = sample.run(cfg)
    offline = evaluate(samples, digits_proxy.reference, network=digits_proxy.network, cache_dir=tmp_path / "cache",
                       precision_recall=False)  # fmt: skip
    assert offline["fd"] == pytest.approx(fd, rel=1e-4)
    assert offline["conditional_accuracy"] == pytest.approx(accuracy, abs=1e-6)


@pytest.mark.slow
def test_dsr_evaluate_scores_samples_in_proxy_features_from_the_command_line(digits_proxy, proxy_dir, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    with np.load(digits_proxy.reference) as f:  # the held-out digits themselves: FD ~0, all classified right
        np.savez(tmp_path / "samples.npz", arr_0=f["arr_0"], arr_1=f["arr_1"])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "dsr.evaluate", f"samples={tmp_path / 'samples.npz'}", "features=proxy",
               "data=digits", "data.image_size=16", f"proxy_dir={proxy_dir}", f"cache_dir={tmp_path / 'cache'}",
               "accelerator=cpu"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "FD (proxy features)" in result.stdout and "Conditional accuracy" in result.stdout
    metrics = json.loads((tmp_path / "samples_metrics.json").read_text())
    assert abs(metrics["fd"]) < 1e-6 and metrics["conditional_accuracy"] == pytest.approx(digits_proxy.heldout_accuracy)
    missing = subprocess.run(command[:5], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert missing.returncode == 2 and "features=proxy needs the data the samples imitate" in missing.stderr
