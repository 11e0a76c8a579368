"""Everything a run needs on disk, checked before anything heavy is built, and reported all at once.

A run that lacks its data, its encoder weights, its latent statistics, its decoder, its register neurons, its FID
reference or its Inception weights would otherwise stop on the first of them, minutes in, and on the next one only
after that is fixed. `missing_prerequisites` looks at the config alone (paths, the Hugging Face cache) and names each
missing piece with the setting or command that provides it.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dsr.data.imagefolder import check_root as check_imagefolder_root
from dsr.data.latents import read_manifest as read_latent_manifest
from dsr.data.webdataset import read_manifest as read_shard_manifest
from dsr.encoders.rae import DECODER_HINT, STATS_HINT, missing_pretrained, pretrained_available
from dsr.metrics.inception import resolve_inception_weights
from dsr.registers.neurons import RELEASE_NEURON_FILES


class MissingPrerequisites(FileNotFoundError, ValueError):
    """Things a run needs are not there (missing files, or settings that point nowhere); the message lists each with
    what provides it."""


def _data_problem(data: DictConfig) -> str | None:
    dataset = data.get("dataset") or {}
    target = str(dataset.get("_target_", data.get("_target_", "")))
    try:
        if target.endswith("imagenet_folder"):
            check_imagefolder_root(dataset.get("root"))
        elif target.endswith("CachedLatents"):
            read_latent_manifest(dataset.get("root") or "")
        elif target.endswith("ShardDataModule"):
            read_shard_manifest(data.get("root"))
    except FileNotFoundError as err:
        return str(err)
    return None


def _run_choices() -> str:
    """`encoder=... registers=...` as chosen for this run, for the commands the messages suggest."""
    if not HydraConfig.initialized():
        return "encoder=<name>"
    choices = HydraConfig.get().runtime.choices
    return " ".join(f"{g}={choices[g]}" for g in ("encoder", "registers") if choices.get(g))


def _encoder_problems(encoder: DictConfig, frozen_decoder: bool) -> list[str]:
    problems = []
    pretrained = encoder.get("pretrained")
    if pretrained and encoder.get("local_files_only", True) and not pretrained_available(str(pretrained)):
        problems.append(missing_pretrained(str(pretrained)))
    stats = encoder.get("stats")
    if stats and not Path(str(stats)).is_file():
        problems.append(f"encoder.stats={stats} does not exist: {STATS_HINT.replace('encoder=<name>', _run_choices())}")
    weights = encoder.get("decoder_weights")
    if frozen_decoder and encoder.get("decoder") is not None and weights and not Path(str(weights)).is_file():
        hint = DECODER_HINT.replace("encoder=<name>", _run_choices())
        problems.append(f"encoder.decoder_weights={weights} does not exist: {hint}")
    registers = encoder.get("registers", "none")
    if registers in ("ttr", "recursive_ttr"):
        source = encoder.get(f"{registers}_neurons")
        if source is None or (str(source) not in RELEASE_NEURON_FILES and not Path(str(source)).is_file()):
            rounds = " analyze.rounds=2" if registers == "recursive_ttr" else ""
            problems.append(
                f"encoder.{registers}_neurons={source}: no register-neuron list; find one with `python -m dsr.analyze "
                f"encoder=<name> analyze.discover=true{rounds}` and set encoder.{registers}_neurons=<its JSON>"
            )
    return problems


def missing_prerequisites(cfg: DictConfig) -> list[str]:
    """What `python -m dsr.train` with this config would fail on, each with what provides it ([] when ready)."""
    problems = [p for p in [_data_problem(cfg.data)] if p]
    encoder = cfg.get("encoder")
    if encoder is not None:
        frozen = bool(encoder.get("freeze_decoder", True))
        problems += _encoder_problems(encoder, frozen)
    fid = (cfg.get("callbacks") or {}).get("fid")
    if fid is not None and fid.get("every_n_steps") and fid.get("features", "inception") == "inception":
        reference = fid.get("reference")
        if not reference or not Path(str(reference)).exists():
            problems.append(
                f"evaluation.reference={reference}: the in-training FID needs an ADM reference batch, image folder or "
                "statistics .npz (or $DSR_FID_REFERENCE); use evaluation.features=proxy on the built-in data; or turn "
                "it off with callbacks.fid.every_n_steps=0"
            )
        try:
            resolve_inception_weights(fid.get("inception_weights"))
        except FileNotFoundError as err:
            problems.append(str(err))
    init_from = cfg.get("init_from")
    if init_from and not Path(str(init_from)).is_file():
        problems.append(f"init_from={init_from} does not exist")
    return problems


def check_prerequisites(cfg: DictConfig) -> None:
    """Raise `MissingPrerequisites` listing everything `missing_prerequisites` finds."""
    problems = missing_prerequisites(cfg)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise MissingPrerequisites(f"this run lacks {len(problems)} prerequisite(s); nothing was started:\n{lines}")
