"""The FID callback inside a tiny training run: it logs values that equal an offline evaluation of the same samples."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from helpers import TINY_RUN, compose_train

from dsr.diffusion.generation import generate_shard
from dsr.lightning.dit_module import DiTModule
from dsr.metrics.inception import InceptionFeatures
from dsr.metrics.reference import load_images
from dsr.metrics.scores import FeatureStats, frechet_distance, inception_score


@pytest.fixture
def reference_npz(tmp_path):
    """32 real 16x16 images of the synthetic set as an ADM-style npz of images (arr_0)."""
    from hydra.utils import instantiate

    data = instantiate(compose_train(TINY_RUN, tmp_path / "ref").data.dataset)
    images = np.stack([(data[i][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for i in range(32)])
    path = tmp_path / "reference.npz"
    np.savez(path, arr_0=images)
    return path


@pytest.mark.slow
def test_fid_callback_logs_the_offline_metrics(run_train, inception_weights, reference_npz, tmp_path):
    fid = [
        "callbacks.fid.every_n_steps=3",
        "callbacks.fid.num_samples=12",
        "callbacks.fid.batch_size=8",
        f"evaluation.reference={reference_npz}",
        f"evaluation.inception_weights={inception_weights}",
        f"callbacks.fid.cache_dir={tmp_path / 'cache'}",
        "trainer.max_steps=3",
    ]
    _, run_dir = run_train([*TINY_RUN, *fid], name="fid")
    rows = list(csv.DictReader(open(run_dir / "logs" / "metrics.csv")))
    logged = [r for r in rows if r.get("fid/fid")]
    assert len(logged) == 1 and int(logged[0]["step"]) == 2  # Lightning logs step 3's metrics at index 2
    fid_logged, is_logged = float(logged[0]["fid/fid"]), float(logged[0]["fid/inception_score"])
    assert math.isfinite(fid_logged) and fid_logged > 0
    assert (run_dir / "samples" / "fid_step_0000003.png").is_file()

    # Offline: the same 12 samples (seeded per index) from the final EMA weights, scored with dsr.evaluate.
    module = DiTModule.from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    images, labels = generate_shard(module, np.arange(12), num_classes=4, seed=0, batch_size=5)
    assert np.bincount(labels).tolist() == [3, 3, 3, 3]
    extractor = InceptionFeatures(inception_weights)
    pool, logits = extractor.extract(images)
    ref_pool, _ = extractor.extract(load_images(reference_npz))
    expected_fid = frechet_distance(FeatureStats.from_features(pool), FeatureStats.from_features(ref_pool))
    assert fid_logged == pytest.approx(expected_fid, rel=1e-4)
    assert is_logged == pytest.approx(inception_score(logits, splits=10)[0], rel=1e-4)


def test_fid_callback_checks_its_inputs_at_start_up(tmp_path, inception_weights, monkeypatch):
    from dsr.train import train

    monkeypatch.delenv("DSR_FID_REFERENCE", raising=False)
    cfg = compose_train([*TINY_RUN, "callbacks.fid.every_n_steps=3"], tmp_path / "a")
    with pytest.raises(ValueError, match="evaluation.reference"):
        train(cfg)
    monkeypatch.delenv("DSR_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    cfg = compose_train(
        [*TINY_RUN, "callbacks.fid.every_n_steps=3", f"evaluation.reference={inception_weights}"], tmp_path / "b"
    )
    with pytest.raises(FileNotFoundError, match="evaluation.inception_weights"):
        train(cfg)
    assert not (tmp_path / "b" / "checkpoints").exists()  # failed before any training step
