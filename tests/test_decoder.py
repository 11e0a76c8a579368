"""Stage-1 building blocks: the ViT decoder (against Hugging Face's ViTMAE decoder and closed forms), the DINO feature
discriminator, DiffAug and LPIPS."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import ViTMAEConfig
from transformers.models.vit_mae.modeling_vit_mae import ViTMAEDecoder

from dsr.models.decoder import ViTDecoder, from_reference_state_dict, mae_sincos_table, reference_key_map
from dsr.models.discriminator import DINODiscriminator, diff_augment
from dsr.models.perceptual import LPIPS, vgg_trunk_state_dict

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY_DISC = dict(random_init=True, resolution=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, taps=(0, 1))


def tiny_decoder(**kwargs) -> ViTDecoder:
    args = dict(in_channels=16, grid_size=4, patch_size=2, hidden_size=32, depth=2, num_heads=4, mlp_dim=64)
    return ViTDecoder(**{**args, **kwargs})


# ----------------------------------------------------------------------------------------------------------------------
# decoder
# ----------------------------------------------------------------------------------------------------------------------


def test_sincos_table_matches_closed_form():
    dim, grid = 16, 5
    table = mae_sincos_table(dim, grid)
    expected = torch.zeros(1 + grid * grid, dim, dtype=torch.float64)
    quarter = dim // 4
    for n in range(grid * grid):
        row, col = divmod(n, grid)
        for i in range(quarter):
            omega = 10000.0 ** (-i / quarter)
            # MAE layout: first half the column (its meshgrid puts w first), second half the row; sin then cos.
            expected[1 + n, i] = math.sin(col * omega)
            expected[1 + n, quarter + i] = math.cos(col * omega)
            expected[1 + n, 2 * quarter + i] = math.sin(row * omega)
            expected[1 + n, 3 * quarter + i] = math.cos(row * omega)
    torch.testing.assert_close(table.double(), expected, rtol=0, atol=1e-7)
    decoder = tiny_decoder(hidden_size=dim, grid_size=grid, num_heads=2)
    torch.testing.assert_close(decoder.pos_embed[0].double(), expected, rtol=0, atol=1e-7)
    assert "pos_embed" not in decoder.state_dict()  # recomputed, never loaded
    assert torch.all(decoder.cls_token == 0)


def test_unpatchify_reads_each_token_as_row_col_channel():
    decoder = tiny_decoder(grid_size=3, patch_size=2)
    b, g, p = 2, 3, 2
    tokens = torch.randn(b, g * g, p * p * 3)
    expected = torch.empty(b, 3, g * p, g * p)
    for n in range(g * g):
        gy, gx = divmod(n, g)
        for py in range(p):
            for px in range(p):
                for c in range(3):
                    expected[:, c, gy * p + py, gx * p + px] = tokens[:, n, (py * p + px) * 3 + c]
    torch.testing.assert_close(decoder.unpatchify(tokens), expected, rtol=0, atol=0)


def test_decoder_matches_hugging_face_vitmae_decoder():
    """RAE's decoder is HF's ViTMAE decoder with a trainable CLS token: with the CLS input at zero, HF's CLS row after
    the embedding is the embedding's bias, so our decoder with cls_token = that bias must give the same pixels."""
    torch.manual_seed(0)
    config = ViTMAEConfig(
        hidden_size=16,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=4,
        decoder_intermediate_size=64,
        patch_size=2,
        image_size=8,
        num_channels=3,
        layer_norm_eps=1e-12,
        hidden_act="gelu",
    )
    config._attn_implementation = "eager"
    reference = ViTMAEDecoder(config, num_patches=16).eval()
    for param in reference.parameters():  # non-trivial LayerNorms and biases (the fixed table stays)
        if param.requires_grad:
            param.data.add_(0.1 * torch.randn_like(param))
    # transformers 5 renamed the layer's modules; RAE's vendored copy has the 4.x names its checkpoints carry.
    renames = {
        "attention.q_proj": "attention.attention.query",
        "attention.k_proj": "attention.attention.key",
        "attention.v_proj": "attention.attention.value",
        "attention.o_proj": "attention.output.dense",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    }
    state = {}
    for key, value in reference.state_dict().items():
        for new, old in renames.items():
            key = key.replace(f".{new}.", f".{old}.")
        state[key] = value
    state.pop("mask_token")
    state["trainable_cls_token"] = reference.decoder_embed.bias.detach().view(1, 1, -1).clone()
    decoder = tiny_decoder().eval()
    decoder.load_state_dict(from_reference_state_dict(state, decoder))  # also checks HF's table against ours

    tokens = torch.randn(3, 16, 16)  # [B, N, C], row-major over the 4x4 grid
    with torch.no_grad():
        hidden = torch.cat([torch.zeros(3, 1, 16), tokens], dim=1)
        logits = reference(hidden, ids_restore=torch.arange(16).expand(3, 16)).logits  # [B, N, p*p*3]
        ours = decoder(tokens.transpose(1, 2).reshape(3, 16, 4, 4))
    torch.testing.assert_close(ours, decoder.unpatchify(logits), rtol=1e-5, atol=1e-5)


def test_other_token_grids_are_resized_bilinearly():
    """Bilinear weights sum to one, so resizing the embedded tokens equals embedding the resized latents."""
    torch.manual_seed(0)
    decoder = tiny_decoder().eval()
    z = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        resized = F.interpolate(z, size=(4, 4), mode="bilinear", align_corners=False)
        torch.testing.assert_close(decoder(z), decoder(resized), rtol=1e-5, atol=1e-5)


def to_reference(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Our state dict in the reference layout, by inverting `reference_key_map`: the fused qkv split into thirds."""
    reference = {}
    for ref_key, key in reference_key_map(depth).items():
        value = state[key]
        for index, part in enumerate(("query", "key", "value")):
            if f".attention.attention.{part}." in ref_key:
                value = value.chunk(3)[index]
        reference[ref_key] = value.reshape(-1) if ref_key == "trainable_cls_token" else value
    return reference


def test_reference_key_map_round_trip():
    torch.manual_seed(0)
    decoder = tiny_decoder()
    state = {k: torch.randn_like(v) for k, v in decoder.state_dict().items()}
    assert set(reference_key_map(2).values()) == set(state)  # every one of our keys has a source
    reference = to_reference(state, depth=2)
    reference["decoder_pos_embed"] = mae_sincos_table(32, 4)[None]
    back = from_reference_state_dict(reference, decoder)
    assert set(back) == set(state)
    for key in state:
        torch.testing.assert_close(back[key], state[key], rtol=0, atol=0)
    # A table of another layout, or an unknown key, is refused.
    with pytest.raises(ValueError, match="sin-cos"):
        from_reference_state_dict({**reference, "decoder_pos_embed": reference["decoder_pos_embed"].flip(-1)}, decoder)
    with pytest.raises(KeyError, match="mask_token"):
        from_reference_state_dict({**reference, "mask_token": torch.zeros(1)}, decoder)


@pytest.mark.parametrize(("name", "millions"), [("vit_b", 86.2), ("vit_l", 303.9), ("vit_xl", 415.1)])
def test_decoder_configs_have_the_reference_sizes(name, millions):
    factory = instantiate(OmegaConf.load(CONF / "decoder" / f"{name}.yaml"))
    with torch.device("meta"):
        decoder = factory(in_channels=768, grid_size=16)
    assert abs(sum(p.numel() for p in decoder.parameters()) / 1e6 - millions) < 0.05
    assert decoder.patch_size * 16 == 256


# ----------------------------------------------------------------------------------------------------------------------
# DiffAug
# ----------------------------------------------------------------------------------------------------------------------


def test_translation_moves_a_planted_pixel_by_the_drawn_offset():
    b, size = 64, 16
    x = torch.zeros(b, 3, size, size)
    x[:, :, 8, 8] = 1.0
    out = diff_augment(x, generator=torch.Generator().manual_seed(3), color=False)
    rand = torch.rand(b, 7, generator=torch.Generator().manual_seed(3))  # the same draws, made again
    delta = round(size * 0.125)
    shift_h = (rand[:, 0] * (2 * delta + 1)).floor().long() - delta
    shift_w = (rand[:, 1] * (2 * delta + 1)).floor().long() - delta
    for i in range(b):
        where = out[i, 0].nonzero()
        assert where.tolist() == [[8 - shift_h[i].item(), 8 - shift_w[i].item()]]  # out(r, c) = x(r + dh, c + dw)
    assert set(shift_h.tolist()) == set(range(-delta, delta + 1))  # every offset occurs
    torch.testing.assert_close(out.sum(dim=(1, 2, 3)), torch.full((b,), 3.0))


def test_translation_fills_with_zeros_and_keeps_content():
    x = torch.rand(1, 3, 16, 16) + 1
    rand = torch.full((1, 7), 0.5)
    rand[0, 0], rand[0, 1] = 0.99, 0.0  # shift rows by +2, columns by -2
    out = diff_augment(x, rand, color=False)
    torch.testing.assert_close(out[0, :, :14, 2:], x[0, :, 2:, :14], rtol=0, atol=0)
    assert out[0, :, 14:].abs().sum() == 0 and out[0, :, :, :2].abs().sum() == 0


def test_colour_augmentation_matches_closed_form():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    rand = torch.rand(4, 7)
    out = diff_augment(x, rand, translation=0.0)
    for i in range(4):
        y = x[i].double() + (rand[i, 2].item() - 0.5)
        grey = y.mean(dim=0, keepdim=True)
        y = grey + (y - grey) * 2 * rand[i, 3].item()
        y = y.mean() + (y - y.mean()) * (rand[i, 4].item() + 0.5)
        torch.testing.assert_close(out[i].double(), y, rtol=1e-5, atol=1e-5)


def test_cutout_zeroes_a_square_and_is_off_by_default():
    x = torch.ones(1, 3, 20, 20)
    rand = torch.full((1, 7), 0.5)
    out = diff_augment(x, rand, translation=0.0, color=False, cutout=0.2)
    assert (out[0, 0] == 0).sum() == 16  # a 4x4 square
    assert (out[0, 0] == 0).nonzero().min(0).values.tolist() == [8, 8]
    torch.testing.assert_close(diff_augment(x, rand, translation=0.0, color=False), x)


def test_augmentation_is_reproducible_from_its_generator():
    x = torch.rand(8, 3, 16, 16)
    first = diff_augment(x, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(diff_augment(x, generator=torch.Generator().manual_seed(5)), first)
    assert not torch.allclose(diff_augment(x, generator=torch.Generator().manual_seed(6)), first)


# ----------------------------------------------------------------------------------------------------------------------
# discriminator
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def disc() -> DINODiscriminator:
    torch.manual_seed(0)
    return DINODiscriminator(**TINY_DISC)


def test_discriminator_taps_the_final_block_then_the_listed_ones(disc):
    images = torch.rand(2, 3, 24, 24) * 2 - 1
    features = disc.features(images)
    # The same forward written out with timm's pieces: resize, ImageNet normalisation, blocks.
    x = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = ((x + 1) / 2 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    tokens = disc.backbone._pos_embed(disc.backbone.patch_embed(x))
    outputs = []
    for block in disc.backbone.blocks:
        tokens = block(tokens)
        outputs.append(tokens[:, 1:].transpose(1, 2))
    for got, want in zip(features, [outputs[2], outputs[0], outputs[1]], strict=True):
        torch.testing.assert_close(got, want)
    assert disc(images).shape == (2, 3 * 16)


def test_discriminator_trains_heads_only_and_passes_gradients_to_images(disc):
    images = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    disc.zero_grad(set_to_none=True)
    disc(images).sum().backward()
    assert all(p.grad is None for p in disc.backbone.parameters())
    assert all(not p.requires_grad for p in disc.backbone.parameters())
    head_grads = [p.grad for p in disc.heads.parameters()]
    assert head_grads and all(g is not None and g.abs().sum() > 0 for g in head_grads)
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_discriminator_judges_each_sample_alone(disc):
    """Per-sample normalisation in the heads: a sample's logits do not depend on the rest of the batch."""
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(disc(images)[:1], disc(images[:1]), rtol=1e-5, atol=1e-5)


def test_spectral_norm_bounds_the_heads_convolutions():
    torch.manual_seed(0)
    disc = DINODiscriminator(**TINY_DISC)
    disc.heads.train()
    with torch.no_grad():
        for _ in range(200):  # one power iteration per forward in train mode
            disc(torch.rand(1, 3, 32, 32))
    disc.heads.eval()
    convs = [m for m in disc.heads.modules() if isinstance(m, torch.nn.Conv1d)]
    assert len(convs) == 3 * 3
    for conv in convs:
        assert torch.linalg.matrix_norm(conv.weight.flatten(1), ord=2).item() == pytest.approx(1.0, abs=1e-3)


def test_discriminator_loads_dino_weights_with_zeroed_key_bias(tmp_path):
    torch.manual_seed(1)
    source = DINODiscriminator(**TINY_DISC).backbone
    state = {k: torch.randn_like(v) for k, v in source.state_dict().items()}
    state["head.weight"] = torch.zeros(10, 32)  # a classifier, as timm checkpoints carry: ignored
    path = tmp_path / "dino.pth"
    torch.save(state, path)
    disc = DINODiscriminator(**{**TINY_DISC, "random_init": False, "dino_weights": str(path)})
    loaded = disc.backbone.state_dict()
    bias = loaded["blocks.1.attn.qkv.bias"]
    assert torch.all(bias[32:64] == 0)
    torch.testing.assert_close(bias[:32], state["blocks.1.attn.qkv.bias"][:32])
    torch.testing.assert_close(bias[64:], state["blocks.1.attn.qkv.bias"][64:])
    torch.testing.assert_close(loaded["blocks.2.mlp.fc1.weight"], state["blocks.2.mlp.fc1.weight"])
    with pytest.raises(FileNotFoundError, match="module.discriminator.dino_weights"):
        DINODiscriminator(**{**TINY_DISC, "random_init": False, "dino_weights": None})


# ----------------------------------------------------------------------------------------------------------------------
# LPIPS
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lpips() -> LPIPS:
    torch.manual_seed(0)
    return LPIPS(random_init=True)


def test_lpips_is_zero_for_identical_images_and_grows_with_noise(lpips):
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32)
    noise = torch.randn_like(x)
    assert lpips(x, x).item() == 0.0
    small, large = (lpips(x, (x + s * noise).clamp(0, 1)).item() for s in (0.05, 0.3))
    assert 0 < small < large


def test_lpips_matches_a_direct_computation(lpips):
    """Inputs in [0, 1] mapped to [-1, 1], LPIPS's shift/scale, VGG features unit-normalised over channels, squared
    differences weighted by the lin layers, averaged over space, summed over layers (float64)."""
    torch.manual_seed(1)
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    net = lpips.net
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    with torch.no_grad():
        fx, fy = (net.net((2 * im - 1 - shift) / scale) for im in (x, y))
        expected = torch.zeros(2, dtype=torch.float64)
        for index, (a, b) in enumerate(zip(fx, fy, strict=True)):
            a, b = a.double(), b.double()
            a = a / torch.sqrt(1e-8 + a.square().sum(1, keepdim=True))
            b = b / torch.sqrt(1e-8 + b.square().sum(1, keepdim=True))
            weight = net.lins[index].model[-1].weight.double()
            expected += F.conv2d((a - b).square(), weight).mean(dim=(1, 2, 3))
        torch.testing.assert_close(lpips(x, y, reduction="none").double(), expected, rtol=1e-4, atol=1e-6)


def test_lpips_loads_the_vgg_trunk_from_a_local_file_only(tmp_path, monkeypatch, lpips):
    def no_download(*args, **kwargs):
        raise AssertionError("LPIPS tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    # A torchvision-layout file (features.i.*) with recognisable values.
    trunk = {k: v for k, v in lpips.net.state_dict().items() if k.startswith("net.slice")}
    torchvision_state = {f"features.{k.split('.', 2)[2]}": torch.full_like(v, 0.5) for k, v in trunk.items()}
    torchvision_state["features.5.weight"] = torch.randn_like(torchvision_state["features.5.weight"])
    assert set(vgg_trunk_state_dict(torchvision_state)) == set(trunk)
    path = tmp_path / "vgg16.pth"
    torch.save(torchvision_state, path)
    loaded = LPIPS(vgg_weights=str(path))
    state = loaded.net.state_dict()
    torch.testing.assert_close(state["net.slice2.5.weight"], torchvision_state["features.5.weight"])
    torch.testing.assert_close(state["net.slice5.28.bias"], torch.full((512,), 0.5))
    assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(FileNotFoundError, match="module.lpips.vgg_weights"):
        LPIPS(vgg_weights=str(tmp_path / "missing.pth"))
