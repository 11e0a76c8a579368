"""What several test modules share: the tiny run overrides, config composition, and tiny models with planted
structure. Fixtures live in conftest.py; test modules import these helpers, never each other."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel, SiglipVisionConfig, SiglipVisionModel

from dsr.config import CONF_DIR, compose
from dsr.registers.planted import plant_neuron, silence_neuron

__all__ = ["CONF_DIR", "DDT_TINY", "TINY_RUN", "compose_script", "compose_train", "perturb_checkpoint", "planted_vit",
           "planted_images", "same_init_with_registers"]  # fmt: skip

# A model and data small enough for a CPU test: 16x16 images, 4x4 tokens of 48 channels.
TINY_RUN = [
    "experiment=quickstart",
    "data.image_size=16",
    "data.num_classes=4",
    "data.dataset.num_samples=128",
    "data.global_batch_size=16",
    "backbone.hidden_size=32",
    "backbone.depth=2",
    "backbone.num_heads=2",
    "backbone.num_registers=2",
    "backbone.register_start=1",
    "sampler.solver.num_steps=4",
    "callbacks.sample_grid.per_class=2",
    "trainer.max_steps=6",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "callbacks.fid.every_n_steps=0",  # the quickstart's proxy FD at its last step: tests that want it turn it on
    "evaluation.features=inception",
]


def compose_train(overrides: list[str], run_dir: Path) -> DictConfig:
    """The config `python -m dsr.train <overrides>` would run, with its run directory at `run_dir`."""
    return compose("train", overrides, run_dir=run_dir)


def compose_script(config_name: str, overrides: list[str]) -> DictConfig:
    """The config of another entry point (`stats`, `cache_latents`, `analyze`, `sample`) with Hydra's runtime set, as
    its `@hydra.main` would see it."""
    return compose(config_name, overrides)


def same_init_with_registers(factory, **registers) -> tuple[nn.Module, nn.Module]:
    """`factory()` and `factory(**registers)` built from the same seed; asserts that the registers are the only new
    parameter and that every other parameter and buffer draws the same initial value. Returns both models."""
    torch.manual_seed(0)
    plain = factory()
    torch.manual_seed(0)
    with_registers = factory(**registers)
    shared, extended = plain.state_dict(), with_registers.state_dict()
    assert set(extended) - set(shared) == {"registers.tokens"}
    for key, value in shared.items():
        assert torch.equal(value, extended[key]), key
    return plain, with_registers


def perturb_checkpoint(path: Path, scale: float = 0.1, seed: int = 0) -> Path:
    """Add seeded noise to every floating-point tensor of a checkpoint's state dict, in place. A few training steps
    leave the zero-initialised output layer near zero (flat grey images, a weak test of exact equality); this gives
    the sampled images real structure."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    generator = torch.Generator().manual_seed(seed)
    for value in checkpoint["state_dict"].values():
        if value.is_floating_point():
            value.add_(scale * torch.randn(value.shape, generator=generator, dtype=value.dtype))
    torch.save(checkpoint, path)
    return path


# A tiny DiT-DH (tests of the model, of the release layout and of checkpoint import).
DDT_TINY = dict(
    input_size=4,
    patch_size=2,
    in_channels=3,
    hidden_size=32,
    depth=3,
    num_heads=2,
    head_hidden_size=48,
    head_depth=2,
    head_num_heads=2,
    num_classes=5,
)


# ------------------------------------------------------------------------------------------------------------------
# Tiny encoders with planted register neurons (see test_ttr's docstring)
# ------------------------------------------------------------------------------------------------------------------

A, B = (0, 7), (1, 21)  # (layer, neuron) of the strong and the weak planted register neuron
THRESHOLD = 20.0  # between normal patch norms (~4-10) and both planted populations (>= 25)
MARKER = 8.0


@torch.no_grad()
def _plant(conv: nn.Conv2d, pos: Tensor, prefix: list[Tensor], blocks: nn.ModuleList, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    # Content of moderate norm (~3-4) from input channel 2, so the markers stand out after LayerNorm.
    conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.5)
    pos.copy_(torch.randn(pos.shape, generator=g) * 0.3)
    area = conv.kernel_size[0] * conv.kernel_size[1]
    for channel in (0, 1):  # residual dim `channel` = mean of input channel `channel` over the patch, nothing else
        conv.weight[:, channel] = 0
        conv.weight[channel] = 0
        conv.weight[channel, channel] = 1.0 / area
        conv.bias[channel] = 0
    for t in (pos, *prefix):
        t[..., :2] = 0
    width = conv.out_channels
    for (layer, neuron), dim, gain, write_norm in ((A, 0, 8.0, 6.0), (B, 1, 4.0, 6.0)):
        read = torch.zeros(width)
        read[dim] = gain
        write = torch.randn(width, generator=g)
        write[:2] = 0
        # fires only where the normalised marker dim exceeds 2.5
        plant_neuron(blocks[layer].mlp, neuron, read, -2.5 * gain, write / write.norm() * write_norm)


# Both families at the same size: 16 px images as 4x4 patches of width 32, 3 blocks.
PLANTED_VIT = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, image_size=16, patch_size=4)


def planted_vit(family: str, *, clean: bool = False) -> nn.Module:
    """A tiny encoder of `family` with the planted neurons (silenced when `clean`), in eval mode."""
    torch.manual_seed(0)
    if family == "siglip":
        config = SiglipVisionConfig(**PLANTED_VIT, intermediate_size=64)
        model = SiglipVisionModel(config)
        emb = model.embeddings
        _plant(emb.patch_embedding, emb.position_embedding.weight, [], model.encoder.layers)
    elif family == "dinov2":
        config = Dinov2WithRegistersConfig(**PLANTED_VIT, mlp_ratio=2, num_register_tokens=4)  # MLP 64 wide too
        model = Dinov2WithRegistersModel(config)
        emb = model.embeddings
        prefix = [emb.cls_token, emb.register_tokens]
        _plant(emb.patch_embeddings.projection, emb.position_embeddings, prefix, model.encoder.layer)
    else:
        model = timm.models.vision_transformer.VisionTransformer(
            img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=4, mlp_ratio=2, reg_tokens=2, num_classes=0
        )
        _plant(model.patch_embed.proj, model.pos_embed, [model.cls_token, model.reg_token], model.blocks)
    if clean:
        for layer, neuron in (A, B):
            silence_neuron(model, layer, neuron)
    return model.eval()


def planted_images(n: int, seed: int = 2, a_patch: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Images [n, 3, 16, 16] with marker A and marker B on two different random patches; returns (x, pa, pb)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 16, 16, generator=g) - 0.5
    x[:, :2] *= 0.2
    pa = torch.randint(0, 16, (n,), generator=g) if a_patch is None else torch.full((n,), a_patch)
    pb = (pa + 1 + torch.randint(0, 15, (n,), generator=g)) % 16
    for i in range(n):
        (ra, ca), (rb, cb) = divmod(int(pa[i]), 4), divmod(int(pb[i]), 4)
        x[i, 0, 4 * ra : 4 * ra + 4, 4 * ca : 4 * ca + 4] = MARKER
        x[i, 1, 4 * rb : 4 * rb + 4, 4 * cb : 4 * cb + 4] = MARKER
    return x, pa, pb
