"""Forward FLOPs by formula (`analytic_forward_flops`) against torch's flop counter on the built model."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import CONF_DIR
from omegaconf import OmegaConf

from dsr.models.ddt import DiTDH
from dsr.models.dit import LightningDiT
from dsr.models.profile import analytic_forward_flops, forward_flops, register_overhead


def measured(factory, latent_shape) -> int:
    channels, height, width = latent_shape
    with torch.device("meta"):
        model = factory(in_channels=channels, input_size=(height, width))
    return forward_flops(model, latent_shape)


def backbone_config(name: str, **overrides):
    """A `conf/backbone` entry as the stage sees it (data.num_classes left unresolved: FLOPs do not need it)."""
    cfg = OmegaConf.load(CONF_DIR / "backbone" / f"{name}.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def factory_of(cfg):
    """The factory Hydra would build from `cfg` (a concrete class count for num_classes)."""
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if not k.startswith("_")}
    kwargs["num_classes"] = 10
    cls = DiTDH if cfg._target_.endswith("DiTDH") else LightningDiT
    return functools.partial(cls, **kwargs)


@pytest.mark.parametrize(
    "name, overrides, latent_shape",
    [
        ("dit_tiny", {}, (48, 8, 8)),
        ("dit_tiny", {"num_registers": 8, "register_start": 1}, (48, 8, 8)),
        ("dit_tiny", {"num_registers": 5, "register_start": 0, "patch_size": 2}, (12, 6, 10)),  # odd sizes, p = 2
        ("dit_tiny", {"use_swiglu": False, "wo_shift": True, "use_qknorm": True, "num_registers": 3}, (7, 5, 3)),
        ("dit_s", {}, (768, 16, 16)),
        ("dit_s", {"num_registers": 36}, (768, 16, 16)),
        ("dit_xl", {}, (768, 16, 16)),
        ("dit_xl", {"num_registers": 36}, (768, 16, 16)),
        ("dit_xl", {"num_registers": 36}, (1152, 16, 16)),  # So400M latents
        ("dit_dh_s", {}, (768, 16, 16)),
        ("dit_dh_s", {"num_registers": 36}, (768, 16, 16)),
        ("dit_dh_s", {"num_registers": 36, "head_num_registers": 0}, (768, 16, 16)),
        ("dit_dh_s", {"num_registers": 7, "register_start": 3, "patch_size": 2}, (5, 14, 6)),
        ("dit_dh_xl", {"num_registers": 36}, (768, 16, 16)),
        ("dit_dh_b", {"hidden_size": 2048, "num_heads": 16, "num_registers": 4}, (33, 5, 7)),  # no projector
    ],
)
def test_formula_equals_torch_flop_counter(name, overrides, latent_shape):
    cfg = backbone_config(name, **overrides)
    expected = measured(factory_of(cfg), latent_shape)
    assert analytic_forward_flops(cfg, latent_shape) == expected
    assert analytic_forward_flops(factory_of(cfg), latent_shape) == expected


def test_paper_gflops():
    """The DSR paper's RAE-DiT-XL 238.1 -> 262.9 GFLOPs (2 per MAC), and DiT-DH-XL's by the same convention."""
    latent = (768, 16, 16)
    xl = backbone_config("dit_xl")
    assert round(analytic_forward_flops(xl, latent) / 1e9, 1) == 238.1
    assert round(analytic_forward_flops(backbone_config("dit_xl", num_registers=36), latent) / 1e9, 1) == 262.9
    dh = analytic_forward_flops(backbone_config("dit_dh_xl"), latent)
    assert round(dh / 1e9, 1) == 323.2
    assert round(analytic_forward_flops(backbone_config("dit_dh_xl", num_registers=36), latent) / 1e9, 1) == 359.3


def test_jit_quote_for_dit_dh_xl_is_macs_with_per_sample_head_modulation():
    """JiT quotes 146 GFLOPs for RAE's DiT-DH-XL. That is DiT's convention (multiply-accumulates, not 2 per MAC) with
    the head's adaLN counted once per sample, as in a DiT block (146.5 G); DiT-DH's head modulates every token, which
    adds (2 blocks x 6 + final 2) x 2048^2 MACs per token, 15.0 G, for 161.6 GMAC = 323.2 GFLOPs here."""
    latent, tokens, width = (768, 16, 16), 256, 2048
    macs = analytic_forward_flops(backbone_config("dit_dh_xl"), latent) // 2
    per_token_modulation = tokens * (2 * 6 + 2) * width * width
    per_sample_modulation = (2 * 6 + 2) * width * width
    assert round(macs / 1e9, 1) == 161.6
    assert 146 <= (macs - per_token_modulation + per_sample_modulation) / 1e9 < 147


def test_register_overhead_without_registers_covers_the_head_bank():
    cfg = backbone_config("dit_dh_s", num_registers=6, register_start=2, head_num_registers=6)
    stats = register_overhead(factory_of(cfg), (32, 4, 4))
    plain = analytic_forward_flops(backbone_config("dit_dh_s", num_registers=0), (32, 4, 4))
    assert stats["gflops_without_registers"] * 1e9 == pytest.approx(plain, rel=1e-12)
    assert stats["params_M_with_registers"] - stats["params_M_without_registers"] == pytest.approx(
        6 * (384 + 2048) / 1e6
    )


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(TypeError, match="LightningDiT, DiTDH and JiT"):
        analytic_forward_flops(functools.partial(torch.nn.Linear, 3), (3, 4, 4))
