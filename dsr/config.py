"""Composing `conf/`, building from it, and the resolved config a run stores.

One place for what every command, test, benchmark and `dsr.convert` does with the config tree: `compose` gives the
config a `python -m dsr.<command> <overrides>` would run, with Hydra's runtime set so `${hydra:...}` interpolations
resolve; `build` instantiates a node with the configuration error itself surfacing; `resolved_config` is the plain
data stored in checkpoints. Importing this module registers the OmegaConf resolvers the tree uses.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parent / "conf"  # package data; the repository's conf/ links here
MAX_DIRNAME = 120


# --------------------------------------------------------------------------------------------------------
# resolvers
# --------------------------------------------------------------------------------------------------------


def short_dirname(name: str) -> str:
    """`${dsr.dirname:...}`: `name` as a directory name that fits a filesystem's 255-byte limit: unchanged up to
    `MAX_DIRNAME` characters, else its start plus a hash of the whole, so long override lists still give one stable
    directory per job."""
    if len(name) <= MAX_DIRNAME:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:12]
    return f"{name[: MAX_DIRNAME - 13]}-{digest}"


def reference_t_max(prediction: str) -> float:
    """`${dsr.reference_t_max:${transport.prediction}}`: the references' interval end for a prediction type."""
    from dsr.diffusion.transport import REFERENCE_T_MAX  # torch: only when a config is resolved, not for --help

    if prediction not in REFERENCE_T_MAX:
        raise ValueError(f"transport.prediction must be one of {sorted(REFERENCE_T_MAX)}, got {prediction!r}")
    return REFERENCE_T_MAX[prediction]


def usage(module: str) -> str:
    """`${dsr.usage:dsr.sample}`: a command's module docstring, read without importing it (the text of `--help`)."""
    path = CONF_DIR.parent.joinpath(*module.split(".")[1:]).with_suffix(".py")
    text = ast.get_docstring(ast.parse(path.read_text())) or module
    return text.replace("$", "$$")  # the help template is a string.Template


def group_options(*groups: str) -> str:
    """`${dsr.groups:encoder,data}`: one line per config group, with the options `conf/<group>/` holds."""
    lines = []
    for group in groups:
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        lines.append(f"  {group}: {', '.join(options)}")
    return "\n".join(lines)


def as_yaml(node: Any) -> str:
    """`${dsr.yaml:${stats}}`: a config node as YAML, for `--help`."""
    text = OmegaConf.to_yaml(node) if OmegaConf.is_config(node) else f"{node}\n"
    return text.replace("$", "$$")


OmegaConf.register_new_resolver("dsr.dirname", short_dirname, replace=True)
OmegaConf.register_new_resolver("dsr.usage", usage, replace=True)
OmegaConf.register_new_resolver("dsr.groups", group_options, replace=True)
OmegaConf.register_new_resolver("dsr.yaml", as_yaml, replace=True)
OmegaConf.register_new_resolver("dsr.reference_t_max", reference_t_max, replace=True)


# --------------------------------------------------------------------------------------------------------
# one spelling per concept: the old ones still work, with a warning naming the new
# --------------------------------------------------------------------------------------------------------


class DeprecatedName(FutureWarning):
    """A setting spelled the old way; the message names the one spelling it now has (README "Names")."""


# Old dotted key -> the one spelling, per command config. The table README "Names" shows, and tests walk.
_STAGE_KEYS = {
    "encoder.input_size": "encoder.resolution",  # pixels a frozen network sees; input_size is the latent grid
    "module.codec": "module.encoder",  # stage=decoder: the `encoder` group, as in stage=dit
    "module.discriminator.input_size": "module.discriminator.resolution",
}
RENAMED_KEYS: dict[str, dict[str, str]] = {
    "train": _STAGE_KEYS,
    "stats": {**_STAGE_KEYS, "stats.num_samples": "stats.num_images"},
    "cache_latents": {**_STAGE_KEYS, "cache.num_samples": "cache.num_images"},
    "analyze": {**_STAGE_KEYS, "analyze.out_dir": "analyze.output", "analyze.device": "accelerator"},
    "sample": {"out_dir": "output", "use_ema": "ema", "precision": "sampler.precision"},
    "evaluate": {"out": "output", "device": "accelerator"},
}
# Old values -> current ones: precisions in Lightning's names (as trainer.precision spells them), sample's ema.
RENAMED_VALUES: dict[str, dict[str, str]] = {
    "encoder.precision": {"bf16": "bf16-mixed", "fp32": "32-true"},
    "sampler.precision": {"bf16": "bf16-mixed", "fp32": "32-true"},
    "ema": {"true": "auto", "false": "none"},  # sample's use_ema=true / false
}
_OVERRIDE = re.compile(r"^(?P<prefix>~|\+\+|\+)?(?P<key>[A-Za-z_][\w.]*)(?P<rest>(=.*)?)$", re.DOTALL)


def _deprecated(old: str, new: str) -> None:
    # Explicit, without a source line: the old spelling is in the user's command line or config, not in this file.
    warnings.warn_explicit(f"{old} is deprecated: use {new}", DeprecatedName, filename="dsr", lineno=0)


def rename_overrides(config_name: str, overrides: Sequence[str]) -> list[str]:
    """Command-line overrides with old key (and value) spellings replaced by the current ones, each with a warning."""
    keys, renamed = RENAMED_KEYS.get(config_name, {}), []
    for override in overrides:
        match = _OVERRIDE.match(override)
        if match is None:
            renamed.append(override)
            continue
        prefix, key, rest = match.group("prefix") or "", match.group("key"), match.group("rest")
        if key in keys:
            _deprecated(key, keys[key])
            key = keys[key]
        values = RENAMED_VALUES.get(key, {})
        if rest[1:] in values:
            _deprecated(f"{key}={rest[1:]}", f"{key}={values[rest[1:]]}")
            rest = f"={values[rest[1:]]}"
        renamed.append(f"{prefix}{key}{rest}")
    return renamed


def _node(cfg: DictConfig, dotted: str) -> DictConfig | None:
    """The mapping at `dotted`, or None if it is absent or reached through an interpolation (`module.encoder` is
    `${encoder}` in a live config: renaming `encoder` covers it)."""
    node = cfg
    for part in dotted.split(".") if dotted else ():
        if not isinstance(node, DictConfig) or part not in node or OmegaConf.is_interpolation(node, part):
            return None
        node = node[part]
    return node if isinstance(node, DictConfig) else None


def _stored_copies(table: dict[str, Any], keys: bool) -> dict[str, Any]:
    """A stored (resolved) config holds a copy of the encoder node under `module.encoder`: the same renames apply."""
    copies = {f"module.{k}": f"module.{v}" if keys else v for k, v in table.items() if k.startswith("encoder.")}
    return {**table, **copies}


def rename_keys(config_name: str, cfg: DictConfig, warn: bool = True) -> DictConfig:
    """Move settings spelled the old way (in a config file of the user's, or a stored config) to the current
    spelling, in place; `warn=False` for stored configs, which their users cannot edit."""
    for old, new in _stored_copies(RENAMED_KEYS.get(config_name, {}), keys=True).items():
        parent_key, _, leaf = old.rpartition(".")
        parent = _node(cfg, parent_key)
        if parent is None or leaf not in parent:
            continue
        if warn:
            _deprecated(old, new)
        value = OmegaConf.to_container(parent, resolve=False)[leaf]  # interpolations stay interpolations
        with open_dict(cfg):
            OmegaConf.update(cfg, new, value, merge=False, force_add=True)
            del parent[leaf]
    for key, values in _stored_copies(RENAMED_VALUES, keys=False).items():
        parent_key, _, leaf = key.rpartition(".")
        parent = _node(cfg, parent_key)
        if parent is None or leaf not in parent or OmegaConf.is_interpolation(parent, leaf):
            continue
        value = parent[leaf]
        if isinstance(value, str) and value in values:
            if warn:
                _deprecated(f"{key}={value}", f"{key}={values[value]}")
            parent[leaf] = values[value]
    return cfg


# --------------------------------------------------------------------------------------------------------
# composing, building, storing
# --------------------------------------------------------------------------------------------------------


def compose(config_name: str, overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> DictConfig:
    """The config `python -m dsr.<command> <overrides>` would run (`config_name`: train, sample, stats, ...), with
    Hydra's runtime (`${hydra:runtime.choices.*}`) set. With `run_dir`, `paths.run_dir` is that folder. Settings
    spelled the old way are renamed, with a `DeprecatedName` warning."""
    overrides = rename_overrides(config_name, overrides)
    if run_dir is not None:
        overrides.append(f"hydra.run.dir={run_dir}")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=config_name):
            cfg = hydra_compose(config_name, overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    HydraConfig.instance().set_config(cfg)
    rename_keys(config_name, cfg)
    if run_dir is not None:
        with open_dict(cfg):
            cfg.paths.run_dir = str(run_dir)
    return cfg


def build(node: DictConfig) -> Any:
    """`instantiate`, but a configuration error (missing file, bad value) surfaces as itself, with the
    message that names the setting, rather than wrapped in Hydra's InstantiationException."""
    try:
        return instantiate(node)
    except InstantiationException as err:
        if isinstance(err.__cause__, (OSError, ValueError)):
            raise err.__cause__ from None
        raise


def resolved_config(cfg: DictConfig) -> dict:
    """The run's config as plain, resolved data (without Hydra's own node, present when composed by tests)."""
    return {
        key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
        for key in cfg
        if key != "hydra"
    }


# What may change when a run resumes: how long it runs, where and with what it logs, how it is spread over devices (the
# global batch stays: it is in `data`), its callbacks' cadence, how it samples for monitoring, and where files live.
# Everything else defines the experiment (backbone, encoder, registers, transport, loss, data and batch, the recipe's
# optimizer, schedule, EMA, clipping and precision, the seed) and is refused unless resume=force.
SAFE_ON_RESUME = (
    "trainer.max_steps", "trainer.max_epochs", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
    "trainer.accelerator", "trainer.log_every_n_steps", "trainer.enable_progress_bar", "trainer.default_root_dir",
    "trainer.num_sanity_val_steps", "trainer.benchmark", "trainer.deterministic", "logger", "callbacks", "cluster",
    "cluster_environment", "paths", "name", "sweep_name", "resume", "init_from", "evaluation", "sampler", "compile",
    "matmul_precision", "attention_backend", "backbone.grad_checkpointing", "module.backbone.grad_checkpointing",
    "data.num_workers", "data.prefetch_factor", "data.micro_batch_size", "module.solver", "module.guidance",
    "module.sampling_precision", "module.sampling_shift", "experiment",
)  # fmt: skip


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping) and node:
        out = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def resume_changes(stored: Mapping, current: Mapping) -> tuple[list[str], list[str]]:
    """The settings a resumed run changes against the config its checkpoint stores, as `key: old -> new` lines:
    (refused, allowed) by `SAFE_ON_RESUME`. Keys the stored config lacks (settings added since it was written) count
    as unchanged; stored settings spelled the old way are renamed first."""
    stored = OmegaConf.to_container(rename_keys("train", OmegaConf.create(dict(stored)), warn=False), resolve=False)
    old, new = _leaves(stored), _leaves(dict(current))
    refused, allowed = [], []
    for key in sorted(k for k in old.keys() & new.keys() if old[k] != new[k]):
        line = f"{key}: {old[key]!r} -> {new[key]!r}"
        safe = any(key == p or key.startswith(f"{p}.") for p in SAFE_ON_RESUME)
        (allowed if safe else refused).append(line)
    # A setting the code no longer has: nothing can be configured differently, so the run resumes (and says so).
    allowed += [f"{key}: {old[key]!r} -> (no longer a setting)" for key in sorted(old.keys() - new.keys())]
    return refused, allowed


def check_positive_ints(cfg: DictConfig, keys: Sequence[str]) -> None:
    """Each of `keys` must be an integer >= 1 (not a bool): a ValueError naming the first that is not."""
    for key in keys:
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")


def required_file(cfg: DictConfig, key: str, usage: str) -> Path:
    """The resolved path of the file setting `key`: a ValueError with `usage` when it is unset, FileNotFoundError
    naming it when nothing is there."""
    if OmegaConf.is_missing(cfg, key):
        raise ValueError(f"{key} is required: {usage}")
    path = Path(str(cfg[key])).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{key}={cfg[key]}: no checkpoint file at {path.resolve()}")
    return path.resolve()


# --------------------------------------------------------------------------------------------------------
# command entry points
# --------------------------------------------------------------------------------------------------------

# What a wrong setting raises: a bad value, a missing file, a key the config lacks. Anything else is a bug and keeps
# its traceback.
CONFIG_ERRORS = (ValueError, FileNotFoundError, OmegaConfBaseException)
USAGE_ERROR = 2  # exit status of a configuration error, as argparse uses for bad arguments


def report_config_errors(task: Callable[..., Any]) -> Callable[..., Any]:
    """Run `task`; a configuration error ends in one line, `error: <what to set>`, and exit status 2, instead of a
    traceback. HYDRA_FULL_ERROR=1 re-raises it with the traceback."""

    @functools.wraps(task)
    def checked(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except CONFIG_ERRORS as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error: {str(err).strip() or type(err).__name__}", file=sys.stderr, flush=True)
            raise SystemExit(USAGE_ERROR) from None

    return checked


def entry_point(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """`@hydra.main` on `conf/<config_name>.yaml` for `python -m dsr.<command>`, with configuration errors reported
    by `report_config_errors`; an override Hydra cannot compose (an unknown group option or key) is reported the same
    way, before Hydra starts."""

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @functools.wraps(task)
        def renamed(cfg: DictConfig) -> Any:
            return task(rename_keys(config_name, cfg))

        hydra_main = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(
            report_config_errors(renamed)
        )

        @functools.wraps(hydra_main)
        def main() -> Any:
            sys.argv[1:] = rename_overrides(config_name, sys.argv[1:])  # before Hydra parses them
            check_overrides(config_name, sys.argv[1:])
            return hydra_main()

        return main

    return decorate


@report_config_errors
def check_overrides(config_name: str, argv: Sequence[str]) -> None:
    """Compose once with the command line's overrides, so that one Hydra cannot compose (an unknown group option,
    a key the config lacks, bad syntax) is one line and exit status 2. Flags (`--help`, `--cfg`, `-m`, ...) and
    sweeps are left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if any(arg.startswith("-") for arg in argv):
        return
    try:
        if any(o.is_sweep_override() for o in OverridesParser.create().parse_overrides(list(argv))):
            return  # a sweep (cluster=slurm_8gpu runs every command as one): Hydra's launcher composes each job
        with warnings.catch_warnings():  # Hydra's own composition that follows warns once
            warnings.simplefilter("ignore", DeprecatedName)
            compose(config_name, argv)
    except HydraException as err:
        raise ValueError(" ".join(str(err).split("Config search path:")[0].split())) from None
