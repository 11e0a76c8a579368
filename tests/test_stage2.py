"""Stage-2 pieces: batch planning, learning-rate recipes, the pixel encoder, config composition, and
end-to-end learning of a class-conditional model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import CONF_DIR, TINY_RUN, compose_train
from hydra.utils import instantiate

from dsr.data.datamodule import BatchPlan
from dsr.encoders.pixel import PixelEncoder
from dsr.lightning.dit_module import DiTModule, LRSchedule


@pytest.mark.parametrize(
    "global_batch, world, micro, expected",
    [(1024, 8, None, (128, 1)), (1024, 8, 64, (64, 2)), (1024, 1, 256, (256, 4)), (16, 2, 100, (8, 1))],
)
def test_batch_plan(global_batch, world, micro, expected):
    plan = BatchPlan.derive(global_batch, world, micro)
    assert (plan.micro_batch_size, plan.accumulate) == expected
    assert plan.micro_batch_size * plan.accumulate * plan.world_size == global_batch


def test_batch_plan_errors_name_the_setting():
    with pytest.raises(ValueError, match="data.global_batch_size"):
        BatchPlan.derive(1000, 16)
    with pytest.raises(ValueError, match="data.micro_batch_size"):
        BatchPlan.derive(1024, 8, 48)


def test_lr_schedules_of_both_recipes():
    rae = LRSchedule(constant_epochs=40, decay_end_epochs=800, final_lr=2e-5)
    spe = 1251.0  # ImageNet steps per epoch at batch 1024
    m = lambda epoch: rae.multiplier(round(epoch * spe), spe, 2e-4)  # noqa: E731
    assert m(0) == m(39.99) == 1.0
    assert m(420) == pytest.approx(1 - 0.9 * 380 / 760, abs=1e-6)  # halfway down the linear decay
    assert m(800) == pytest.approx(0.1) and m(1400) == pytest.approx(0.1)  # 2e-5 / 2e-4, then constant
    constant = LRSchedule()
    assert {constant.multiplier(s, spe, 2e-4) for s in (0, 10**4, 10**6)} == {1.0}
    warm = LRSchedule(warmup_epochs=5)
    assert warm.multiplier(round(2.5 * spe), spe, 2e-4) == pytest.approx(0.5, abs=1e-3)
    assert warm.multiplier(round(6 * spe), spe, 2e-4) == 1.0


def test_pixel_encoder_patches_are_channels_and_round_trip():
    encoder = PixelEncoder(image_size=8, patch_size=4)
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    z = encoder.encode(images)
    assert z.shape == (2, 48, 2, 2) and encoder.latent_shape == (48, 2, 2)
    # latent position (1, 0) holds the bottom-left 4x4 patch, channel = c * 16 + row * 4 + col, in [-1, 1]
    torch.testing.assert_close(z[:, :, 1, 0].reshape(2, 3, 4, 4), images[:, :, 4:8, 0:4] * 2 - 1)
    torch.testing.assert_close(encoder.decode(z), images)
    with pytest.raises(ValueError, match="encoder.image_size"):
        encoder.encode(torch.rand(1, 3, 16, 16))


GROUPS = {
    "backbone": ["dit_tiny", "dit_s", "dit_b", "dit_l", "dit_xl"],
    "sampler": ["euler", "heun", "sde"],
    "registers": ["none", "diffusion", "trained", "ttr", "recursive_ttr", "dsr"],
    "encoder": ["siglip2_b", "siglip2_so400m", "dinov2_b_reg", "dinov2_b", "tiny", "pixel"],
    "decoder": ["vit_b", "vit_l", "vit_xl", "tiny"],
    "recipe": ["dsr_release", "rae"],
    "logger": ["csv", "wandb"],
}


@pytest.mark.parametrize("group, option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes_and_builds(group, option, tmp_path):
    assert (CONF_DIR / group / f"{option}.yaml").is_file()
    cfg = compose_train([f"{group}={option}", "data=synthetic"], tmp_path)
    with torch.device("meta"):
        backbone = instantiate(cfg.backbone)(in_channels=48, input_size=(8, 8))
    diffusion_registers = {"none": 0, "trained": 0, "ttr": 0, "recursive_ttr": 0}.get(option, 36)
    assert backbone.num_registers == (diffusion_registers if group == "registers" else 36)
    assert backbone.depth == cfg.backbone.depth
    solver = instantiate(cfg.sampler.solver)
    assert solver.num_steps >= 2
    transport = instantiate(cfg.transport)
    assert transport.prediction == {"rae": "velocity"}.get(option, "x")
    for logger in cfg.logger.values():
        assert logger._target_.startswith("lightning.pytorch.loggers.")


def test_rae_recipe_sets_its_hyperparameters(tmp_path):
    cfg = compose_train(["recipe=rae"], tmp_path)
    assert cfg.module.ema_decay == 0.9995 and cfg.trainer.gradient_clip_val == 1.0
    assert cfg.module.lr_schedule.constant_epochs == 40 and cfg.module.lr_schedule.final_lr == 2e-5
    cfg = compose_train([], tmp_path)  # defaults: the DSR release's recipe on LightningDiT-XL with registers
    assert cfg.module.ema_decay == 0.9999 and cfg.trainer.gradient_clip_val is None
    assert cfg.transport.prediction == "x" and cfg.backbone.num_registers == 36 and cfg.backbone.depth == 28


def mean_red_minus_green(images: torch.Tensor) -> torch.Tensor:
    """Per image: mean over pixels of R - G (the grey background contributes 0)."""
    return (images[:, 0] - images[:, 1]).mean(dim=(1, 2))


@pytest.mark.slow
def test_tiny_model_learns_the_requested_class(run_train):
    """Two classes that differ only in colour (red vs green disks): after a short training run, EMA samples
    of each class have that class's colour. Conditioning, loss, sampler and EMA all have to work."""
    overrides = [
        *TINY_RUN,
        "data.num_classes=2",
        "data.image_size=8",
        "encoder.patch_size=2",
        "data.dataset.num_samples=512",
        "data.global_batch_size=32",
        "backbone.hidden_size=64",
        "backbone.depth=2",
        "backbone.num_heads=4",
        "transport.shift=1.0",
        "module.ema_decay=0.98",
        "trainer.max_steps=600",
        "sampler.solver.num_steps=20",
        "callbacks.sample_grid.every_n_steps=0",
        "trainer.log_every_n_steps=50",
    ]
    _, run_dir = run_train(overrides, name="learn")
    module = DiTModule.from_checkpoint(Path(run_dir) / "checkpoints" / "last.ckpt")
    generator = torch.Generator().manual_seed(0)
    y = torch.tensor([0] * 16 + [1] * 16)
    samples = mean_red_minus_green(module.sample(y, generator=generator))
    data = instantiate(compose_train(overrides, run_dir).data.dataset)
    images = torch.stack([data[i][0] for i in range(64)])
    labels = torch.tensor([data[i][1] for i in range(64)])
    real = mean_red_minus_green(images)
    target_red, target_green = real[labels == 0].mean(), real[labels == 1].mean()
    assert target_red > 0.05 and target_green < -0.05
    red, green = samples[:16], samples[16:]
    # (almost) every sample has its class's colour, and the class means are close to the data's
    assert (red > 0).float().mean() >= 0.8 and (green < 0).float().mean() >= 0.8, (red, green)
    assert abs(red.mean() - target_red) < 0.5 * target_red
    assert abs(green.mean() - target_green) < 0.5 * abs(target_green)


@pytest.mark.parametrize(
    "encoder, registers, expected",
    [
        ("siglip2_b", "dsr", "ttr"),
        ("siglip2_so400m", "dsr", "recursive_ttr"),
        ("dinov2_b_reg", "dsr", "trained"),
        ("pixel", "dsr", "none"),
        ("siglip2_b", "diffusion", "none"),
        ("siglip2_so400m", "recursive_ttr", "recursive_ttr"),
    ],
)
def test_register_options_select_the_encoder_side_and_its_artifacts(encoder, registers, expected, tmp_path):
    cfg = compose_train([f"encoder={encoder}", f"registers={registers}", "paths.artifacts=/a"], tmp_path)
    assert cfg.encoder.get("registers") == expected
    if encoder != "pixel":  # statistics and decoders are per (encoder, encoder-side registers)
        assert cfg.encoder.stats == f"/a/{encoder}-{expected}/stats.pt"
        assert cfg.encoder.decoder_weights == f"/a/{encoder}-{expected}/decoder-vit_xl.pt"
