"""Scale and operations: W&B offline runs, DDP on CPU, submitit sweeps, crash-and-restart, cluster configs,
torch.compile and the FSDP strategy."""

from __future__ import annotations

import csv
import glob
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_RUN, compose_train
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "WANDB_MODE": "offline"}


def cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "dsr.train", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def csv_column(path: Path, key: str) -> dict[int, float]:
    with open(path) as f:
        return {int(row["step"]): float(row[key]) for row in csv.DictReader(f) if row.get(key)}


# ------------------------------------------------------------------------------------------------------------
# W&B
# ------------------------------------------------------------------------------------------------------------


def wandb_records(path: Path):
    """The protobuf records of a `.wandb` transaction log (a LevelDB-style log: 32 KiB blocks of records with a
    7-byte header each, after a 7-byte file header); wandb ships no reader for it."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        pending += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_holds_metrics_config_and_images(run_train):
    overrides = [*TINY_RUN, "logger=wandb", "callbacks.outlier_monitor.every_n_steps=3"]
    _, run_dir = run_train(overrides, name="wandb")
    (log,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    # wandb's service process finishes writing the log after `wandb.finish()` returns: wait for its exit record.
    deadline = time.time() + 60
    while time.time() < deadline:
        records = list(wandb_records(Path(log)))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.2)
    history: dict[str, list[str]] = {}
    run, config_keys = None, set()
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:
                history.setdefault(item.key or "/".join(item.nested_key), []).append(item.value_json)
        elif kind == "run":
            run = record.run
        elif kind == "config":
            config_keys |= {item.key for item in record.config.update}
    # The run: its id is the run directory's (a restart continues it), grouped by experiment, tagged by choices.
    assert run.run_id == (run_dir / "wandb_run_id").read_text().strip()
    assert run.run_group == "quickstart" and run.display_name == "quickstart"
    assert {"encoder=pixel", "backbone=dit_tiny", "registers=diffusion"} <= set(run.tags)
    assert {"config", "model"} <= config_keys  # the resolved config and the model's size
    # The same losses as the CSV logger recorded, step by step.
    losses = [float(v) for v in history["train/loss"]]
    expected = csv_column(run_dir / "logs" / "metrics.csv", "train/loss")
    np.testing.assert_allclose(losses, [expected[s] for s in sorted(expected)], rtol=1e-6)
    assert len(history["outliers/layer_00/max_median"]) == 2  # steps 3 and 6
    # The images: the final sample grid (the same pixels as samples/final.png) and two outlier plots.
    media = run_dir / "wandb" / Path(log).parent.name / "files" / "media" / "images"
    (grid,) = (media / "samples").glob("grid_*.png")
    logged = np.asarray(Image.open(grid).convert("RGB"), dtype=np.int16)
    saved = np.asarray(Image.open(run_dir / "samples" / "final.png").convert("RGB"), dtype=np.int16)
    np.testing.assert_array_equal(logged, saved)
    assert len(list((media / "outliers").glob("max_median_*.png"))) == 2


# ------------------------------------------------------------------------------------------------------------
# DDP, sweeps, crashes
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_gloo_two_processes_end_with_the_same_weights(tmp_path):
    dump = tmp_path / "weights"
    cli(
        [
            *TINY_RUN,
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.strategy=ddp",
            "trainer.max_steps=4",
            "callbacks.sample_grid.every_n_steps=0",
            "+callbacks.rank_weights._target_=rank_weights.SaveRankWeights",
            f"+callbacks.rank_weights.dirpath={dump}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
    )
    rank0, rank1 = (torch.load(dump / f"rank{r}.pt") for r in (0, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2
    start = checkpoint_free_init(tmp_path)
    moved = 0
    for key, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][key]), key  # all-reduced gradients: identical replicas
        moved += not torch.equal(value, start[key])
    assert moved > len(start) // 2  # and they trained


def checkpoint_free_init(tmp_path: Path) -> dict[str, torch.Tensor]:
    """The backbone's weights before training (same seed, same config, no steps)."""
    import lightning as L
    from hydra.utils import instantiate

    cfg = compose_train(TINY_RUN, tmp_path / "init")
    L.seed_everything(cfg.seed, workers=True)
    return instantiate(cfg.module).backbone.state_dict()


@pytest.mark.slow
def test_sweep_through_the_local_submitit_launcher(tmp_path):
    """`-m` with cluster=submitit_local: two jobs as separate processes, each with its own run directory."""
    overrides = [o for o in TINY_RUN if not o.startswith("backbone.depth")]
    cli(
        [
            "-m",
            "cluster=submitit_local",
            *overrides,
            "trainer.accelerator=cpu",
            "backbone.depth=2,3",
            f"paths.output_root={tmp_path / 'out'}",
            "sweep_name=depths",
        ],
        cwd=tmp_path,
        timeout=400,
    )
    for depth in (2, 3):
        # <output_root>/<sweep_name>/<name>/<overrides, shortened with a hash when long>
        (run_dir,) = (tmp_path / "out" / "depths" / "quickstart").glob(f"backbone.depth={depth},*")
        state = checkpoint(run_dir / "checkpoints" / "last.ckpt")
        assert state["global_step"] == 6
        blocks = {k.split(".")[2] for k in state["state_dict"] if k.startswith("backbone.blocks.")}
        assert len(blocks) == depth  # each job trained its own point of the sweep
        assert (run_dir / "samples" / "final.png").is_file()
    assert list((tmp_path / "out" / "depths" / ".submitit").glob("*/*_log.out"))  # submitit's own job logs


@pytest.mark.slow
def test_sigkill_mid_run_then_the_same_command_resumes_to_the_same_weights(tmp_path):
    args = [
        *[o for o in TINY_RUN if not o.startswith("trainer.max_steps")],
        "trainer.accelerator=cpu",
        "trainer.max_steps=120",
        "trainer.deterministic=true",
        "callbacks.checkpoint.every_n_train_steps=10",
        "callbacks.sample_grid.every_n_steps=0",
        "callbacks.outlier_monitor.every_n_steps=0",
    ]
    killed_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "dsr.train", *args, f"hydra.run.dir={killed_dir}"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved_step = checkpoint(last)["global_step"]
    assert 10 <= saved_step < 120  # killed mid-run, after a checkpoint

    resumed = cli([*args, f"hydra.run.dir={killed_dir}"], cwd=tmp_path)
    assert "resuming from" in resumed.stderr + resumed.stdout
    cli([*args, f"hydra.run.dir={tmp_path / 'straight'}"], cwd=tmp_path)
    a, b = checkpoint(last), checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 120
    for key, value in b["state_dict"].items():
        assert torch.equal(value, a["state_dict"][key]), key


# ------------------------------------------------------------------------------------------------------------
# cluster configs, compile, FSDP
# ------------------------------------------------------------------------------------------------------------


def test_slurm_cluster_config_asks_for_one_task_per_gpu_and_requeues(tmp_path, monkeypatch):
    import submitit
    from hydra.utils import instantiate

    monkeypatch.setenv("SLURM_PARTITION", "h100")
    monkeypatch.setenv("SLURM_ACCOUNT", "lab")
    cfg = compose_train(["cluster=slurm_8gpu", "trainer.num_nodes=2", "sweep_name=table2"], tmp_path / "run")
    launcher = cfg.hydra.launcher
    assert cfg.hydra.mode.name == "MULTIRUN"  # every command submits
    assert launcher.tasks_per_node == launcher.gpus_per_node == cfg.trainer.devices == 8
    assert launcher.nodes == cfg.trainer.num_nodes == 2
    assert (launcher.partition, launcher.account) == ("h100", "lab")
    assert launcher.max_num_timeout > 0
    assert cfg.trainer.strategy == "ddp" and cfg.cluster_environment.auto_requeue is False
    assert cfg.hydra.sweep.dir == f"{cfg.paths.output_root}/table2"  # fixed: a re-run or requeue finds its jobs

    # The sbatch script submitit would submit, from the launcher's parameters mapped as the launcher maps them
    # (queue-independent names as they are, the rest prefixed "slurm_"); the executor insists on finding `srun`.
    monkeypatch.setattr(submitit.slurm.slurm.shutil, "which", lambda name: f"/usr/bin/{name}")
    params = instantiate(launcher).params
    executor = submitit.AutoExecutor(
        folder=tmp_path / "submitit", cluster="slurm", slurm_max_num_timeout=params["max_num_timeout"]
    )
    common = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes", "name"}
    skip = {"submitit_folder", "max_num_timeout", "stderr_to_stdout", "_target_"}
    executor.update_parameters(
        **{k if k in common else f"slurm_{k}": v for k, v in params.items() if k not in skip and v is not None}
    )
    script = executor._executor._make_submission_file_text("python -m dsr.train", "uid")
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=h100",
        "#SBATCH --account=lab",
        f"#SBATCH --signal=USR2@{launcher.signal_delay_s}",
    ):
        assert line in script, line


@pytest.mark.slow
def test_compiled_backbone_trains_like_the_eager_one(run_train):
    common = [*TINY_RUN, "trainer.max_steps=3", "trainer.deterministic=true", "callbacks.sample_grid.every_n_steps=0"]
    _, eager = run_train(common, name="eager")
    torch._dynamo.reset()
    # Dynamo capture and AOTAutograd without code generation: the graph path of `compile=true`, fast on a CPU.
    _, compiled = run_train([*common, "+compile.backend=aot_eager"], name="compiled")
    torch._dynamo.reset()
    a = csv_column(eager / "logs" / "metrics.csv", "train/loss")
    b = csv_column(compiled / "logs" / "metrics.csv", "train/loss")
    assert a.keys() == b.keys() and len(a) == 3
    np.testing.assert_allclose([b[k] for k in sorted(b)], [a[k] for k in sorted(a)], rtol=1e-4)
    state = checkpoint(compiled / "checkpoints" / "last.ckpt")["state_dict"]
    assert not any("_orig_mod" in key for key in state)  # compiled in place: checkpoints keep their names


def test_fsdp_strategy_wraps_blocks_and_backbones_and_leaves_frozen_networks_out(tmp_path):
    from hydra.utils import instantiate

    from dsr.lightning.sharding import WRAPPED, ShardedStrategy
    from dsr.models.dit import DiTBlock, LightningDiT
    from dsr.train import strategy_for

    # The tiny encoder without statistics or decoder files: only the module's structure matters here.
    overrides = ["experiment=quickstart_rae", "trainer.strategy=fsdp", "encoder.stats=null", "encoder.decoder=null"]
    cfg = compose_train(overrides, tmp_path / "run")
    module = instantiate(cfg.module)
    strategy = strategy_for(cfg, module)
    assert isinstance(strategy, ShardedStrategy) and strategy._state_dict_type == "sharded"
    ignored = strategy.kwargs["ignored_modules"]
    assert any(m is module.encoder.model for m in ignored)  # the frozen encoder stays whole, replicated
    assert not any(p.requires_grad for m in ignored for p in m.parameters())
    # The units FSDP would make: every block and each whole backbone (trained and EMA), nothing else.
    units = set(strategy.kwargs["auto_wrap_policy"]._run_policy(module, set(ignored), {}))
    assert units == {*module.backbone.blocks, *module.ema.module.blocks, module.backbone, module.ema.module}
    assert WRAPPED >= {DiTBlock, LightningDiT}


def test_sharded_checkpoint_replaces_the_old_one_only_when_complete(tmp_path, monkeypatch):
    """A sharded checkpoint is a directory: the new one is written aside and swapped in, so a crash while writing
    keeps the previous one, and a crash between the two renames leaves it where resume looks."""
    from lightning.pytorch.strategies import FSDPStrategy

    from dsr.lightning.sharding import ShardedStrategy
    from dsr.train import resume_checkpoint

    def fake_save(self, checkpoint, filepath, storage_options=None):
        if checkpoint.get("crash"):
            (Path(filepath) / "shard0").mkdir(parents=True)
            raise RuntimeError("killed mid-write")
        Path(filepath).mkdir(parents=True)
        (Path(filepath) / "meta.pt").write_text(str(checkpoint["step"]))

    monkeypatch.setattr(FSDPStrategy, "save_checkpoint", fake_save)
    strategy = ShardedStrategy()
    last = tmp_path / "checkpoints" / "last.ckpt"
    strategy.save_checkpoint({"step": 1}, last)
    strategy.save_checkpoint({"step": 2}, last)
    assert (last / "meta.pt").read_text() == "2"
    with pytest.raises(RuntimeError):
        strategy.save_checkpoint({"step": 3, "crash": True}, last)
    assert (last / "meta.pt").read_text() == "2"  # the previous checkpoint survived
    strategy.save_checkpoint({"step": 4}, last)  # and the leftover partial write is cleared
    assert (last / "meta.pt").read_text() == "4"
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
    last.rename(last.with_name("last.ckpt.previous"))  # killed between the renames
    assert resume_checkpoint(tmp_path, resume=True) == last.with_name("last.ckpt.previous")
