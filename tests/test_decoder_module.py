"""Stage-1 training (DecoderModule) on the tiny codec: losses, the adaptive weight, the GAN schedule, gradient
accumulation, validation metrics, and the real `dsr.train` entry point (export, checkpoint, exact resume)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import compose_train
from hydra.utils import instantiate
from torchmetrics.image import StructuralSimilarityIndexMeasure

from dsr.data.synthetic import SyntheticShapes
from dsr.lightning.decoder_module import CosineSchedule, DecoderModule, psnr

TINY_STAGE1 = [
    "stage=decoder",
    "encoder=tiny",
    "decoder=tiny",
    "data=synthetic",
    "data.image_size=32",
    "data.dataset.num_samples=16",
    "data.global_batch_size=8",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.max_epochs=-1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "module.lpips.random_init=true",
    "module.discriminator.random_init=true",
    "module.discriminator.resolution=32",
    "module.discriminator.embed_dim=32",
    "module.discriminator.depth=2",
    "module.discriminator.num_heads=2",
    "module.discriminator.taps=[0]",
]


def build(tmp_path: Path, overrides: list[str] = ()) -> tuple[DecoderModule, L.LightningDataModule]:
    cfg = compose_train([*TINY_STAGE1, f"paths.artifacts={tmp_path}/artifacts", *overrides], tmp_path / "run")
    torch.manual_seed(0)
    module = instantiate(cfg.module)
    datamodule = instantiate(cfg.data)
    module.accumulate_grad_batches = datamodule.configure_batches(1).accumulate  # as dsr.train does
    return module, datamodule


def fit(module: DecoderModule, datamodule, max_steps: int, callbacks=()) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    dataset = SyntheticShapes(num_samples=8, image_size=32, num_classes=8, seed=0)
    return torch.stack([dataset[i][0] for i in range(8)])


def test_one_step_lowers_the_reconstruction_loss(tmp_path, images):
    module, _ = build(tmp_path)
    draws = module.step_draws(len(images), 0)
    z = module.codec.tokens(images)
    before = module.generator_losses(images, z, draws, lpips=True, gan=False)["rec_loss"]
    optimizer = torch.optim.Adam(module.codec.decoder.parameters(), lr=1e-3)
    before.backward()
    optimizer.step()
    after = module.generator_losses(images, z, draws, lpips=True, gan=False)["rec_loss"]
    assert after.item() < before.item()


def test_adaptive_weight_is_the_gradient_norm_ratio_on_the_last_layer(tmp_path, images):
    module, _ = build(tmp_path)
    draws = module.step_draws(len(images), 0)
    z = module.codec.tokens(images)
    terms = module.generator_losses(images, z, draws, lpips=True, gan=True)

    # The same forward again, differentiated by two plain backward passes.
    last_layer = module.codec.decoder.decoder_pred.weight
    again = module.generator_losses(images, z, draws, lpips=True, gan=True)
    module.zero_grad(set_to_none=True)
    again["rec_loss"].backward(retain_graph=True)
    rec_grad = last_layer.grad.clone()
    last_layer.grad = None
    again["g_loss"].backward()
    expected = (rec_grad.norm() / (last_layer.grad.norm() + 1e-6)).clamp(0, 1e4)
    assert expected > 0
    torch.testing.assert_close(terms["adaptive_weight"], expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(terms["loss"], terms["rec_loss"] + 0.75 * expected * terms["g_loss"])

    module.max_d_weight = 1e-3 * expected.item()  # the clamp
    capped = module.generator_losses(images, z, draws, lpips=True, gan=True)["adaptive_weight"]
    assert capped.item() == pytest.approx(module.max_d_weight, rel=1e-6)


def test_psnr_caps_identical_images_and_matches_a_uniform_offset():
    x = torch.rand(3, 3, 16, 16) * 0.7 + 0.1
    assert psnr(x, x).tolist() == [100.0] * 3  # mse clamped at 1e-10
    for d in (0.01, 0.05, 0.2):
        torch.testing.assert_close(psnr(x, x + d), torch.full((3,), 20 * math.log10(1 / d)), rtol=1e-4, atol=0)


def test_cosine_schedule_matches_the_reference_formula():
    schedule = CosineSchedule(warmup_epochs=1, decay_end_epochs=16, final_lr=2e-5)
    base, final, per_epoch = 2e-4, 2e-5, 10
    for step in (0, 4, 9, 10, 11, 50, 85, 120, 159, 160, 500):
        if step < 10:
            expected = base * (step + 1) / 10  # warm-up from zero
        else:
            progress = min(1.0, (step - 10) / 150)
            expected = final + (base - final) * 0.5 * (1 + math.cos(math.pi * progress))
        assert schedule.multiplier(step, per_epoch, base) * base == pytest.approx(expected, rel=1e-12)


class Recorder(L.Callback):
    """Per optimizer step: the logged losses, the discriminator heads' weights and the step counter."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []
        self.heads: list[torch.Tensor] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        self.initial_heads = torch.cat(
            [p.detach().flatten().clone() for p in pl_module.discriminator.heads.parameters()]
        )

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()} | {"step": trainer.global_step})
        self.heads.append(torch.cat([p.detach().flatten().clone() for p in pl_module.discriminator.heads.parameters()]))


def test_gan_term_and_discriminator_updates_start_on_schedule(tmp_path):
    # 16 images, global batch 8: 2 steps per epoch. D updates from epoch 1 (step 2), the GAN term from epoch 2 (step 4).
    module, datamodule = build(tmp_path, ["module.disc_update_start=1", "module.disc_start=2"])
    recorder = Recorder()
    trainer = fit(module, datamodule, max_steps=6, callbacks=[recorder])

    assert [m["step"] for m in recorder.metrics] == [1, 2, 3, 4, 5, 6]
    for m in recorder.metrics[:4]:  # before disc_start: exactly the reconstruction loss
        assert m["train/g_loss"] == 0.0 and m["train/adaptive_weight"] == 0.0
        assert m["train/loss"] == m["train/rec_loss"]
    for m in recorder.metrics[4:]:
        assert m["train/g_loss"] != 0.0 and m["train/adaptive_weight"] > 0.0
        expected = m["train/rec_loss"] + 0.75 * m["train/adaptive_weight"] * m["train/g_loss"]
        assert m["train/loss"] == pytest.approx(expected, rel=1e-5) and m["train/loss"] != m["train/rec_loss"]
    unchanged = [torch.equal(h, recorder.initial_heads) for h in recorder.heads]
    assert unchanged == [True, True, False, False, False, False]  # D steps from step 2

    opt_g, opt_d = trainer.optimizers
    assert trainer.global_step == 6  # generator steps only
    assert opt_g.state[opt_g.param_groups[0]["params"][0]]["step"].item() == 6
    assert opt_d.state[opt_d.param_groups[0]["params"][0]]["step"].item() == 4
    # Both schedules follow the generator's steps from step 0 (RAE's discriminator schedule started late).
    expected_lr = 2e-4 * module.lr_schedule.multiplier(6, 2, 2e-4)
    assert opt_g.param_groups[0]["lr"] == pytest.approx(expected_lr)
    assert opt_d.param_groups[0]["lr"] == pytest.approx(expected_lr)


@pytest.mark.slow
def test_accumulating_half_batches_equals_whole_batches(tmp_path):
    """k=2 micro-batches of 4 give the same decoder, EMA, discriminator and optimizer states as batches of 8 (the
    discriminator trains every step; the GAN term, whose adaptive weight is per micro-batch, is off)."""
    states = []
    for micro in ("null", "4"):
        module, datamodule = build(
            tmp_path / micro, [f"data.micro_batch_size={micro}", "module.disc_update_start=0", "module.disc_start=100"]
        )
        initial = {k: v.clone() for k, v in module.state_dict().items()}
        trainer = fit(module, datamodule, max_steps=2)
        assert trainer.global_step == 2
        assert module.accumulate_grad_batches == (1 if micro == "null" else 2)
        trained = {k: v for k, v in module.state_dict().items() if not k.startswith(("lpips.", "codec.model."))}
        moments = [s["exp_avg"] for o in trainer.optimizers for s in o.state.values()]
        states.append((initial, trained, moments))
    (initial, whole, whole_moments), (_, halves, half_moments) = states
    assert not torch.equal(whole["codec.decoder.decoder_pred.weight"], initial["codec.decoder.decoder_pred.weight"])
    assert not torch.equal(whole["discriminator.heads.0.2.bias"], initial["discriminator.heads.0.2.bias"])
    assert set(whole) == set(halves)
    for key in whole:
        if key.startswith("discriminator.heads.") and key.endswith((".0.0.bias", ".fn.0.bias")):
            # Biases of convolutions followed by a per-sample norm: their gradient is zero up to rounding, which
            # Adam's normalisation turns into updates of arbitrary sign.
            continue
        torch.testing.assert_close(halves[key], whole[key], rtol=1e-4, atol=1e-6, msg=key)
    for a, b in zip(half_moments, whole_moments, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


@pytest.mark.slow
def test_validation_scores_the_ema_decoder(tmp_path, inception_weights, monkeypatch):
    monkeypatch.setenv("DSR_CACHE", str(tmp_path / "cache"))
    val = SyntheticShapes(num_samples=6, image_size=32, num_classes=8, seed=1)
    images = torch.stack([val[i][0] for i in range(6)])
    # The rFID reference is the EMA decoder's own 8-bit reconstructions (the EMA starts as the decoder): rFID ~ 0.
    module, _ = build(tmp_path / "first")
    with torch.no_grad():
        recon = module.ema.module(module.codec.tokens(images)) * module.codec.pixel_std + module.codec.pixel_mean
    recon = (recon.clamp(0, 1) * 255).round()
    reference = tmp_path / "reference.npz"
    np.savez(reference, arr_0=recon.to(torch.uint8).permute(0, 2, 3, 1).numpy())

    evaluation = [f"evaluation.reference={reference}", f"evaluation.inception_weights={inception_weights}"]
    module, datamodule = build(tmp_path, ["data.micro_batch_size=4", *evaluation])
    datamodule.val_dataset = val
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    metrics = trainer.validate(module, datamodule=datamodule)[0]

    recon, target = recon / 255, (images * 255).round() / 255
    mse = (recon.double() - target.double()).square().mean(dim=(1, 2, 3))
    assert metrics["val/psnr"] == pytest.approx((10 * torch.log10(1 / mse)).mean().item(), rel=1e-5)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
    ssim.update(recon, target)
    assert metrics["val/ssim"] == pytest.approx(ssim.compute().item(), rel=1e-4)
    assert abs(metrics["val/rfid"]) < 1e-2
    assert (tmp_path / "run" / "samples" / "step_0000000.png").is_file()


@pytest.mark.slow
def test_train_entry_point_exports_the_decoder_and_resumes_exactly(run_train, tmp_path, caplog):
    overrides = [
        *TINY_STAGE1,
        "data.dataset.num_samples=32",  # 4 steps per epoch: the restart falls mid-epoch
        "module.disc_update_start=0",
        "module.disc_start=0.25",  # the GAN term from step 1
        "callbacks.checkpoint.every_n_train_steps=2",
    ]

    def run(name: str, max_steps: int) -> tuple[Path, Path]:
        artifacts = tmp_path / f"artifacts-{name}"
        _, run_dir = run_train([*overrides, f"trainer.max_steps={max_steps}", f"paths.artifacts={artifacts}"], name)
        return run_dir, artifacts / "tiny-none" / "decoder-tiny.pt"

    run_dir, export = run("run", 3)
    assert (run_dir / "checkpoints" / "step_00000002.ckpt").is_file()
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 3
    keys = set(last["state_dict"])
    assert not any(k.startswith(("codec.model.", "lpips.", "discriminator.backbone.")) for k in keys)  # frozen
    assert any(k.startswith("discriminator.heads.") for k in keys) and any(k.startswith("ema.module.") for k in keys)
    exported = torch.load(export, map_location="cpu", weights_only=True)
    for key, value in exported.items():  # the EMA decoder of the final step
        torch.testing.assert_close(value, last["state_dict"][f"ema.module.{key}"], rtol=0, atol=0)

    # The stage-2 codec loads the file strictly as its frozen decoder.
    cfg = compose_train(["encoder=tiny", "decoder=tiny", "data=synthetic", "data.image_size=32"], tmp_path / "stage2")
    codec = instantiate(cfg.encoder, decoder_weights=str(export), stats=None)
    torch.testing.assert_close(codec.decoder.decoder_pred.weight, exported["decoder_pred.weight"])

    caplog.set_level(logging.INFO, logger="dsr.train")
    resumed_dir, _ = run("run", 5)
    assert "resuming from" in caplog.text
    straight_dir, _ = run("straight", 5)
    resumed = torch.load(resumed_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    straight = torch.load(straight_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == straight["global_step"] == 5
    assert set(resumed["state_dict"]) == set(straight["state_dict"])
    for key, value in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, msg=key)
    for a, b in zip(resumed["optimizer_states"], straight["optimizer_states"], strict=True):
        for index, state in b["state"].items():
            torch.testing.assert_close(a["state"][index]["exp_avg_sq"], state["exp_avg_sq"])
            assert a["state"][index]["step"] == state["step"]
    assert [s["last_epoch"] for s in resumed["lr_schedulers"]] == [5, 5]
