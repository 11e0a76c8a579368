"""The paper's table rows: `conf/experiment/<row>.yaml`, their launchers `experiments/<table>.sh` and the table in
`experiments/README.md` agree with each other and with the configs Hydra composes from them. Composition only: no
model is built."""

from __future__ import annotations

import math
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import compose_script, compose_train
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT_DIR = ROOT / "conf" / "experiment"
SCRIPT_DIR = ROOT / "experiments"
README = SCRIPT_DIR / "README.md"
HEADER = (
    "| experiment | table | encoder | backbone | registers | num_registers | register_start | epochs | steps | "
    "global batch | lr | EMA | recipe | paper gFID | our gFID |"
)
NOT_IN_NOTES = "n/a (not in our notes)"
SO400M_RELEASE_SHIFT_DIM = 196608  # SigLIP2-B's 16 x 16 x 768, kept by the release's So400M configs
# Where and how a job runs; a composed row must not depend on these (conf/cluster/slurm_8gpu.yaml, `sweep_name`).
LAUNCH_ONLY = ("cluster=", "sweep_name=")


def readme_rows() -> list[dict[str, str]]:
    """The machine-readable table of experiments/README.md: one dict per row, keyed by the header's columns."""
    lines = README.read_text().splitlines()
    assert lines.count(HEADER) == 1, "experiments/README.md needs exactly one table with the expected header"
    start = lines.index(HEADER)
    columns = [c.strip() for c in HEADER.strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(columns), line
        rows.append(dict(zip(columns, cells, strict=True)))
    assert set(lines[start + 1].replace("|", "").strip()) <= {"-", ":", " "}, "no separator row under the header"
    return rows


def experiment_files() -> set[str]:
    return {p.stem for p in EXPERIMENT_DIR.glob("*.yaml") if not p.stem.startswith(("quickstart", "small_scale"))}


def script_experiments(script: Path) -> list[str]:
    """The rows a launcher passes as `experiment=a,b,...` (one such argument per script)."""
    found = re.findall(r"(?<![\w.])experiment=([\w,]+)", script.read_text())
    assert len(found) == 1, f"{script.name}: expected one experiment=... argument, found {found}"
    return found[0].split(",")


def script_args(script: Path) -> list[str]:
    """The arguments a launcher passes to `python -m dsr.train` (continuation lines joined)."""
    lines = [line for line in script.read_text().replace("\\\n", " ").splitlines() if "python -m dsr.train" in line]
    assert len(lines) == 1, f"{script.name}: expected one dsr.train command"
    return shlex.split(lines[0].split("python -m dsr.train", 1)[1])


def number(cell: str) -> float:
    return float(cell)


ROWS = readme_rows()
ROW_NAMES = [row["experiment"] for row in ROWS]
SCRIPTS = sorted(SCRIPT_DIR.glob("*.sh"))


@pytest.fixture(autouse=True)
def _clear_hydra():
    yield
    GlobalHydra.instance().clear()


def test_readme_lists_every_experiment_once():
    assert len(ROW_NAMES) == len(set(ROW_NAMES)), "a row appears twice in the README table"
    assert set(ROW_NAMES) == experiment_files()
    assert {row["table"] for row in ROWS} == {s.stem for s in SCRIPTS}


@pytest.mark.parametrize("row", ROWS, ids=ROW_NAMES)
def test_row_matches_composed_config(row, tmp_path):
    name = row["experiment"]
    cfg = compose_train([f"experiment={name}"], tmp_path / name)
    choices = cfg.hydra.runtime.choices

    assert cfg.name == name
    assert choices.experiment == name
    for column in ("encoder", "backbone", "registers", "recipe"):
        assert choices[column] == row[column], column
    assert choices.data == "imagenet" and choices.stage == "dit"
    assert choices.cluster == "local", "experiment files leave the cluster to the launcher"
    assert cfg.backbone.num_registers == int(row["num_registers"])
    assert cfg.backbone.register_start == int(row["register_start"])
    epochs, steps = cfg.trainer.max_epochs, cfg.trainer.max_steps
    assert (epochs in (-1, None)) if row["epochs"] == "-" else epochs == int(row["epochs"])
    assert steps == -1 if row["steps"] == "-" else steps == int(row["steps"])
    assert row["epochs"] != "-" or row["steps"] != "-", "a row needs an epoch or a step limit"
    assert cfg.data.global_batch_size == int(row["global batch"])
    assert math.isclose(cfg.module.optimizer.lr, number(row["lr"]))
    decays = list(cfg.module.ema_decays or [cfg.module.ema_decay])
    assert decays == [number(v) for v in row["EMA"].split(",")]

    # Common to every row: ImageNet 256, no weight decay, an online FID on 10K samples; unguided sampling except the
    # JiT-B rows, which are not the paper's and use JiT's own CFG for B.
    assert cfg.data.image_size == 256 and cfg.data.num_classes == 1000
    assert cfg.module.optimizer.weight_decay == 0.0
    assert cfg.sampler.guidance.scale == (3.0 if choices.backbone == "jit_b" else 1.0)
    assert cfg.callbacks.fid.every_n_steps == 25000 and cfg.callbacks.fid.num_samples == 10000

    schedule = cfg.module.lr_schedule
    if choices.recipe == "sit":  # SiT's protocol (the SD-VAE rows): its recipe, sampler and SD-VAE latents
        assert choices.encoder == "sd_vae" and choices.backbone == "sit_xl" and choices.sampler == "sit_sde"
        assert cfg.data.global_batch_size == 256 and math.isclose(cfg.module.optimizer.lr, 1e-4)
        assert list(cfg.module.optimizer.betas) == [0.9, 0.999] and cfg.module.ema_decay == 0.9999
        assert (cfg.transport.prediction, cfg.transport.time_dist, cfg.transport.shift) == ("velocity", "uniform", 1.0)
        assert cfg.trainer.gradient_clip_val is None and cfg.trainer.precision == "32-true"
        assert cfg.sampler.solver.num_steps == 250 and cfg.sampler.solver.last_step == "mean"
        assert cfg.sampler.guidance.guided_channels == 3 and steps == 400000
    elif choices.recipe == "jit":  # the pixel rows: JiT on the images, its recipe and sampler
        assert choices.encoder == "pixel" and cfg.encoder.patch_size == 1 and choices.backbone.startswith("jit_")
        assert choices.sampler == "jit" and cfg.sampler.solver.num_steps == 51 and cfg.sampler.solver.euler_last_step
        assert cfg.data.global_batch_size == 1024 and list(cfg.module.optimizer.betas) == [0.9, 0.95]
        assert schedule.warmup_epochs == 5 and schedule.constant_epochs is None and decays == [0.9999, 0.9996]
        assert (cfg.transport.prediction, cfg.transport.clamp_target, cfg.transport.shift) == ("x", True, 1.0)
        if cfg.backbone.num_registers:  # registers join with JiT's in-context class tokens
            assert cfg.backbone.register_start == cfg.backbone.in_context_start
    else:  # the DSR release's rows: batch 1024, AdamW (0.9, 0.95) at 2e-4, Euler 50 steps, x-prediction
        assert choices.sampler == "euler" and cfg.data.global_batch_size == 1024
        assert math.isclose(cfg.module.optimizer.lr, 2e-4) and list(cfg.module.optimizer.betas) == [0.9, 0.95]
        assert cfg.sampler.solver.method == "euler" and cfg.sampler.solver.num_steps == 50
        assert cfg.transport.prediction == "x"  # the release's x-prediction for every row, DiT-DH included
    if choices.recipe == "dsr_release":
        assert cfg.module.ema_decay == 0.9999 and cfg.trainer.gradient_clip_val is None
        assert schedule.constant_epochs is None and schedule.warmup_epochs == 0.0
    elif choices.recipe == "rae":  # DiT-DH: RAE's schedule with x-prediction
        assert choices.backbone == "dit_dh_xl"
        assert cfg.module.ema_decay == 0.9995 and cfg.trainer.gradient_clip_val == 1.0
        assert schedule.constant_epochs == 40 and schedule.decay_end_epochs == 800 == epochs
        assert math.isclose(schedule.final_lr, 2e-5)

    registers = choices.registers
    if registers == "dsr":
        assert cfg.encoder.registers == cfg.encoder.dsr_registers
        assert cfg.backbone.num_registers == 36
        if choices.encoder == "siglip2_b":
            assert cfg.encoder.registers == "ttr"
    elif registers == "diffusion":
        assert cfg.encoder.registers == "none" and cfg.backbone.num_registers > 0
        assert 0 <= cfg.backbone.register_start < cfg.backbone.depth
    else:
        assert cfg.encoder.registers == registers and cfg.backbone.num_registers == 0
    if cfg.backbone.num_registers:
        assert 0 <= cfg.backbone.register_start < cfg.backbone.depth

    if choices.encoder == "siglip2_so400m":
        assert cfg.transport.shift_dim == SO400M_RELEASE_SHIFT_DIM
    else:
        assert cfg.transport.shift_dim is None

    # Every interpolation resolves, and the artifacts come from the (encoder, encoder registers) pair.
    resolved = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    assert resolved["paths"]["latent_dir"].endswith(f"/{choices.encoder}-{cfg.encoder.registers}")


@pytest.mark.parametrize("row", ROWS, ids=ROW_NAMES)
def test_row_file_header_and_paper_numbers(row):
    text = (EXPERIMENT_DIR / f"{row['experiment']}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    config = yaml.safe_load(text)
    assert config["name"] == row["experiment"]
    assert not any("cluster" in str(entry) for entry in config.get("defaults", [])), "the launcher picks the cluster"
    assert "cluster" not in config and "sweep_name" not in config
    paper = row["paper gFID"]
    if paper.startswith("n/a"):
        assert paper == NOT_IN_NOTES
        assert "n/a (" in text, "rows without paper numbers say so in their header"
    else:
        assert float(paper) > 0 and paper in text, "the header comment quotes the paper's number"


def test_paper_numbers():
    paper = {row["experiment"]: row["paper gFID"] for row in ROWS}
    expected = {
        "main_dit_xl_80ep": "5.89",
        "main_dit_xl_80ep_dsr": "4.58",
        "main_dit_xl_800ep": "3.85",
        "main_dit_xl_800ep_dsr": "3.26",
        "main_dit_dh_xl_800ep": "2.91",
        "main_dit_dh_xl_800ep_dsr": "2.72",
        "scale_dit_s": "28.03",
        "scale_dit_s_dsr": "23.93",
        "scale_dit_b": "20.36",
        "scale_dit_b_dsr": "9.81",
        "enc_siglip2_b_ttr": "4.63",
        "diff_regs_36": "5.33",
        "input_dinov2_b_reg": "4.11",
        "input_dinov2_b_reg_dsr": "3.92",
        "input_vae_sit_xl": "16.05",
        "input_vae_sit_xl_diff": "14.47",
        "input_jit_h": "30.34",
        "input_jit_h_dsr": "23.14",
    }
    assert {k: v for k, v in paper.items() if v != NOT_IN_NOTES} == expected


def test_scripts_launch_every_row_once():
    assert {s.stem for s in SCRIPTS} == {
        "main", "encoder_registers", "diffusion_registers", "scaling", "input_spaces", "jit"
    }  # fmt: skip
    launched: dict[str, str] = {}
    tables = {row["experiment"]: row["table"] for row in ROWS}
    for script in SCRIPTS:
        rows = script_experiments(script)
        for name in rows:
            assert (EXPERIMENT_DIR / f"{name}.yaml").is_file(), f"{script.name}: no experiment {name}"
            assert name not in launched, f"{name} launched by {launched.get(name)} and {script.name}"
            launched[name] = script.stem
            assert tables[name] == script.stem, f"{name}: README table column says {tables[name]}"
    assert set(launched) == experiment_files()


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_script_shape(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text and 'cd "$(dirname "$0")/.."' in text
    args = script_args(script)
    assert args[0] == "-m"
    assert "cluster=slurm_8gpu" in args and f"sweep_name={script.stem}" in args and "logger=wandb" in args
    assert args[-1] == "$@"
    for env in ("SLURM_PARTITION", "SLURM_ACCOUNT", "IMAGENET_TRAIN_DIR", "DSR_ARTIFACTS", "WANDB_PROJECT"):
        assert env in text, f"{script.name}: the header names ${env}"
    assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_script_arguments_compose(script, tmp_path):
    """Each row with the script's own arguments, minus the cluster and sweep name (composed elsewhere)."""
    args = script_args(script)
    shared = [a for a in args if a not in ("-m", "$@") and not a.startswith(LAUNCH_ONLY + ("experiment=",))]
    for name in script_experiments(script):
        cfg = compose_train([*shared, f"experiment={name}"], tmp_path / name)
        assert cfg.hydra.runtime.choices.logger == "wandb"
        assert cfg.logger.wandb.name == name and cfg.logger.wandb.group == name


def readme_commands() -> list[list[str]]:
    """The `python -m dsr.<entry> ...` commands in the README's code blocks, as argument lists."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("python -m dsr."):
                commands.append(shlex.split(line)[2:])
    return commands


def test_readme_commands_compose(tmp_path):
    """Every command the README gives composes with the real configs: no invented keys or options."""
    placeholders = {
        "$RUN": str(tmp_path / "run"),
        "$NEURONS": str(tmp_path / "register_neurons.json"),
        "<w>": "1.5",
        "<t_lo>": "0.0",
        "<t_hi>": "1.0",
    }
    commands = readme_commands()
    entries = [c[0] for c in commands]
    for entry in ("dsr.sample", "dsr.evaluate", "dsr.stats", "dsr.analyze", "dsr.train"):
        assert entry in entries, f"README gives no {entry} command"
    for entry, *args in commands:
        for key, value in placeholders.items():
            args = [a.replace(key, value) for a in args]
        args = [a for a in args if a != "-m" and not a.startswith(LAUNCH_ONLY)]
        sweeps = [
            [a] if "," not in a else [f"{a.split('=')[0]}={v}" for v in a.split("=", 1)[1].split(",")] for a in args
        ]
        variants = [[]]
        for options in sweeps:
            variants = [v + [o] for v in variants for o in options]
        for overrides in variants:
            if entry == "dsr.train":
                cfg = compose_train(overrides, tmp_path / "train")
            else:
                cfg = compose_script(entry.split(".")[1], overrides)
            if entry == "dsr.sample":  # 50 Euler steps, or SiT's 250-step SDE for the SD-VAE rows
                steps = 250 if cfg.hydra.runtime.choices.sampler == "sit_sde" else 50
                assert cfg.num_samples == 50000 and cfg.sampler.solver.num_steps == steps
                assert Path(cfg.ckpt).name == "last.ckpt"
            if entry == "dsr.stats":
                assert cfg.stats.output.endswith(
                    f"{cfg.hydra.runtime.choices.encoder}-{cfg.encoder.registers}/stats.pt"
                )


def test_readme_prerequisites_cover_every_artifact_pair(tmp_path):
    """Each row's (encoder, encoder registers) artifacts have their statistics command in the README."""
    stats_pairs = set()
    for entry, *args in readme_commands():
        if entry == "dsr.stats":
            options = dict(a.split("=", 1) for a in args)
            stats_pairs.add((options["encoder"], options["registers"]))
    for name in ROW_NAMES:
        cfg = compose_train([f"experiment={name}"], tmp_path / name)
        if cfg.hydra.runtime.choices.encoder == "sd_vae":  # scales its latents and decodes them itself: no artifacts
            assert cfg.encoder.stats is None and "decoder" not in cfg.encoder
            continue
        if cfg.hydra.runtime.choices.encoder == "pixel":  # JiT reads the images: no statistics, no decoder
            assert "stats" not in cfg.encoder and "decoder" not in cfg.encoder
            continue
        pair = (cfg.hydra.runtime.choices.encoder, cfg.encoder.registers)
        assert pair in stats_pairs, f"{name}: no dsr.stats command for {pair}"
        assert f"`{pair[0]}-{pair[1]}`" in README.read_text()


@pytest.mark.slow
def test_cli_prints_resolved_row(tmp_path):
    """The real entry point composes and resolves a DSR row (`--cfg job --resolve` prints it without running)."""
    env = {**os.environ, "DSR_OUTPUT_ROOT": str(tmp_path / "outputs"), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "dsr.train", "experiment=main_dit_xl_80ep_dsr", "--cfg", "job", "--resolve"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["name"] == "main_dit_xl_80ep_dsr"
    assert printed["backbone"]["num_registers"] == 36 and printed["backbone"]["register_start"] == 8
    assert printed["encoder"]["registers"] == "ttr"
    assert printed["trainer"]["max_epochs"] == 80
    assert printed["module"]["ema_decay"] == 0.9999
    assert not (tmp_path / "outputs").exists(), "--cfg must not create a run directory"
