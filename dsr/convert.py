"""Import the released RAE / DSR checkpoints as dsr files.

    python -m dsr.convert stage2  SRC OUT [--weights auto|ema|model] [--release-config YAML] [OVERRIDES ...]
    python -m dsr.convert stats   SRC [--out OUT] [OVERRIDES ...]
    python -m dsr.convert decoder SRC [--out OUT] [--weights ema|model] [--grid-size G] [OVERRIDES ...]

Convert `stats` and `decoder` before `stage2`: the stage-2 conversion builds the configured encoder, which reads
them, and the latent statistics travel in the stage-2 checkpoint.

OVERRIDES are the `dsr.train` overrides that describe the model the weights belong to, e.g.
`encoder=siglip2_b backbone=dit_dh_xl registers=diffusion`. They are composed with `conf/` exactly as `dsr.train`
would, and the resolved config is stored in the stage-2 checkpoint, so `DiTModule.from_checkpoint` (and
`dsr.sample ckpt=OUT`) rebuild the model from it.

Release formats read:
- stage 2: a raw state_dict (`stage2_model.pt`), or a training checkpoint `{"model", "ema", "step", "epoch", ...}`.
  Keys may carry `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes.
- latent statistics: `{"mean": [C, h, w], "var": [C, h, w]}` (`stat.pt` / `normalization_stats.pt`).
- stage-1 decoder: a plain state_dict of RAE's ViT-MAE-style decoder (`model.pt`, as `extract_decoder.py` writes it)
  or a stage-1 training checkpoint `{"model", "ema", ...}` whose RAE state holds `decoder.*`. The key map (query, key
  and value fused into one qkv) is `dsr.models.decoder.reference_key_map`.

Stage-2 key layout (release -> dsr), the same for RAE's and DSR's code:
- LightningDiT: identical names except `blocks.i.mlp.w12 / w3` -> `blocks.i.mlp.fc1 / fc2` (SwiGLU) and
  `register_tokens` -> `registers.tokens`.
- SiT (willisma/SiT's `SiT-XL-2-256x256.pt`, a state dict or a training checkpoint with "ema"): DiT's names, the same
  as `dsr.models.sit.SiT`'s (a LightningDiT, so it takes the LightningDiT branch below; its MLP is not SwiGLU).
- JiT (LTH14/JiT's `checkpoint-last.pth`: `model`, `model_ema1`, `model_ema2`, `optimizer`, `epoch`, every key under
  its Denoiser's `net.`; or a plain state dict): `dsr.models.jit.JiT`'s names except `blocks.i.mlp.w12 / w3` ->
  `blocks.i.mlp.fc1 / fc2`. Its frozen `pos_embed` is checked and not loaded (its RoPE tables are not in the file).
  The two EMAs fill `module.ema_decays` in order (recipe=jit keeps JiT's 0.9999 and 0.9996); JiT ships no config
  file, so `--release-config` does not apply: `backbone=jit_* recipe=jit` describe the model.
- DiTwDDTHead -> DiTDH: `blocks.i` for i < depth stay trunk `blocks.i`; `blocks.{depth + j}` -> `head_blocks.j`; the
  same MLP renames; `enc_register_tokens` -> `registers.tokens`, `dec_register_tokens` -> `head_registers.tokens`.
- Fixed tables stored by the release (`pos_embed`, `*register_pos_embed`, RoPE `*feat_rope*.freqs_cos / freqs_sin`)
  are recomputed by dsr from the config; they are checked against the file (a mismatch means the config describes
  another model) and not loaded. `t_embedder.W`, the frozen Fourier frequencies, is loaded.
Any release key that is neither mapped nor a known fixed table, and any dsr key the file lacks, is an error that lists
them; so is a shape mismatch, and a fixed table the config's model computes but the file lacks (a release model built
without RoPE or without the absolute position table). `register_start` leaves no trace in the weights: pass
`--release-config` (the release's YAML) to check it, the sizes and every flag that changes the forward pass against
the composed config.

The transport (prediction type, time distribution, shift dimension, time interval) leaves no trace in the weights
either, and sampling from a model with the wrong one is silently wrong. With `--release-config` it is taken from the
release's YAML: values that only come from the default recipe yield to it, and a value set on the command line
(`recipe=...`, `transport.*=...`, or through `experiment=...`) that contradicts it is an error naming both. Without
one, the overrides must say how the model was trained: `recipe=rae` (velocity) or `recipe=dsr_release` (x-prediction),
or `transport.prediction=...`.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from dsr.config import CONF_DIR, build, compose, report_config_errors, resolved_config
from dsr.utils.files import atomic_write, load_tensors

if TYPE_CHECKING:
    from torch import Tensor, nn

# torch, Lightning and the models are imported where a conversion needs them, so `--help` answers without them.

# DDP's, torch.compile's and JiT's (its Denoiser holds the network as `net`).
PREFIXES = ("module.", "_orig_mod.", "net.")
# Fixed tables are recomputed here in float64 and the release's in float32: a layout error shows up as O(1).
FIXED_TABLE_ATOL = 1e-4


# --------------------------------------------------------------------------------------------------------
# reading release files
# --------------------------------------------------------------------------------------------------------


def strip_prefixes(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop the `module.` / `_orig_mod.` / `net.` prefixes that DDP, torch.compile and JiT's Denoiser add (in any
    order, any number)."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith(PREFIXES):
            for prefix in PREFIXES:
                key = key.removeprefix(prefix)
        if key in out:
            raise ValueError(f"two keys become '{key}' once the module./_orig_mod. prefixes are removed")
        out[key] = value
    return out


def is_state_dict(obj: Any) -> bool:
    from torch import Tensor

    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def load_file(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return load_tensors(path, "SRC")


# JiT's training checkpoint (`checkpoint-last.pth`): the raw weights and its two EMAs (0.9999 and 0.9996 as trained).
JIT_EMA_KEYS = ("model_ema1", "model_ema2")


def release_weights(checkpoint: Any, weights: str = "auto") -> tuple[dict[str, Tensor], list[dict[str, Tensor]], int]:
    """(raw weights, EMA weight sets, optimizer step) from a release stage-2 file.

    `weights`: "auto" takes "model" for the raw and "ema" for the EMA weights of a training checkpoint (JiT's has two,
    `model_ema1` and `model_ema2`, in that order; a plain state_dict, which the release ships as its EMA weights, fills
    both); "ema" / "model" put that one set in both ("ema" is JiT's first EMA).
    """
    if weights not in ("auto", "ema", "model"):
        raise ValueError(f"--weights must be auto, ema or model, got {weights!r}")
    if is_state_dict(checkpoint):
        if weights == "model":
            raise ValueError(
                "this file is a plain state_dict (one set of weights, the release's EMA): use --weights auto"
            )
        state = strip_prefixes(checkpoint)
        return state, [state], 0
    if isinstance(checkpoint, Mapping) and "model" in checkpoint and set(JIT_EMA_KEYS) <= set(checkpoint):
        # JiT counts epochs, not steps; a positive count only marks the EMAs as already averaged.
        step = max(1, int(checkpoint.get("epoch", 0)))
        model = strip_prefixes(checkpoint["model"])
        emas = [strip_prefixes(checkpoint[key]) for key in JIT_EMA_KEYS]
        if weights == "auto":
            return model, emas, step
        chosen = model if weights == "model" else emas[0]
        return chosen, [chosen], step
    if not isinstance(checkpoint, Mapping) or not ({"model", "ema"} & set(checkpoint)):
        found = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ValueError(f"not a release stage-2 file: expected a state_dict or a dict with 'model'/'ema', got {found}")
    sets = {k: strip_prefixes(checkpoint[k]) for k in ("model", "ema") if k in checkpoint}
    step = int(checkpoint.get("step", 0))
    if weights == "auto":
        model = sets.get("model", sets.get("ema"))
        return model, [sets.get("ema", model)], step
    if weights not in sets:
        raise ValueError(f"--weights {weights}: the checkpoint has no '{weights}' entry (it has {sorted(sets)})")
    return sets[weights], [sets[weights]], step


# --------------------------------------------------------------------------------------------------------
# stage-2 key layout
# --------------------------------------------------------------------------------------------------------


def release_name(key: str, backbone: nn.Module) -> str:
    """The release's name of one of `backbone`'s state-dict keys."""
    from timm.layers import GluMlp

    from dsr.models.ddt import DiTDH
    from dsr.models.dit import LightningDiT
    from dsr.models.jit import JiT

    if isinstance(backbone, JiT):
        key = {"registers.tokens": "register_tokens"}.get(key, key)  # JiT itself has no registers
    elif isinstance(backbone, DiTDH):
        key = re.sub(r"^head_blocks\.(\d+)\.", lambda m: f"blocks.{backbone.depth + int(m.group(1))}.", key)
        key = {"registers.tokens": "enc_register_tokens", "head_registers.tokens": "dec_register_tokens"}.get(key, key)
    elif isinstance(backbone, LightningDiT):
        key = {"registers.tokens": "register_tokens"}.get(key, key)
    else:
        raise TypeError(f"no release layout for {type(backbone).__name__}")
    if isinstance(backbone.blocks[0].mlp, GluMlp):  # the release's SwiGLUFFN names its projections w12 / w3
        key = re.sub(r"\.mlp\.fc1\.", ".mlp.w12.", key)
        key = re.sub(r"\.mlp\.fc2\.", ".mlp.w3.", key)
    return key


def release_layout(backbone: nn.Module) -> dict[str, str]:
    """{release key: dsr key} for every entry of `backbone.state_dict()`."""
    return {release_name(key, backbone): key for key in backbone.state_dict()}


def release_fixed_tables(backbone: nn.Module) -> dict[str, Tensor]:
    """The release's frozen tables (parameters without gradient, persistent buffers) as `backbone` computes them."""
    from dsr.models.dit import LightningDiT
    from dsr.models.jit import JiT

    tables: dict[str, Tensor] = {}
    if backbone.pos_embed is not None:
        tables["pos_embed"] = backbone.pos_embed
    if isinstance(backbone, JiT):  # JiT keeps its RoPE tables as plain attributes, outside the state dict
        return tables
    if isinstance(backbone, LightningDiT):
        if backbone.rope is not None:
            tables["feat_rope.freqs_cos"], tables["feat_rope.freqs_sin"] = backbone.rope.tables(prefixed=False)
            if backbone.registers is not None:
                cos, sin = backbone.rope.tables(prefixed=True)
                tables["feat_rope_incontext.freqs_cos"], tables["feat_rope_incontext.freqs_sin"] = cos, sin
        if backbone.registers is not None:
            tables["register_pos_embed"] = backbone.registers.pos_code
        return tables
    if backbone.rope is not None:
        tables["enc_feat_rope.freqs_cos"], tables["enc_feat_rope.freqs_sin"] = backbone.rope.tables(prefixed=False)
        tables["dec_feat_rope.freqs_cos"], tables["dec_feat_rope.freqs_sin"] = backbone.head_rope.tables(prefixed=False)
        if backbone.registers is not None:
            cos, sin = backbone.rope.tables(prefixed=True)
            tables["enc_feat_rope_incontext.freqs_cos"], tables["enc_feat_rope_incontext.freqs_sin"] = cos, sin
        if backbone.head_registers is not None:
            cos, sin = backbone.head_rope.tables(prefixed=True)
            tables["dec_feat_rope_incontext.freqs_cos"], tables["dec_feat_rope_incontext.freqs_sin"] = cos, sin
    if backbone.registers is not None:
        tables["enc_register_pos_embed"] = backbone.registers.pos_code
    if backbone.head_registers is not None:
        tables["dec_register_pos_embed"] = backbone.head_registers.pos_code
    return tables


def release_to_dsr(release: Mapping[str, Tensor], backbone: nn.Module) -> dict[str, Tensor]:
    """Map a release stage-2 state_dict onto `backbone`'s keys; every key, shape and fixed table is checked."""
    release = strip_prefixes(release)
    layout = release_layout(backbone)
    tables = release_fixed_tables(backbone)
    target = backbone.state_dict()
    unknown = sorted(k for k in release if k not in layout and k not in tables)
    missing = sorted(k for k in layout if k not in release)
    # The release saves every fixed table its model uses, so one the file lacks is one its model did not apply.
    absent_tables = sorted(k for k in tables if k not in release)
    problems = []
    if unknown:
        problems.append(f"keys the config's model does not have: {unknown}")
    if missing:
        problems.append(f"keys the config's model needs but the file lacks: {missing}")
    if absent_tables:
        problems.append(
            f"fixed tables the config's model applies but the file lacks: {absent_tables} (a release model built "
            "without them: set backbone.use_rope=false for *feat_rope*, backbone.use_pos_embed=false for pos_embed)"
        )
    for key, value in release.items():
        reference = target[layout[key]] if key in layout else tables.get(key)
        if reference is not None and tuple(value.shape) != tuple(reference.shape):
            problems.append(f"{key}: shape {tuple(value.shape)} in the file, {tuple(reference.shape)} in the model")
        elif key in tables:
            error = (value.double() - reference.double()).abs().max().item()
            if error > FIXED_TABLE_ATOL:
                problems.append(
                    f"{key}: the fixed table differs from the one the config gives (max |diff| {error:.3g})"
                )
    if problems:
        raise ValueError(
            "the release weights do not fit the composed backbone config (check backbone=, registers= and the "
            "backbone.* overrides):\n  " + "\n  ".join(problems)
        )
    return {dsr_key: release[key].to(target[dsr_key].dtype) for key, dsr_key in layout.items()}


def dsr_to_release(backbone: nn.Module) -> dict[str, Tensor]:
    """`backbone`'s weights in the release's layout, fixed tables included (the inverse of `release_to_dsr`)."""
    state = {release_name(k, backbone): v.detach().clone() for k, v in backbone.state_dict().items()}
    state.update({k: v.detach().clone() for k, v in release_fixed_tables(backbone).items()})
    return state


# --------------------------------------------------------------------------------------------------------
# checking a release config against the composed one
# --------------------------------------------------------------------------------------------------------


def release_config_mismatches(release_config: Mapping, backbone: nn.Module, latent_shape: Sequence[int]) -> list[str]:
    """Differences between a release YAML's `stage_2` block and `backbone` (built from the composed config)."""
    from timm.layers import GluMlp
    from torch import nn

    from dsr.models.ddt import DiTDH
    from dsr.models.dit import LightningDiT
    from dsr.models.layers import RMSNorm

    stage2 = release_config["stage_2"]
    params = dict(stage2.get("params", {}))
    cls_name = str(stage2["target"]).rsplit(".", 1)[-1]
    expected_cls = {"LightningDiT": LightningDiT, "DiTwDDTHead": DiTDH}.get(cls_name)
    if expected_cls is None:
        return [f"stage_2.target={stage2['target']} is not a model this converter knows"]
    if not isinstance(backbone, expected_cls):
        return [f"the release model is {cls_name}: use backbone={'dit_dh_*' if expected_cls is DiTDH else 'dit_*'}"]

    def pair(value: Any) -> list:
        return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value, value]

    trunk, head = backbone.blocks[0], getattr(backbone, "head_blocks", [None])[0]
    registers = int(params.get("register_len", 0)) if params.get("register_conditioning") else 0
    ours: dict[str, Any] = {
        "in_channels": (params.get("in_channels"), latent_shape[0], "encoder="),
        "input_size": (params.get("input_size"), latent_shape[1], "encoder="),
        # dsr's DiT-DH uses one patch size for trunk and head (every released model: 1).
        "patch_size": (pair(params.get("patch_size", 1)), [backbone.patch_size] * 2, "backbone.patch_size"),
        "register_len": (registers, backbone.num_registers, "registers= / backbone.num_registers"),
    }
    if registers:
        ours["register_start"] = (params.get("register_start", 0), backbone.register_start, "backbone.register_start")
    if expected_cls is DiTDH:
        hidden, depth, heads = pair(params["hidden_size"]), pair(params["depth"]), pair(params["num_heads"])
        ours["hidden_size"] = (hidden, [trunk.attn.qkv.in_features, head.attn.qkv.in_features], "backbone.*hidden_size")
        ours["depth"] = (depth, [len(backbone.blocks), len(backbone.head_blocks)], "backbone.depth / head_depth")
        ours["num_heads"] = (heads, [trunk.attn.num_heads, head.attn.num_heads], "backbone.num_heads / head_num_heads")
        if registers:
            ours["register_len (head)"] = (registers, backbone.head_num_registers, "backbone.head_num_registers")
    else:
        ours["hidden_size"] = (params["hidden_size"], trunk.attn.qkv.in_features, "backbone.hidden_size")
        ours["depth"] = (params["depth"], len(backbone.blocks), "backbone.depth")
        ours["num_heads"] = (params["num_heads"], trunk.attn.num_heads, "backbone.num_heads")
    # Flags that change the forward pass, with the release's defaults (its LightningDiT always adds pos_embed).
    flags = {
        "use_qknorm": (False, not isinstance(trunk.attn.q_norm, nn.Identity)),
        "use_swiglu": (True, isinstance(trunk.mlp, GluMlp)),
        "use_rmsnorm": (True, isinstance(trunk.norm1, RMSNorm)),
        "use_rope": (True, backbone.use_rope),
        "use_pos_embed": (True, backbone.pos_embed is not None),
        "wo_shift": (False, trunk.wo_shift),
    }
    for flag, (default, mine) in flags.items():
        ours[flag] = (bool(params.get(flag, default)), mine, f"backbone.{flag}")
    unsupported = [f for f in ("learn_sigma", "final_no_ln", "attn_with_bias") if params.get(f)]
    return [f"{flag}=true: dsr's backbones have no such variant" for flag in unsupported] + [
        f"{name}: release {theirs}, config {mine} (set {setting})"
        for name, (theirs, mine, setting) in ours.items()
        if theirs is not None and theirs != mine
    ]


def release_transport(release_config: Mapping) -> dict[str, Any]:
    """The transport a release YAML trains and samples with, as `dsr.diffusion.transport.Transport` arguments.

    Prediction "data" is dsr's "x" ("velocity" is the release's default); the interval is the release's for that
    prediction (`REFERENCE_T_MAX`); the shift comes from `misc.time_dist_shift_dim / time_dist_shift_base`, whose
    default is the product of `misc.latent_size` (768 x 16 x 16 when absent), as the release's training script has it.
    """
    from dsr.diffusion.transport import REFERENCE_T_MAX

    params = dict((release_config.get("transport") or {}).get("params") or {})
    misc = dict(release_config.get("misc") or {})
    if params.get("path_type", "Linear") != "Linear":
        raise ValueError(f"transport.params.path_type={params['path_type']}: dsr has only the Linear path")
    if params.get("loss_weight") is not None:
        raise ValueError(f"transport.params.loss_weight={params['loss_weight']}: dsr has only the unweighted loss")
    prediction = {"data": "x", "velocity": "velocity"}.get(str(params.get("prediction", "velocity")))
    if prediction is None:
        raise ValueError(f"transport.params.prediction={params['prediction']}: dsr supports data (x) and velocity")
    time_dist = str(params.get("time_dist_type", "uniform"))
    if time_dist == "uniform":
        dist: dict[str, Any] = {"time_dist": "uniform"}
    elif time_dist.startswith("logit-normal_"):
        mean, std = (float(v) for v in time_dist.removeprefix("logit-normal_").split("_"))
        dist = {"time_dist": "logit_normal", "logit_mean": mean, "logit_std": std}
    else:
        raise ValueError(f"transport.params.time_dist_type={time_dist}: expected uniform or logit-normal_<mu>_<sigma>")
    shift_dim = misc.get("time_dist_shift_dim", math.prod(int(d) for d in misc.get("latent_size", (768, 16, 16))))
    return {
        "prediction": prediction,
        **dist,
        "t_min": 0.0,
        "t_max": REFERENCE_T_MAX[prediction],
        "shift": None,
        "shift_dim": int(shift_dim),
        "shift_base_dim": int(misc.get("time_dist_shift_base", 4096)),
    }


def _transport_keys_set_by(config_file: Path) -> set[str]:
    """The `transport.*` keys a recipe or experiment file sets, its recipe choice included."""
    if not config_file.is_file():
        return set()  # an unknown option: composing the config reports it
    node = OmegaConf.load(config_file)
    keys = set(node.get("transport") or {})
    for entry in node.get("defaults") or []:
        if isinstance(entry, Mapping):
            for group, choice in entry.items():
                if str(group).removeprefix("override").strip(" /") == "recipe":
                    keys |= _transport_keys_set_by(CONF_DIR / "recipe" / f"{choice}.yaml")
    return keys


def stated_transport_keys(overrides: Sequence[str]) -> set[str]:
    """The `transport.*` keys the command line sets: directly, through `recipe=`, or through `experiment=`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys: set[str] = set()
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if key.startswith("transport."):
            keys.add(key.removeprefix("transport."))
        elif key in ("recipe", "experiment"):
            keys |= _transport_keys_set_by(CONF_DIR / key / f"{override.value()}.yaml")
    return keys


def transport_overrides(overrides: Sequence[str], release_config: Mapping | None) -> list[str]:
    """The `transport.*` overrides that make the composed transport the release config's (or [] without one).

    A value the command line states and the release config contradicts is an error naming both; without a release
    config, the command line must state the prediction type."""
    stated = stated_transport_keys(overrides)
    if release_config is None:
        if "prediction" not in stated:
            raise ValueError(
                "say how the imported model was trained: add recipe=rae (RAE's velocity models), recipe=dsr_release "
                "(the DSR release's x-prediction) or transport.prediction=x|velocity, or pass --release-config with "
                "the release's YAML"
            )
        return []
    theirs = release_transport(release_config)
    composed = instantiate(compose("train", overrides, run_dir=".").transport)
    ours = {key: getattr(composed, key) for key in theirs}
    conflicts = [
        f"transport.{key}: the release config says {theirs[key]}, the command line {ours[key]}"
        for key in theirs
        if key in stated and ours[key] != theirs[key]
    ]
    if conflicts:
        raise ValueError(
            "the command line contradicts the release config's transport (drop the override, or fix the file):\n  "
            + "\n  ".join(conflicts)
        )
    return [f"transport.{key}={'null' if v is None else v}" for key, v in theirs.items() if v != ours[key]]


# --------------------------------------------------------------------------------------------------------
# the conversions
# --------------------------------------------------------------------------------------------------------


def convert_stage2(
    src: str | Path,
    out: str | Path,
    overrides: Sequence[str] = (),
    weights: str = "auto",
    release_config: str | Path | None = None,
) -> Path:
    """Write a dsr stage-2 checkpoint (Lightning layout: `state_dict` with `backbone.*` and `ema.*`, `dsr.config`)."""
    import lightning as L
    import torch

    from dsr.models.jit import JiT
    from dsr.utils.frozen import drop_frozen

    out = Path(out)
    release = None
    if release_config is not None:
        if get_class(compose("train", overrides, run_dir=out.parent).backbone._target_) is JiT:
            raise ValueError("--release-config: JiT ships no config file; the overrides (backbone=jit_*, "
                             "recipe=jit) describe the model")  # fmt: skip
        release = OmegaConf.to_container(OmegaConf.load(release_config), resolve=True)
    overrides = [*overrides, *transport_overrides(overrides, release)]
    cfg = compose("train", overrides, run_dir=out.parent)
    if "backbone" not in cfg.get("module", {}):
        raise ValueError("the composed config has no module.backbone: convert stage-2 weights with stage=dit")
    module = build(cfg.module)
    if release is not None:
        mismatches = release_config_mismatches(release, module.backbone, module.latent_shape)
        if mismatches:
            raise ValueError(f"{release_config} describes another model:\n  " + "\n  ".join(mismatches))

    checkpoint = load_file(src)
    model_weights, ema_sets, step = release_weights(checkpoint, weights)
    module.backbone.load_state_dict(release_to_dsr(model_weights, module.backbone))
    if len(ema_sets) > 1 and len(ema_sets) != len(module.ema.averages):
        raise ValueError(
            f"the file holds {len(ema_sets)} EMAs and the config keeps {len(module.ema.averages)} "
            f"(module.ema_decays={list(module.ema.decays)}): recipe=jit keeps JiT's two, [0.9999, 0.9996]"
        )
    # One EMA in the file (the DSR / RAE releases): every configured decay starts from it. Several (JiT): in order.
    for i, average in enumerate(module.ema.averages):
        average.load_state_dict(release_to_dsr(ema_sets[min(i, len(ema_sets) - 1)], average))
    module.ema.n_averaged.fill_(max(step, 1))  # > 0: a first EMA update averages instead of copying the raw weights

    module.run_config = resolved_config(cfg)
    lightning_checkpoint = {
        "state_dict": drop_frozen(module, module.state_dict()),
        "epoch": int(checkpoint.get("epoch", 0)) if not is_state_dict(checkpoint) else 0,
        "global_step": step,
        "pytorch-lightning_version": L.__version__,
    }
    module.on_save_checkpoint(lightning_checkpoint)
    lightning_checkpoint["dsr"]["converted_from"] = {"path": str(Path(src).resolve()), "weights": weights}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: torch.save(lightning_checkpoint, f))
    return out


def convert_stats(src: str | Path, out: str | Path) -> Path:
    """Release `{mean, var}` [C, h, w] -> the dsr statistics file (same keys, float32, plus where they came from)."""
    import torch

    stats = load_file(src)
    if not isinstance(stats, Mapping):
        raise ValueError(f"{src}: expected a dict with 'mean' and 'var', got {type(stats).__name__}")
    unknown, missing = sorted(set(stats) - {"mean", "var"}), sorted({"mean", "var"} - set(stats))
    if unknown or missing:
        raise ValueError(
            f"{src}: a release statistics file holds exactly 'mean' and 'var'; missing {missing}, unexpected {unknown}"
        )
    mean, var = stats["mean"], stats["var"]
    if mean.ndim != 3 or mean.shape != var.shape:
        raise ValueError(f"{src}: mean {tuple(mean.shape)} and var {tuple(var.shape)} must both be [C, h, w]")
    if (var < 0).any():
        raise ValueError(f"{src}: negative variances")
    converted = {
        "mean": mean.float().contiguous(),
        "var": var.float().contiguous(),
        "count": None,  # the release's estimator is an EMA over batches (momentum 0.1), not a count of images
        "source": str(Path(src).resolve()),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: torch.save(converted, f))
    return out


def release_decoder_weights(checkpoint: Any, weights: str = "ema") -> dict[str, Tensor]:
    """The RAE decoder's state_dict (ViTMAE names) from a plain decoder file or a stage-1 training checkpoint.

    A training checkpoint's "model" / "ema" entry holds the whole RAE: `decoder.*` is kept, and `encoder.*` (the
    frozen encoder, loaded from the hub instead) is dropped; any other key is an error.
    """
    if weights not in ("ema", "model"):
        raise ValueError(f"--weights must be ema or model for a decoder, got {weights!r}")
    if not is_state_dict(checkpoint):
        if not isinstance(checkpoint, Mapping) or weights not in checkpoint:
            found = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
            raise ValueError(
                f"not a release decoder file: expected a state_dict or a dict with '{weights}', got {found}"
            )
        checkpoint = checkpoint[weights]
    state = strip_prefixes(checkpoint)
    if any(key.startswith("decoder.") for key in state):  # an RAE state dict (decoder keys start "decoder_")
        others = sorted({key for key in state if not key.startswith(("decoder.", "encoder."))})
        if others:
            raise ValueError(f"unexpected keys next to the RAE's decoder.* and encoder.*: {others}")
        state = {key.removeprefix("decoder."): value for key, value in state.items() if key.startswith("decoder.")}
    return state


def convert_decoder(
    src: str | Path, out: str | Path, overrides: Sequence[str] = (), weights: str = "ema", grid_size: int | None = None
) -> Path:
    """RAE stage-1 decoder weights -> a plain state_dict of the configured `dsr.models.decoder.ViTDecoder`.

    The decoder is built from the `decoder` config group composed from `overrides`; its latent width comes from the
    weights (`decoder_embed`) and its token grid from the released position table (or `grid_size` without one).
    """
    import torch

    from dsr.models.decoder import REFERENCE_POS_EMBED, from_reference_state_dict

    cfg = compose("train", overrides, run_dir=".")
    if cfg.get("decoder") is None:
        raise ValueError("the composed config has no decoder: choose one, e.g. decoder=vit_xl")
    state = release_decoder_weights(load_file(src), weights)
    if "decoder_embed.weight" not in state:
        raise ValueError(f"{src}: no decoder_embed.weight; not an RAE decoder (keys: {sorted(state)[:8]} ...)")
    in_channels = state["decoder_embed.weight"].shape[1]
    if REFERENCE_POS_EMBED in state:
        table_grid = math.isqrt(state[REFERENCE_POS_EMBED].shape[1] - 1)
        if grid_size is not None and grid_size != table_grid:
            raise ValueError(
                f"--grid-size {grid_size}, but the file's {REFERENCE_POS_EMBED} is for a {table_grid} grid"
            )
        grid_size = table_grid
    elif grid_size is None:
        raise ValueError(f"{src} has no {REFERENCE_POS_EMBED}: give the token grid with --grid-size (16 at 256 px)")
    decoder = instantiate(cfg.decoder)(in_channels=in_channels, grid_size=grid_size)
    if REFERENCE_POS_EMBED in state and state[REFERENCE_POS_EMBED].shape[-1] != decoder.pos_embed.shape[-1]:
        raise ValueError(
            f"the release decoder is {state[REFERENCE_POS_EMBED].shape[-1]} wide, the configured one "
            f"{decoder.pos_embed.shape[-1]}: check decoder= and decoder.hidden_size"
        )
    try:
        converted = from_reference_state_dict(state, decoder)
    except KeyError as err:  # unknown / missing keys, listed by the decoder's own key map
        raise ValueError(f"{err.args[0]} (check decoder= and decoder.depth)") from None
    target = decoder.state_dict()
    misshapen = [
        f"{key}: {tuple(value.shape)} in the file, {tuple(target[key].shape)} in the model"
        for key, value in converted.items()
        if key in target and value.shape != target[key].shape
    ]
    if misshapen:
        raise ValueError(
            "the release decoder does not fit the composed decoder config (check decoder= and decoder.*):\n  "
            + "\n  ".join(misshapen)
        )
    decoder.load_state_dict({k: v.to(target[k].dtype) for k, v in converted.items()})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: torch.save(decoder.state_dict(), f))
    return out


def default_path(overrides: Sequence[str], key: str) -> Path:
    """`paths.<key>` of the config composed from `overrides` (where the encoder expects the file)."""
    cfg = compose("train", overrides, run_dir=".")
    if key not in cfg.paths:
        raise ValueError(f"the config has no paths.{key}: give --out")
    return Path(str(cfg.paths[key]))


# --------------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dsr.convert",
        description="Import released RAE / DSR checkpoints (stage-2 DiT / DiT-DH, latent statistics, stage-1 "
        "decoder) as dsr files. Trailing OVERRIDES are dsr.train overrides naming the model the weights belong to, "
        "e.g. encoder=siglip2_b backbone=dit_dh_xl registers=diffusion.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Convert in this order (the stage-2 conversion builds the configured encoder, which reads the first "
        "two,\nand stores the latent statistics in the checkpoint):\n"
        "  python -m dsr.convert stats   stat.pt  encoder=siglip2_b\n"
        "  python -m dsr.convert decoder model.pt encoder=siglip2_b decoder=vit_xl\n"
        "  python -m dsr.convert stage2  stage2_model.pt outputs/dit_dh_xl/checkpoints/last.ckpt \\\n"
        "      --release-config DiTDH-XL_SigLIP2-B_data_lognormal.yaml \\\n"
        "      encoder=siglip2_b decoder=vit_xl backbone=dit_dh_xl registers=none\n"
        "A stage-2 import states how the model was trained: --release-config (its transport is taken over), or\n"
        "recipe=rae (velocity) / recipe=dsr_release (x-prediction).\n"
        "Each KIND has its own --help.",
    )
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")

    s2 = kinds.add_parser(
        "stage2",
        help="LightningDiT / DiT-DH weights (with or without diffusion registers) -> a dsr stage-2 checkpoint",
        description="Reads a raw state_dict (stage2_model.pt) or a release training checkpoint ('model'/'ema') of "
        "RAE's or DSR's LightningDiT / DiTwDDTHead and writes a checkpoint that DiTModule.from_checkpoint and "
        "`dsr.sample ckpt=OUT` load. The OVERRIDES must describe the same model: backbone=dit_xl or dit_dh_xl, "
        "registers=diffusion for DSR's register variants (36 registers, register_start 8 as released). Convert the "
        "latent statistics and the decoder first: the encoder is built as configured and its statistics are stored "
        "in the checkpoint.",
    )
    s2.add_argument("src", type=Path, help="release file: stage2_model.pt or a training checkpoint ep-*.pt")
    s2.add_argument("out", type=Path, help="dsr checkpoint to write (e.g. outputs/<name>/checkpoints/last.ckpt)")
    s2.add_argument(
        "--weights",
        choices=("auto", "ema", "model"),
        default="auto",
        help="auto: training checkpoint 'model' -> backbone and 'ema' -> EMA, a plain state_dict fills both; "
        "ema / model: that one set in both slots (JiT's checkpoint: auto fills the configured decays with its two "
        "EMAs in order; ema is its first)",
    )
    s2.add_argument(
        "--release-config",
        type=Path,
        help="the release's YAML: its transport block (prediction, time distribution, shift, interval) is taken over "
        "and its stage_2 block is checked against the composed config (register_start and the forward flags are not "
        "visible in the weights)",
    )
    s2.add_argument("overrides", nargs="*", help="dsr.train overrides, e.g. backbone=dit_dh_xl registers=diffusion")

    st = kinds.add_parser(
        "stats",
        help="latent statistics {mean, var} [C, h, w] -> the dsr statistics file",
        description="Reads a release stat.pt / normalization_stats.pt and writes the dsr statistics file "
        "(mean, var, count=None, source). Without --out it goes where encoder.stats points by default "
        "(paths.latent_stats of the config composed from OVERRIDES, e.g. encoder=siglip2_b).",
    )
    st.add_argument("src", type=Path, help="release statistics file")
    st.add_argument("--out", type=Path, help="output file (default: paths.latent_stats)")
    st.add_argument("overrides", nargs="*", help="dsr.train overrides naming the encoder, e.g. encoder=siglip2_b")

    dec = kinds.add_parser(
        "decoder",
        help="RAE stage-1 ViT decoder (ViTMAE key names) -> a state_dict of dsr.models.decoder.ViTDecoder",
        description="Reads a released decoder (model.pt / ema.pt: a plain state_dict of RAE's GeneralDecoder) or a "
        "stage-1 training checkpoint ('model'/'ema' holding the RAE's decoder.* keys) and writes the plain "
        "state_dict that encoder.decoder_weights loads. The decoder is built from the decoder config group "
        "(e.g. decoder=vit_xl); without --out the file goes to paths.decoder_weights of the composed config "
        "(under $DSR_ARTIFACTS, default artifacts/).",
    )
    dec.add_argument("src", type=Path, help="release decoder file or stage-1 training checkpoint")
    dec.add_argument("--out", type=Path, help="output file (default: paths.decoder_weights)")
    dec.add_argument(
        "--weights", choices=("ema", "model"), default="ema", help="which set of a training checkpoint (default: ema)"
    )
    dec.add_argument("--grid-size", type=int, help="token grid side, only for files without decoder_pos_embed")
    dec.add_argument("overrides", nargs="*", help="dsr.train overrides, e.g. encoder=siglip2_b decoder=vit_xl")
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    p = parser()
    # Overrides may come before or after the options; argparse leaves those after an option unparsed.
    args, rest = p.parse_known_args(argv)
    unknown = [arg for arg in rest if arg.startswith("-") or "=" not in arg]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *rest]
    if args.kind == "stage2":
        path = convert_stage2(args.src, args.out, args.overrides, args.weights, args.release_config)
    elif args.kind == "stats":
        path = convert_stats(args.src, args.out or default_path(args.overrides, "latent_stats"))
    else:
        out = args.out or default_path(args.overrides, "decoder_weights")
        path = convert_decoder(args.src, out, args.overrides, args.weights, args.grid_size)
    print(f"wrote {path}")
    return path


# `python -m dsr.convert` and `dsr-convert`: a configuration error is one line and exit status 2.
cli = report_config_errors(main)

if __name__ == "__main__":
    cli(sys.argv[1:])
