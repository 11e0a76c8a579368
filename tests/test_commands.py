"""The commands as a user meets them: their own --help, configuration errors as one line with exit status 2, every
missing prerequisite named at once, console scripts and a config tree that a non-editable install can find."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import compose_train

from dsr.config import report_config_errors
from dsr.lightning.preflight import MissingPrerequisites, check_prerequisites, missing_prerequisites

REPO = Path(__file__).resolve().parents[1]
USER_COMMAND = ["encoder=siglip2_so400m", "registers=recursive_ttr", "backbone=dit_dh_xl"]


def test_the_users_command_with_nothing_prepared_names_every_missing_prerequisite(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("IMAGENET_TRAIN_DIR", raising=False)
    monkeypatch.delenv("DSR_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.delenv("DSR_FID_REFERENCE", raising=False)
    cfg = compose_train([*USER_COMMAND, f"paths.artifacts={tmp_path / 'artifacts'}"], tmp_path / "run")
    problems = missing_prerequisites(cfg)
    expected = [
        "data.dataset.root is not set",
        "encoder.pretrained=google/siglip2-so400m-patch14-224 was not found locally",
        "encoder.stats=",
        "encoder.decoder_weights=",
        "evaluation.reference=None",
        "InceptionV3 weights",
    ]
    assert len(problems) == len(expected)
    for problem, start in zip(problems, expected, strict=True):
        assert start in problem
    assert "python -m dsr.stats encoder=siglip2_so400m registers=recursive_ttr" in problems[2]
    assert "stage=decoder encoder=siglip2_so400m registers=recursive_ttr" in problems[3]
    # The shipped recursive neuron list of So400M counts as present; a missing JSON does not.
    with pytest.raises(MissingPrerequisites, match="lacks 6 prerequisite"):
        check_prerequisites(cfg)
    cfg.encoder.recursive_ttr_neurons = str(tmp_path / "none.json")
    assert any("encoder.recursive_ttr_neurons=" in p and "analyze.rounds=2" in p for p in missing_prerequisites(cfg))

    # Provided, they disappear one by one.
    root = tmp_path / "imagenet"
    (root / "n01440764").mkdir(parents=True)
    cfg = compose_train([*USER_COMMAND, f"data.dataset.root={root}", "callbacks.fid.every_n_steps=0",
                         "encoder.stats=null", "encoder.decoder_weights=null"], tmp_path / "run")  # fmt: skip
    assert [p.split("=")[0] for p in missing_prerequisites(cfg)] == ["encoder.pretrained"]


def test_a_configuration_error_is_one_line_and_exit_status_2(capsys, monkeypatch):
    @report_config_errors
    def task(value: int) -> int:
        if value < 0:
            raise ValueError(f"thing.value={value} must be >= 0: set thing.value=1")
        if value == 0:
            raise RuntimeError("a bug keeps its traceback")
        return value

    assert task(3) == 3
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        task(-1)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: thing.value=-1 must be >= 0: set thing.value=1\n"
    with pytest.raises(RuntimeError):
        task(0)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ValueError, match="thing.value=-1"):
        task(-1)


@pytest.mark.slow
def test_help_shows_the_commands_own_usage_groups_and_settings(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "dsr.sample", "--help"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120).stdout  # fmt: skip
    assert out.startswith("Sample generation for evaluation: class-balanced")
    assert "  sampler: euler, heun, sde" in out and "ckpt: ???" in out
    assert "encoder:" not in out and "powered by Hydra" not in out


@pytest.mark.slow
def test_a_non_editable_install_finds_its_config_and_has_a_console_script_per_command(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "dsr", source / "dsr", ignore=shutil.ignore_patterns("__pycache__", "local"))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target",
         str(target), str(source)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    scripts = {p.name for p in (target / "bin").iterdir()}
    commands = {"train", "sample", "evaluate", "analyze", "stats", "cache-latents", "convert", "make-shards"}
    assert {f"dsr-{c}" for c in commands} <= scripts
    probe = (
        "from dsr.config import CONF_DIR, compose\n"
        "cfg = compose('train', ['experiment=quickstart'])\n"
        "print(CONF_DIR)\nprint(cfg.backbone._target_, cfg.data.dataset._target_)\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(target)})  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    conf_dir, targets = result.stdout.split("\n")[:2]
    assert Path(conf_dir) == target / "dsr" / "conf"
    assert targets == "dsr.models.dit.LightningDiT dsr.data.synthetic.SyntheticShapes"


@pytest.mark.slow
def test_an_override_hydra_cannot_compose_is_one_line_and_exit_status_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "dsr.sample", "sampler=nope", "ckpt=x.ckpt"], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert (
        result.stderr
        == "error: In 'sample': Could not find 'sampler/nope' Available options in 'sampler': euler heun sde\n"
    )


def test_the_override_check_leaves_sweeps_and_flags_to_hydra(capsys):
    from dsr.config import check_overrides

    check_overrides("train", ["cluster=submitit_local", "backbone.depth=2,3"])  # a sweep: composed per job
    check_overrides("train", ["-m", "backbone=nope"])  # Hydra's own flags
    check_overrides("train", ["experiment=quickstart"])
    with pytest.raises(SystemExit) as exit_info:
        check_overrides("train", ["backbone=nope"])
    assert exit_info.value.code == 2 and "Could not find 'backbone/nope'" in capsys.readouterr().err
