"""LightningDiT and diffusion registers against a float64 re-implementation written from the equations."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import same_init_with_registers

from dsr.models.dit import LightningDiT
from dsr.models.profile import register_overhead
from dsr.models.registers import register_grid

TINY = dict(input_size=4, patch_size=2, in_channels=3, hidden_size=32, depth=4, num_heads=2, num_classes=5)


def randomize_(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Non-zero weights everywhere (adaLN-Zero init would make every block the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3
            p.copy_(1 + noise if name.endswith(("norm1.weight", "norm2.weight", "norm_final.weight")) else noise)
    return model


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, rows: int, cols: int) -> torch.Tensor:
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, c.flatten()), sincos_1d(dim // 2, r.flatten())], dim=1)


def rope_complex(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, d]: pair j of the first half turns by rows * f_j, of the second half by cols * f_j."""
    d = x.shape[-1]
    a = d // 2
    freqs = 10000.0 ** (-2 * torch.arange(a // 2, dtype=torch.float64) / a)
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1)  # [N, d/2]
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * weight


def reference_forward(m: LightningDiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Float64 LightningDiT forward from the equations (explicit softmax attention, complex RoPE)."""
    B, C, H, W = x.shape
    p, D = m.patch_size, m.x_embedder.proj.out_channels
    h_grid, w_grid = H // p, W // p
    patches = x.reshape(B, C, h_grid, p, w_grid, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h_grid * w_grid, -1)
    h = patches @ m.x_embedder.proj.weight.reshape(D, -1).T + m.x_embedder.proj.bias
    h = h + sincos_2d(D, h_grid, w_grid)

    angles = 2 * math.pi * t[:, None] * m.t_embedder.W[None]
    temb = torch.cat([angles.sin(), angles.cos()], dim=1)
    temb = F.linear(
        F.silu(F.linear(temb, m.t_embedder.mlp[0].weight, m.t_embedder.mlp[0].bias)),
        m.t_embedder.mlp[2].weight,
        m.t_embedder.mlp[2].bias,
    )
    c = temb + m.y_embedder.embedding_table.weight[y]

    rows = torch.arange(h_grid, dtype=torch.float64).repeat_interleave(w_grid)
    cols = torch.arange(w_grid, dtype=torch.float64).repeat(h_grid)
    R = m.num_registers
    for i, blk in enumerate(m.blocks):
        if R and i == m.register_start:
            gr, gc = register_grid(R)
            bank = m.registers.tokens[0] + sincos_2d(D, gr, gc)[:R]
            h = torch.cat([bank.expand(B, R, D), h], dim=1)
        mod = F.linear(F.silu(c), blk.adaLN_modulation[1].weight, blk.adaLN_modulation[1].bias)
        if blk.wo_shift:
            s1, g1, s2, g2 = mod.chunk(4, dim=1)
            sh1 = sh2 = torch.zeros_like(s1)
        else:
            sh1, s1, g1, sh2, s2, g2 = mod.chunk(6, dim=1)
        a = rms(h, blk.norm1.weight) * (1 + s1[:, None]) + sh1[:, None]
        nh, hd = blk.attn.num_heads, blk.attn.head_dim
        q, k, v = F.linear(a, blk.attn.qkv.weight, blk.attn.qkv.bias).reshape(B, -1, 3, nh, hd).permute(2, 0, 3, 1, 4)
        if isinstance(blk.attn.q_norm, torch.nn.RMSNorm):
            q, k = rms(q, blk.attn.q_norm.weight), rms(k, blk.attn.k_norm.weight)
        n_prefix = h.shape[1] - h_grid * w_grid
        q = torch.cat([q[:, :, :n_prefix], rope_complex(q[:, :, n_prefix:], rows, cols)], dim=2)
        k = torch.cat([k[:, :, :n_prefix], rope_complex(k[:, :, n_prefix:], rows, cols)], dim=2)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        att = att.transpose(1, 2).reshape(B, -1, D)
        h = h + g1[:, None] * F.linear(att, blk.attn.proj.weight, blk.attn.proj.bias)
        a = rms(h, blk.norm2.weight) * (1 + s2[:, None]) + sh2[:, None]
        gate, value = F.linear(a, blk.mlp.fc1.weight, blk.mlp.fc1.bias).chunk(2, dim=-1)
        h = h + g2[:, None] * F.linear(F.silu(gate) * value, blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    h = h[:, R:]
    fl = m.final_layer
    shift, scale = F.linear(F.silu(c), fl.adaLN_modulation[1].weight, fl.adaLN_modulation[1].bias).chunk(2, dim=1)
    out = F.linear(
        rms(h, fl.norm_final.weight) * (1 + scale[:, None]) + shift[:, None], fl.linear.weight, fl.linear.bias
    )
    out = out.reshape(B, h_grid, w_grid, p, p, C).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(B, C, H, W)


def rope_angles(head_dim: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """[N, head_dim] angle per channel (both channels of a pair share it)."""
    ones = torch.ones(rows.shape[0], head_dim // 2, dtype=torch.complex128)
    pairs = torch.view_as_real(ones)[None, None].flatten(-2)  # (1, 0) pairs: rotation of 1 + 0i
    turned = torch.view_as_complex(rope_complex(pairs, rows, cols)[0, 0].reshape(-1, head_dim // 2, 2).contiguous())
    return turned.angle().repeat_interleave(2, dim=-1)


def exact_tables_(model: LightningDiT) -> LightningDiT:
    """Replace the float32-built fixed tables of a float64 model by float64 recomputations."""
    h_grid, w_grid = model.grid_size
    D = model.x_embedder.proj.out_channels
    model.pos_embed = sincos_2d(D, h_grid, w_grid)[None]
    rows = torch.arange(h_grid, dtype=torch.float64).repeat_interleave(w_grid)
    cols = torch.arange(w_grid, dtype=torch.float64).repeat(h_grid)
    angles = rope_angles(model.blocks[0].attn.head_dim, rows, cols)
    model.rope.cos, model.rope.sin = angles.cos(), angles.sin()
    R = model.num_registers
    pad = torch.zeros(R, angles.shape[1], dtype=torch.float64)
    model.rope.prefixed_cos, model.rope.prefixed_sin = (
        torch.cat([pad.cos(), angles.cos()]),
        torch.cat([pad.sin(), angles.sin()]),
    )
    if R:
        model.registers.pos_code = sincos_2d(D, *register_grid(R))[:R][None]
    return model


def test_fixed_tables_match_float64_recomputation():
    torch.manual_seed(0)
    model = LightningDiT(**TINY, num_registers=5, register_start=1)
    reference = exact_tables_(LightningDiT(**TINY, num_registers=5, register_start=1).double())
    for name in ["pos_embed", "rope.cos", "rope.sin", "rope.prefixed_cos", "rope.prefixed_sin"]:
        torch.testing.assert_close(model.get_buffer(name).double(), reference.get_buffer(name), rtol=0, atol=1e-6)
    torch.testing.assert_close(model.registers.pos_code.double(), reference.registers.pos_code, rtol=0, atol=1e-6)
    assert model.rope.sin.abs().max() > 0.5


def inputs(batch: int = 3, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TINY["in_channels"], TINY["input_size"], TINY["input_size"], generator=g, dtype=dtype)
    t = torch.rand(batch, generator=g, dtype=dtype)
    y = torch.randint(0, TINY["num_classes"] + 1, (batch,), generator=g)
    return x, t, y


@pytest.mark.parametrize(
    "options",
    [
        dict(num_registers=0),
        dict(num_registers=5, register_start=1),
        dict(num_registers=4, register_start=0, wo_shift=True),
        dict(num_registers=9, register_start=3, use_qknorm=True),
    ],
)
def test_forward_matches_float64_reference(options):
    torch.manual_seed(0)
    model = exact_tables_(randomize_(LightningDiT(**TINY, **options).double()))
    x, t, y = inputs()
    out = model(x, t, y)
    ref = reference_forward(model, x, t, y)
    assert out.shape == x.shape
    assert ref.abs().max() > 1e-2  # a non-trivial output
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_registers_change_the_output_but_not_its_shape():
    torch.manual_seed(0)
    plain = randomize_(LightningDiT(**TINY).double())
    torch.manual_seed(0)
    with_registers = LightningDiT(**TINY, num_registers=4, register_start=1).double()
    with_registers.load_state_dict(plain.state_dict(), strict=False)
    x, t, y = inputs()
    a, b = plain(x, t, y), with_registers(x, t, y)
    assert a.shape == b.shape == x.shape
    assert (a - b).abs().max() > 1e-3


def test_zero_registers_is_the_plain_model_bit_for_bit():
    """Same seed: identical initial weights whether or not registers are built; with none, the forward is
    exactly the plain composition of the same submodules."""
    plain, _ = same_init_with_registers(lambda **r: LightningDiT(**TINY, **r), num_registers=6, register_start=2)

    randomize_(plain)
    x, t, y = inputs(dtype=torch.float32)
    h = plain.x_embedder(x) + plain.pos_embed
    c = plain.t_embedder(t) + plain.y_embedder(y)
    for block in plain.blocks:
        h = block(h, c, rope=(plain.rope.cos, plain.rope.sin))
    expected = plain.unpatchify(plain.final_layer(h, c))
    assert torch.equal(plain(x, t, y), expected)


def test_registers_receive_gradient_and_init_distinct():
    torch.manual_seed(0)
    model = randomize_(LightningDiT(**TINY, num_registers=4, register_start=1))
    tokens = model.registers.tokens
    assert torch.cdist(tokens[0], tokens[0]).add(torch.eye(4) * 1e9).min() > 1e-3
    x, t, y = inputs(dtype=torch.float32)
    model(x, t, y).square().mean().backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    # every register gets its own gradient (no collapse to one shared token)
    assert torch.cdist(tokens.grad[0], tokens.grad[0]).add(torch.eye(4) * 1e9).min() > 0


def test_sequence_grows_from_register_start_and_patches_keep_their_rotary_angles():
    R, start = 5, 2
    torch.manual_seed(0)
    model = LightningDiT(**TINY, num_registers=R, register_start=start)
    seen = []
    for block in model.blocks:
        block.register_forward_pre_hook(
            lambda mod, args, kwargs: seen.append((args[0].shape[1], kwargs["rope"])), with_kwargs=True
        )
    final_lengths = []
    model.final_layer.register_forward_pre_hook(lambda mod, args: final_lengths.append(args[0].shape[1]))
    x, t, y = inputs(dtype=torch.float32)
    model(x, t, y)
    n = (TINY["input_size"] // TINY["patch_size"]) ** 2
    assert [length for length, _ in seen] == [n] * start + [n + R] * (TINY["depth"] - start)
    assert final_lengths == [n]
    plain_cos, plain_sin = seen[0][1]
    for _, (cos, sin) in seen[start:]:
        assert torch.equal(cos[R:], plain_cos) and torch.equal(sin[R:], plain_sin)
        assert torch.equal(cos[:R], torch.ones_like(cos[:R])) and torch.equal(sin[:R], torch.zeros_like(sin[:R]))
    assert plain_sin.abs().sum() > 0  # patches really rotate


def test_register_grid_and_code():
    assert register_grid(36) == (6, 6)
    assert register_grid(5) == (2, 3)
    assert register_grid(1) == (1, 1)
    torch.manual_seed(0)
    model = LightningDiT(**TINY, num_registers=36, register_start=0)
    torch.testing.assert_close(model.registers.pos_code[0].double(), sincos_2d(32, 6, 6), rtol=0, atol=1e-6)


def test_invalid_register_start_is_a_clear_error():
    with pytest.raises(ValueError, match="register_start"):
        LightningDiT(**TINY, num_registers=4, register_start=4)


# Parameter counts (RAE notes: LightningDiT on 768-channel 16x16 latents, incl. the frozen 256xD position
# table and 256 Fourier frequencies) and the paper's GFLOPs with and without 36 registers.
@pytest.mark.parametrize(
    "hidden, depth, heads, start, params_m, gflops, gflops_dsr",
    [
        (384, 12, 6, 4, 33.7, 12.4, 13.7),
        (768, 12, 12, 4, 131.9, 46.6, 51.2),
        (1152, 28, 16, 8, 677.3, 238.1, 262.9),
    ],
)
def test_paper_sizes(hidden, depth, heads, start, params_m, gflops, gflops_dsr):
    factory = functools.partial(
        LightningDiT, hidden_size=hidden, depth=depth, num_heads=heads, num_registers=36, register_start=start
    )
    stats = register_overhead(factory, (768, 16, 16))
    frozen = (256 * hidden + 256) / 1e6
    assert abs(stats["params_M_without_registers"] + frozen - params_m) < 0.1
    assert abs(stats["params_M_with_registers"] - stats["params_M_without_registers"] - 36 * hidden / 1e6) < 1e-9
    assert round(stats["gflops_without_registers"], 1) == gflops
    assert round(stats["gflops_with_registers"], 1) == gflops_dsr
