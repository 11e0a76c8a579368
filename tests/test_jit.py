"""JiT: the network against a float64 re-implementation from its equations, in-context tokens with diffusion registers,
JiT's loss, time distribution, sampler and CFG interval in dsr's time, the JiT checkpoint import, the rows and FLOPs."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import compose_train, same_init_with_registers
from hydra.utils import instantiate

from dsr.analysis.capture import dit_statistics, register_counts
from dsr.diffusion.guidance import ClassifierFreeGuidance
from dsr.diffusion.samplers import ODESampler
from dsr.diffusion.transport import Transport
from dsr.models.jit import JiT
from dsr.models.profile import analytic_forward_flops, count_parameters, forward_flops

TINY = dict(input_size=16, patch_size=4, hidden_size=32, depth=4, num_heads=2, bottleneck_dim=8, in_context_len=3,
            in_context_start=1, num_classes=5)  # fmt: skip


def tiny(seed: int = 0, **overrides) -> JiT:
    """A float64 tiny JiT with every weight random (adaLN-Zero's zeros would hide most of the computation)."""
    torch.manual_seed(seed)
    model = JiT(**{**TINY, **overrides}).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def inputs(n: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64)
    return x, torch.rand(n, generator=g, dtype=torch.float64), torch.tensor([0, 4, 5][:n])


# ------------------------------------------------------------------------------------------------------------------
# a float64 JiT written from the paper's and the code's equations, reading the model's weights by name
# ------------------------------------------------------------------------------------------------------------------


def rms(x, w):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * w


def sincos(dim, h, w):
    """[h w, dim]: the first half codes the column, the second the row; each [sin, cos] at 1 / 10000^(k / (dim/4))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )

    def code(pos):
        a = pos.reshape(-1, 1) * omega
        return torch.cat([a.sin(), a.cos()], 1)

    return torch.cat([code(cols), code(rows)], 1)


def rotate(q, grid, prefix):
    """EVA 2-D RoPE on [B, H, T, d]: pairs (2k, 2k+1) of the first d/2 channels turn by row * f_k, of the second half by
    col * f_k, f_k = 10000^(-2k / (d/2)); the first `prefix` tokens are not turned."""
    d = q.shape[-1]
    f = 10000.0 ** (-torch.arange(0, d // 2, 2, dtype=torch.float64) / (d // 2))
    out = q.clone()
    for n in range(q.shape[2] - prefix):
        r, c = divmod(n, grid)
        for half, pos in ((0, r), (1, c)):
            for k in range(len(f)):
                i = half * d // 2 + 2 * k
                a = pos * f[k]
                x0, x1 = q[:, :, prefix + n, i], q[:, :, prefix + n, i + 1]
                out[:, :, prefix + n, i] = x0 * math.cos(a) - x1 * math.sin(a)
                out[:, :, prefix + n, i + 1] = x1 * math.cos(a) + x0 * math.sin(a)
    return out


def reference_forward(m: JiT, x, t, y):
    P = dict(m.named_parameters())
    p, D, heads = m.patch_size, m.final_layer.norm_final.weight.shape[0], m.blocks[0].attn.num_heads
    B, grid = x.shape[0], x.shape[-1] // p
    lin = lambda v, name: v @ P[name + ".weight"].T + P[name + ".bias"]  # noqa: E731
    patches = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(B, grid * grid, -1)  # (c, i, j)
    s = patches @ P["x_embedder.proj1.weight"].reshape(len(P["x_embedder.proj1.weight"]), -1).T
    s = s @ P["x_embedder.proj2.weight"][:, :, 0, 0].T + P["x_embedder.proj2.bias"] + sincos(D, grid, grid)
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    angle = (1 - t)[:, None] * freqs  # JiT's time: 1 is data
    t_emb = lin(F.silu(lin(torch.cat([angle.cos(), angle.sin()], 1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    y_emb = P["y_embedder.embedding_table.weight"][y]
    c = t_emb + y_emb
    regs, ctx = 0, 0
    for i in range(m.depth):
        if m.num_registers and i == m.register_start:
            code = sincos(D, *_grid(m.num_registers))[: m.num_registers]
            s = torch.cat([(P["registers.tokens"][0] + code).expand(B, -1, -1), s], 1)
            regs = m.num_registers
        if m.in_context_len and i == m.in_context_start:
            tokens = y_emb[:, None] + P["in_context_posemb"]
            s = torch.cat([s[:, :regs], tokens, s[:, regs:]], 1)
            ctx = m.in_context_len
        b = f"blocks.{i}."
        sh1, sc1, g1, sh2, sc2, g2 = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, -1)
        h = rms(s, P[b + "norm1.weight"]) * (1 + sc1[:, None]) + sh1[:, None]
        q, k, v = lin(h, b + "attn.qkv").reshape(B, -1, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        q, k = rms(q, P[b + "attn.q_norm.weight"]), rms(k, P[b + "attn.k_norm.weight"])
        q, k = rotate(q, grid, regs + ctx), rotate(k, grid, regs + ctx)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // heads), -1) @ v
        s = s + g1[:, None] * lin(a.transpose(1, 2).reshape(B, -1, D), b + "attn.proj")
        h = rms(s, P[b + "norm2.weight"]) * (1 + sc2[:, None]) + sh2[:, None]
        gate, value = lin(h, b + "mlp.fc1").chunk(2, -1)
        s = s + g2[:, None] * lin(F.silu(gate) * value, b + "mlp.fc2")
    s = s[:, regs + ctx :]
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, -1)
    out = lin(rms(s, P["final_layer.norm_final.weight"]) * (1 + scale[:, None]) + shift[:, None], "final_layer.linear")
    out = out.reshape(B, grid, grid, p, p, 3)  # each token as (p_row, p_col, channel)
    return out.permute(0, 5, 1, 3, 2, 4).reshape(B, 3, grid * p, grid * p)


def _grid(n):
    rows = max(1, math.isqrt(n))
    return rows, math.ceil(n / rows)


@pytest.mark.parametrize(
    "registers",
    [dict(num_registers=0), dict(num_registers=2, register_start=2), dict(num_registers=2, register_start=0)],
)
def test_forward_matches_a_float64_reimplementation(registers):
    model = tiny(**registers)
    x, t, y = inputs()
    # The model's fixed tables (sin-cos, RoPE) are float32 buffers even in a float64 model: hence 1e-6, not 1e-12.
    torch.testing.assert_close(model(x, t, y), reference_forward(model, x, t, y), rtol=1e-5, atol=1e-6)


def test_zero_registers_is_plain_jit_bit_for_bit():
    plain, _ = same_init_with_registers(lambda **r: JiT(**TINY, **r), num_registers=4, register_start=2)
    shared = plain.state_dict()
    # JiT's own state dict: every key but the registers' (the reference stores pos_embed too, which dsr recomputes).
    assert "pos_embed" not in shared and {"in_context_posemb", "x_embedder.proj1.weight"} <= set(shared)


@pytest.mark.parametrize("starts", [(1, 2), (2, 1), (1, 1)])
def test_prefix_tokens_join_at_their_blocks_with_identity_rotary_rows_and_leave_before_the_output(starts):
    context_start, register_start = starts
    model = tiny(in_context_start=context_start, num_registers=2, register_start=register_start).eval()
    x, t, y = inputs()
    seen, final = [], []
    hooks = [block.register_forward_pre_hook(lambda m, a, kw: seen.append((a[0], kw["rope"])), with_kwargs=True)
             for block in model.blocks]  # fmt: skip
    hooks.append(model.final_layer.register_forward_pre_hook(lambda m, a: final.append(a[0])))
    model(x, t, y)
    for h in hooks:
        h.remove()
    n = 16  # 4 x 4 patches
    plain_cos, plain_sin = model.rope.tables(prefixed=False)
    y_emb = model.y_embedder(y)
    for i, (tokens, (cos, sin)) in enumerate(seen):
        regs = 2 if i >= register_start else 0
        ctx = 3 if i >= context_start else 0
        assert tokens.shape[1] == regs + ctx + n, i
        assert model.prefix_counts()[i] == {"registers": regs, "in_context": ctx}
        assert torch.equal(cos[: regs + ctx], torch.ones_like(cos[: regs + ctx])) and not sin[: regs + ctx].any()
        assert torch.equal(cos[regs + ctx :], plain_cos) and torch.equal(sin[regs + ctx :], plain_sin)
        if i == context_start:  # the class embedding repeated plus learned positions, right after any registers
            torch.testing.assert_close(tokens[:, regs : regs + 3], y_emb[:, None] + model.in_context_posemb)
        if i == register_start:  # registers always first
            expected = (model.registers.tokens + model.registers.pos_code).expand(3, -1, -1)
            torch.testing.assert_close(tokens[:, :2], expected)
    assert final[0].shape[1] == n  # both kinds stripped before the final layer
    assert register_counts(model) == [sum(g.values()) for g in model.prefix_counts()]


def test_gradient_reaches_registers_and_in_context_tokens():
    model = tiny(num_registers=2, register_start=2)
    x, t, y = inputs()
    model(x, t, y).square().mean().backward()
    assert model.registers.tokens.grad.abs().sum() > 0
    assert model.in_context_posemb.grad.abs().sum() > 0


def test_dropout_acts_on_the_middle_half_of_the_blocks_only():
    model = JiT(**{**TINY, "depth": 8}, dropout=0.2)
    probabilities = [(b.attn.proj_drop.p, b.mlp.drop1.p, b.mlp.drop2.p) for b in model.blocks]
    assert probabilities == [(0.0, 0.0, 0.0)] * 2 + [(0.2, 0.2, 0.0)] * 4 + [(0.0, 0.0, 0.0)] * 2


# ------------------------------------------------------------------------------------------------------------------
# JiT's loss, time distribution, sampler and interval in dsr's time
# ------------------------------------------------------------------------------------------------------------------


def jit_transport(**overrides) -> Transport:
    recipe = dict(prediction="x", clamp_target=True, time_dist="logit_normal", logit_mean=0.8, logit_std=0.8,
                  t_min=0.0, t_max=1.0, shift=1.0)  # fmt: skip
    return Transport(**{**recipe, **overrides})


def test_loss_is_jits_velocity_loss_with_the_shared_clamped_divisor():
    g = torch.Generator().manual_seed(0)
    x, e = (
        torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64),
        torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64),
    )
    t_dsr = torch.tensor([0.0, 0.01, 0.049, 0.05, 0.5, 0.99], dtype=torch.float64)
    net = lambda z, t, y: 0.5 * z + 0.1 * t.reshape(-1, 1, 1, 1)  # noqa: E731  (any x-prediction)
    for scale in (1.0, 2.0):
        ours = jit_transport(noise_scale=scale).training_loss(net, x, None, noise=e, t=t_dsr)
        # JiT, in its own time t = 1 - t_dsr (1 = data): z = t x + (1 - t) e s, v = (x - z) / max(1 - t, 0.05).
        tj = (1 - t_dsr).reshape(-1, 1, 1, 1)
        z = tj * x + (1 - tj) * e * scale
        div = (1 - tj).clamp_min(0.05)
        jit = (((x - z) / div - (net(z, 1 - tj.flatten(), None) - z) / div) ** 2).mean()
        torch.testing.assert_close(ours.loss, jit, rtol=1e-12, atol=0)
    # The release's recipe compares with the true velocity: it differs below the clamp only.
    release = Transport(prediction="x", t_max=1.0).training_loss(net, x, None, noise=e, t=t_dsr)
    mapped = jit_transport().training_loss(net, x, None, noise=e, t=t_dsr)
    differs = (release.loss_map - mapped.loss_map).abs().flatten(1).amax(1) > 1e-9
    assert differs.tolist() == [True, True, True, False, False, False]


def test_mapped_time_distribution_puts_jits_mass_on_each_noise_level():
    t = jit_transport().sample_time(200_000, (3, 16, 16), generator=torch.Generator().manual_seed(0)).double()
    levels = torch.tensor([0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.98, 0.999], dtype=torch.float64)  # untruncated at 1
    # JiT: logit(t_jit) ~ N(-0.8, 0.8^2); P(t_dsr <= a) = P(t_jit >= 1 - a) = 1 - Phi((logit(1 - a) + 0.8) / 0.8).
    jit_cdf = 1 - torch.special.ndtr((torch.logit(1 - levels) + 0.8) / 0.8)
    ours = (t[:, None] <= levels).double().mean(0)
    assert (ours - jit_cdf).abs().max() < 4e-3  # ~3.5 standard errors at n = 200k


def test_cfg_interval_is_jits_open_interval_on_its_grid():
    # JiT's mask on its float32 grid (t = 1 data): guided where t > 0.1 and t < 1 (low 0.1, high 1.0).
    t_jit = torch.linspace(0.0, 1.0, 51)
    jit_mask = (t_jit < 1.0) & (t_jit > 0.1)
    cfg = instantiate(compose_train(["sampler=jit"], "/tmp").sampler.guidance)
    from dsr.diffusion.samplers import time_grid

    grid = time_grid(51, 1.0, 0.0).float()  # dsr's grid for the same steps, t = 1 noise
    assert torch.equal(cfg.inside(grid), jit_mask)
    assert not jit_mask[5] and jit_mask[6]  # the step from t_jit = 0.1 (dsr 0.9) is not guided; the next one is
    closed = ClassifierFreeGuidance(2.0, 0.0, 0.9)  # dsr's default interval is closed at both ends
    assert bool(closed.inside(grid)[5]) and bool(closed.inside(grid)[50])


def test_sampler_is_jits_heun_with_a_last_euler_step_and_cfg():
    table = torch.randn(6, 3, 1, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x_pred = lambda z, t_jit, y: torch.tanh(z) * t_jit.reshape(-1, 1, 1, 1) + table[y]  # noqa: E731
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y, scale, steps = torch.tensor([1, 3]), 2.5, 50

    # JiT's generate(), from its description, float64: v = (x_hat - z) / max(1 - t, 0.05); CFG where 0.1 < t < 1.
    def v_jit(z, t):
        tt = torch.full((len(z),), t, dtype=torch.float64)
        div = max(1 - t, 0.05)
        vc, vu = (x_pred(z, tt, y) - z) / div, (x_pred(z, tt, torch.full_like(y, 5)) - z) / div
        return vu + (scale if 0.1 < t < 1.0 else 1.0) * (vc - vu)

    grid = torch.linspace(0, 1, steps + 1, dtype=torch.float64).tolist()
    z = noise.clone()
    for i in range(steps - 1):
        h = grid[i + 1] - grid[i]
        v = v_jit(z, grid[i])
        z = z + h * 0.5 * (v + v_jit(z + h * v, grid[i + 1]))
    z = z + (grid[-1] - grid[-2]) * v_jit(z, grid[-2])

    sampler = ODESampler("heun", num_steps=steps + 1, euler_last_step=True)
    cfg = ClassifierFreeGuidance(scale, 0.0, 0.9, include_t_min=False, include_t_max=False)
    model = lambda x, t, labels: x_pred(x, 1 - t, labels)  # noqa: E731  (the model in dsr's time)
    ours = sampler.integrate(cfg.velocity_fn(model, y, 5, jit_transport()), noise, shift=1.0, t_end=0.0)
    torch.testing.assert_close(ours, z, rtol=1e-10, atol=1e-10)
    assert sampler.last_nfe == sampler.nfe() == 2 * steps - 1


# ------------------------------------------------------------------------------------------------------------------
# rows, FLOPs, analysis
# ------------------------------------------------------------------------------------------------------------------


def test_rows_compose_with_the_stated_hyperparameters(tmp_path):
    names = ("input_jit_h", "input_jit_h_dsr", "jit_b_200ep", "jit_b_200ep_dsr", "quickstart_jit")
    rows = {name: compose_train([f"experiment={name}"], tmp_path / name) for name in names}
    for name, cfg in rows.items():
        t, m = cfg.transport, cfg.module
        assert (t.prediction, t.clamp_target, t.time_dist, t.logit_mean, t.logit_std, t.shift) == (
            "x", True, "logit_normal", 0.8, 0.8, 1.0), name  # fmt: skip
        assert cfg.backbone._target_ == "dsr.models.jit.JiT" and cfg.encoder.patch_size == 1, name
        assert (cfg.sampler.solver.method, cfg.sampler.solver.euler_last_step) == ("heun", True), name
        g = cfg.sampler.guidance
        assert (g.t_min, g.t_max, g.include_t_min, g.include_t_max) == (0.0, 0.9, False, False), name
        if name != "quickstart_jit":
            assert m.ema_decays == [0.9999, 0.9996] and cfg.data.global_batch_size == 1024, name
            assert (m.optimizer.lr, list(m.optimizer.betas), m.optimizer.weight_decay) == (2e-4, [0.9, 0.95], 0.0)
            assert m.lr_schedule.warmup_epochs == 5 and m.lr_schedule.constant_epochs is None
            assert cfg.sampler.solver.num_steps == 51 and cfg.trainer.precision == "bf16-mixed"
    h, h_dsr, b, b_dsr = (rows[k] for k in ("input_jit_h", "input_jit_h_dsr", "jit_b_200ep", "jit_b_200ep_dsr"))
    assert (h.backbone.hidden_size, h.backbone.depth, h.backbone.bottleneck_dim, h.backbone.dropout) == (
        1280,
        32,
        256,
        0.2,
    )
    assert h.trainer.max_epochs == h_dsr.trainer.max_epochs == 80 and h.sampler.guidance.scale == 1.0
    assert (h.backbone.num_registers, h_dsr.backbone.num_registers, h_dsr.backbone.register_start) == (0, 36, 10)
    assert b.trainer.max_epochs == 200 and b.sampler.guidance.scale == b_dsr.sampler.guidance.scale == 3.0
    assert (b.backbone.hidden_size, b.backbone.in_context_start, b_dsr.backbone.num_registers) == (768, 4, 36)
    with torch.device("meta"):
        jit_h = instantiate(h.backbone)(in_channels=3, input_size=(256, 256))
    assert round(count_parameters(jit_h) / 1e6) == 953  # the paper's JiT-H


def test_analytic_flops_cover_in_context_tokens_and_registers():
    for overrides in (dict(), dict(num_registers=4, register_start=3), dict(num_registers=2, register_start=0)):
        factory = functools.partial(JiT, **{**TINY, **overrides})
        with torch.device("meta"):
            model = factory(in_channels=3, input_size=(16, 16))
        assert analytic_forward_flops(factory, (3, 16, 16)) == forward_flops(model, (3, 16, 16))


def test_outlier_statistics_exclude_prefix_tokens_and_report_them_by_kind():
    model = tiny(num_registers=2, register_start=2).float().eval()
    g = torch.Generator().manual_seed(0)
    images, noise = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g)
    x_t = 0.5 * images + 0.5 * noise
    with torch.no_grad():  # block 3's output, read directly
        hidden = []
        handle = model.blocks[3].register_forward_hook(lambda m, a, out: hidden.append(out))
        model(x_t, torch.full((4,), 0.5), torch.tensor([0, 1, 2, 3]))
        handle.remove()
    stats = dit_statistics(model, images, torch.tensor([0, 1, 2, 3]), noise, 0.5, batch_size=2, progress=False)
    records = stats.records()
    assert [r["num_excluded_tokens"] for r in records] == [0, 3, 5, 5]
    assert "prefix_tokens" not in records[0]
    assert records[1]["prefix_tokens"].keys() == {"in_context"}
    kinds = records[3]["prefix_tokens"]
    assert kinds["registers"]["count"] == 2 and kinds["in_context"]["count"] == 3
    out = hidden[0]
    torch.testing.assert_close(kinds["registers"]["max_norm"], out[:, :2].norm(dim=-1).max().item(), rtol=1e-5, atol=0)
    torch.testing.assert_close(kinds["in_context"]["mean_norm"], out[:, 2:5].norm(dim=-1).mean().item(), rtol=1e-5,
                               atol=0)  # fmt: skip


# ------------------------------------------------------------------------------------------------------------------
# importing JiT's checkpoints
# ------------------------------------------------------------------------------------------------------------------

JIT_OVERRIDES = ["experiment=quickstart_jit", "data.image_size=16", "data.num_classes=5", "backbone.hidden_size=32",
                 "backbone.depth=4", "backbone.num_heads=2", "backbone.bottleneck_dim=8", "backbone.in_context_len=3",
                 "backbone.num_registers=0", "registers=none"]  # fmt: skip
# LTH14/JiT's model_jit.py names, as its Denoiser saves them (under `net.`; pos_embed is a frozen parameter there).
JIT_BLOCK_KEYS = ["norm1.weight", "attn.q_norm.weight", "attn.k_norm.weight", "attn.qkv.weight", "attn.qkv.bias",
                  "attn.proj.weight", "attn.proj.bias", "norm2.weight", "mlp.w12.weight", "mlp.w12.bias",
                  "mlp.w3.weight", "mlp.w3.bias", "adaLN_modulation.1.weight", "adaLN_modulation.1.bias"]  # fmt: skip
JIT_KEYS = {"t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
            "y_embedder.embedding_table.weight", "x_embedder.proj1.weight", "x_embedder.proj2.weight",
            "x_embedder.proj2.bias", "pos_embed", "in_context_posemb", "final_layer.norm_final.weight",
            "final_layer.linear.weight", "final_layer.linear.bias", "final_layer.adaLN_modulation.1.weight",
            "final_layer.adaLN_modulation.1.bias"}  # fmt: skip
JIT_KEYS |= {f"blocks.{i}.{k}" for i in range(4) for k in JIT_BLOCK_KEYS}


def jit_checkpoint(seeds=(0, 1, 2)):
    """JiT's checkpoint-last.pth layout: the raw weights and both EMAs, each under the Denoiser's `net.`."""
    from dsr.convert import dsr_to_release

    sets = [dsr_to_release(tiny(seed).float()) for seed in seeds]
    assert set(sets[0]) == JIT_KEYS
    wrap = lambda state: {f"net.{k}": v for k, v in state.items()}  # noqa: E731
    return {"model": wrap(sets[0]), "model_ema1": wrap(sets[1]), "model_ema2": wrap(sets[2]), "optimizer": {},
            "epoch": 7}, sets  # fmt: skip


def test_jit_checkpoint_imports_with_both_emas(tmp_path):
    from dsr.convert import convert_stage2
    from dsr.lightning.dit_module import DiTModule

    checkpoint, sets = jit_checkpoint()
    torch.save(checkpoint, tmp_path / "checkpoint-last.pth")
    out = convert_stage2(tmp_path / "checkpoint-last.pth", tmp_path / "jit.ckpt", JIT_OVERRIDES)
    module = DiTModule.from_checkpoint(out)
    assert module.ema_decays == (0.995, 0.99)
    for weights, state in zip([module.backbone, *module.ema.averages], sets, strict=True):
        for key, value in weights.state_dict().items():
            expected = state[key.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3")]
            assert torch.equal(value, expected), key
    x, t, y = (v.float() if v.is_floating_point() else v for v in inputs())
    reference = tiny(1).float()
    torch.testing.assert_close(module.sampling_model("auto")(x, t, y), reference(x, t, y))


def test_jit_import_errors_name_the_problem(tmp_path):
    from dsr.convert import convert_stage2

    checkpoint, _ = jit_checkpoint()
    path = tmp_path / "checkpoint-last.pth"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"holds 2 EMAs and the config keeps 1 .*recipe=jit"):
        convert_stage2(path, tmp_path / "a.ckpt", [*JIT_OVERRIDES, "module.ema_decays=[0.995]"])
    with pytest.raises(ValueError, match=r"in_context_posemb: shape \(1, 3, 32\) in the file, \(1, 4, 32\)"):
        convert_stage2(path, tmp_path / "b.ckpt", [*JIT_OVERRIDES, "backbone.in_context_len=4"])
    with pytest.raises(ValueError, match=r"keys the config's model needs but the file lacks: \['register_tokens'\]"):
        convert_stage2(path, tmp_path / "c.ckpt", [*JIT_OVERRIDES, "registers=diffusion", "backbone.num_registers=2"])
    del checkpoint["model"]["net.blocks.3.mlp.w3.bias"]
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"lacks: \['blocks.3.mlp.w3.bias'\]"):
        convert_stage2(path, tmp_path / "d.ckpt", JIT_OVERRIDES)
    with pytest.raises(ValueError, match="JiT ships no config"):
        convert_stage2(path, tmp_path / "e.ckpt", JIT_OVERRIDES, release_config=tmp_path / "x.yaml")


@pytest.mark.slow
def test_a_tiny_jit_trains_samples_and_is_analysed_through_the_commands(run_train, tmp_path):
    import json

    from helpers import compose_script

    from dsr.analyze import run

    overrides = [*JIT_OVERRIDES, "registers=diffusion", "backbone.num_registers=2", "backbone.register_start=2",
                 "data.dataset.num_samples=64", "data.global_batch_size=8", "trainer.max_steps=3",
                 "trainer.enable_progress_bar=false", "callbacks.fid.every_n_steps=0",
                 "callbacks.sample_grid.per_class=1", "sampler.solver.num_steps=3"]  # fmt: skip
    _, run_dir = run_train(overrides)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    stored = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert stored["global_step"] == 3 and stored["dsr"]["ema_decays"] == [0.995, 0.99]
    assert (run_dir / "samples" / "final.png").is_file()
    analyze = ["analyze.target=dit", f"analyze.ckpt={ckpt}", "analyze.times=[0.5]", "analyze.num_images=4",
               "analyze.batch_size=4", "analyze.num_maps=1", "analyze.num_workers=0", "accelerator=cpu"]  # fmt: skip
    out = run(compose_script("analyze", analyze))
    report = json.loads((out / "t0.50" / "stats.json").read_text())
    assert report["metadata"]["in_context_len"] == 3 and report["metadata"]["num_registers"] == 2
    records = report["layers"]
    assert [r["num_excluded_tokens"] for r in records] == [0, 3, 5, 5]
    assert [sorted(r.get("prefix_tokens", {})) for r in records] == [
        [],
        ["in_context"],
        *[["in_context", "registers"]] * 2,
    ]
