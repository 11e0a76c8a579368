"""Faults a long run meets, injected: non-finite steps (skipped, counted, and a stop after too many in a row), failed
checkpoint writes, bad files, kills at seeded points and preemption signals (locally and through submitit)."""

from __future__ import annotations

import csv
import json
import math

import lightning as L
import pytest
import torch
from helpers import TINY_RUN

from dsr.lightning.training import NonFiniteError

COMMON = [*TINY_RUN, "callbacks.sample_grid.every_n_steps=0", "trainer.deterministic=true"]


class PlantNaN(L.Callback):
    """A NaN in one gradient of the backbone at the given optimizer steps (after the backward, before the step)."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step in self.steps:
            pl_module.backbone.final_layer.linear.weight.grad[0, 0] = float("nan")


class Snapshot(L.Callback):
    """The weights, optimizer state and EMA before and after one optimizer step."""

    def __init__(self, step):
        self.step, self.before, self.after = step, None, None

    @staticmethod
    def state(trainer, pl_module):
        optimizer = trainer.optimizers[0].state_dict()["state"]
        return ({k: v.clone() for k, v in pl_module.backbone.state_dict().items()},
                {k: {n: t.clone() for n, t in s.items()} for k, s in optimizer.items()},
                {k: v.clone() for k, v in pl_module.ema.state_dict().items() if k != "n_averaged"})  # fmt: skip

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.before = self.state(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step + 1:
            self.after = self.state(trainer, pl_module)


def fit(overrides, run_dir, callbacks=()):
    from helpers import compose_train

    from dsr import train as train_command

    cfg = compose_train(overrides, run_dir)
    original = train_command.instantiate

    def with_callbacks(node, *args, **kwargs):  # the trainer gets the planted faults beside the configured callbacks
        if kwargs.get("callbacks") is not None:
            kwargs["callbacks"] = [*kwargs["callbacks"], *callbacks]
        return original(node, *args, **kwargs)

    train_command.instantiate = with_callbacks
    try:
        return train_command.train(cfg)
    finally:
        train_command.instantiate = original


@pytest.mark.parametrize("fused", [True, False], ids=["fused-on-device", "unfused-on-host"])
def test_a_nonfinite_step_is_skipped_and_touches_nothing(tmp_path, fused):
    snapshot = Snapshot(3)
    overrides = [*COMMON, f"module.optimizer.fused={str(fused).lower()}", "trainer.max_steps=6"]
    fit(overrides, tmp_path, [PlantNaN({3}), snapshot])
    (w0, opt0, ema0), (w1, opt1, ema1) = snapshot.before, snapshot.after
    for before, after in ((w0, w1), (ema0, ema1)):
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for key in opt0:
        assert all(torch.equal(opt0[key][n], opt1[key][n]) for n in opt0[key]), key  # moments and step count
    rows = list(csv.DictReader(open(tmp_path / "logs" / "metrics.csv")))
    skipped = {int(r["step"]): float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")}
    assert skipped[2] == 0 and skipped[3] == 1 and skipped[5] == 1  # logged at step index k for optimizer step k
    assert math.isnan(float(next(r["train/grad_norm"] for r in rows if r.get("train/grad_norm") and r["step"] == "3")))
    final = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == 6 and all(torch.isfinite(v).all() for v in final["state_dict"].values()
                                             if v.is_floating_point())  # fmt: skip


def test_consecutive_nonfinite_steps_stop_the_run_with_a_diagnosis(tmp_path):
    from torch.utils.data import DistributedSampler

    overrides = [*COMMON, "module.nonfinite_patience=3", "trainer.max_steps=20",
                 "callbacks.checkpoint.every_n_train_steps=2"]  # fmt: skip
    with pytest.raises(NonFiniteError, match=r"3 consecutive optimizer steps .* from step 2") as stopped:
        fit(overrides, tmp_path, [PlantNaN(range(2, 100))])
    diagnosis_path = tmp_path / "nonfinite_step_00000002.json"
    assert str(diagnosis_path) in str(stopped.value)
    diagnosis = json.loads(diagnosis_path.read_text())
    assert diagnosis["first_step_of_run"] == 2 and diagnosis["longest_run"] == 3 and diagnosis["skipped_steps"] == 3
    norms = diagnosis["block_grad_norms"]
    assert math.isnan(norms["final_layer"]) and all(math.isfinite(v) for k, v in norms.items() if k != "final_layer")
    assert set(norms) >= {"blocks.0", "blocks.1", "x_embedder", "t_embedder", "y_embedder"}
    # The batch of step 2: the seeded sampler's order of epoch 0 (128 images, batches of 16), its third batch.
    from helpers import compose_train
    from hydra.utils import instantiate

    dataset = instantiate(compose_train(COMMON, tmp_path / "x").data.dataset)
    order = list(DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True))
    assert diagnosis["sample_indices"] == order[32:48]
    # The last checkpoint (step 2, before the bad steps could touch anything) is intact and loadable.
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] in (2, 4) and all(torch.isfinite(v).all() for v in last["state_dict"].values()
                                                 if v.is_floating_point())  # fmt: skip


def test_the_skip_counters_survive_a_resume(tmp_path):
    overrides = [*COMMON, "module.nonfinite_patience=3", "callbacks.checkpoint.every_n_train_steps=5"]
    fit([*overrides, "trainer.max_steps=5"], tmp_path, [PlantNaN([3, 4])])  # two skips in a row, then stop
    counters = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["dsr"]["nonfinite"]
    assert (counters["skipped"], counters["streak"], counters["first_step"]) == (2, 2, 3)
    # Resumed, one more bad step makes three in a row: the run of skips started before the resume.
    with pytest.raises(NonFiniteError, match=r"3 consecutive optimizer steps .* from step 3"):
        fit([*overrides, "trainer.max_steps=10"], tmp_path, [PlantNaN([5])])


# ------------------------------------------------------------------------------------------------------------------
# write failures and bad files
# ------------------------------------------------------------------------------------------------------------------


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_names_the_file(tmp_path, monkeypatch):
    from dsr.lightning import checkpoint_io

    saves, save = [], torch.save

    def disk_fills_up(obj, f, *args, **kwargs):  # the second last.ckpt (step 4): part of the file, then a full disk
        if "last.ckpt" in f.name:
            saves.append(1)
            if len(saves) == 2:
                f.write(b"PK\x03\x04 partial")
                raise OSError(28, "No space left on device")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_io.torch, "save", disk_fills_up)
    overrides = [*COMMON, "trainer.max_steps=6", "callbacks.checkpoint.every_n_train_steps=2",
                 "callbacks.checkpoint.save_top_k=1"]  # fmt: skip
    with pytest.raises(
        checkpoint_io.CheckpointWriteError,
        match=rf"{tmp_path}/checkpoints/last.ckpt: .*No space left on device; the previous last.ckpt is intact",
    ):
        fit(overrides, tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    kept = torch.load(last, map_location="cpu", weights_only=True)  # loadable: the step-2 checkpoint
    assert kept["global_step"] == 2
    assert not list((tmp_path / "checkpoints").glob("*.tmp-*"))  # no half-written file left behind


def test_a_checkpoint_save_removes_the_half_written_checkpoints_a_killed_run_left(tmp_path):
    from dsr.lightning.checkpoint_io import AtomicCheckpointIO

    stale = [tmp_path / "last.ckpt.tmp-12345", tmp_path / "epoch=0-step=40.ckpt.tmp-12345"]
    for path in stale:
        path.write_bytes(b"PK\x03\x04 partial")
    other = tmp_path / "notes.txt.tmp-12345"  # not a checkpoint's: left alone
    other.write_bytes(b"")
    AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(3)}, tmp_path / "epoch=0-step=60.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0-step=60.ckpt", "notes.txt.tmp-12345"]
    assert AtomicCheckpointIO().load_checkpoint(tmp_path / "epoch=0-step=60.ckpt")["step"] == 3


def _truncated(path, into):
    data = path.read_bytes()
    into.write_bytes(data[: len(data) // 2])
    return into


def test_bad_files_fail_with_one_line_naming_the_file(tmp_path):
    import numpy as np

    from dsr.data.latents import CachedLatents, latents_path
    from dsr.encoders.rae import load_stats
    from dsr.lightning.dit_module import DiTModule
    from dsr.utils.files import load_tensors

    torch.save({"mean": torch.zeros(4, 2, 2), "var": torch.ones(4, 2, 2)}, tmp_path / "stats.pt")
    bad_stats = _truncated(tmp_path / "stats.pt", tmp_path / "stats_cut.pt")
    with pytest.raises(ValueError, match=r"^encoder.stats=.*stats_cut.pt is not a readable torch file: truncated"):
        load_stats(bad_stats, (4, 2, 2))
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    for name in ("empty.pt", "notes.pt"):
        with pytest.raises(ValueError, match=f"^init_from=.*{name} is not a readable torch file"):
            load_tensors(tmp_path / name, "init_from")
    with pytest.raises(ValueError, match="is a folder, not a file"):
        load_tensors(tmp_path, "ckpt")
    # A foreign checkpoint (statistics passed as a model) and a truncated one.
    with pytest.raises(ValueError, match="holds no dsr config"):
        DiTModule.from_checkpoint(tmp_path / "stats.pt")
    with pytest.raises(ValueError, match="^ckpt=.*stats_cut.pt is not a readable torch file"):
        DiTModule.from_checkpoint(bad_stats)
    # A latent cache with a truncated shard and one written for another latent shape: refused at construction.
    root = tmp_path / "cache"
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps({"num_samples": 4, "shard_size": 2, "views": ["plain"],
                                                    "latent_shape": [4, 2, 2]}))  # fmt: skip
    for shard in range(2):
        np.save(latents_path(root, shard), np.zeros((2, 1, 4, 2, 2), dtype=np.float16))
        np.save(root / f"labels_{shard:05d}.npy", np.zeros(2, dtype=np.int64))
    assert len(CachedLatents(str(root))) == 4
    _truncated(latents_path(root, 1), latents_path(root, 1))
    with pytest.raises(ValueError, match=r"latents_00001.npy is truncated or damaged"):
        CachedLatents(str(root))
    np.save(latents_path(root, 1), np.zeros((2, 1, 8, 2, 2), dtype=np.float16))
    with pytest.raises(ValueError, match=r"latents_00001.npy holds an array of shape \(2, 1, 8, 2, 2\)"):
        CachedLatents(str(root))


@pytest.mark.slow
def test_a_bad_checkpoint_through_a_command_is_one_line_and_exit_status_2(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    torch.save({"mean": torch.zeros(4, 2, 2), "var": torch.ones(4, 2, 2)}, tmp_path / "stats.pt")
    bad = _truncated(tmp_path / "stats.pt", tmp_path / "cut.ckpt")
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "dsr.sample", f"ckpt={bad}", "accelerator=cpu"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(repo)})  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: ckpt={bad} is not a readable torch file")


# ------------------------------------------------------------------------------------------------------------------
# kills at seeded random points: the same command finishes with the uninterrupted result
# ------------------------------------------------------------------------------------------------------------------


def _run_killed(command, cwd, outputs, kill_after, env):
    """Start `command`, SIGKILL it once `kill_after` files match `outputs` (a glob under cwd), rerun it to the end."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(list(cwd.glob(outputs))) < kill_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "finished before the kill: nothing was interrupted"
    done = len(list(cwd.glob(outputs)))
    subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True, timeout=300)
    return done


def _env():
    import os
    from pathlib import Path

    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _killed_and_straight(command, output_key, cwd, outputs, kill_after):
    """`command` with `<output_key>=cwd/killed` killed once `kill_after` files match `outputs` and rerun to the end
    (`_run_killed`), then with `<output_key>=cwd/straight` uninterrupted; returns how many outputs the kill left."""
    import subprocess

    done = _run_killed([*command, f"{output_key}={cwd / 'killed'}"], cwd, outputs, kill_after, _env())
    subprocess.run([*command, f"{output_key}={cwd / 'straight'}"], cwd=cwd, env=_env(), check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    return done


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_a_killed_sample_run_reruns_to_the_same_npz(tmp_path, seed):
    import random
    import sys

    import numpy as np

    fit([*COMMON, "trainer.max_steps=2"], tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    args = [f"ckpt={ckpt}", "num_samples=48", "shard_size=4", "batch_size=2", "sampler.solver.num_steps=20",
            "accelerator=cpu", "devices=1"]  # fmt: skip
    kill_after = random.Random(seed).randint(1, 8)  # of 12 shards
    done = _killed_and_straight([sys.executable, "-m", "dsr.sample", *args], "output", tmp_path,
                                "killed/shards/shard_*.npz", kill_after)  # fmt: skip
    assert kill_after <= done < 12
    with np.load(tmp_path / "killed" / "samples.npz") as a, np.load(tmp_path / "straight" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


def _tar_members(path):
    import tarfile

    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


@pytest.mark.slow
def test_a_killed_make_shards_run_reruns_to_the_same_shards(tmp_path):
    import random
    import sys

    from PIL import Image

    source = tmp_path / "tree"
    generator = random.Random(0)
    for c in range(4):
        (source / f"n0{c}").mkdir(parents=True)
        for i in range(10):
            colour = tuple(generator.randrange(256) for _ in range(3))
            Image.new("RGB", (24 + i, 20 + c), colour).save(source / f"n0{c}" / f"{i}.png")
    args = [f"source={source}", "image_size=16", "samples_per_shard=2", "num_workers=0"]
    command = [sys.executable, "-m", "dsr.data.make_shards", *args]
    done = _killed_and_straight(command, "output", tmp_path, "killed/shard-*.tar", random.Random(2).randint(2, 12))
    assert done < 20
    names = sorted(p.name for p in (tmp_path / "straight").glob("shard-*.tar"))
    assert len(names) == 20 and names == sorted(p.name for p in (tmp_path / "killed").glob("shard-*.tar"))
    for name in names:
        assert _tar_members(tmp_path / "killed" / name) == _tar_members(tmp_path / "straight" / name), name
    killed_manifest = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    straight_manifest = json.loads((tmp_path / "straight" / "manifest.json").read_text())
    assert killed_manifest["shards"] == straight_manifest["shards"]


# ------------------------------------------------------------------------------------------------------------------
# preemption: SIGUSR2 / SIGTERM write last.ckpt at the next step boundary; the same command resumes exactly
# ------------------------------------------------------------------------------------------------------------------


class SendSignal(L.Callback):
    """Sends `signum` to this process once, at the end of the given optimizer step."""

    def __init__(self, step, signum):
        self.step, self.signum, self.sent = step, signum, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import os

        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_a_signal_writes_last_ckpt_at_the_next_step_and_the_same_command_resumes_exactly(tmp_path):
    import signal

    from dsr.lightning.callbacks import Preempted

    common = [*COMMON, "trainer.max_steps=7", "callbacks.checkpoint.every_n_train_steps=100"]
    fit(common, tmp_path / "straight")
    straight = _weights(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    before = (signal.SIGUSR2, signal.SIGTERM)
    for signum, step in ((signal.SIGUSR2, 2), (signal.SIGTERM, 4)):
        run_dir = tmp_path / signal.Signals(signum).name
        with pytest.raises(Preempted) as stopped:
            fit(common, run_dir, callbacks=[SendSignal(step, signum)])
        assert stopped.value.code == 0  # a clean exit, not a failure
        # Sent after this step's checks: written at the next step boundary, and nothing else ran past it.
        interrupted = _weights(run_dir / "checkpoints" / "last.ckpt")
        assert interrupted["global_step"] == step + 1
        assert not (run_dir / "samples" / "final.png").exists()  # no end-of-training work on the way out
        leftover = [
            h for h in map(signal.getsignal, before) if type(getattr(h, "__self__", None)).__name__ == "Preemption"
        ]
        assert not leftover  # the handlers found at the start of training are back
        fit(common, run_dir)  # the same command resumes
        resumed = _weights(run_dir / "checkpoints" / "last.ckpt")
        assert resumed["global_step"] == 7
        for key, value in straight["state_dict"].items():
            assert torch.equal(value, resumed["state_dict"][key]), key


def _children(pid):
    """The process ids whose parent is `pid` (from /proc)."""
    from pathlib import Path

    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _wait_for(path, alive, timeout=240):
    import time

    deadline = time.time() + timeout
    while not path.exists() and alive() and time.time() < deadline:
        time.sleep(0.02)
    assert path.exists(), f"{path} never appeared"


@pytest.mark.slow
def test_real_preemption_signals_locally_and_through_submitit_resume_to_the_uninterrupted_weights(
    tmp_path, monkeypatch
):
    """A real SIGTERM to `python -m dsr.train` (a clean exit after last.ckpt), and submitit's own SIGUSR2 hand-over
    with its local executor (last.ckpt, then submitit requeues the job, which resumes): both end where an uninterrupted
    run ends."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import submitit

    args = [*COMMON, "trainer.accelerator=cpu", "trainer.max_steps=40", "callbacks.checkpoint.every_n_train_steps=5"]
    fit(args, tmp_path / "straight")
    straight = _weights(tmp_path / "straight" / "checkpoints" / "last.ckpt")

    def same_as_straight(run_dir):
        final = _weights(run_dir / "checkpoints" / "last.ckpt")
        assert final["global_step"] == 40
        for key, value in straight["state_dict"].items():
            assert torch.equal(value, final["state_dict"][key]), key

    # Locally: the process writes last.ckpt at the next step boundary and exits with status 0.
    local = tmp_path / "local"
    command = [sys.executable, "-m", "dsr.train", *args, f"hydra.run.dir={local}"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    _wait_for(local / "checkpoints" / "step_00000005.ckpt", lambda: proc.poll() is None)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-2000:]
    assert "SIGTERM received: wrote" in output
    assert 5 <= _weights(local / "checkpoints" / "last.ckpt")["global_step"] < 40
    subprocess.run(command, cwd=tmp_path, env=_env(), check=True, capture_output=True, timeout=300)
    same_as_straight(local)

    # Under submitit: its USR2 handler (checkpoint, requeue) runs after dsr's last.ckpt; the requeued job resumes.
    tests = Path(__file__).resolve().parent
    monkeypatch.setenv("PYTHONPATH", f"{tests.parent}:{tests}")  # the job's own process unpickles TrainJob
    from submitit_job import TrainJob

    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(timeout_min=20)
    job = executor.submit(TrainJob(), args, str(tmp_path / "requeued"))
    controller = job._process
    _wait_for(tmp_path / "requeued" / "checkpoints" / "step_00000005.ckpt", lambda: controller.poll() is None)
    (task,) = _children(controller.pid)
    os.kill(task, signal.SIGUSR2)  # what SLURM sends before the time limit (submitit's signal)
    assert job.result() == 40
    log = job.paths.stdout.read_text() + job.paths.stderr.read_text()
    assert "SIGUSR2 received: wrote" in log and "Requeued job" in log
    assert "Restored all states from the checkpoint" in log  # the requeued run resumed
    same_as_straight(tmp_path / "requeued")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_training_killed_at_a_seeded_point_reruns_to_the_uninterrupted_weights(tmp_path, seed):
    import random
    import sys

    args = [*COMMON, "trainer.accelerator=cpu", "trainer.max_steps=30", "callbacks.checkpoint.every_n_train_steps=3",
            "callbacks.checkpoint.save_top_k=-1"]  # fmt: skip
    fit(args, tmp_path / "straight")
    kill_after = random.Random(seed).randint(1, 8)  # checkpoints (of 10) before the kill
    killed = tmp_path / "killed"
    done = _run_killed([sys.executable, "-m", "dsr.train", *args, f"hydra.run.dir={killed}"], tmp_path,
                       "killed/checkpoints/step_*.ckpt", kill_after, _env())  # fmt: skip
    assert kill_after <= done < 10
    a, b = _weights(killed / "checkpoints" / "last.ckpt"), _weights(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 30
    for key, value in b["state_dict"].items():
        assert torch.equal(value, a["state_dict"][key]), key


@pytest.mark.slow
def test_a_killed_latent_cache_reruns_to_the_same_shards(tmp_path):
    import random
    import sys

    args = ["encoder=tiny", "decoder=tiny", "data=synthetic", "data.dataset.num_samples=1200", "accelerator=cpu",
            "devices=1", "cache.shard_size=8", "cache.batch_size=1", "cache.num_workers=0"]  # fmt: skip
    command = [sys.executable, "-m", "dsr.cache_latents", *args]
    done = _killed_and_straight(command, "cache.output", tmp_path, "killed/latents_*.npy",
                                random.Random(3).randint(5, 60))  # fmt: skip
    assert done < 150
    names = sorted(p.name for p in (tmp_path / "straight").iterdir())
    assert len(names) == 2 * 150 + 2 and names == sorted(p.name for p in (tmp_path / "killed").iterdir())
    for name in names:
        if name.endswith(".npy"):  # the shards, byte for byte (the manifest and settings name their own folder)
            assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
