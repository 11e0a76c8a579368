"""SiT (DiT's architecture as a flow) and its diffusion registers, against a float64 re-implementation of SiT's
equations in SiT's own time convention."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import same_init_with_registers
from hydra.utils import instantiate
from test_dit import randomize_, sincos_2d

from dsr.config import compose
from dsr.models.profile import analytic_forward_flops, forward_flops, register_overhead
from dsr.models.registers import register_grid
from dsr.models.sit import SiT

TINY = dict(input_size=4, patch_size=2, in_channels=3, hidden_size=32, depth=4, num_heads=2, num_classes=5)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def sit_reference(m: SiT, x: torch.Tensor, t_sit: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SiT's network in float64 from the equations: time t_sit with 1 = data, output d x_t / d t_sit (toward
    data), the learned-sigma half dropped."""
    B, C, H, W = x.shape
    p, D = m.patch_size, m.x_embedder.proj.out_channels
    gh, gw = H // p, W // p
    patches = x.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, -1)
    h = patches @ m.x_embedder.proj.weight.reshape(D, -1).T + m.x_embedder.proj.bias + sincos_2d(D, gh, gw)
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    angles = t_sit[:, None] * freqs[None]
    temb = torch.cat([angles.cos(), angles.sin()], dim=1)
    mlp = m.t_embedder.mlp
    temb = F.linear(F.silu(F.linear(temb, mlp[0].weight, mlp[0].bias)), mlp[2].weight, mlp[2].bias)
    c = temb + m.y_embedder.embedding_table.weight[y]
    R = m.num_registers
    for i, blk in enumerate(m.blocks):
        if R and i == m.register_start:
            bank = m.registers.tokens[0] + sincos_2d(D, *register_grid(R))[:R]
            h = torch.cat([bank.expand(B, R, D), h], dim=1)
        sh1, s1, g1, sh2, s2, g2 = F.linear(F.silu(c), blk.adaLN_modulation[1].weight,
                                            blk.adaLN_modulation[1].bias).chunk(6, dim=1)  # fmt: skip
        a = layer_norm(h) * (1 + s1[:, None]) + sh1[:, None]
        nh, hd = blk.attn.num_heads, blk.attn.head_dim
        q, k, v = F.linear(a, blk.attn.qkv.weight, blk.attn.qkv.bias).reshape(B, -1, 3, nh, hd).permute(2, 0, 3, 1, 4)
        att = (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v).transpose(1, 2).reshape(B, -1, D)
        h = h + g1[:, None] * F.linear(att, blk.attn.proj.weight, blk.attn.proj.bias)
        a = layer_norm(h) * (1 + s2[:, None]) + sh2[:, None]
        hidden = gelu_tanh(F.linear(a, blk.mlp.fc1.weight, blk.mlp.fc1.bias))
        h = h + g2[:, None] * F.linear(hidden, blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    h = h[:, R:]
    fl = m.final_layer
    shift, scale = F.linear(F.silu(c), fl.adaLN_modulation[1].weight, fl.adaLN_modulation[1].bias).chunk(2, dim=1)
    out = F.linear(layer_norm(h) * (1 + scale[:, None]) + shift[:, None], fl.linear.weight, fl.linear.bias)
    channels = out.shape[-1] // (p * p)
    out = out.reshape(B, gh, gw, p, p, channels).permute(0, 5, 1, 3, 2, 4).reshape(B, channels, H, W)
    return out[:, :C]


def inputs(batch: int = 3, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, TINY["in_channels"], TINY["input_size"], TINY["input_size"], generator=g, dtype=dtype)
    return (
        x,
        torch.rand(batch, generator=g, dtype=dtype),
        torch.randint(0, TINY["num_classes"] + 1, (batch,), generator=g),
    )


@pytest.mark.parametrize(
    "options",
    [dict(), dict(num_registers=5, register_start=1), dict(num_registers=3, register_start=0, learn_sigma=False)],
)
def test_forward_is_sits_network_in_dsr_time(options):
    torch.manual_seed(0)
    model = randomize_(SiT(**TINY, **options).double())
    # The fixed tables in float64 (the model builds them in float32).
    model.t_embedder.freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    model.pos_embed = sincos_2d(32, 2, 2)[None]
    if model.registers is not None:
        model.registers.pos_code = sincos_2d(32, *register_grid(model.num_registers))[None, : model.num_registers]
    x, t, y = inputs()
    out = model(x, t, y)  # dsr: t = 0 data, velocity noise - x
    reference = sit_reference(model, x, 1 - t, y)  # SiT: time 1 - t, velocity x - noise
    assert out.shape == x.shape and reference.abs().max() > 1e-2
    torch.testing.assert_close(out, -reference, rtol=1e-10, atol=1e-10)
    assert model.final_layer.linear.out_features == 4 * 3 * (1 if options.get("learn_sigma") is False else 2)


def test_the_time_mapping_sends_dsr_data_to_sit_data():
    """dsr's x_t = (1 - t) x + t e at t is SiT's t' x + (1 - t') e at t' = 1 - t; its velocity e - x is minus SiT's."""
    g = torch.Generator().manual_seed(3)
    x, e, t = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g), torch.rand(4, 1, generator=g)
    t_sit = 1 - t
    assert torch.allclose((1 - t) * x + t * e, t_sit * x + (1 - t_sit) * e)
    dt = 1e-3  # finite differences of each path in its own time
    dsr_velocity = (((1 - t - dt) * x + (t + dt) * e) - ((1 - t) * x + t * e)) / dt
    sit_velocity = (((t_sit + dt) * x + (1 - t_sit - dt) * e) - (t_sit * x + (1 - t_sit) * e)) / dt
    torch.testing.assert_close(dsr_velocity, -sit_velocity, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(dsr_velocity, e - x, rtol=1e-3, atol=1e-3)


def test_zero_registers_is_the_plain_sit_bit_for_bit_and_registers_train():
    plain, with_registers = same_init_with_registers(lambda **r: SiT(**TINY, **r), num_registers=6, register_start=2)

    randomize_(plain)
    x, t, y = inputs(dtype=torch.float32)
    h = plain.x_embedder(x) + plain.pos_embed
    c = plain.t_embedder(1 - t) + plain.y_embedder(y)
    for block in plain.blocks:
        h = block(h, c)
    expected = -plain.unpatchify(plain.final_layer(h, c))[:, :3]
    assert torch.equal(plain(x, t, y), expected)

    randomize_(with_registers)
    lengths = []
    for block in with_registers.blocks:
        block.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    with_registers(x, t, y).square().mean().backward()
    assert lengths == [4, 4, 10, 10]
    assert with_registers.registers.tokens.grad.abs().min() > 0


@pytest.mark.parametrize(
    "name, published_gmacs, gflops, gflops_registers, params_m",
    [
        ("sit_s", 6.06, 12.11, 13.37, 32.87),
        ("sit_b", 23.01, 46.01, 50.57, 130.32),
        ("sit_xl", 118.64, 237.24, 261.99, 674.83),
    ],
)
def test_sit_sizes_and_flops_match_the_published_ones(name, published_gmacs, gflops, gflops_registers, params_m):
    """The DiT / SiT papers' forward cost at 256 px (32x32x4 SD-VAE latents, patch 2), in multiply-accumulates."""
    cfg = compose("train", [f"backbone={name}", "data=imagenet", "registers=none"])
    factory = instantiate(cfg.backbone)
    assert factory.func is SiT and factory.keywords["learn_sigma"] is True
    stats = register_overhead(functools.partial(SiT, **{**factory.keywords, "num_registers": 36}), (4, 32, 32))
    assert round(stats["gflops_without_registers"], 2) == gflops
    assert round(stats["gflops_with_registers"], 2) == gflops_registers
    assert round(stats["params_M_without_registers"], 2) == params_m
    assert abs(stats["gflops_without_registers"] / (2 * published_gmacs) - 1) < 2e-3
    with torch.device("meta"):
        model = factory(in_channels=4, input_size=32)
    assert analytic_forward_flops(factory, (4, 32, 32)) == forward_flops(model, (4, 32, 32))


def test_sit_trains_through_the_stage_and_its_blocks_are_analysed(run_train):
    """The real training entry point with a tiny SiT, then the DiT outlier statistics on its blocks."""
    from helpers import TINY_RUN  # noqa: PLC0415

    from dsr.analysis.capture import capture_block_outputs  # noqa: PLC0415
    from dsr.lightning.dit_module import DiTModule  # noqa: PLC0415

    _, run_dir = run_train([*TINY_RUN, "backbone=sit_s", "backbone.patch_size=1", "trainer.max_steps=3"])
    module = DiTModule.from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    backbone = module.ema.module.eval()
    assert isinstance(backbone, SiT) and backbone.num_registers == 2 and backbone.learn_sigma
    assert not torch.equal(module.backbone.registers.tokens, backbone.registers.tokens)  # trained, EMA lags
    x = torch.randn(2, *backbone.x_embedder.proj.weight.shape[1:2], 4, 4)
    outputs, counts = capture_block_outputs(backbone, x, torch.full((2,), 0.5), torch.tensor([0, 1]))
    assert counts == [0, 2] and [o.shape[1] for o in outputs] == [16, 18]


def _sit_release_file(model: SiT) -> dict[str, torch.Tensor]:
    """`model`'s weights in SiT's released layout: DiT's names, plus the frozen sin-cos table `pos_embed` that SiT
    keeps as a parameter (recomputed here in float64)."""
    grid = model.grid_size
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return {**state, "pos_embed": sincos_2d(model.x_embedder.proj.out_channels, *grid)[None].float()}


def test_sit_layout_weights_import_with_strict_key_shape_and_table_checks():
    from dsr.convert import release_to_dsr  # noqa: PLC0415

    torch.manual_seed(0)
    released = _sit_release_file(randomize_(SiT(**TINY)))
    model = SiT(**TINY)
    model.load_state_dict(release_to_dsr(released, model))
    x, t, y = inputs(dtype=torch.float32)
    reference = SiT(**TINY)
    reference.load_state_dict({k: v for k, v in released.items() if k != "pos_embed"})
    assert torch.equal(model(x, t, y), reference(x, t, y))

    renamed = {("blocks.0.mlp.w12.weight" if k == "blocks.0.mlp.fc1.weight" else k): v for k, v in released.items()}
    with pytest.raises(
        ValueError, match=r"(?s)does not have: \['blocks.0.mlp.w12.weight'\].*lacks: \['blocks.0.mlp.fc1"
    ):
        release_to_dsr(renamed, SiT(**TINY))
    with pytest.raises(ValueError, match=r"final_layer.linear.weight: shape \(24, 32\) in the file, \(12, 32\)"):
        release_to_dsr(released, SiT(**TINY, learn_sigma=False))
    transposed = {**released, "pos_embed": released["pos_embed"][:, [0, 2, 1, 3]]}  # rows and columns swapped
    with pytest.raises(ValueError, match="pos_embed: the fixed table differs"):
        release_to_dsr(transposed, SiT(**TINY))


def test_dsr_convert_writes_a_checkpoint_that_samples_from_sit_weights(tmp_path):
    from helpers import TINY_RUN  # noqa: PLC0415

    from dsr.convert import main  # noqa: PLC0415
    from dsr.lightning.dit_module import DiTModule  # noqa: PLC0415

    # TINY_RUN's pixel latents are 48 x 4 x 4; patch 1 on a 32-wide, 2-deep SiT.
    sizes = dict(input_size=4, patch_size=1, in_channels=48, hidden_size=32, depth=2, num_heads=2, num_classes=4)
    torch.manual_seed(0)
    source = randomize_(SiT(**sizes))
    torch.save({"ema": _sit_release_file(source)}, tmp_path / "SiT-tiny.pt")  # SiT's training checkpoints hold "ema"
    overrides = [*TINY_RUN, "backbone=sit_s", "backbone.patch_size=1", "backbone.num_registers=0", "recipe=sit"]
    out = main(["stage2", str(tmp_path / "SiT-tiny.pt"), str(tmp_path / "sit.ckpt"), *overrides])
    module = DiTModule.from_checkpoint(out)
    assert module.transport.prediction == "velocity" and module.transport.time_dist == "uniform"
    x, t, y = torch.randn(2, 48, 4, 4), torch.rand(2), torch.tensor([0, 3])
    with torch.no_grad():
        assert torch.equal(module.ema.module.eval()(x, t, y), source.eval()(x, t, y))

    # SiT's two sampler presets, as composed, sample from it.
    from hydra.utils import instantiate as build_node  # noqa: PLC0415

    from dsr.diffusion.samplers import AdaptiveODESampler, SDESampler  # noqa: PLC0415

    for preset, kind in (("sit_ode", AdaptiveODESampler), ("sit_sde", SDESampler)):
        grid_free = [o for o in overrides if not o.startswith("sampler.solver.num_steps")]  # TINY_RUN's Euler steps
        if preset == "sit_ode":  # the quickstart experiment sets a grid size an adaptive solver does not have
            grid_free.append("~sampler.solver.num_steps")
        cfg = compose("train", [*grid_free, f"sampler={preset}", "sampler.guidance.scale=1.5"])
        module.solver, module.guidance = build_node(cfg.sampler.solver), build_node(cfg.sampler.guidance)
        assert isinstance(module.solver, kind) and module.guidance.guided_channels == 3
        if preset == "sit_sde":
            module.solver.num_steps = 5  # 250 as configured
        images = module.sample(torch.tensor([0, 1]))
        assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_sits_time_distribution_and_sampler_grid_describe_the_same_noise_levels():
    """recipe=sit draws t uniform on [0, 1] in dsr's time: the same noise levels as SiT's uniform t_sit = 1 - t; and
    sampler=sit_sde's grid is SiT's SDE grid linspace(0, 0.96, 250) in SiT's time, read backwards as 1 - t."""
    from scipy import stats as scipy_stats  # noqa: PLC0415

    from dsr.diffusion.samplers import time_grid  # noqa: PLC0415

    cfg = compose("train", ["backbone=sit_xl", "recipe=sit", "sampler=sit_sde", "data=imagenet"])
    transport, solver = instantiate(cfg.transport), instantiate(cfg.sampler.solver)
    t = transport.sample_time(20000, (4, 32, 32), generator=torch.Generator().manual_seed(0))
    assert scipy_stats.kstest((1 - t).numpy(), "uniform").pvalue > 1e-3  # SiT's t_sit ~ U(0, 1)
    grid = time_grid(solver.num_steps, transport.shift_for((4, 32, 32)), solver.t_end)
    sit_grid = torch.linspace(0, 1 - 0.04, 250, dtype=torch.float64)
    torch.testing.assert_close(1 - grid, sit_grid, rtol=0, atol=1e-12)
