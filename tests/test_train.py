"""End-to-end: the real entry point on tiny configs (CLI, resume, accumulation, learning, errors)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_RUN, compose_train
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def last_checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_cli_runs_through_hydra_and_writes_its_outputs(tmp_path):
    run_dir = tmp_path / "cli run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "dsr.train", *TINY_RUN, "backbone.hidden_size=48", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    grid = run_dir / "samples" / "final.png"
    metrics = run_dir / "logs" / "metrics.csv"
    for path in (ckpt, grid, metrics):
        assert path.is_file(), path
        assert str(path) in proc.stdout  # the run tells the user where its outputs are
    # The override reached the model, and the checkpoint carries the resolved config.
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["dsr"]["config"]["backbone"]["hidden_size"] == 48
    assert state["state_dict"]["backbone.x_embedder.proj.weight"].shape[0] == 48
    assert state["global_step"] == 6
    # One row per class (4), `per_class` (2) columns of 16x16 images with 1-px padding.
    assert Image.open(grid).size == (2 * 17 + 1, 4 * 17 + 1)
    header = metrics.read_text().splitlines()[0]
    assert "train/loss" in header and "train/grad_norm" in header
    assert "registers add" in proc.stderr + proc.stdout  # the overhead report


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(run_train):
    common = [
        *TINY_RUN,
        "trainer.deterministic=true",
        "callbacks.checkpoint.every_n_train_steps=2",
        "callbacks.sample_grid.every_n_steps=0",
        "module.ema_decays=[0.9,0.99]",  # every EMA is saved and restored
    ]
    # 128 samples / 16 per batch = 8 steps an epoch: stop mid-way through the second epoch (the last checkpoint
    # is step 10, written again at 11), then resume with the same command across the next epoch boundary to 20.
    _, straight_dir = run_train([*common, "trainer.max_steps=20"], name="straight")
    _, resumed_dir = run_train([*common, "trainer.max_steps=11"], name="interrupted")
    assert last_checkpoint(resumed_dir)["global_step"] == 11
    run_train([*common, "trainer.max_steps=20"], name="interrupted")
    straight, resumed = last_checkpoint(straight_dir), last_checkpoint(resumed_dir)
    assert straight["global_step"] == resumed["global_step"] == 20
    assert straight["state_dict"].keys() == resumed["state_dict"].keys()
    assert any(k.startswith("ema.averages.1.") for k in straight["state_dict"])
    assert straight["dsr"]["ema_decays"] == resumed["dsr"]["ema_decays"] == [0.9, 0.99]
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    assert straight["lr_schedulers"][0]["last_epoch"] == resumed["lr_schedulers"][0]["last_epoch"] == 20


def test_gradient_accumulation_equals_the_large_batch(run_train):
    """16 images in one batch, or 2 accumulated micro-batches of 8: the same optimizer steps."""
    common = [
        *TINY_RUN,
        "trainer.deterministic=true",
        "trainer.max_steps=4",
        "callbacks.sample_grid.every_n_steps=0",
    ]
    _, one = run_train(common, name="one")
    _, two = run_train([*common, "data.micro_batch_size=8"], name="two")
    a, b = last_checkpoint(one), last_checkpoint(two)
    assert a["global_step"] == b["global_step"] == 4
    batches = [s["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"] for s in (a, b)]
    assert batches == [4, 8]  # the second run really took two micro-batches per step
    for key, value in a["state_dict"].items():
        if value.is_floating_point():
            torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    # ... and not trivially: the weights moved.
    assert not torch.equal(
        a["state_dict"]["backbone.final_layer.linear.weight"],
        torch.zeros_like(a["state_dict"]["backbone.final_layer.linear.weight"]),
    )


def test_missing_imagenet_is_a_clear_error_at_start_up(tmp_path, monkeypatch):
    from dsr.train import train

    monkeypatch.delenv("IMAGENET_TRAIN_DIR", raising=False)
    cfg = compose_train(["data=imagenet", "backbone=dit_tiny", "trainer.accelerator=cpu"], tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="data.dataset.root"):
        train(cfg)
    missing = tmp_path / "no-such-dir"
    cfg = compose_train(["data=imagenet", f"data.dataset.root={missing}", "trainer.accelerator=cpu"], tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=str(missing)):
        train(cfg)


def test_bf16_mixed_precision_trains(run_train):
    """The bf16 autocast path: finite loss, fp32 master weights and EMA, loss error computed in fp32."""
    metrics, run_dir = run_train([*TINY_RUN, "trainer.precision=bf16-mixed"], name="bf16")
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    state = last_checkpoint(run_dir)["state_dict"]
    assert state["backbone.blocks.0.attn.qkv.weight"].dtype == torch.float32
    assert state["ema.averages.0.blocks.0.attn.qkv.weight"].dtype == torch.float32
    assert not torch.equal(state["backbone.blocks.0.attn.qkv.weight"], state["ema.averages.0.blocks.0.attn.qkv.weight"])


class _RunsCode:
    """Unpickling this touches a marker file: the code a swapped-in checkpoint could run."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def test_a_resume_never_runs_code_from_the_checkpoint(run_train, tmp_path):
    common = [*TINY_RUN, "trainer.max_steps=2", "callbacks.sample_grid.every_n_steps=0"]
    _, run_dir = run_train(common)
    last = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    marker = tmp_path / "ran"
    torch.save({**checkpoint, "planted": _RunsCode(marker)}, last)
    with pytest.raises(ValueError, match=r"resume=.*last.ckpt holds Python objects other than tensors"):
        run_train([*TINY_RUN, "trainer.max_steps=4", "callbacks.sample_grid.every_n_steps=0"])
    assert not marker.exists()


def test_a_resume_refuses_a_changed_experiment_and_allows_a_longer_run(run_train, caplog):
    common = [*TINY_RUN, "trainer.max_steps=2", "callbacks.sample_grid.every_n_steps=0"]
    _, run_dir = run_train(common, name="run")
    with pytest.raises(ValueError, match="resume=force") as refused:
        run_train([*common, "transport.logit_mean=0.5", "module.optimizer.lr=0.5"], name="run")
    message = str(refused.value)
    assert "transport.logit_mean: 0.0 -> 0.5" in message and "module.optimizer.lr: 0.001 -> 0.5" in message
    assert "module.transport.logit_mean: 0.0 -> 0.5" in message  # the module's copy of the node too
    assert last_checkpoint(run_dir)["global_step"] == 2  # nothing was touched

    with caplog.at_level("INFO", logger="dsr.train"):
        run_train([*TINY_RUN, "trainer.max_steps=3", "callbacks.sample_grid.every_n_steps=0"], name="run")
    assert "resuming with a changed setting: trainer.max_steps: 2 -> 3" in caplog.text
    assert last_checkpoint(run_dir)["global_step"] == 3

    # A checkpoint written before a setting existed resumes: the missing key counts as unchanged.
    checkpoint = last_checkpoint(run_dir)
    del checkpoint["dsr"]["config"]["module"]["ema_decays"]
    torch.save(checkpoint, run_dir / "checkpoints" / "last.ckpt")
    run_train([*TINY_RUN, "trainer.max_steps=4", "callbacks.sample_grid.every_n_steps=0"], name="run")
    assert last_checkpoint(run_dir)["global_step"] == 4
    # resume=force takes the changed experiment, with a warning per change.
    with caplog.at_level("WARNING", logger="dsr.train"):
        run_train([*TINY_RUN, "trainer.max_steps=5", "callbacks.sample_grid.every_n_steps=0", "resume=force",
                   "transport.logit_mean=0.5"], name="run")  # fmt: skip
    assert "resume=force: resuming with a changed setting: transport.logit_mean: 0.0 -> 0.5" in caplog.text
    assert last_checkpoint(run_dir)["global_step"] == 5
