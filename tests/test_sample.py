"""Sample generation (`dsr.sample`) from a tiny trained checkpoint: determinism per index, resumable shards,
the ADM npz layout and the Hydra CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CONF_DIR, TINY_RUN, compose_train, perturb_checkpoint
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

import dsr.sample as sample
from dsr.diffusion import generation
from dsr.utils.images import to_uint8

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 4  # TINY_RUN's data.num_classes
FAST = ["sampler.solver.num_steps=3", "accelerator=cpu", "devices=1"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny model trained for a few steps; its last checkpoint is shared by every test here."""
    from dsr.train import train

    run_dir = tmp_path_factory.mktemp("train") / "run"
    train(compose_train([*TINY_RUN, "trainer.max_steps=3", "callbacks.sample_grid.every_n_steps=1000"], run_dir))
    GlobalHydra.instance().clear()
    return perturb_checkpoint(run_dir / "checkpoints" / "last.ckpt")


def compose_sample(overrides: list[str]) -> DictConfig:
    """The config `python -m dsr.sample <overrides>` would run (Hydra's choices included)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="sample"):
        cfg = compose("sample", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def run_sample(ckpt: Path, out_dir: Path | None, *overrides: str) -> Path:
    out = [f"output={out_dir}"] if out_dir is not None else []
    return sample.run(compose_sample([f"ckpt={ckpt}", *FAST, *out, *overrides]))


def load(npz: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(npz) as data:
        return data["arr_0"], data["arr_1"]


def loaded_module(ckpt: Path, cfg: DictConfig):
    from dsr.lightning.dit_module import DiTModule

    module = DiTModule.from_checkpoint(ckpt)
    module.solver = instantiate(cfg.sampler.solver)
    module.guidance = instantiate(cfg.sampler.guidance)
    return module


def test_shards_labels_and_noise_are_functions_of_the_index():
    assert generation.shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert generation.shard_ranges(8, 4) == [(0, 4), (4, 8)]
    assert generation.shard_ranges(1, 1000) == [(0, 1)]
    with pytest.raises(ValueError, match="num_samples"):
        generation.shard_ranges(0, 4)
    np.testing.assert_array_equal(generation.labels_for([0, 1, 5, 999, 1000], 1000), [0, 1, 5, 999, 0])
    assert generation.labels_for(range(50_000), 1000).dtype == np.int64
    assert (np.bincount(generation.labels_for(range(50_000), 1000)) == 50).all()

    batch = generation.noise_for([3, 7, 11], (2, 4, 4), seed=5)
    assert batch.shape == (3, 2, 4, 4) and batch.dtype == torch.float32
    assert torch.equal(batch[1], generation.noise_for([7], (2, 4, 4), seed=5)[0])
    assert not torch.equal(batch[0], batch[1])
    assert not torch.equal(batch[1], generation.noise_for([7], (2, 4, 4), seed=6)[0])

    images = torch.tensor([0.0, 0.5 / 255, 0.51 / 255, 1.0, 1.2, -0.1]).reshape(1, 3, 1, 2)
    # Channels [0, .5], [.51, 255], [306, -25.5] (in units of 1/255) -> pixels (R, G, B) in HWC order.
    np.testing.assert_array_equal(to_uint8(images), [[[[0, 1, 255], [0, 255, 0]]]])


@pytest.mark.parametrize(
    "sampler_overrides",
    [["sampler=euler"], ["sampler=sde", "sampler.guidance.scale=2.0"]],
    ids=["euler", "sde-cfg"],
)
def test_image_is_same_alone_in_any_batch_and_layout(ckpt, tmp_path, sampler_overrides):
    n = 10
    npz = run_sample(ckpt, tmp_path / "a", f"num_samples={n}", "batch_size=3", "shard_size=4", *sampler_overrides)
    images, labels = load(npz)
    assert images.dtype == np.uint8 and images.shape == (n, 16, 16, 3)
    assert labels.dtype == np.int64 and labels.shape == (n,)
    np.testing.assert_array_equal(labels, np.arange(n) % NUM_CLASSES)
    assert np.bincount(labels).tolist() == [3, 3, 2, 2]
    # Real images, different per index.
    assert images.std() > 5 and len({img.tobytes() for img in images}) == n

    # Another batch size (and shard size) gives the same bytes.
    other = run_sample(ckpt, tmp_path / "b", f"num_samples={n}", "batch_size=7", "shard_size=5", *sampler_overrides)
    np.testing.assert_array_equal(load(other)[0], images)

    # Index i alone through the library function, as if for a huge run, equals the run's image i.
    cfg = compose_sample([f"ckpt={ckpt}", *FAST, "num_samples=50000", *sampler_overrides])
    module = loaded_module(ckpt, cfg)
    for i in (0, 5, 9):
        alone, label = generation.generate_shard(module, [i], num_classes=NUM_CLASSES, seed=0, batch_size=1)
        assert label.tolist() == [i % NUM_CLASSES]
        np.testing.assert_array_equal(alone[0], images[i])
    # A batch of scattered indices too.
    picked, _ = generation.generate_shard(module, [9, 2, 6], num_classes=NUM_CLASSES, seed=0, batch_size=8)
    np.testing.assert_array_equal(picked, images[[9, 2, 6]])
    # Another seed changes the images.
    reseeded, _ = generation.generate_shard(module, [5], num_classes=NUM_CLASSES, seed=1, batch_size=1)
    assert not np.array_equal(reseeded[0], images[5])


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory) -> tuple[np.ndarray, np.ndarray]:
    """An uninterrupted run of the resume tests' configuration."""
    out = tmp_path_factory.mktemp("reference")
    return load(run_sample(ckpt, out, "num_samples=11", "batch_size=2", "shard_size=3"))


def counting_generate(monkeypatch, fail_after: int | None = None) -> list[list[int]]:
    """Record the indices of every generate_shard call; raise on the call after `fail_after` calls."""
    calls: list[list[int]] = []
    real = generation.generate_shard  # dsr.sample imports it from there when a run starts

    def wrapped(module, indices, **kwargs):
        if fail_after is not None and len(calls) >= fail_after:
            raise RuntimeError("simulated crash")
        calls.append([int(i) for i in indices])
        return real(module, indices, **kwargs)

    monkeypatch.setattr(generation, "generate_shard", wrapped)
    return calls


def test_resume_skips_finished_shards(ckpt, tmp_path, monkeypatch, reference):
    out = tmp_path / "resume"
    config = ["num_samples=11", "batch_size=2", "shard_size=3"]
    npz = run_sample(ckpt, out, *config)
    first = load(npz)
    np.testing.assert_array_equal(first[0], reference[0])
    np.testing.assert_array_equal(first[1], reference[1])
    shards = sorted((out / "shards").glob("shard_*.npz"))
    assert [p.name for p in shards] == [f"shard_{s:05d}.npz" for s in range(4)]
    with np.load(shards[3]) as last:
        assert last["images"].shape == (2, 16, 16, 3)
        np.testing.assert_array_equal(last["indices"], [9, 10])
        np.testing.assert_array_equal(last["labels"], [1, 2])

    mtimes = {p.name: p.stat().st_mtime_ns for p in shards}
    shards[1].unlink()
    shards[3].unlink()
    npz.unlink()
    stale = out / "shards" / "shard_00001.npz.tmp-12345"
    stale.write_bytes(b"half a shard")

    calls = counting_generate(monkeypatch)
    again = run_sample(ckpt, out, *config)
    assert calls == [[3, 4, 5], [9, 10]]
    assert not stale.exists()
    for name in ("shard_00000.npz", "shard_00002.npz"):
        assert (out / "shards" / name).stat().st_mtime_ns == mtimes[name]
    second = load(again)
    np.testing.assert_array_equal(second[0], first[0])
    np.testing.assert_array_equal(second[1], first[1])
    assert (out / "sample_config.yaml").is_file()

    # Nothing left to do: no generation at all, same result.
    calls.clear()
    np.testing.assert_array_equal(load(run_sample(ckpt, out, *config))[0], first[0])
    assert calls == []

    # Shards made with other settings are not mixed in.
    with pytest.raises(ValueError, match="seed"):
        run_sample(ckpt, out, *config, "seed=1")


def test_crash_then_rerun_equals_uninterrupted(ckpt, tmp_path, monkeypatch, reference):
    out = tmp_path / "crash"
    config = ["num_samples=11", "batch_size=2", "shard_size=3"]
    counting_generate(monkeypatch, fail_after=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_sample(ckpt, out, *config)
    assert [p.name for p in (out / "shards").glob("shard_*.npz")] == ["shard_00000.npz"]
    assert not (out / "samples.npz").exists()

    monkeypatch.undo()
    calls = counting_generate(monkeypatch)
    images, labels = load(run_sample(ckpt, out, *config))
    assert calls == [[3, 4, 5], [6, 7, 8], [9, 10]]
    np.testing.assert_array_equal(images, reference[0])
    np.testing.assert_array_equal(labels, reference[1])


def test_default_out_dir_pngs_and_config(ckpt):
    npz = run_sample(ckpt, None, "num_samples=5", "shard_size=2", "save_png=true", "sampler=heun")
    expected = ckpt.parent.parent / "samples" / "last-heun-cfg1-n5-seed0"
    assert npz == expected / "samples.npz" and npz.is_file()
    images, _ = load(npz)
    pngs = sorted((expected / "png").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(5)]
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(pngs[3])), images[3])
    config = (expected / "sample_config.yaml").read_text()
    assert "method: heun" in config and "num_samples: 5" in config and f"ckpt: {ckpt}" in config


def test_refuses_bad_settings(ckpt, tmp_path):
    with pytest.raises(ValueError, match="num_samples"):
        run_sample(ckpt, tmp_path, "num_samples=0")
    with pytest.raises(ValueError, match="batch_size"):
        run_sample(ckpt, tmp_path, "batch_size=0")
    with pytest.raises(ValueError, match="sampler.precision"):
        run_sample(ckpt, tmp_path, "sampler.precision=fp8")
    with pytest.raises(ValueError, match="num_classes"):
        run_sample(ckpt, tmp_path, "num_samples=2", "num_classes=5")
    with pytest.raises(ValueError, match="ckpt is required"):
        sample.run(compose_sample([f"output={tmp_path}"]))
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(FileNotFoundError, match="ckpt=") as err:
        run_sample(missing, tmp_path)
    assert str(missing) in str(err.value)


@pytest.mark.slow
def test_cli(ckpt, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "cli"
    args = [sys.executable, "-m", "dsr.sample", f"ckpt={ckpt}", "num_samples=10", "batch_size=4", "shard_size=4"]
    args += ["sampler.solver.num_steps=3", f"output={out}", "accelerator=cpu"]
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert str(out / "samples.npz") in result.stdout
    images, labels = load(out / "samples.npz")
    assert images.shape == (10, 16, 16, 3) and labels.tolist() == [i % NUM_CLASSES for i in range(10)]
    assert not (tmp_path / "outputs").exists() and not (tmp_path / ".hydra").exists()

    missing = tmp_path / "missing.ckpt"
    bad = subprocess.run(
        [sys.executable, "-m", "dsr.sample", f"ckpt={missing}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0
    assert "ckpt=" in bad.stderr + bad.stdout and str(missing) in bad.stderr + bad.stdout
