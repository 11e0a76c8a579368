"""DiT-DH (trunk + wide shallow DDT head) against a float64 re-implementation written from the equations."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import CONF_DIR, DDT_TINY, TINY_RUN

from dsr.models.ddt import DiTDH
from dsr.models.profile import count_parameters
from dsr.models.registers import register_grid


def randomize_(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Non-zero weights everywhere (the adaLN-Zero init would make every block the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3
            p.copy_(1 + noise if "norm" in name else noise)
    return model


# ------------------------------------------------------------------------------------------------------------
# float64 reference, from the equations (explicit softmax attention, complex-number RoPE)
# ------------------------------------------------------------------------------------------------------------


def sincos(dim: int, rows: int, cols: int) -> torch.Tensor:
    """MAE/DiT table [rows * cols, dim]: first half encodes the column, second half the row."""

    def one_axis(d: int, pos: torch.Tensor) -> torch.Tensor:
        omega = 10000.0 ** (-torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        angles = pos.double()[:, None] * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.cat([one_axis(dim // 2, c.flatten()), one_axis(dim // 2, r.flatten())], dim=1)


def rotate(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, d]: channel pair j of the first half turns by rows * f_j, of the second half by cols * f_j."""
    d = x.shape[-1]
    freqs = 10000.0 ** (-2 * torch.arange(d // 4, dtype=torch.float64) / (d // 2))
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1)
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * weight


def block(blk, h: torch.Tensor, cond: torch.Tensor, n_prefix: int, rows, cols) -> torch.Tensor:
    """One pre-norm block; `cond` is [B, 1, D] (trunk) or [B, N, D] (head); the first n_prefix tokens are unrotated."""
    B, _, D = h.shape
    mod = F.linear(F.silu(cond), blk.adaLN_modulation[1].weight, blk.adaLN_modulation[1].bias)
    if blk.wo_shift:
        s1, g1, s2, g2 = mod.chunk(4, dim=-1)
        sh1 = sh2 = 0
    else:
        sh1, s1, g1, sh2, s2, g2 = mod.chunk(6, dim=-1)
    a = rms(h, blk.norm1.weight) * (1 + s1) + sh1
    nh, hd = blk.attn.num_heads, blk.attn.head_dim
    q, k, v = F.linear(a, blk.attn.qkv.weight, blk.attn.qkv.bias).reshape(B, -1, 3, nh, hd).permute(2, 0, 3, 1, 4)
    q = torch.cat([q[:, :, :n_prefix], rotate(q[:, :, n_prefix:], rows, cols)], dim=2)
    k = torch.cat([k[:, :, :n_prefix], rotate(k[:, :, n_prefix:], rows, cols)], dim=2)
    att = (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v).transpose(1, 2).reshape(B, -1, D)
    h = h + g1 * F.linear(att, blk.attn.proj.weight, blk.attn.proj.bias)
    a = rms(h, blk.norm2.weight) * (1 + s2) + sh2
    gate, value = F.linear(a, blk.mlp.fc1.weight, blk.mlp.fc1.bias).chunk(2, dim=-1)
    return h + g2 * F.linear(F.silu(gate) * value, blk.mlp.fc2.weight, blk.mlp.fc2.bias)


def reference_forward(m: DiTDH, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Float64 DiT-DH forward (SwiGLU, RMSNorm, RoPE, pos-embed on) as the DSR release computes it."""
    B, C, H, W = x.shape
    p = m.patch_size
    gh, gw = H // p, W // p
    patches = x.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, -1)

    def embed(pe):
        return patches @ pe.proj.weight.reshape(pe.proj.out_channels, -1).T + pe.proj.bias

    angles = 2 * math.pi * t[:, None] * m.t_embedder.W[None]
    mlp = m.t_embedder.mlp
    t_emb = F.linear(
        F.silu(F.linear(torch.cat([angles.sin(), angles.cos()], 1), mlp[0].weight, mlp[0].bias)),
        mlp[2].weight,
        mlp[2].bias,
    )
    c = F.silu(t_emb + m.y_embedder.embedding_table.weight[y])[:, None]  # [B, 1, D_s]

    rows = torch.arange(gh, dtype=torch.float64).repeat_interleave(gw)
    cols = torch.arange(gw, dtype=torch.float64).repeat(gh)
    D_s = m.s_embedder.proj.out_channels
    s = embed(m.s_embedder) + sincos(D_s, gh, gw)
    R, R_head = m.num_registers, m.head_num_registers
    for i, blk in enumerate(m.blocks):
        if R and i == m.register_start:
            bank = m.registers.tokens[0] + sincos(D_s, *register_grid(R))[:R]
            s = torch.cat([bank.expand(B, R, D_s), s], dim=1)
        s = block(blk, s, c, s.shape[1] - gh * gw, rows, cols)
    s = s[:, s.shape[1] - gh * gw - R_head :]  # trunk registers survive the hand-off only if the head has a bank
    s = F.silu(s + t_emb[:, None])
    if not isinstance(m.s_projector, torch.nn.Identity):
        s = F.linear(s, m.s_projector.weight, m.s_projector.bias)

    D_x = m.x_embedder.proj.out_channels
    h = embed(m.x_embedder)
    if R_head:
        bank = m.head_registers.tokens[0] + sincos(D_x, *register_grid(R_head))[:R_head]
        h = torch.cat([bank.expand(B, R_head, D_x), h], dim=1)
    for blk in m.head_blocks:
        h = block(blk, h, s, R_head, rows, cols)  # per-token condition: token i is modulated by s_i
    h, s = h[:, R_head:], s[:, R_head:]
    fl = m.final_layer
    shift, scale = F.linear(F.silu(s), fl.adaLN_modulation[1].weight, fl.adaLN_modulation[1].bias).chunk(2, dim=-1)
    out = F.linear(rms(h, fl.norm_final.weight) * (1 + scale) + shift, fl.linear.weight, fl.linear.bias)
    return out.reshape(B, gh, gw, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)


def exact_tables_(m: DiTDH) -> DiTDH:
    """Recompute the float32-built fixed tables of a float64 model in float64 (so 1e-10 tolerances hold)."""
    gh, gw = m.grid_size
    m.pos_embed = sincos(m.s_embedder.proj.out_channels, gh, gw)[None]
    rows = torch.arange(gh, dtype=torch.float64).repeat_interleave(gw)
    cols = torch.arange(gw, dtype=torch.float64).repeat(gh)

    def tables(head_dim: int, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
        unit = torch.zeros(1, 1, gh * gw, head_dim, dtype=torch.float64)
        unit[..., 0::2] = 1  # (1, 0) pairs: rotating them gives (cos, sin) per pair
        turned = rotate(unit, rows, cols)[0, 0]
        cos, sin = turned[:, 0::2].repeat_interleave(2, -1), turned[:, 1::2].repeat_interleave(2, -1)
        pad = torch.zeros(prefix, head_dim, dtype=torch.float64)
        return torch.cat([pad + 1, cos]), torch.cat([pad, sin])

    m.rope.cos, m.rope.sin = tables(m.blocks[0].attn.head_dim, 0)
    m.rope.prefixed_cos, m.rope.prefixed_sin = tables(m.blocks[0].attn.head_dim, m.num_registers)
    m.head_rope.prefixed_cos, m.head_rope.prefixed_sin = tables(m.head_blocks[0].attn.head_dim, m.head_num_registers)
    for bank in (m.registers, m.head_registers):
        if bank is not None:
            bank.pos_code = sincos(bank.tokens.shape[-1], *register_grid(bank.num_registers))[: bank.num_registers][
                None
            ]
    return m


def inputs(shape=(3, 4, 4), batch: int = 3, seed: int = 0, dtype=torch.float64, num_classes: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=g, dtype=dtype)
    t = torch.rand(batch, generator=g, dtype=dtype)
    y = torch.randint(0, num_classes + 1, (batch,), generator=g)
    return x, t, y


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(num_registers=4, register_start=1),  # the release: both banks, head registers follow the trunk's count
        dict(num_registers=5, register_start=0, head_num_registers=0),  # trunk registers dropped at the hand-off
        dict(num_registers=4, register_start=2, wo_shift=True),
        dict(head_hidden_size=32, head_num_heads=4, num_registers=9, register_start=1),  # Identity s_projector
        dict(input_size=(6, 4), num_registers=3, register_start=1),  # non-square grid
    ],
)
def test_forward_matches_float64_reference(options):
    torch.manual_seed(0)
    model = exact_tables_(randomize_(DiTDH(**{**DDT_TINY, **options}).double()))
    size = options.get("input_size", 4)
    x, t, y = inputs(shape=(3, *((size, size) if isinstance(size, int) else size)))
    out = model(x, t, y)
    ref = reference_forward(model, x, t, y)
    assert out.shape == x.shape
    assert ref.abs().max() > 1e-2
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_init_is_identity_blocks_and_zero_output():
    torch.manual_seed(0)
    model = DiTDH(**DDT_TINY, num_registers=4, register_start=1)
    seen = []
    for blk in [*model.blocks, *model.head_blocks]:
        blk.register_forward_hook(lambda mod, args, out: seen.append(torch.equal(args[0], out)))
    x, t, y = inputs(dtype=torch.float32)
    out = model(x, t, y)
    assert seen == [True] * (DDT_TINY["depth"] + DDT_TINY["head_depth"])
    assert torch.equal(out, torch.zeros_like(x))
    # Inner layers keep PyTorch's default init (the reference's DDT does no global xavier pass): not zero.
    assert model.head_blocks[0].attn.qkv.weight.abs().sum() > 0 and model.s_projector.weight.abs().sum() > 0


def test_registers_change_the_output_but_not_its_shape():
    torch.manual_seed(0)
    plain = randomize_(DiTDH(**DDT_TINY).double())
    torch.manual_seed(0)
    with_registers = DiTDH(**DDT_TINY, num_registers=4, register_start=1).double()
    missing = with_registers.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["head_registers.tokens", "registers.tokens"]
    x, t, y = inputs()
    a, b = plain(x, t, y), with_registers(x, t, y)
    assert a.shape == b.shape == x.shape
    assert (a - b).abs().max() > 1e-3


def test_register_tokens_see_identity_rope_and_leave_before_the_final_layer():
    R, start = 4, 1
    torch.manual_seed(0)
    model = DiTDH(**DDT_TINY, num_registers=R, register_start=start)
    n = (DDT_TINY["input_size"] // DDT_TINY["patch_size"]) ** 2
    trunk, head, final = [], [], []
    for blk in model.blocks:
        blk.register_forward_pre_hook(lambda m, a, k: trunk.append((a[0].shape[1], k["rope"])), with_kwargs=True)
    for blk in model.head_blocks:
        blk.register_forward_pre_hook(
            lambda m, a, k: head.append((a[0].shape, a[1].shape, k["rope"])), with_kwargs=True
        )
    model.final_layer.register_forward_pre_hook(lambda m, a: final.append((a[0].shape[1], a[1].shape[1])))
    model(*inputs(dtype=torch.float32))

    assert [length for length, _ in trunk] == [n] * start + [n + R] * (DDT_TINY["depth"] - start)
    plain_cos, plain_sin = trunk[0][1]
    assert plain_sin.abs().sum() > 0  # patches really rotate
    for _, (cos, sin) in trunk[start:]:
        assert torch.equal(cos[:R], torch.ones_like(cos[:R])) and torch.equal(sin[:R], torch.zeros_like(sin[:R]))
        assert torch.equal(cos[R:], plain_cos) and torch.equal(sin[R:], plain_sin)
    for x_shape, c_shape, (cos, sin) in head:
        assert x_shape[1] == c_shape[1] == n + R  # per-token condition, registers included
        assert x_shape[2] == c_shape[2] == DDT_TINY["head_hidden_size"]
        assert torch.equal(cos[:R], torch.ones_like(cos[:R])) and torch.equal(sin[:R], torch.zeros_like(sin[:R]))
        assert sin[R:].abs().sum() > 0 and cos.shape[1] == DDT_TINY["head_hidden_size"] // DDT_TINY["head_num_heads"]
    assert final == [(n, n)]


def test_gradient_reaches_both_register_banks():
    torch.manual_seed(0)
    model = randomize_(DiTDH(**DDT_TINY, num_registers=4, register_start=1))
    model(*inputs(dtype=torch.float32)).square().mean().backward()
    for bank in (model.registers, model.head_registers):
        grad = bank.tokens.grad
        assert grad is not None and grad[0].abs().sum(-1).gt(0).all()  # every register of both banks


def test_head_register_j_is_conditioned_by_trunk_register_j():
    """The head's per-token condition is SiLU(s + t_emb) projected, over the trunk's *full* output: rows [:R] come
    from the trunk's registers (the DSR release keeps them through the hand-off) and rows [R:] from its patches."""
    R = 3
    torch.manual_seed(0)
    model = randomize_(DiTDH(**DDT_TINY, num_registers=R, register_start=1).double())
    x, t, y = inputs()
    trunk_out, head_cond = [], []
    model.blocks[-1].register_forward_hook(lambda m, a, out: trunk_out.append(out))
    model.head_blocks[0].register_forward_pre_hook(lambda m, a: head_cond.append(a[1]))
    model(x, t, y)
    expected = model.s_projector(F.silu(trunk_out[0] + model.t_embedder(t)[:, None]))
    torch.testing.assert_close(head_cond[0], expected, rtol=0, atol=0)
    assert head_cond[0].shape[1] == R + 4 and (head_cond[0][:, :R] - head_cond[0][:, R : 2 * R]).abs().max() > 1e-3


def test_invalid_register_settings_name_the_setting():
    with pytest.raises(ValueError, match="head_num_registers"):
        DiTDH(**DDT_TINY, num_registers=4, register_start=1, head_num_registers=3)
    with pytest.raises(ValueError, match="head_num_registers"):
        DiTDH(**DDT_TINY, head_num_registers=2)
    with pytest.raises(ValueError, match="register_start"):
        DiTDH(**DDT_TINY, num_registers=4, register_start=DDT_TINY["depth"])


def expected_parameters(C: int, D_s: int, depth: int, D_x: int, head_depth: int, num_classes: int, R: int) -> int:
    """Closed-form parameter count of DiT-DH with p = 1 (buffers such as the sin-cos table not included)."""

    def linear(i: int, o: int) -> int:
        return i * o + o

    def blk(d: int) -> int:
        h = int(8 * d / 3)
        return 2 * d + linear(d, 3 * d) + linear(d, d) + linear(d, 2 * h) + linear(h, d) + linear(d, 6 * d)

    trunk = linear(C, D_s) + linear(512, D_s) + linear(D_s, D_s) + (num_classes + 1) * D_s + depth * blk(D_s)
    head = linear(D_s, D_x) + linear(C, D_x) + head_depth * blk(D_x)
    final = D_x + linear(D_x, 2 * D_x) + linear(D_x, C)
    return trunk + head + final + R * (D_s + D_x)


# RAE notes' arithmetic (incl. the frozen 256 x D_s position table and 256 Fourier frequencies) on 16x16x768 latents.
@pytest.mark.parametrize(
    "name, D_s, depth, heads, total_m",
    [
        ("dit_dh_s", 384, 12, 6, 196.4),
        ("dit_dh_b", 768, 12, 12, 294.3),
        ("dit_dh_xl", 1152, 28, 16, 838.7),
    ],
)
def test_parameter_counts(name, D_s, depth, heads, total_m):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF_DIR / "backbone" / f"{name}.yaml")
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.head_hidden_size, cfg.head_depth) == (
        D_s,
        depth,
        heads,
        2048,
        2,
    )
    for R in (0, 36):
        factory = functools.partial(
            DiTDH, hidden_size=D_s, depth=depth, num_heads=heads, num_registers=R, register_start=cfg.register_start
        )
        with torch.device("meta"):
            model = factory(in_channels=768, input_size=16)
        count = count_parameters(model)
        assert count == expected_parameters(768, D_s, depth, 2048, 2, 1000, R)
        if R == 0:
            assert abs((count + 256 * D_s + 256) / 1e6 - total_m) < 0.06


def test_trains_through_the_stage(run_train):
    """The real training entry point with a tiny DiT-DH: label dropout, EMA, sampling and checkpoint all work."""
    from dsr.lightning.dit_module import DiTModule

    overrides = [
        *TINY_RUN,
        "backbone=dit_dh_s",
        "backbone.head_hidden_size=32",
        "backbone.head_depth=1",
        "backbone.head_num_heads=2",
        "trainer.max_steps=3",
    ]
    _, run_dir = run_train(overrides)
    module = DiTModule.from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert isinstance(module.backbone, DiTDH) and module.backbone.head_registers is not None
    # The head's registers were trained: the raw weights moved away from their lagging EMA.
    assert not torch.equal(module.backbone.head_registers.tokens, module.ema.module.head_registers.tokens)
