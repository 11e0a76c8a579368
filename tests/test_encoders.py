"""Encoder wrappers against the Hugging Face models called directly, on tiny random checkpoints saved to disk and
loaded through the real `from_pretrained` path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    Siglip2Config,
    Siglip2ImageProcessor,
    Siglip2Model,
    SiglipConfig,
    SiglipModel,
    SiglipVisionModel,
)

from dsr.encoders.dinov2 import IMAGENET_MEAN, IMAGENET_STD, DINOv2
from dsr.encoders.siglip2 import SigLIP2

transformers.logging.set_verbosity_error()
REPO = Path(__file__).resolve().parents[1]
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=4)
TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)


def randomise_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial LayerNorm affines, so that keeping or dropping them makes a visible difference."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm) and module.weight is not None:
            module.weight.data = 1 + 0.5 * torch.randn(module.weight.shape, generator=generator)
            module.bias.data = 0.5 * torch.randn(module.bias.shape, generator=generator)


def plain_layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine, in float64."""
    x = x.double()
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory) -> Path:
    """A full (vision + text) SigLIP checkpoint, laid out like google/siglip2-base-patch16-256."""
    torch.manual_seed(0)
    model = SiglipModel(SiglipConfig(vision_config={**VISION, "image_size": 32}, text_config=TEXT))
    randomise_norms(model)
    path = tmp_path_factory.mktemp("siglip")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_siglip_tokens_match_the_hf_model(siglip_dir, images):
    encoder = SigLIP2(pretrained=str(siglip_dir), image_size=32, precision="32-true")
    reference = SiglipVisionModel.from_pretrained(siglip_dir).eval()
    with torch.no_grad():
        out = reference(pixel_values=(images - 0.5) / 0.5, output_hidden_states=True)
    # Patch tokens = the last block's output, layer-normed without the affine (SigLIP has no CLS token).
    expected = plain_layer_norm(out.hidden_states[-1], reference.config.layer_norm_eps)
    z = encoder.tokens(images)
    assert z.shape == (3, 32, 8, 8)
    tokens = z.flatten(2).transpose(1, 2)  # back to [B, N, C], row-major
    torch.testing.assert_close(tokens.double(), expected, atol=1e-5, rtol=1e-5)
    # The affine really was removed: the HF output (with its randomised affine) differs.
    assert (tokens - out.last_hidden_state).abs().max() > 0.1
    assert encoder.latent_shape == (32, 8, 8)
    assert not any(p.requires_grad for p in encoder.model.parameters())


def test_resize_to_the_encoder_input(siglip_dir):
    encoder = SigLIP2(pretrained=str(siglip_dir), image_size=48, precision="32-true")
    big = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    resized = F.interpolate(big, size=(32, 32), mode="bicubic", align_corners=False)
    torch.testing.assert_close(encoder.tokens(big), encoder.tokens(resized))


def test_siglip2_naflex_matches_the_hf_processor(tmp_path):
    torch.manual_seed(0)
    model = Siglip2Model(Siglip2Config(vision_config={**VISION, "num_patches": 64}, text_config=TEXT))
    randomise_norms(model)
    model.save_pretrained(tmp_path)
    encoder = SigLIP2(pretrained=str(tmp_path), image_size=32, precision="32-true")
    assert encoder.naflex and encoder.latent_shape == (32, 8, 8)

    pixels = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    processor = Siglip2ImageProcessor(patch_size=4, max_num_patches=64)
    inputs = processor(images=list(pixels), return_tensors="pt")
    assert inputs["spatial_shapes"].tolist() == [[8, 8], [8, 8]]  # no resize happened
    reference = model.vision_model.eval()
    with torch.no_grad():
        out = reference(**inputs, output_hidden_states=True)
    expected = plain_layer_norm(out.hidden_states[-1], reference.config.layer_norm_eps)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    tokens = encoder.tokens(images).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("registers", [4, 0])
def test_dinov2_drops_cls_and_registers(tmp_path, registers):
    torch.manual_seed(0)
    common = dict(VISION, patch_size=7, image_size=28)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**common, num_register_tokens=registers))
    else:
        model = Dinov2Model(Dinov2Config(**common))
    randomise_norms(model)
    model.save_pretrained(tmp_path)
    encoder = DINOv2(pretrained=str(tmp_path), resolution=28, image_size=32, precision="32-true")
    assert encoder.num_prefix_tokens == 1 + registers
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))

    pixels = F.interpolate(images, size=(28, 28), mode="bicubic", align_corners=False)
    pixels = (pixels - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        out = model.eval()(pixel_values=pixels, output_hidden_states=True)
    assert out.hidden_states[-1].shape[1] == 16 + 1 + registers
    expected = plain_layer_norm(out.hidden_states[-1][:, 1 + registers :], model.config.layer_norm_eps)
    tokens = encoder.tokens(images).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens.double(), expected, atol=1e-5, rtol=1e-5)


def test_normalisation_round_trip_and_stats_file(siglip_dir, images, tmp_path):
    generator = torch.Generator().manual_seed(5)
    mean = torch.randn(32, 8, 8, generator=generator)
    var = torch.rand(32, 8, 8, generator=generator) + 0.1
    torch.save({"mean": mean, "var": var}, tmp_path / "stats.pt")
    encoder = SigLIP2(pretrained=str(siglip_dir), image_size=32, stats=str(tmp_path / "stats.pt"), precision="32-true")
    raw = encoder.tokens(images)
    z = encoder.encode(images)
    expected = (raw.double() - mean.double()) / torch.sqrt(var.double() + 1e-5)
    torch.testing.assert_close(z.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(encoder.denormalize(z), raw, atol=1e-5, rtol=1e-5)

    torch.save({"mean": mean[:, :4], "var": var[:, :4]}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="another encoder"):
        SigLIP2(pretrained=str(siglip_dir), image_size=32, stats=str(tmp_path / "wrong.pt"))
    with pytest.raises(FileNotFoundError, match="encoder.stats=.*dsr.stats"):
        SigLIP2(pretrained=str(siglip_dir), image_size=32, stats=str(tmp_path / "absent.pt"))


def test_noise_augmentation_only_in_training(siglip_dir, images):
    encoder = SigLIP2(pretrained=str(siglip_dir), image_size=32, noise_tau=0.8)
    raw = encoder.tokens(images)
    assert torch.equal(encoder.eval().augment(raw), raw)
    torch.manual_seed(0)
    noisy = encoder.train().augment(raw)
    assert not encoder.model.training  # the frozen encoder stays in eval mode
    # Per-sample sigma ~ U(0, 0.8): each sample's noise has one standard deviation below 0.8.
    sigma = (noisy - raw).flatten(1).std(1)
    assert (sigma < 0.8).all() and (sigma > 0).all() and sigma.std() > 0


def test_missing_local_directory_names_the_setting():
    with pytest.raises(FileNotFoundError, match="encoder.pretrained=/no/such/model"):
        SigLIP2(pretrained="/no/such/model")


@pytest.mark.slow
def test_missing_hub_weights_fail_at_start_up_with_the_setting(tmp_path):
    """The real entry point, with an empty Hugging Face cache and no network: a clear error, before any training."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "dsr.train", "encoder=siglip2_b", "data=synthetic", "backbone=dit_tiny",
         f"paths.output_root={tmp_path}", "trainer.accelerator=cpu"],
        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode != 0
    message = result.stderr + result.stdout
    assert "encoder.pretrained=google/siglip2-base-patch16-256 was not found locally" in message
    assert str(tmp_path / "hf") in message
    assert "Epoch" not in message  # nothing started


def test_test_time_registers_are_installed_from_the_config(siglip_dir, images, tmp_path):
    from dsr.registers.ttr import TestTimeRegisters

    neurons = {0: [3, 17], 1: [5]}
    (tmp_path / "neurons.json").write_text('{"0": [3, 17], "1": [5]}')
    encoder = SigLIP2(pretrained=str(siglip_dir), image_size=32, precision="32-true", registers="ttr",
                      ttr_neurons=str(tmp_path / "neurons.json"))  # fmt: skip
    assert encoder.test_time_registers is not None and encoder.test_time_registers.installed
    plain = SigLIP2(pretrained=str(siglip_dir), image_size=32, precision="32-true")
    with TestTimeRegisters(plain.model, neurons):
        expected = plain.tokens(images)
    z = encoder.tokens(images)
    assert z.shape == plain.tokens(images).shape  # the register is dropped at the output
    torch.testing.assert_close(z, expected)
    assert (z - plain.tokens(images)).abs().max() > 1e-3  # and it changed the latents

    with pytest.raises(ValueError, match="registers=trained needs an encoder with trained registers"):
        SigLIP2(pretrained=str(siglip_dir), image_size=32, registers="trained")
    with pytest.raises(ValueError, match="encoder.recursive_ttr_neurons is not set"):
        SigLIP2(pretrained=str(siglip_dir), image_size=32, registers="recursive_ttr")


@pytest.mark.parametrize(
    "name, config, registers, neurons",
    [
        ("siglip2_b", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=256, patch_size=16), "ttr", "siglip2_b"),
        ("siglip2_so400m", dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                                image_size=224, patch_size=14), "recursive_ttr", "siglip2_so400m"),
    ],
)  # fmt: skip
def test_shipped_neuron_lists_fit_the_real_architectures(name, config, registers, neurons):
    """The release's lists index layers and MLP neurons that exist in the real checkpoints' architecture (built on
    the meta device: no memory, no weights)."""
    with torch.device("meta"):
        encoder = SigLIP2(pretrained=None, config=config, registers=registers, **{f"{registers}_neurons": neurons})
    installed = encoder.test_time_registers.neurons
    # The release's So400M list names some neurons twice (found in both rounds): each is applied once.
    raw = json.loads(next((REPO / "dsr" / "registers" / "data").glob(f"{neurons}_register_neurons*.json")).read_text())
    assert installed == {int(layer): list(dict.fromkeys(js)) for layer, js in raw.items()}
    assert sum(len(v) for v in installed.values()) == {"siglip2_b": 50, "siglip2_so400m": 72}[name]
    assert encoder.latent_shape == (config["hidden_size"], 16, 16)


class _RunsCode:
    """Unpickling this touches a marker file: the code a malicious checkpoint could run."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def test_files_a_user_is_handed_are_loaded_without_running_code(tmp_path):
    from dsr.encoders.rae import load_stats  # noqa: PLC0415
    from dsr.lightning.dit_module import DiTModule  # noqa: PLC0415
    from dsr.utils.files import load_tensors  # noqa: PLC0415

    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"mean": torch.zeros(2, 1, 1), "var": torch.ones(2, 1, 1), "extra": _RunsCode(marker)}, evil)
    with pytest.raises(ValueError, match=r"encoder.stats=.*evil.pt holds Python objects other than tensors"):
        load_stats(evil, (2, 1, 1))
    with pytest.raises(ValueError, match=r"ckpt=.*evil.pt holds Python objects"):
        DiTModule.from_checkpoint(evil)
    assert not marker.exists()
    torch.save({"mean": torch.zeros(2, 1, 1), "var": torch.ones(2, 1, 1), "count": 3, "source": "x"}, evil)
    assert load_tensors(evil, "encoder.stats")["count"] == 3  # what dsr writes loads
