"""The commands as a user meets them: their own --help, configuration errors as one line with exit status 2, every
missing prerequisite named at once, console scripts and a config tree that a non-editable install can find."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import compose_script, compose_train

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
    assert (
        "  sampler: dopri5, euler, heun, jit, sde" in out
        and "  sampler/guidance: autoguidance, cfg" in out
        and "ckpt: ???" in out
    )
    assert "encoder:" not in out and "powered by Hydra" not in out


HELP_PROBE = """
import contextlib, io, runpy, sys
heavy = ("torch", "lightning", "timm", "transformers", "diffusers", "webdataset", "torchvision", "matplotlib")
for command in sys.argv[1:]:
    sys.argv[:] = [command, "--help"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        runpy.run_module(command, run_name="__main__")
    loaded = [m for m in heavy if m in sys.modules]
    print(command, "|", out.getvalue().splitlines()[0] if out.getvalue() else "", "|", ",".join(loaded))
"""
COMMANDS = ["dsr.train", "dsr.sample", "dsr.tune", "dsr.evaluate", "dsr.analyze", "dsr.stats", "dsr.cache_latents",
            "dsr.convert", "dsr.data.make_shards"]  # fmt: skip


@pytest.mark.slow
def test_help_answers_without_importing_torch_or_lightning(tmp_path):
    # Each command's --help in one interpreter, in turn: the first that imports a heavy library is named. Last, a
    # module that does import torch, so the probe is seen to notice.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", HELP_PROBE, *COMMANDS, "dsr.models.dit"], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split(" | ") for line in result.stdout.splitlines()]
    assert [row[0] for row in rows] == [*COMMANDS, "dsr.models.dit"]
    for command, first_line, loaded in rows[:-1]:
        assert first_line and "powered by Hydra" not in first_line, command  # the command's own usage text
        assert loaded == "", f"python -m {command} --help imported {loaded}"
    assert "torch" in rows[-1][2].split(",")


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
    commands = {"train", "sample", "tune", "evaluate", "analyze", "stats", "cache-latents", "convert", "make-shards"}
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
    assert result.stderr == (
        "error: In 'sample': Could not find 'sampler/nope' Available options in 'sampler': "
        "dopri5 euler heun jit sde sit_ode sit_sde\n"
    )


def test_the_override_check_leaves_sweeps_and_flags_to_hydra(capsys):
    from dsr.config import check_overrides

    check_overrides("train", ["cluster=submitit_local", "backbone.depth=2,3"])  # a sweep: composed per job
    check_overrides("train", ["-m", "backbone=nope"])  # Hydra's own flags
    check_overrides("train", ["experiment=quickstart"])
    with pytest.raises(SystemExit) as exit_info:
        check_overrides("train", ["backbone=nope"])
    assert exit_info.value.code == 2 and "Could not find 'backbone/nope'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------------
# One spelling per concept; the old ones still work, with a warning naming the new
# ------------------------------------------------------------------------------------------------------------------

DECODER_STAGE = ["stage=decoder", "encoder=tiny", "decoder=tiny"]
# (command config, what it needs besides, old key, a value, the key it must land on)
OLD_KEYS = [
    ("train", ["encoder=tiny"], "encoder.input_size", "16", "encoder.resolution"),
    ("train", DECODER_STAGE, "module.codec", "null", "module.encoder"),
    ("train", DECODER_STAGE, "module.discriminator.input_size", "64", "module.discriminator.resolution"),
    ("stats", [], "stats.num_samples", "7", "stats.num_images"),
    ("cache_latents", [], "cache.num_samples", "7", "cache.num_images"),
    ("analyze", [], "analyze.out_dir", "elsewhere", "analyze.output"),
    ("analyze", [], "analyze.device", "cpu", "accelerator"),
    ("sample", ["ckpt=x.ckpt"], "out_dir", "elsewhere", "output"),
    ("sample", ["ckpt=x.ckpt"], "use_ema", "0.9996", "ema"),
    ("sample", ["ckpt=x.ckpt"], "precision", "bf16-mixed", "sampler.precision"),
    ("evaluate", ["samples=a.npz", "reference=b.npz"], "out", "m.json", "output"),
    ("evaluate", ["samples=a.npz", "reference=b.npz"], "device", "cpu", "accelerator"),
]


def test_every_renamed_setting_is_checked_here():
    from dsr.config import RENAMED_KEYS

    renamed = {(old, new) for table in RENAMED_KEYS.values() for old, new in table.items()}
    assert renamed == {(old, new) for _, _, old, _, new in OLD_KEYS}


@pytest.mark.parametrize(("config", "needs", "old", "value", "new"), OLD_KEYS, ids=[c[2] for c in OLD_KEYS])
def test_an_old_spelling_on_the_command_line_lands_on_the_new_key_with_a_warning(config, needs, old, value, new):
    import yaml
    from omegaconf import OmegaConf

    from dsr.config import DeprecatedName, compose

    with pytest.warns(DeprecatedName, match=f"^{old} is deprecated: use {new}$"):
        cfg = compose(config, [*needs, f"{old}={value}"])
    assert OmegaConf.select(cfg, new) == yaml.safe_load(value)
    parent, _, leaf = old.rpartition(".")
    assert leaf not in (OmegaConf.select(cfg, parent) if parent else cfg)


def test_an_old_spelling_in_a_users_config_file_takes_effect(tmp_path):
    """A user's experiment file written with the old names builds the encoder it asked for."""
    from dsr.config import DeprecatedName, build, compose

    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\nencoder:\n  input_size: 16\n  precision: fp32\n"
    )
    overrides = ["encoder=tiny", f"hydra.searchpath=[file://{tmp_path}]", "experiment=mine", "encoder.stats=null",
                 "encoder.decoder=null", "encoder.decoder_weights=null"]  # fmt: skip
    with pytest.warns(DeprecatedName) as warned:
        cfg = compose("train", overrides)
    messages = {str(w.message) for w in warned}
    assert "encoder.input_size is deprecated: use encoder.resolution" in messages
    assert "encoder.precision=fp32 is deprecated: use encoder.precision=32-true" in messages
    assert "input_size" not in cfg.encoder and cfg.encoder.precision == "32-true"
    encoder = build(cfg.encoder)
    assert encoder.resolution == 16 and tuple(encoder.latent_shape) == (64, 4, 4)  # 16 px / patch 4, not 32 px


def test_an_old_value_spelling_on_the_command_line_is_renamed():
    from dsr.config import DeprecatedName, compose

    with pytest.warns(DeprecatedName, match="^encoder.precision=bf16 is deprecated: use encoder.precision=bf16-mixed"):
        cfg = compose("train", ["encoder.precision=bf16"])
    assert cfg.encoder.precision == "bf16-mixed"
    with pytest.warns(DeprecatedName, match="^ema=false is deprecated: use ema=none"):
        cfg = compose("sample", ["ckpt=x.ckpt", "use_ema=false"])
    assert cfg.ema == "none" and "use_ema" not in cfg
    with pytest.warns(DeprecatedName, match="^sampler.precision=bf16 is deprecated: use sampler.precision=bf16-mixed"):
        cfg = compose("sample", ["ckpt=x.ckpt", "sampler.precision=bf16"])
    assert cfg.sampler.precision == "bf16-mixed"


def test_a_checkpoint_storing_old_spellings_loads_silently_as_it_was(tmp_path):
    """Stored configs cannot be edited by their users: they are renamed without a warning and rebuild the same model."""
    import warnings

    from dsr.config import build, resolved_config
    from dsr.lightning.dit_module import DiTModule

    cfg = compose_train(["experiment=quickstart_rae", "encoder.stats=null", "encoder.decoder_weights=null",
                         "encoder.resolution=16", "data.image_size=16", "backbone.depth=2"], tmp_path)  # fmt: skip
    module = build(cfg.module)
    stored = resolved_config(cfg)
    stored["encoder"]["input_size"] = stored["encoder"].pop("resolution")  # as written before the rename
    stored["encoder"]["precision"] = "fp32"
    stored["module"]["encoder"] = stored["encoder"]
    torch.save({"state_dict": module.state_dict(), "dsr": {"config": stored}}, tmp_path / "old.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = DiTModule.from_checkpoint(tmp_path / "old.ckpt")
    assert loaded.encoder.resolution == 16 and loaded.encoder.precision == "32-true"
    assert tuple(loaded.latent_shape) == (64, 4, 4)
    for key, value in module.backbone.state_dict().items():
        assert torch.equal(loaded.backbone.state_dict()[key], value)


def test_num_images_caches_the_same_seeded_subset_that_stats_reads(tmp_path):
    from dsr.cache_latents import run
    from dsr.config import build
    from dsr.data.latents import CachedLatents
    from dsr.data.views import subset_indices, without_flip

    overrides = ["experiment=quickstart_rae", "encoder.stats=null", "data.dataset.num_samples=20", "seed=3",
                 "cache.num_images=6", "cache.views=original", "cache.dtype=float32", "cache.shard_size=4",
                 f"cache.output={tmp_path / 'cache'}", f"paths.artifacts={tmp_path}"]  # fmt: skip
    cfg = compose_script("cache_latents", overrides)
    run(cfg)
    cached = CachedLatents(tmp_path / "cache")
    dataset = build(without_flip(cfg.data.dataset))
    picked = subset_indices(len(dataset), 6, 3)
    assert len(cached) == 6 and picked != list(range(6))
    encoder = build(cfg.encoder).eval()
    with torch.no_grad():
        expected = encoder.tokens(torch.stack([dataset[i][0] for i in picked]))
    for row, index in enumerate(picked):
        latents, label = cached[row]
        assert label == dataset[index][1]
        torch.testing.assert_close(latents, expected[row], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_a_documented_command_line_with_an_old_spelling_still_runs(tmp_path):
    ckpt = REPO / "tests" / "fixtures" / "quickstart_before_interval.ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "dsr.sample", f"ckpt={ckpt}", f"out_dir={tmp_path / 'old'}", "num_samples=2",
               "batch_size=2", "shard_size=2", "sampler.solver.num_steps=3", "accelerator=cpu"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "out_dir is deprecated: use output" in result.stderr
    assert (tmp_path / "old" / "samples.npz").is_file()
