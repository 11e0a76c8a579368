"""Import of released RAE / DSR files: key layout, checks, and a converted model's forward against stored values.

No reference code is needed: release-format files are written here from the documented key layout.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DDT_TINY

from dsr.config import compose
from dsr.convert import (
    convert_stats,
    dsr_to_release,
    main,
    release_layout,
    release_to_dsr,
    release_weights,
    strip_prefixes,
)
from dsr.lightning.dit_module import DiTModule
from dsr.models.ddt import DiTDH
from dsr.models.dit import LightningDiT
from dsr.models.sit import SiT

# A tiny DSR-release DiT-DH on 3x4x4 latents (pixel encoder, patch 1, 4 px): trunk 32 x 3 (2 heads), head 48 x 2
# (2 heads), 4 registers in each bank, trunk registers joining at block 1.
OVERRIDES = [
    "encoder=pixel",
    "encoder.patch_size=1",
    "data=synthetic",
    "data.image_size=4",
    "data.num_classes=5",
    "backbone=dit_dh_s",
    "backbone.hidden_size=32",
    "backbone.depth=3",
    "backbone.num_heads=2",
    "backbone.head_hidden_size=48",
    "backbone.head_depth=2",
    "backbone.head_num_heads=2",
    "registers=diffusion",
    "backbone.num_registers=4",
    "backbone.register_start=1",
    "recipe=dsr_release",
]
# test_ddt's tiny DiT-DH, with patch size 1 and registers (the released layout).
TINY = {**DDT_TINY, "patch_size": 1, "num_registers": 4, "register_start": 1}

# The release's DiTwDDTHead(hidden_size=[32, 48], depth=[3, 2], num_heads=[2, 2], register_conditioning=True,
# register_len=4), as its state_dict names and shapes things (trunk and head blocks share one `blocks` list; RoPE
# tables and the frozen sin-cos tables are saved too).
BLOCK_KEYS = {
    "norm1.weight": "D",
    "norm2.weight": "D",
    "attn.qkv.weight": "3D,D",
    "attn.qkv.bias": "3D",
    "attn.proj.weight": "D,D",
    "attn.proj.bias": "D",
    "mlp.w12.weight": "2H,D",
    "mlp.w12.bias": "2H",
    "mlp.w3.weight": "D,H",
    "mlp.w3.bias": "D",
    "adaLN_modulation.1.weight": "6D,D",
    "adaLN_modulation.1.bias": "6D",
}
RELEASE_DDT_KEYS = {
    "x_embedder.proj.weight": (48, 3, 1, 1),
    "x_embedder.proj.bias": (48,),
    "s_embedder.proj.weight": (32, 3, 1, 1),
    "s_embedder.proj.bias": (32,),
    "s_projector.weight": (48, 32),
    "s_projector.bias": (48,),
    "t_embedder.W": (256,),
    "t_embedder.mlp.0.weight": (32, 512),
    "t_embedder.mlp.0.bias": (32,),
    "t_embedder.mlp.2.weight": (32, 32),
    "t_embedder.mlp.2.bias": (32,),
    "y_embedder.embedding_table.weight": (6, 32),
    "final_layer.norm_final.weight": (48,),
    "final_layer.linear.weight": (3, 48),
    "final_layer.linear.bias": (3,),
    "final_layer.adaLN_modulation.1.weight": (96, 48),
    "final_layer.adaLN_modulation.1.bias": (96,),
    "pos_embed": (1, 16, 32),
    "enc_register_tokens": (1, 4, 32),
    "enc_register_pos_embed": (1, 4, 32),
    "dec_register_tokens": (1, 4, 48),
    "dec_register_pos_embed": (1, 4, 48),
    "enc_feat_rope.freqs_cos": (16, 16),
    "enc_feat_rope.freqs_sin": (16, 16),
    "enc_feat_rope_incontext.freqs_cos": (20, 16),
    "enc_feat_rope_incontext.freqs_sin": (20, 16),
    "dec_feat_rope.freqs_cos": (16, 24),
    "dec_feat_rope.freqs_sin": (16, 24),
    "dec_feat_rope_incontext.freqs_cos": (20, 24),
    "dec_feat_rope_incontext.freqs_sin": (20, 24),
}
for _i in range(5):
    _D = 32 if _i < 3 else 48
    _H = int(8 * _D / 3)
    for _name, _shape in BLOCK_KEYS.items():
        _dims = {"D": _D, "3D": 3 * _D, "6D": 6 * _D, "H": _H, "2H": 2 * _H}
        RELEASE_DDT_KEYS[f"blocks.{_i}.{_name}"] = tuple(_dims[d] for d in _shape.split(","))


def tiny_ddt() -> DiTDH:
    torch.manual_seed(0)
    return DiTDH(**TINY)


def test_release_layout_of_dit_dh_with_registers():
    release = dsr_to_release(tiny_ddt())
    assert {k: tuple(v.shape) for k, v in release.items()} == RELEASE_DDT_KEYS


def test_release_layout_of_lightningdit_with_registers():
    torch.manual_seed(0)
    model = LightningDiT(**{k: v for k, v in TINY.items() if not k.startswith("head_")})
    release = dsr_to_release(model)
    fixed = {
        "pos_embed",
        "register_pos_embed",
        "feat_rope.freqs_cos",
        "feat_rope.freqs_sin",
        "feat_rope_incontext.freqs_cos",
        "feat_rope_incontext.freqs_sin",
    }
    assert fixed <= set(release)
    assert release["feat_rope_incontext.freqs_cos"].shape == (20, 16)
    assert torch.equal(release["register_tokens"], model.registers.tokens)
    assert torch.equal(release["blocks.2.mlp.w12.weight"], model.blocks[2].mlp.fc1.weight)
    assert torch.equal(release["blocks.2.mlp.w3.bias"], model.blocks[2].mlp.fc2.bias)
    assert not any(".fc1." in k or ".fc2." in k or "registers." in k for k in release)
    assert len(release) == len(model.state_dict()) + len(fixed)


def test_round_trip_and_head_blocks_follow_the_trunk():
    model = tiny_ddt()
    release = dsr_to_release(model)
    # The head's first block is the release's block `depth`.
    assert torch.equal(release["blocks.3.attn.qkv.weight"], model.head_blocks[0].attn.qkv.weight)
    assert torch.equal(release["dec_register_tokens"], model.head_registers.tokens)
    back = release_to_dsr(release, model)
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    assert len(release_layout(model)) == len(model.state_dict())


def test_strip_prefixes():
    w = torch.zeros(1)
    stripped = strip_prefixes({"module._orig_mod.a": w, "_orig_mod.module.b": w, "c": w, "blocks.module.d": w})
    assert set(stripped) == {"a", "b", "c", "blocks.module.d"}
    with pytest.raises(ValueError, match="two keys"):
        strip_prefixes({"module.a": w, "a": w})


def test_unknown_missing_and_misshapen_keys_are_listed():
    model = tiny_ddt()
    release = dsr_to_release(model)
    release["blocks.5.attn.qkv.weight"] = torch.zeros(1)  # a third head block: not in this config
    del release["dec_register_tokens"]
    release["s_projector.weight"] = torch.zeros(48, 31)
    with pytest.raises(ValueError) as err:
        release_to_dsr(release, model)
    message = str(err.value)
    assert "blocks.5.attn.qkv.weight" in message and "dec_register_tokens" in message
    assert "s_projector.weight: shape (48, 31)" in message and "backbone" in message


def test_fixed_tables_are_checked():
    model = tiny_ddt()
    release = dsr_to_release(model)
    pos = release["pos_embed"].reshape(4, 4, 32)
    release["pos_embed"] = pos.transpose(0, 1).reshape(1, 16, 32)  # rows and columns swapped
    with pytest.raises(ValueError, match="pos_embed: the fixed table differs"):
        release_to_dsr(release, model)
    release = dsr_to_release(model)
    release["dec_feat_rope_incontext.freqs_sin"] = release["dec_feat_rope_incontext.freqs_sin"].roll(4, dims=0)
    with pytest.raises(ValueError, match="dec_feat_rope_incontext.freqs_sin"):
        release_to_dsr(release, model)


def test_release_weights_selection():
    a, b = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    model, (ema,), step = release_weights({"model": {"module.w": a["w"]}, "ema": b, "step": 9})
    assert (model["w"].item(), ema["w"].item(), step) == (0.0, 1.0, 9)
    model, (ema,), _ = release_weights({"model": a, "ema": b}, "ema")
    assert model["w"].item() == ema["w"].item() == 1.0
    model, (ema,), _ = release_weights(a)
    assert model is ema
    # JiT's checkpoint: the Denoiser's `net.` prefix, two EMAs in order, epochs instead of steps.
    c = {"w": torch.full((1,), 2.0)}
    jit = {"model": {"module.net.w": a["w"]}, "model_ema1": {"net.w": b["w"]}, "model_ema2": {"net.w": c["w"]}}
    model, emas, step = release_weights({**jit, "epoch": 0})
    assert [model["w"].item(), *(e["w"].item() for e in emas), step] == [0.0, 1.0, 2.0, 1]
    model, emas, _ = release_weights(jit, "ema")
    assert [model["w"].item(), *(e["w"].item() for e in emas)] == [1.0, 1.0]
    with pytest.raises(ValueError, match="plain state_dict"):
        release_weights(a, "model")
    with pytest.raises(ValueError, match="no 'ema' entry"):
        release_weights({"model": a}, "ema")
    with pytest.raises(ValueError, match="not a release stage-2 file"):
        release_weights({"optimizer": {}})


# --------------------------------------------------------------------------------------------------------------
# end to end: a release training checkpoint with closed-form weights -> dsr checkpoint -> forward
# --------------------------------------------------------------------------------------------------------------


def closed_form(key: str, shape: tuple[int, ...], offset: float) -> torch.Tensor:
    """Deterministic weights that do not depend on any random generator (so stored outputs stay valid)."""
    values = torch.sin(0.61 * torch.arange(math.prod(shape), dtype=torch.float64) + offset).reshape(shape)
    if "norm" in key:
        return 1 + 0.1 * values
    if len(shape) >= 2 and "register" not in key and "embedding_table" not in key:
        return 0.8 * values / math.sqrt(math.prod(shape[1:]))
    return 0.3 * values


def closed_form_release(shift: float = 0.0) -> dict[str, torch.Tensor]:
    fixed = dsr_to_release(tiny_ddt())  # fixed tables as the release stores them (checked on import)
    trained = sorted(k for k in RELEASE_DDT_KEYS if "rope" not in k and "pos_embed" not in k)
    state = {k: fixed[k] for k in RELEASE_DDT_KEYS if k not in trained}
    for i, key in enumerate(trained):
        state[key] = closed_form(key, RELEASE_DDT_KEYS[key], 0.1 * i + shift).float()
    return state


def closed_form_inputs():
    x = torch.sin(0.37 * torch.arange(2 * 3 * 4 * 4, dtype=torch.float64) + 0.5).reshape(2, 3, 4, 4)
    return x, torch.tensor([0.3, 0.85], dtype=torch.float64), torch.tensor([2, 5])


# Computed once with the float64 re-implementation of tests/test_ddt.py (`reference_forward`, float64 fixed tables)
# on the float32 weights of `closed_form_release()` and `closed_form_inputs()`: out[0, :, 0, 0], out[1, :, 3, 2].
STORED = {
    "model": [-0.9109915, 0.3854313, 1.0384766, -1.4120391, 1.1116455, 0.7617112],
    "ema": [-1.0001353, 0.3589456, 1.1856814, -1.541846, 1.0878853, 0.9466599],
}


def picked(out: torch.Tensor) -> torch.Tensor:
    return torch.cat([out[0, :, 0, 0], out[1, :, 3, 2]])


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, DiTModule]:
    folder = tmp_path_factory.mktemp("release")
    src = folder / "ep-0000010.pt"
    checkpoint = {
        "model": {f"module.{k}": v for k, v in closed_form_release().items()},
        "ema": {f"_orig_mod.{k}": v for k, v in closed_form_release(shift=0.05).items()},
        "step": 12510,
        "epoch": 10,
        "optimizer": {"state": {}, "param_groups": []},
    }
    torch.save(checkpoint, src)
    out = folder / "run" / "checkpoints" / "last.ckpt"
    assert main(["stage2", str(src), str(out), *OVERRIDES]) == out
    return out, DiTModule.from_checkpoint(out)


def test_converted_checkpoint_holds_both_weight_sets_and_the_config(converted):
    path, module = converted
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = checkpoint["state_dict"]
    assert {k.split(".")[0] for k in state} <= {"backbone", "ema", "encoder"}
    assert state["ema.n_averaged"].item() == 12510 and checkpoint["global_step"] == 12510
    assert checkpoint["dsr"]["config"]["module"]["backbone"]["_target_"] == "dsr.models.ddt.DiTDH"
    assert checkpoint["dsr"]["config"]["module"]["backbone"]["num_registers"] == 4
    assert checkpoint["dsr"]["latent_shape"] == [3, 4, 4]
    model, ema = closed_form_release(), closed_form_release(shift=0.05)
    assert torch.equal(module.backbone.head_blocks[1].mlp.fc1.weight, model["blocks.4.mlp.w12.weight"])
    assert torch.equal(module.ema.module.registers.tokens, ema["enc_register_tokens"])
    assert torch.equal(module.backbone.t_embedder.W, model["t_embedder.W"])


@pytest.mark.parametrize("which", ["model", "ema"])
def test_converted_forward_matches_stored_reference_values(converted, which):
    _, module = converted
    net = module.backbone if which == "model" else module.ema.module
    x, t, y = closed_form_inputs()
    with torch.no_grad():
        out = net(x.float(), t.float(), y)
    stored = torch.tensor(STORED[which])
    assert stored.abs().max() > 1e-2
    torch.testing.assert_close(picked(out).double(), stored.double(), rtol=2e-5, atol=2e-5)


def test_release_config_is_checked(tmp_path):
    src = tmp_path / "stage2_model.pt"
    torch.save(closed_form_release(), src)
    params = dict(
        input_size=4,
        patch_size=1,
        in_channels=3,
        hidden_size=[32, 48],
        depth=[3, 2],
        num_heads=[2, 2],
        mlp_ratio=4.0,
        num_classes=5,
        wo_shift=False,
        register_conditioning=True,
        register_len=4,
    )
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    from omegaconf import OmegaConf

    transport = {"params": {"path_type": "Linear", "prediction": "data", "time_dist_type": "logit-normal_0_1"}}
    OmegaConf.save(
        {
            "stage_2": {"target": "stage2.models.DDT.DiTwDDTHead", "params": {**params, "register_start": 1}},
            "transport": transport,
        },
        good,
    )
    OmegaConf.save(
        {
            "stage_2": {"target": "stage2.models.DDT.DiTwDDTHead", "params": {**params, "register_start": 8}},
            "transport": transport,
        },
        bad,
    )
    main(["stage2", str(src), str(tmp_path / "ok.ckpt"), "--release-config", str(good), *OVERRIDES])
    with pytest.raises(ValueError, match=r"register_start: release 8, config 1 \(set backbone.register_start\)"):
        main(["stage2", str(src), str(tmp_path / "no.ckpt"), "--release-config", str(bad), *OVERRIDES])


def release_yaml(path: Path, prediction: str = "data", **params) -> Path:
    """A release stage-2 YAML for the tiny DiT-DH of OVERRIDES (stage_2, transport and misc blocks)."""
    from omegaconf import OmegaConf

    model = dict(input_size=4, patch_size=1, in_channels=3, hidden_size=[32, 48], depth=[3, 2], num_heads=[2, 2])
    model |= dict(num_classes=5, register_conditioning=True, register_len=4, register_start=1) | params
    transport = {"path_type": "Linear", "prediction": prediction, "loss_weight": None}
    OmegaConf.save(
        {
            "stage_2": {"target": "stage2.models.DDT.DiTwDDTHead", "params": model},
            "transport": {"params": {**transport, "time_dist_type": "logit-normal_0_1"}},
            "misc": {"latent_size": [3, 4, 4], "time_dist_shift_dim": 196608, "time_dist_shift_base": 4096},
        },
        path,
    )
    return path


def stored_transport(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["dsr"]["config"]["transport"]


WITHOUT_RECIPE = [o for o in OVERRIDES if not o.startswith("recipe=")]


@pytest.mark.parametrize("prediction, expected, t_max", [("data", "x", 1.0), ("velocity", "velocity", 0.999)])
def test_the_release_config_gives_the_transport(tmp_path, prediction, expected, t_max):
    src = tmp_path / "stage2_model.pt"
    torch.save(closed_form_release(), src)
    config = release_yaml(tmp_path / "release.yaml", prediction)
    out = main(["stage2", str(src), str(tmp_path / "out.ckpt"), "--release-config", str(config), *WITHOUT_RECIPE])
    transport = stored_transport(out)
    assert transport["prediction"] == expected and transport["t_max"] == t_max and transport["t_min"] == 0.0
    assert (transport["time_dist"], transport["logit_mean"], transport["logit_std"]) == ("logit_normal", 0.0, 1.0)
    assert transport["shift_dim"] == 196608 and transport["shift"] is None
    module = DiTModule.from_checkpoint(out)
    # sqrt(196608 / 4096), not the tiny latent's own sqrt(48 / 4096)
    assert module.transport.shift_for(module.latent_shape) == pytest.approx(math.sqrt(48), rel=1e-12)
    assert module.transport.sample_t_end == pytest.approx(1 - t_max)
    # A stated value that agrees with the file is fine.
    main(["stage2", str(src), str(tmp_path / "b.ckpt"), "--release-config", str(config), *WITHOUT_RECIPE,
          f"transport.prediction={expected}"])  # fmt: skip


def test_a_stated_transport_that_contradicts_the_release_config_is_refused(tmp_path):
    src = tmp_path / "stage2_model.pt"
    torch.save(closed_form_release(), src)
    config = release_yaml(tmp_path / "release.yaml", "data")
    args = ["stage2", str(src), str(tmp_path / "out.ckpt"), "--release-config", str(config), *WITHOUT_RECIPE]
    with pytest.raises(ValueError, match="transport.prediction: the release config says x, the command line velocity"):
        main([*args, "recipe=rae"])
    with pytest.raises(
        ValueError, match="transport.shift_dim: the release config says 196608, the command line 294912"
    ):
        main([*args, "transport.shift_dim=294912"])
    with pytest.raises(ValueError, match="transport.t_max: the release config says 1.0, the command line 0.999"):
        main([*args, "transport.t_max=0.999"])
    assert not (tmp_path / "out.ckpt").exists()


def test_a_stage2_import_must_say_how_the_model_was_trained(tmp_path):
    src = tmp_path / "stage2_model.pt"
    torch.save(closed_form_release(), src)
    with pytest.raises(ValueError, match="recipe=rae .*recipe=dsr_release .*--release-config"):
        main(["stage2", str(src), str(tmp_path / "out.ckpt"), *WITHOUT_RECIPE])
    out = main(["stage2", str(src), str(tmp_path / "v.ckpt"), *WITHOUT_RECIPE, "transport.prediction=velocity"])
    assert stored_transport(out)["prediction"] == "velocity"
    assert stored_transport(main(["stage2", str(src), str(tmp_path / "r.ckpt"), *OVERRIDES]))["prediction"] == "x"


@pytest.mark.parametrize(
    "flag, value, setting",
    [("use_rope", False, "backbone.use_rope"), ("use_pos_embed", False, "backbone.use_pos_embed"),
     ("use_qknorm", True, "backbone.use_qknorm"), ("use_swiglu", False, "backbone.use_swiglu"),
     ("use_rmsnorm", False, "backbone.use_rmsnorm"), ("wo_shift", True, "backbone.wo_shift")],
)  # fmt: skip
def test_every_forward_flag_is_checked_against_the_release_config(tmp_path, flag, value, setting):
    src = tmp_path / "stage2_model.pt"
    torch.save(closed_form_release(), src)
    config = release_yaml(tmp_path / "release.yaml", **{flag: value})
    with pytest.raises(ValueError, match=rf"{flag}: release {value}, config {not value} \(set {setting}\)"):
        main(["stage2", str(src), str(tmp_path / "out.ckpt"), "--release-config", str(config), *WITHOUT_RECIPE])


@pytest.mark.parametrize("dropped, setting", [("feat_rope", "use_rope=false"), ("pos_embed", "use_pos_embed=false")])
def test_fixed_tables_the_file_lacks_are_an_error(tmp_path, dropped, setting):
    """A release model built without RoPE (or without pos_embed) saves no such tables; converting it into a model
    that applies them would change the forward pass."""
    src = tmp_path / "stage2_model.pt"
    torch.save({k: v for k, v in closed_form_release().items() if dropped not in k}, src)
    with pytest.raises(ValueError, match=f"fixed tables the config's model applies but the file lacks.*{setting}"):
        main(["stage2", str(src), str(tmp_path / "out.ckpt"), *OVERRIDES])


def test_wrong_model_config_is_an_error_naming_the_settings(tmp_path):
    src = tmp_path / "stage2_model.pt"
    torch.save(closed_form_release(), src)
    with pytest.raises(ValueError, match="registers="):
        main(["stage2", str(src), str(tmp_path / "x.ckpt"), *OVERRIDES, "backbone.num_registers=0"])


def test_stats_conversion(tmp_path):
    from dsr.encoders.rae import load_stats

    g = torch.Generator().manual_seed(0)
    mean, var = torch.randn(6, 2, 3, generator=g, dtype=torch.float64), torch.rand(6, 2, 3, generator=g) + 0.1
    src = tmp_path / "stat.pt"
    torch.save({"mean": mean, "var": var}, src)
    out = convert_stats(src, tmp_path / "artifacts" / "stats.pt")
    stats = load_stats(out, (6, 2, 3))
    assert stats["mean"].dtype == torch.float32 and torch.equal(stats["mean"], mean.float())
    assert torch.equal(stats["var"], var) and stats["count"] is None and stats["source"] == str(src.resolve())
    torch.save({"mean": mean, "var": var, "momentum": 0.1}, src)
    with pytest.raises(ValueError, match="unexpected \\['momentum'\\]"):
        convert_stats(src, tmp_path / "x.pt")


def test_help_explains_each_kind(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert all(kind in text for kind in ("stage2", "stats", "decoder"))
    with pytest.raises(SystemExit):
        main(["stage2", "--help"])
    assert "--weights" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------
# stage-1 decoder: RAE's ViTMAE-style keys -> ViTDecoder
# --------------------------------------------------------------------------------------------------------------


def tiny_decoder():
    from dsr.models.decoder import ViTDecoder

    torch.manual_seed(0)  # conf/decoder/tiny.yaml's sizes, on 16-channel 4x4 latents
    return ViTDecoder(in_channels=16, grid_size=4, patch_size=4, hidden_size=64, depth=2, num_heads=2, mlp_dim=128)


def release_decoder_state(decoder) -> dict[str, torch.Tensor]:
    """The decoder's weights under RAE's GeneralDecoder names (query / key / value are thirds of qkv, in order)."""
    from dsr.models.decoder import reference_key_map

    ours = decoder.state_dict()
    state = {}
    for ref, key in reference_key_map(decoder.depth).items():
        value = ours[key]
        for index, part in enumerate(("query", "key", "value")):
            if f".attention.attention.{part}." in ref:
                value = value.chunk(3)[index]
        state[ref] = value.clone().reshape(1, 1, -1) if ref == "trainable_cls_token" else value.clone()
    return state


def mae_table(dim: int, grid: int) -> torch.Tensor:
    """RAE's fixed `decoder_pos_embed` [1, 1 + grid^2, dim]: a zero CLS row, then per row-major token the column's
    sin / cos codes in the first half of the channels and the row's in the second."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.arange(float(grid)).repeat_interleave(grid), torch.arange(float(grid)).repeat(grid)
    table = torch.cat(
        [
            (cols[:, None] * omega).sin(),
            (cols[:, None] * omega).cos(),
            (rows[:, None] * omega).sin(),
            (rows[:, None] * omega).cos(),
        ],
        dim=1,
    )
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()[None]


DECODER_OVERRIDES = ["encoder=tiny", "decoder=tiny"]


def test_decoder_conversion_plain_and_training_checkpoint(tmp_path, monkeypatch):
    from dsr.models.decoder import ViTDecoder

    monkeypatch.setenv("DSR_ARTIFACTS", str(tmp_path / "artifacts"))
    decoder = tiny_decoder()
    with torch.no_grad():
        for p in decoder.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # distinct values everywhere (the CLS token starts at zero)
    release = release_decoder_state(decoder) | {"decoder_pos_embed": mae_table(64, 4)}
    assert release["decoder_layers.1.attention.attention.key.weight"].shape == (64, 64)
    plain, stage1 = tmp_path / "model.pt", tmp_path / "ep-0000016.pt"
    torch.save(release, plain)
    rae = {f"module.decoder.{k}": v for k, v in release.items()} | {"module.encoder.encoder.layer.0.w": torch.ones(2)}
    torch.save({"ema": rae, "model": {}, "step": 5}, stage1)

    # Without --out the file lands where encoder.decoder_weights looks (paths.decoder_weights, under $DSR_ARTIFACTS).
    out = main(["decoder", str(plain), *DECODER_OVERRIDES])
    assert out == Path(str(compose("train", DECODER_OVERRIDES, run_dir=".").paths.decoder_weights))
    assert out.is_relative_to(tmp_path / "artifacts") and out.name == "decoder-tiny.pt"
    out_ckpt = main(["decoder", str(stage1), "--out", str(tmp_path / "from_ckpt.pt"), *DECODER_OVERRIDES])
    for path in (out, out_ckpt):
        state = torch.load(path, weights_only=True)
        assert state.keys() == decoder.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in decoder.state_dict().items())
        fresh = ViTDecoder(in_channels=16, grid_size=4, patch_size=4, hidden_size=64, depth=2, num_heads=2, mlp_dim=128)
        fresh.load_state_dict(state)
        z = torch.randn(2, 16, 4, 4)
        torch.testing.assert_close(fresh(z), decoder(z), rtol=0, atol=0)
    # qkv is [query; key; value] along the output dimension
    q = release["decoder_layers.0.attention.attention.query.weight"]
    assert torch.equal(torch.load(out, weights_only=True)["blocks.0.attn.qkv.weight"][:64], q)


def test_decoder_conversion_errors(tmp_path):
    release = release_decoder_state(tiny_decoder()) | {"decoder_pos_embed": mae_table(64, 4)}
    src = tmp_path / "model.pt"
    broken = dict(release)
    del broken["decoder_layers.1.output.dense.bias"]
    broken["decoder_layers.1.extra.weight"] = torch.zeros(1)
    torch.save(broken, src)
    with pytest.raises(ValueError, match=r"decoder_layers\.1\.extra\.weight.*decoder_layers\.1\.output\.dense\.bias"):
        main(["decoder", str(src), "--out", str(tmp_path / "x.pt"), *DECODER_OVERRIDES])
    torch.save(release, src)
    with pytest.raises(ValueError, match="decoder.depth"):
        main(["decoder", str(src), "--out", str(tmp_path / "x.pt"), *DECODER_OVERRIDES, "decoder.depth=3"])
    with pytest.raises(ValueError, match="decoder.hidden_size"):
        main(["decoder", str(src), "--out", str(tmp_path / "x.pt"), *DECODER_OVERRIDES, "decoder.hidden_size=32"])
    with pytest.raises(ValueError, match="decoder_pred.weight"):
        main(["decoder", str(src), "--out", str(tmp_path / "x.pt"), *DECODER_OVERRIDES, "decoder.patch_size=2"])
    torch.save({"ema": {"decoder.decoder_embed.weight": torch.zeros(64, 16), "disc.w": torch.zeros(1)}}, src)
    with pytest.raises(ValueError, match="disc.w"):
        main(["decoder", str(src), "--out", str(tmp_path / "x.pt"), *DECODER_OVERRIDES])


def test_full_import_order_stats_decoder_then_stage2(tmp_path, monkeypatch):
    """The documented order on the tiny SigLIP codec: statistics and decoder land where the encoder config looks for
    them; the stage-2 checkpoint then carries the statistics (buffers) but not the frozen encoder or decoder."""
    monkeypatch.setenv("DSR_ARTIFACTS", str(tmp_path / "artifacts"))
    g = torch.Generator().manual_seed(0)
    mean, var = torch.randn(64, 8, 8, generator=g), torch.rand(64, 8, 8, generator=g) + 0.5
    torch.save({"mean": mean, "var": var}, tmp_path / "stat.pt")
    from dsr.models.decoder import ViTDecoder

    torch.manual_seed(0)
    decoder = ViTDecoder(in_channels=64, grid_size=8, patch_size=4, hidden_size=64, depth=2, num_heads=2, mlp_dim=128)
    torch.save(release_decoder_state(decoder), tmp_path / "decoder.pt")  # no position table: the grid is given
    codec = ["encoder=tiny", "decoder=tiny", "data=synthetic", "data.image_size=32", "data.num_classes=5"]
    main(["stats", str(tmp_path / "stat.pt"), *codec])
    main(["decoder", str(tmp_path / "decoder.pt"), "--grid-size", "8", *codec])

    backbone = [
        "recipe=rae",
        "backbone=dit_dh_s",
        "registers=none",
        "backbone.hidden_size=32",
        "backbone.depth=2",
        "backbone.num_heads=2",
        "backbone.head_hidden_size=32",
        "backbone.head_depth=1",
        "backbone.head_num_heads=2",
    ]
    torch.manual_seed(1)
    ours = DiTDH(
        input_size=8,
        in_channels=64,
        num_classes=5,
        hidden_size=32,
        depth=2,
        num_heads=2,
        head_hidden_size=32,
        head_depth=1,
        head_num_heads=2,
    )
    torch.save(dsr_to_release(ours), tmp_path / "stage2_model.pt")
    out = main(["stage2", str(tmp_path / "stage2_model.pt"), str(tmp_path / "run" / "last.ckpt"), *codec, *backbone])

    state = torch.load(out, map_location="cpu", weights_only=False)["state_dict"]
    assert torch.equal(state["encoder.latent_mean"], mean) and torch.equal(state["encoder.latent_var"], var)
    assert not any(k.startswith(("encoder.model.", "encoder.decoder.")) for k in state)  # frozen: reloaded from files
    module = DiTModule.from_checkpoint(out)
    assert torch.equal(module.encoder.latent_mean, mean)
    assert torch.equal(module.encoder.decoder.blocks[1].mlp.fc2.weight, decoder.blocks[1].mlp.fc2.weight)
    assert all(torch.equal(v, module.ema.module.state_dict()[k]) for k, v in ours.state_dict().items())


# --------------------------------------------------------------------------------------------------------------
# the README's import commands, run as written on tiny files
# --------------------------------------------------------------------------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_import_commands() -> list[list[str]]:
    """The commands of the README's "Importing released checkpoints" block, continuation lines joined."""
    import shlex

    text = README.read_text().split("### Importing released checkpoints", 1)[1]
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            assert line.startswith("python -m dsr."), line
            commands.append(shlex.split(line)[2:])
    return commands


def tiny_hub_dirs(root: Path) -> dict[str, Path]:
    """Random-init stand-ins for the hub checkpoints, saved with save_pretrained: 16 px -> 4x4 tokens of 32."""
    from diffusers import AutoencoderKL
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel, SiglipConfig, SiglipModel

    torch.manual_seed(0)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=4, image_size=16)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    siglip = SiglipModel(SiglipConfig(vision_config={**vision, "intermediate_size": 64}, text_config=text))
    dinov2 = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**vision, mlp_ratio=2, num_register_tokens=4))
    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[8, 8, 16],
        layers_per_block=1,
        norm_num_groups=4,
    )  # 16 px -> 4 x 4 x 4
    dirs = {"siglip2_b": root / "siglip", "dinov2_b_reg": root / "dinov2", "sd_vae": root / "sd-vae"}
    siglip.save_pretrained(dirs["siglip2_b"])
    dinov2.save_pretrained(dirs["dinov2_b_reg"])
    vae.save_pretrained(dirs["sd_vae"])
    return dirs


SHRINK_CODEC = ["data.image_size=16", "encoder.resolution=16"]
SHRINK_DECODER = ["decoder.hidden_size=32", "decoder.depth=1", "decoder.num_heads=2", "decoder.mlp_dim=64",
                  "decoder.patch_size=4"]  # fmt: skip
SHRINK_BACKBONE = ["backbone.hidden_size=32", "backbone.depth=2", "backbone.num_heads=2", "backbone.register_start=1"]
SHRINK_HEAD = ["backbone.head_hidden_size=48", "backbone.head_depth=1", "backbone.head_num_heads=2"]


def test_the_readme_import_commands_run_as_written_and_sample(tmp_path, monkeypatch):
    """Each documented command on tiny files: the release files are tiny ones written here, and the only overrides
    added shrink the model and point the encoder at tiny local weights."""
    from omegaconf import OmegaConf

    from dsr.models.decoder import ViTDecoder

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DSR_ARTIFACTS", str(tmp_path / "artifacts"))
    hub = tiny_hub_dirs(tmp_path / "hub")
    neurons = tmp_path / "neurons.json"
    neurons.write_text('{"1": [3, 17]}')  # the tiny SigLIP's stand-in for the release's SigLIP2-B register neurons
    commands = readme_import_commands()
    assert [c[0] for c in commands if c[0] == "dsr.convert"] == ["dsr.convert"] * 7 and commands[-1][0] == "dsr.sample"

    converted = []
    for module, *args in commands:
        kind = args[0] if module == "dsr.convert" else "sample"
        overrides = [a for a in args if "=" in a and not a.startswith("-")]
        encoder = next((o.split("=", 1)[1] for o in overrides if o.startswith("encoder=")), None)
        shrink = ["data.image_size=16"] if encoder == "sd_vae" else SHRINK_CODEC  # the VAE has no input resolution
        extra = [*shrink, f"encoder.pretrained={hub[encoder]}"] if encoder else []
        if encoder == "siglip2_b":
            extra.append(f"encoder.ttr_neurons={neurons}")
        if kind in ("decoder", "stage2"):
            extra += SHRINK_DECODER
        if kind == "stats":
            g = torch.Generator().manual_seed(len(converted))
            torch.save({"mean": torch.randn(32, 4, 4, generator=g), "var": torch.rand(32, 4, 4, generator=g) + 0.5},
                       args[1])  # fmt: skip
        elif kind == "decoder":
            torch.manual_seed(0)
            decoder = ViTDecoder(in_channels=32, grid_size=4, patch_size=4, hidden_size=32, depth=1, num_heads=2,
                                 mlp_dim=64)  # fmt: skip
            torch.save(release_decoder_state(decoder) | {"decoder_pos_embed": mae_table(32, 4)}, args[1])
        elif kind == "stage2":
            extra += SHRINK_BACKBONE + (SHRINK_HEAD if "backbone=dit_dh_xl" in overrides else [])
            cfg = compose("train", [*overrides, *extra], run_dir=tmp_path)
            torch.manual_seed(0)
            backbone = instantiate_backbone(cfg, in_channels=4 if encoder == "sd_vae" else 32)
            weights = dsr_to_release(backbone)
            torch.save({"model": weights, "ema": weights, "step": 3} if "ep-" in args[1] else weights, args[1])
            if "--release-config" in args:
                release = release_config_of(backbone)
                OmegaConf.save(release, args[args.index("--release-config") + 1])
        else:
            extra = ["num_samples=2", "batch_size=2", "shard_size=2", "sampler.solver.num_steps=3",
                     "accelerator=cpu", "devices=1"]  # fmt: skip
        if module == "dsr.convert":
            converted.append(main([*args, *extra]))
        else:
            from helpers import compose_script

            import dsr.sample

            with np.load(dsr.sample.run(compose_script("sample", [*args, *extra]))) as samples:
                images = samples["arr_0"]
            assert images.shape == (2, 16, 16, 3) and images.std() > 0

    rae, dsr_release = DiTModule.from_checkpoint(converted[2]), DiTModule.from_checkpoint(converted[5])
    sit = DiTModule.from_checkpoint(converted[6])
    assert (sit.transport.prediction, sit.transport.time_dist, sit.transport.t_max) == ("velocity", "uniform", 1.0)
    assert isinstance(sit.backbone, SiT) and sit.latent_shape == (4, 4, 4)
    assert (rae.transport.prediction, rae.transport.t_max) == ("velocity", 0.999)
    assert (dsr_release.transport.prediction, dsr_release.transport.t_max) == ("x", 1.0)
    assert dsr_release.transport.shift_for(dsr_release.latent_shape) == pytest.approx(math.sqrt(48))
    assert isinstance(rae.backbone, DiTDH) and dsr_release.backbone.num_registers == 36
    assert dsr_release.encoder.test_time_registers is not None  # registers=dsr: TTR in the encoder
    for module in (rae, dsr_release, sit):
        images = module.sample(torch.tensor([0, 1]))
        assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def instantiate_backbone(cfg, in_channels: int = 32):
    from hydra.utils import instantiate

    return instantiate(cfg.module.backbone)(in_channels=in_channels, input_size=(4, 4))


def release_config_of(backbone: LightningDiT) -> dict:
    """The release YAML of a tiny LightningDiT, in the release's format (its DSR-row settings, shrunk)."""
    params = dict(input_size=4, patch_size=1, in_channels=32, hidden_size=32, depth=2, num_heads=2, mlp_ratio=4.0,
                  num_classes=1000, use_qknorm=False, use_swiglu=True, use_rope=True, use_rmsnorm=True,
                  wo_shift=False, register_conditioning=True, register_len=backbone.num_registers,
                  register_start=backbone.register_start)  # fmt: skip
    return {
        "stage_2": {"target": "stage2.models.lightningDiT.LightningDiT", "params": params},
        "transport": {
            "params": {
                "path_type": "Linear",
                "prediction": "data",
                "loss_weight": None,
                "time_dist_type": "logit-normal_0_1",
            }
        },  # fmt: skip
        "misc": {"latent_size": [32, 4, 4], "time_dist_shift_dim": 196608, "time_dist_shift_base": 4096},
    }
