"""Choices made after training: several EMAs (values, selection, checkpoints), AutoGuidance through the real module
and `dsr.sample`, sampling precision, and overrides of how the model was trained."""

from __future__ import annotations

import copy
import csv
import math

import numpy as np
import pytest
import torch
from helpers import TINY_RUN, compose_script, compose_train, perturb_checkpoint
from hydra.core.global_hydra import GlobalHydra
from torch import nn

from dsr import sample
from dsr.diffusion.generation import generate_shard
from dsr.lightning.dit_module import DiTModule
from dsr.lightning.training import EMAs

DECAYS = [0.9, 0.5]
FAST = ["sampler.solver.num_steps=3", "accelerator=cpu", "devices=1", "num_samples=6", "batch_size=4", "shard_size=6"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run with two EMAs, trained 4 steps; its weights perturbed so samples carry structure."""
    from dsr.train import train

    run_dir = tmp_path_factory.mktemp("ema") / "run"
    train(compose_train([*TINY_RUN, f"module.ema_decays=[{DECAYS[0]},{DECAYS[1]}]", "trainer.max_steps=4"], run_dir))
    GlobalHydra.instance().clear()
    perturb_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    return run_dir


def run_sample(ckpt, out, *overrides):
    cfg = compose_script("sample", [f"ckpt={ckpt}", f"output={out}", *FAST, *overrides])
    return np.load(sample.run(cfg))["arr_0"]


# ------------------------------------------------------------------------------------------------------------------
# several EMAs
# ------------------------------------------------------------------------------------------------------------------


def test_each_decay_is_a_hand_rolled_ema_in_one_foreach_update(monkeypatch):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()
    emas = EMAs(model, [0.99, 0.9, 0.0])
    calls = []
    lerp = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a: calls.append(len(a[0])) or lerp(*a))
    generator = torch.Generator().manual_seed(3)
    hand = {d: None for d in emas.decays}
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
            model[1].running_mean.copy_(torch.randn(4, generator=generator, dtype=torch.float64))
        model[1].num_batches_tracked += 1
        emas.update(model)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        for d in emas.decays:  # e_1 = w_1, then e = d e + (1 - d) w (float64, from the definition)
            hand[d] = weights if hand[d] is None else {k: d * hand[d][k] + (1 - d) * w for k, w in weights.items()}
    assert calls == [3 * 6] * 4  # the first update copies; then one lerp over 6 float tensors x 3 decays
    for d in emas.decays:
        for key, value in emas.select(d).state_dict().items():
            if value.is_floating_point():
                torch.testing.assert_close(value, hand[d][key], rtol=1e-12, atol=1e-12)
            else:  # num_batches_tracked: copied
                assert torch.equal(value, weights[key])
    assert torch.equal(emas.select(0.0).state_dict()["0.weight"], weights["0.weight"])  # decay 0: the last weights
    assert emas.module is emas.averages[0] and int(emas.n_averaged) == 5
    with pytest.raises(ValueError, match=r"ema=0.5: this model keeps EMAs with decays 0.99, 0.9, 0"):
        emas.select(0.5)
    with pytest.raises(ValueError, match="distinct"):
        EMAs(model, [0.9, 0.9])


def test_a_run_keeps_each_ema_and_sampling_selects_them(run_dir, tmp_path):
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    stored = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert stored["dsr"]["ema_decays"] == DECAYS
    module = DiTModule.from_checkpoint(ckpt)
    assert module.ema_decays == tuple(DECAYS)
    assert (
        module.sampling_model("auto") is module.ema.averages[0] and module.sampling_model(0.5) is module.ema.averages[1]
    )
    assert module.sampling_model("none") is module.backbone
    with pytest.raises(ValueError, match="keeps EMAs with decays 0.9, 0.5"):
        module.sampling_model(0.9999)

    images = {ema: run_sample(ckpt, tmp_path / ema, f"ema={ema}") for ema in ("auto", "0.5", "none")}
    assert not np.array_equal(images["auto"], images["0.5"]) and not np.array_equal(images["0.5"], images["none"])
    module.use_sampler(module.solver, module.guidance)
    module.solver.num_steps = 3
    for ema, selector in (("auto", "auto"), ("0.5", 0.5), ("none", "none")):
        alone, _ = generate_shard(module, np.arange(6), num_classes=4, seed=0, batch_size=6, ema=selector)
        np.testing.assert_array_equal(alone, images[ema])
    with pytest.raises(ValueError, match="keeps EMAs with decays 0.9, 0.5"):
        run_sample(ckpt, tmp_path / "bad", "ema=0.7")


def test_a_single_ema_checkpoint_loads_and_a_decay_mismatch_is_refused(run_dir, tmp_path):
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    # The layout before several EMAs: one AveragedModel at ema.module.*, no stored decays.
    old = copy.deepcopy(checkpoint)
    old["state_dict"] = {k.replace("ema.averages.0.", "ema.module."): v for k, v in old["state_dict"].items()
                         if not k.startswith("ema.averages.1.")}  # fmt: skip
    del old["dsr"]["ema_decays"]
    old["dsr"]["config"]["module"]["ema_decays"] = None
    torch.save(old, tmp_path / "old.ckpt")
    module = DiTModule.from_checkpoint(tmp_path / "old.ckpt")
    assert module.ema_decays == (old["dsr"]["config"]["module"]["ema_decay"],)
    for key, value in module.ema.module.state_dict().items():
        assert torch.equal(value, checkpoint["state_dict"][f"ema.averages.0.{key}"])

    checkpoint["dsr"]["config"]["module"]["ema_decays"] = [0.9, 0.7]
    torch.save(checkpoint, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=r"keeps EMAs with decays \[0.9, 0.5\].*module.ema_decays=\[0.9, 0.7\]"):
        DiTModule.from_checkpoint(tmp_path / "other.ckpt")


# ------------------------------------------------------------------------------------------------------------------
# AutoGuidance through the module
# ------------------------------------------------------------------------------------------------------------------


def test_autoguidance_with_the_model_as_its_own_guide_is_the_unguided_model(run_dir, tmp_path):
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    unguided = run_sample(ckpt, tmp_path / "plain")
    for guide_ema in ("auto", "0.5"):
        autoguidance = ["sampler/guidance=autoguidance", f"sampler.guidance.guide_ckpt={ckpt}",
                        "sampler.guidance.scale=3.0", f"sampler.guidance.guide_ema={guide_ema}"]  # fmt: skip
        guided = run_sample(ckpt, tmp_path / guide_ema, *autoguidance)
        if guide_ema == "auto":  # guide == main: any scale is the main model, to the bit
            np.testing.assert_array_equal(guided, unguided)
        else:  # a weaker guide (another EMA) changes the images
            assert not np.array_equal(guided, unguided)


def _guide(checkpoint, tmp_path, name, edit):
    guide = copy.deepcopy(checkpoint)
    edit(guide)
    path = tmp_path / f"{name}.ckpt"
    torch.save(guide, path)
    return path


def test_an_incompatible_guide_is_refused_naming_the_difference(run_dir, tmp_path):
    from dsr.diffusion.guidance import AutoGuidance

    ckpt = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    module = DiTModule.from_checkpoint(ckpt)

    def refused(edit, match):
        path = _guide(checkpoint, tmp_path, match[:8].replace(" ", "_"), edit)
        with pytest.raises(ValueError, match=match):
            module.use_sampler(module.solver, AutoGuidance(str(path), scale=2.0))

    refused(lambda g: g["dsr"].update(latent_shape=[48, 2, 2]), r"latent shape \[48, 2, 2\] is not the model's")
    refused(
        lambda g: g["dsr"]["config"]["module"]["encoder"].update(patch_size=2), "encoder.patch_size: guide 2, model 4"
    )
    refused(lambda g: g["dsr"]["config"]["module"]["transport"].update(shift=2.0), "time shift 2, the model with 1")
    # Latent statistics (the pixel codec has none: give both some).
    module.encoder.register_buffer("latent_mean", torch.zeros(48, 8, 8))
    refused(lambda g: g["state_dict"].update({"encoder.latent_mean": torch.ones(48, 8, 8)}), "latent statistics")
    with pytest.raises(FileNotFoundError, match="sampler.guidance.guide_ckpt"):
        module.use_sampler(module.solver, AutoGuidance(str(tmp_path / "missing.ckpt")))
    # Another prediction type is fine: the guide's output becomes a velocity through its own transport.
    other = _guide(checkpoint, tmp_path, "velocity", lambda g: g["dsr"]["config"]["module"]["transport"].update(
        prediction="velocity", t_max=0.999))  # fmt: skip
    guidance = AutoGuidance(str(other), scale=2.0)
    module.use_sampler(module.solver, guidance)
    assert guidance.guide.transport.prediction == "velocity" and module.transport.prediction == "x"


def test_a_converted_release_dit_dh_guide_guides_a_dsr_model(run_dir, tmp_path):
    """RAE's guide is a DiT-DH-S stage2_model.pt: converted with dsr.convert stage2, it guides like any checkpoint."""
    from helpers import compose_train as _compose

    from dsr.config import build
    from dsr.convert import dsr_to_release
    from dsr.convert import main as convert_main
    from dsr.diffusion.guidance import AutoGuidance

    dh = ["backbone=dit_dh_s", "backbone.hidden_size=32", "backbone.depth=2", "backbone.num_heads=2",
          "backbone.head_hidden_size=48", "backbone.head_depth=1", "backbone.head_num_heads=2",
          "registers=none"]  # fmt: skip
    overrides = [o for o in TINY_RUN if not o.startswith(("backbone.", "experiment"))]
    overrides = ["experiment=quickstart", *overrides, *dh]
    source = build(_compose(overrides, tmp_path / "src").module).backbone
    torch.save(dsr_to_release(source), tmp_path / "stage2_model.pt")  # RAE's layout: a raw state dict
    GlobalHydra.instance().clear()
    out = convert_main(["stage2", str(tmp_path / "stage2_model.pt"), str(tmp_path / "guide.ckpt"), *overrides])
    module = DiTModule.from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    guidance = AutoGuidance(str(out), scale=1.42)
    module.use_sampler(module.solver, guidance)
    x, t, y = torch.randn(3, *module.latent_shape), torch.full((3,), 0.5), torch.tensor([0, 1, 2])
    torch.testing.assert_close(guidance.guide.model(x, t, y), source.eval()(x, t, y), rtol=0, atol=0)
    images = module.sample(y, noise=torch.randn(3, *module.latent_shape, generator=torch.Generator().manual_seed(0)))
    assert images.shape == (3, 3, 16, 16) and torch.isfinite(images).all()


@pytest.mark.slow
def test_the_fid_callback_scores_each_ema_under_its_decay(run_train, inception_weights, tmp_path):
    from hydra.utils import instantiate

    data = instantiate(compose_train(TINY_RUN, tmp_path / "ref").data.dataset)
    reference = np.stack([(data[i][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for i in range(24)])
    np.savez(tmp_path / "reference.npz", arr_0=reference)
    fid = ["callbacks.fid.every_n_steps=2", "callbacks.fid.num_samples=8", "callbacks.fid.batch_size=8",
           f"evaluation.reference={tmp_path / 'reference.npz'}", f"evaluation.inception_weights={inception_weights}",
           f"callbacks.fid.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=2",
           "module.ema_decays=[0.9,0.5]"]  # fmt: skip
    _, run = run_train([*TINY_RUN, *fid], name="fid")
    (row,) = [r for r in csv.DictReader(open(run / "logs" / "metrics.csv")) if r.get("fid/ema0.9/fid")]
    first, second = float(row["fid/ema0.9/fid"]), float(row["fid/ema0.5/fid"])
    assert math.isfinite(first) and math.isfinite(second) and first != second
    assert float(row["sample/nfe"]) == 3  # quickstart's Euler grid of TINY_RUN: 4 points, 3 evaluations
    assert "fid/fid" not in row or not row["fid/fid"]
    assert (run / "samples" / "fid_step_0000002_ema0.5.png").is_file()


# ------------------------------------------------------------------------------------------------------------------
# sampling precision and overrides of the training transport
# ------------------------------------------------------------------------------------------------------------------


def test_bf16_sampling_stays_close_to_fp32(run_dir):
    module = DiTModule.from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    y = torch.arange(8) % 4
    noise = torch.randn(8, *module.latent_shape, generator=torch.Generator().manual_seed(1))
    module.use_sampler(module.solver, module.guidance, "32-true")
    full = module.sample(y, noise=noise)
    module.use_sampler(module.solver, module.guidance, "bf16-mixed")
    half = module.sample(y, noise=noise)
    difference = (half - full).abs()
    assert half.dtype == torch.float32 and 0 < difference.max() < 0.05 and difference.mean() < 0.01  # images in [0, 1]
    with pytest.raises(ValueError, match="sampler.precision='fp8'"):
        module.use_sampler(module.solver, module.guidance, "fp8")


def test_a_sampler_that_overrides_the_training_transport_is_warned_about(run_dir, caplog):
    from dsr.diffusion.samplers import ODESampler, SDESampler

    module = DiTModule.from_checkpoint(run_dir / "checkpoints" / "last.ckpt")  # x-prediction: the grid ends at t = 0
    with caplog.at_level("WARNING", logger="dsr.lightning.dit_module"):
        module.use_sampler(ODESampler(), module.guidance)
        module.use_sampler(SDESampler(t_end=0.001), module.guidance)  # the SDE's own end, not an override
        module.use_sampler(ODESampler(t_end=0.0), module.guidance, shift=1.0)  # the training values, stated
        assert not caplog.records
        module.use_sampler(ODESampler(t_end=0.01), module.guidance, shift=2.5)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "sampler.shift=2.5 differs from the time shift the model was trained with (1)",
        "sampler.solver.t_end=0.01 differs from the end of the training interval (1 - transport.t_max = 0)",
    ]
    y, noise = torch.arange(2), torch.randn(2, *module.latent_shape, generator=torch.Generator().manual_seed(0))
    shifted = module.sample(y, noise=noise)  # the override is used
    module.use_sampler(ODESampler(t_end=0.01), module.guidance)
    assert not torch.equal(shifted, module.sample(y, noise=noise))


def _backbones():
    from helpers import DDT_TINY

    from dsr.models.ddt import DiTDH
    from dsr.models.dit import LightningDiT
    from dsr.models.sit import SiT

    small = dict(input_size=4, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=5)
    return {
        "lightningdit": lambda: LightningDiT(**small, num_registers=2, register_start=1),
        "dit_dh": lambda: DiTDH(**DDT_TINY, num_registers=2),
        "sit": lambda: SiT(**small, num_registers=2, register_start=1),
    }


@pytest.mark.parametrize("name", ["lightningdit", "dit_dh", "sit"])
def test_autoguidance_on_every_backbone(name):
    from dsr.diffusion.guidance import AutoGuidance, Guide
    from dsr.diffusion.transport import Transport

    torch.manual_seed(0)
    main = _backbones()[name]().eval()
    for p in main.parameters():  # zero-initialised output layers would make every velocity equal
        p.data.add_(0.05 * torch.randn_like(p))
    weaker = copy.deepcopy(main)
    for p in weaker.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    transport = Transport(prediction="velocity")
    x, t, y = torch.randn(3, 3, 4, 4), torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0, 1, 4])
    with torch.no_grad():
        v_main = main(x, t, y)
        same = AutoGuidance("-", scale=2.0)
        same.attach(Guide(copy.deepcopy(main), transport))
        assert torch.equal(same.velocity_fn(main, y, 5, transport)(x, t), v_main)
        guided = AutoGuidance("-", scale=2.0, t_max=0.6)
        guided.attach(Guide(weaker, transport))
        v = guided.velocity_fn(main, y, 5, transport)(x, t)
        v_guide = weaker(x[:2], t[:2], y[:2])
    torch.testing.assert_close(v[:2], v_guide + 2.0 * (v_main[:2] - v_guide))
    assert torch.equal(v[2], v_main[2])  # t = 0.9 lies outside [0, 0.6]


def test_training_samples_with_autoguidance_and_refuses_a_bad_guide_at_start_up(run_dir, run_train, tmp_path):
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    guided = ["sampler/guidance=autoguidance", f"sampler.guidance.guide_ckpt={ckpt}", "sampler.guidance.scale=2.0",
              "trainer.max_steps=1"]  # fmt: skip
    _, run = run_train([*TINY_RUN, *guided], name="guided")
    assert (run / "samples" / "final.png").is_file()  # the end-of-training grid, sampled with the guide
    with pytest.raises(FileNotFoundError, match="sampler.guidance.guide_ckpt"):
        run_train([*TINY_RUN, *guided[:1], f"sampler.guidance.guide_ckpt={tmp_path / 'none.ckpt'}"], name="bad")
    assert not (tmp_path / "bad" / "checkpoints").exists()
