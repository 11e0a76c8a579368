"""Diffusion registers added to other people's models (dsr.registers.plug), on tiny random configs of real classes."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import timm
import torch
from diffusers import DiTTransformer2DModel, SD3Transformer2DModel
from timm.layers import RotaryEmbeddingCat
from torch import Tensor, nn

from dsr.models.ddt import DiTDH
from dsr.models.dit import LightningDiT, unpatchify
from dsr.models.rotary import rope_with_prefix
from dsr.registers.plug import (
    BANK_NAME,
    add_diffusion_registers,
    add_test_time_registers,
    diffusion_register_counts,
    find_blocks,
    remove_diffusion_registers,
    remove_test_time_registers,
    widen_mask,
)

R, START = 5, 1
GRID = 16  # tokens of every model below: 8 x 8 latents at patch 2


class ViTDenoiser(nn.Module):
    """A timm VisionTransformer's patch embedding, position table and blocks used as a denoiser: time and label
    embeddings added to every token, a linear map back to patches."""

    def __init__(self, channels: int = 4, width: int = 32, depth: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.vit = timm.models.vision_transformer.VisionTransformer(
            img_size=8, patch_size=2, in_chans=channels, embed_dim=width, depth=depth, num_heads=2,
            class_token=False, global_pool="", num_classes=0,
        )  # fmt: skip
        self.time = nn.Linear(1, width)
        self.label = nn.Embedding(classes + 1, width)
        self.out = nn.Linear(width, 2 * 2 * channels)
        self.channels = channels

    def forward(self, x: Tensor, t: Tensor, y: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        tokens = self.vit._pos_embed(self.vit.patch_embed(x)) + (self.time(t[:, None]) + self.label(y))[:, None]
        for block in self.vit.blocks:
            tokens = block(tokens, attn_mask=attn_mask)
        return unpatchify(self.out(self.vit.norm(tokens)), 2, (4, 4), self.channels)


@dataclass
class Case:
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[tuple, dict]]
    run: Callable[[nn.Module, tuple, dict], Tensor]
    blocks: str


def _latents(batch: int = 3) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.rand(batch, generator=g), torch.tensor([0, 3, 7])[:batch]


def _randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every weight drawn afresh, so zero-initialised gates (adaLN-Zero) do not hide what the registers do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _diffusers_dit() -> nn.Module:
    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=3, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4,
    )  # fmt: skip
    return _randomised(model)


def _sd3() -> nn.Module:
    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=12, out_channels=4,
        pos_embed_max_size=8,
    )  # fmt: skip
    return _randomised(model)


def _lightning_dit(num_registers: int = 0) -> nn.Module:
    torch.manual_seed(0)
    model = LightningDiT(
        input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=10,
        use_qknorm=True, num_registers=num_registers, register_start=START,
    )  # fmt: skip
    return _randomised(model)


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return _randomised(ViTDenoiser())


def _dit_inputs() -> tuple[tuple, dict]:
    x, t, y = _latents()
    return (x,), {"timestep": t * 1000, "class_labels": y}


def _sd3_inputs() -> tuple[tuple, dict]:
    x, t, _ = _latents()
    g = torch.Generator().manual_seed(2)
    context, pooled = torch.randn(3, 7, 24, generator=g), torch.randn(3, 12, generator=g)
    return (x,), {"encoder_hidden_states": context, "pooled_projections": pooled, "timestep": t * 1000}


def _xty() -> tuple[tuple, dict]:
    return _latents(), {}


def _sample(model: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    return model(*args, **kwargs, return_dict=False)[0]


def _call(model: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    return model(*args, **kwargs)


CASES = {
    "diffusers_dit": Case(_diffusers_dit, _dit_inputs, _sample, "transformer_blocks"),
    "diffusers_sd3": Case(_sd3, _sd3_inputs, _sample, "transformer_blocks"),
    "timm_vit": Case(_vit, _xty, _call, "vit.blocks"),
    "lightning_dit": Case(_lightning_dit, _xty, _call, "blocks"),
}


def _token_counts(model: nn.Module, blocks: nn.Module, case: Case) -> tuple[list[int], list[int]]:
    """Sequence length each block receives and returns, read by hooks added after the registers'."""
    seen_in, seen_out = [], []

    def sequence(value):
        return value[1] if isinstance(value, tuple) else value  # SD3 blocks return (context, image)

    def record_input(module, args, kwargs):
        seen_in.append((kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).shape[1])

    handles = [b.register_forward_pre_hook(record_input, with_kwargs=True) for b in blocks]
    handles += [b.register_forward_hook(lambda m, a, o: seen_out.append(sequence(o).shape[1])) for b in blocks]
    args, kwargs = case.inputs()
    with torch.no_grad():
        case.run(model, args, kwargs)
    for h in handles:
        h.remove()
    return seen_in, seen_out


@pytest.mark.parametrize("name", list(CASES))
def test_registers_join_at_start_leave_after_the_last_block_and_come_off_exactly(name):
    case = CASES[name]
    model = case.build()
    args, kwargs = case.inputs()
    with torch.no_grad():
        original = case.run(model, args, kwargs)
    keys = list(model.state_dict())
    assert add_diffusion_registers(model, 0, START) is model and list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(case.run(model, args, kwargs), original)
    assert diffusion_register_counts(model) == [0] * len(find_blocks(model)[1])

    add_diffusion_registers(model, R, START)
    block_name, blocks = find_blocks(model)
    assert block_name == case.blocks
    seen_in, seen_out = _token_counts(model, blocks, case)
    depth = len(blocks)
    assert seen_in == [GRID + (R if i >= START else 0) for i in range(depth)]
    assert seen_out == [GRID + (R if START <= i < depth - 1 else 0) for i in range(depth)]
    assert diffusion_register_counts(model) == [s - GRID for s in seen_out]
    with torch.no_grad():
        with_registers = case.run(model, args, kwargs)
    assert with_registers.shape == original.shape
    assert (with_registers - original).abs().max() > 1e-4  # the registers take part in attention

    # The bank is one submodule under one prefix: parameters, state dict, nothing else.
    assert [k for k in model.state_dict() if k not in keys] == [f"{BANK_NAME}.tokens"]
    assert sum(p is model.diffusion_registers.tokens for p in model.parameters()) == 1

    remove_diffusion_registers(model)
    assert list(model.state_dict()) == keys and not hasattr(model, BANK_NAME)
    with torch.no_grad():
        assert torch.equal(case.run(model, args, kwargs), original)


@pytest.mark.parametrize("name", list(CASES))
def test_registers_train_round_trip_through_the_state_dict_and_compile(name):
    case = CASES[name]
    model = add_diffusion_registers(case.build(), R, START)
    args, kwargs = case.inputs()
    case.run(model, args, kwargs).square().mean().backward()
    grad = model.diffusion_registers.tokens.grad
    assert grad is not None and grad.abs().max() > 0

    with torch.no_grad():
        model.diffusion_registers.tokens.add_(1.0)  # a state no fresh bank has
        expected = case.run(model, args, kwargs)
    state = copy.deepcopy(model.state_dict())
    fresh = add_diffusion_registers(case.build(), R, START)
    fresh.load_state_dict(state)  # strict
    with torch.no_grad():
        assert torch.equal(case.run(fresh, args, kwargs), expected)

    torch._dynamo.reset()
    compiled = torch.compile(fresh, backend="aot_eager", fullgraph=False)
    with torch.no_grad():
        torch.testing.assert_close(case.run(compiled, args, kwargs), expected, rtol=1e-5, atol=1e-5)


def test_on_lightning_dit_the_added_registers_equal_the_built_in_ones_bit_for_bit():
    built_in = _lightning_dit(num_registers=R)
    plain = _lightning_dit()
    missing, unexpected = plain.load_state_dict(built_in.state_dict(), strict=False)
    assert missing == [] and unexpected == ["registers.tokens"]
    add_diffusion_registers(plain, R, START)
    plain.diffusion_registers.tokens.data.copy_(built_in.registers.tokens)
    x, t, y = _latents()
    with torch.no_grad():
        assert torch.equal(plain(x, t, y), built_in(x, t, y))


def test_on_dit_dh_registers_through_the_trunk_equal_built_in_trunk_registers():
    def build(num_registers: int) -> nn.Module:
        torch.manual_seed(0)
        return _randomised(DiTDH(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2,
                                 head_hidden_size=48, head_depth=2, head_num_heads=2, num_classes=10,
                                 num_registers=num_registers, register_start=START, head_num_registers=0))  # fmt: skip

    built_in, plain = build(R), build(0)
    with pytest.raises(ValueError, match="several block lists.*'blocks' \\(3 x DiTBlock\\), 'head_blocks'"):
        add_diffusion_registers(plain, R, START)
    plain.load_state_dict(built_in.state_dict(), strict=False)
    add_diffusion_registers(plain, R, START, blocks="blocks")
    plain.diffusion_registers.tokens.data.copy_(built_in.registers.tokens)
    x, t, y = _latents()
    with torch.no_grad():
        assert torch.equal(plain(x, t, y), built_in(x, t, y))


def test_the_rotary_extension_gives_registers_identity_rows_and_leaves_the_patch_angles():
    model = add_diffusion_registers(_lightning_dit(), R, START)
    cos, sin = model.rope_tables(with_registers=False)
    seen = {}
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, a, k, i=i: seen.__setitem__(i, k["rope"]), with_kwargs=True)
    with torch.no_grad():
        model(*_latents())
    assert seen[0][0] is cos  # before `start`: untouched
    for i in range(START, len(model.blocks)):
        widened_cos, widened_sin = seen[i]
        assert torch.equal(widened_cos[R:], cos) and torch.equal(widened_sin[R:], sin)
        assert torch.equal(widened_cos[:R], torch.ones(R, cos.shape[1]))
        assert torch.equal(widened_sin[:R], torch.zeros(R, sin.shape[1]))
    assert all(torch.equal(a, b) for a, b in zip(seen[START], rope_with_prefix(cos, sin, R), strict=True))


def test_masks_are_widened_so_registers_see_and_are_seen_by_every_token():
    bool_keys = torch.tensor([[True, False, True], [True, True, False]])
    widened = widen_mask(bool_keys, 3, 2, batch_size=2)
    assert torch.equal(widened, torch.cat([torch.ones(2, 2, dtype=torch.bool), bool_keys], dim=1))
    additive = torch.tensor([[0.0, -torch.inf], [0.0, 0.0]])  # square [N, N]; batch 3 differs from N = 2
    widened = widen_mask(additive, 2, 1, batch_size=3)
    assert torch.equal(widened, torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -torch.inf], [0.0, 0.0, 0.0]]))
    padded = torch.tensor([[0.0, -torch.inf], [0.0, -torch.inf]])  # key 1 hidden from every query: registers too
    assert torch.equal(widen_mask(padded, 2, 1, batch_size=3)[0], torch.tensor([0.0, 0.0, -torch.inf]))
    assert widen_mask(additive, 5, 1, batch_size=3) is additive  # over another sequence: left alone

    # Through a timm ViT: masking patch key k with registers equals the blocks run by hand on [registers; patches].
    model = add_diffusion_registers(_vit(), R, START)
    x, t, y = _latents()
    keys = torch.ones(3, 1, GRID, GRID, dtype=torch.bool)
    keys[:, :, :, 6] = False
    with torch.no_grad():
        assert torch.equal(model(x, t, y, attn_mask=torch.ones_like(keys)), model(x, t, y))
        masked = model(x, t, y, attn_mask=keys)
        remove_diffusion_registers(bank_free := copy.deepcopy(model))
        vit = bank_free.vit
        tokens = vit._pos_embed(vit.patch_embed(x)) + (bank_free.time(t[:, None]) + bank_free.label(y))[:, None]
        hand_mask = torch.ones(3, 1, R + GRID, R + GRID, dtype=torch.bool)
        hand_mask[:, :, :, R + 6] = False
        for i, block in enumerate(vit.blocks):
            if i == START:
                tokens = model.diffusion_registers(tokens)
            tokens = block(tokens, attn_mask=hand_mask if i >= START else keys)
        expected = unpatchify(bank_free.out(vit.norm(tokens[:, R:])), 2, (4, 4), 4)
    assert torch.equal(masked, expected)


def test_a_deep_copy_uses_its_own_bank():
    model = add_diffusion_registers(_lightning_dit(), R, START)
    twin = copy.deepcopy(model)  # what an EMA copy is
    x, t, y = _latents()
    with torch.no_grad():
        before = model(x, t, y)
        twin.diffusion_registers.tokens.mul_(-1)
        assert torch.equal(model(x, t, y), before)
        assert not torch.equal(twin(x, t, y), before)
    remove_diffusion_registers(twin)
    assert hasattr(model, BANK_NAME)


class _NoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class _AnglesBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: Tensor, image_rotary_emb: Tensor) -> Tensor:
        return x + self.attention(self.norm(x), self.norm(x), self.norm(x))[0] * image_rotary_emb.mean()


class _AnglesModel(nn.Module):
    def __init__(self, rotary: bool) -> None:
        super().__init__()
        self.rotary = RotaryEmbeddingCat(dim=8, feat_shape=[2, 2]) if rotary else None
        self.blocks = nn.ModuleList(_AnglesBlock() for _ in range(2))

    def forward(self, x: Tensor) -> Tensor:
        angles = torch.ones(x.shape[1], 4)
        for block in self.blocks:
            x = block(x, image_rotary_emb=angles)
        return x


def test_what_the_api_cannot_place_fails_with_what_to_pass():
    with pytest.raises(ValueError, match="no list of transformer blocks in _NoBlocks.*pass blocks="):
        add_diffusion_registers(_NoBlocks(), R)
    with pytest.raises(ValueError, match="RotaryEmbeddingCat at `rotary`.*extend_arguments="):
        add_diffusion_registers(_AnglesModel(rotary=True), R)
    model = add_diffusion_registers(_AnglesModel(rotary=False), 2)
    with pytest.raises(RuntimeError, match="receives `image_rotary_emb`.*extend_arguments=\\{'image_rotary_emb'"):
        model(torch.randn(1, 4, 8))
    remove_diffusion_registers(model)
    widened = []

    def prefix_identity(value: Tensor, num_registers: int) -> Tensor:
        widened.append(value.shape[0])
        return torch.cat([torch.ones(num_registers, value.shape[1]), value])

    extend = {"image_rotary_emb": prefix_identity}
    model = add_diffusion_registers(_AnglesModel(rotary=True), 2, extend_arguments=extend)
    assert model(torch.randn(1, 4, 8)).shape == (1, 4, 8) and widened == [4, 4]
    with pytest.raises(ValueError, match="start=3 must lie in \\[0, 2\\)"):
        add_diffusion_registers(_AnglesModel(rotary=False), 2, start=3)
    with pytest.raises(ValueError, match="already has `diffusion_registers`"):
        add_diffusion_registers(model, 2)


def test_test_time_registers_take_the_same_one_call_shape():
    from helpers import A, planted_images, planted_vit  # noqa: PLC0415

    from dsr.registers.ttr import TestTimeRegisters  # noqa: PLC0415

    model, images = planted_vit("timm"), planted_images(4)[0]
    with torch.no_grad():
        plain = model.forward_features(images)
        with TestTimeRegisters(model, {A[0]: [A[1]]}, 2):
            expected = model.forward_features(images)
        add_test_time_registers(model, {A[0]: [A[1]]}, 2)
        edited = model.forward_features(images)
        assert torch.equal(edited, expected) and not torch.equal(edited, plain)
        with pytest.raises(ValueError, match="already has test-time registers"):
            add_test_time_registers(model, {A[0]: [A[1]]})
        remove_test_time_registers(model)
        assert torch.equal(model.forward_features(images), plain)


def test_the_tutorial_notebook_runs_top_to_bottom_on_a_tiny_config(tmp_path, monkeypatch):
    import json  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    notebook = json.loads((Path(__file__).parents[1] / "notebooks" / "registers_in_your_dit.ipynb").read_text())
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in cells), "clear the notebook's outputs"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    tiny = dict(STEPS=4, BATCH_SIZE=8, WIDTH=16, DEPTH=3, HEADS=2, NUM_REGISTERS=3, REGISTER_START=1,
                SAMPLING_STEPS=2, NUM_HELDOUT=16)  # fmt: skip
    try:
        for i, cell in enumerate(cells):
            exec(compile("".join(cell["source"]), f"registers_in_your_dit.ipynb[{i}]", "exec"), namespace)
            if i == 0:  # the settings cell
                assert set(tiny) <= set(namespace)
                namespace.update(tiny)
    finally:
        plt.close("all")
    assert [len(losses) for losses in namespace["curves"].values()] == [4, 4]
    assert namespace["models"]["registers"].diffusion_registers.tokens.shape == (1, 3, 16)
    stats = namespace["statistics"]
    assert [r["num_excluded_tokens"] for r in stats["registers"].records()] == [0, 3, 0]
    assert [r["num_excluded_tokens"] for r in stats["no registers"].records()] == [0, 0, 0]
    assert stats["registers"].num_images == 16
    assert not hasattr(namespace["ema"], "diffusion_registers")
