"""The speed options change how fast a run is, not what it computes: activation checkpointing, regional compilation,
the attention kernel and the TF32 policy; and the prepared GPU check runs (`--smoke`) on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_RUN, compose_train, perturb_checkpoint
from hydra.utils import instantiate

from dsr.diffusion.transport import Transport
from dsr.models.dit import DiTBlock
from dsr.utils.devices import apply_matmul_precision, compile_backbone, select_attention_backend

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "dit_tiny": ["backbone.hidden_size=32", "backbone.depth=3", "backbone.num_heads=2", "backbone.register_start=1"],
    "dit_dh_s": ["backbone.hidden_size=32", "backbone.depth=2", "backbone.num_heads=2", "backbone.register_start=1",
                 "backbone.head_hidden_size=48", "backbone.head_num_heads=2"],
    "jit_b": ["backbone.hidden_size=32", "backbone.depth=4", "backbone.num_heads=2", "backbone.register_start=2",
              "backbone.in_context_start=2", "backbone.in_context_len=2", "backbone.bottleneck_dim=8",
              "backbone.patch_size=4"],
}  # fmt: skip


def tiny_backbone(name: str, *extra: str) -> tuple[torch.nn.Module, tuple[int, int, int]]:
    cfg = compose_train([f"backbone={name}", "backbone.num_registers=2", "data=synthetic", *TINY[name], *extra],
                        Path("unused"))  # fmt: skip
    shape = (3, 16, 16) if name.startswith("jit") else (8, 4, 4)
    torch.manual_seed(0)
    model = instantiate(cfg.backbone)(in_channels=shape[0], input_size=shape[1:]).double()
    for p in model.parameters():  # nothing zero: every block's branch contributes to the output and the gradients
        p.data.add_(0.05 * torch.randn_like(p))
    return model, shape


@pytest.mark.parametrize("name", list(TINY))
def test_grad_checkpointing_gives_the_same_loss_and_gradients(name):
    grads, losses = {}, {}
    for checkpointed in (False, True):
        model, shape = tiny_backbone(name, f"backbone.grad_checkpointing={str(checkpointed).lower()}")
        blocks = [m for m in model.modules() if isinstance(m, DiTBlock)]
        assert blocks and all(b.grad_checkpointing == checkpointed for b in blocks)
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(3, *shape, generator=generator, dtype=torch.float64)
        loss = Transport(prediction="x").training_loss(model, x, torch.tensor([0, 1, 2]), generator=generator).loss
        loss.backward()
        losses[checkpointed] = loss.item()
        grads[checkpointed] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        counted = []  # a checkpointed block runs its forward again in the backward pass
        hook = blocks[0].attn.register_forward_hook(lambda *_, seen=counted: seen.append(1))
        model.zero_grad()
        Transport(prediction="x").training_loss(model, x, torch.tensor([0, 1, 2]), generator=generator).loss.backward()
        hook.remove()
        assert len(counted) == (2 if checkpointed else 1)
    assert losses[True] == pytest.approx(losses[False], rel=1e-12)
    assert grads[True].keys() == grads[False].keys() and len(grads[False]) > 10
    for key, value in grads[False].items():
        torch.testing.assert_close(grads[True][key], value, rtol=1e-10, atol=1e-12, msg=key)


def test_regional_compilation_compiles_each_block_and_computes_the_same():
    model, shape = tiny_backbone("dit_dh_s")
    x, t, y = torch.randn(2, *shape, dtype=torch.float64), torch.tensor([0.3, 0.8]), torch.tensor([1, 2])
    eager = model(x, t.double(), y)
    line = compile_backbone(model, {"regional": True, "backend": "eager"})
    blocks = [*model.blocks, *model.head_blocks]
    assert line.startswith(f"compile: each of the {len(blocks)} blocks")
    assert all(b._compiled_call_impl is not None for b in blocks) and model._compiled_call_impl is None
    torch.testing.assert_close(model(x, t.double(), y), eager, rtol=1e-12, atol=1e-12)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="compile.regional=true compiles transformer blocks"):
        compile_backbone(torch.nn.Linear(2, 2), {"regional": True})


def test_attention_backend_and_tf32_policy_are_set_and_refused_by_name():
    model, shape = tiny_backbone("dit_tiny")
    x, t, y = torch.randn(2, *shape, dtype=torch.float64), torch.tensor([0.3, 0.8]).double(), torch.tensor([1, 2])
    auto = model(x, t, y)
    try:
        assert "math kernel" in select_attention_backend("math", "cpu")
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        torch.testing.assert_close(model(x, t, y), auto, rtol=1e-12, atol=1e-12)
    finally:
        for name in ("flash", "mem_efficient", "math", "cudnn"):
            getattr(torch.backends.cuda, f"enable_{name}_sdp")(True)
    with pytest.raises(ValueError, match="attention_backend=flash is a CUDA kernel"):
        select_attention_backend("flash", "cpu")
    with pytest.raises(ValueError, match="attention_backend='fast'"):
        select_attention_backend("fast", "cuda")
    try:
        assert "IEEE" in apply_matmul_precision("highest") and not torch.backends.cudnn.allow_tf32
        assert "TF32" in apply_matmul_precision("high") and torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        apply_matmul_precision("highest")
    with pytest.raises(ValueError, match="matmul_precision='low'"):
        apply_matmul_precision("low")


@pytest.mark.slow
def test_the_speed_options_train_the_same_weights_through_the_entry_point(run_train):
    common = [*TINY_RUN, "trainer.max_steps=3", "trainer.deterministic=true", "callbacks.sample_grid.every_n_steps=0"]
    _, plain = run_train(common, name="plain")
    fast = ["backbone.grad_checkpointing=true", "attention_backend=math", "+compile.regional=true",
            "+compile.backend=eager", "callbacks.progress_bar.refresh_rate=2"]  # fmt: skip
    _, options = run_train([*common, *fast], name="options")
    torch._dynamo.reset()
    states = [torch.load(d / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"] for d in (plain, options)]
    trained = [k for k in states[0] if k.startswith(("backbone.", "ema."))]
    assert trained and states[0].keys() == states[1].keys()
    for key in trained:
        np.testing.assert_allclose(states[1][key].numpy(), states[0][key].numpy(), rtol=1e-5, atol=1e-6, err_msg=key)
    assert not any("_orig_mod" in key for key in states[1])


@pytest.mark.slow
def test_the_gpu_check_runs_on_the_cpu_and_its_numbers_add_up(tmp_path):
    from dsr.models.profile import analytic_forward_flops

    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--smoke", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] and set(result["sections_s"]) == {"train", "memory", "sampling", "encoders", "smoke"}
    rows = result["train"]["rows"]
    assert {(r["backbone"], r["num_registers"], r["precision"]) for r in rows} >= {
        ("dit_xl", 36, "bf16-mixed+compile"), ("dit_dh_xl", 0, "fp32"), ("jit_h", 0, "bf16-mixed")}  # fmt: skip
    # achieved TFLOP/s and MFU from the analytic FLOPs of the tiny backbone the smoke run built
    from benchmarks.gpu import TINY, Check

    check = Check(smoke=True)
    cfg = compose_train(["backbone=dit_xl", "backbone.num_registers=36", "data=imagenet", *TINY["dit"]], tmp_path)
    row = next(r for r in rows if (r["backbone"], r["num_registers"], r["precision"]) == ("dit_xl", 36, "fp32"))
    flops = 3 * analytic_forward_flops(instantiate(cfg.backbone), check.latent) * row["batch"] / row["step_s"]
    assert row["tflops"] == pytest.approx(flops / 1e12, rel=1e-9)
    assert row["mfu_vs_measured_matmul"] == pytest.approx(row["tflops"] / result["peak_tflops"]["measured_matmul"])
    plain = next(r for r in rows if (r["backbone"], r["num_registers"], r["precision"]) == ("dit_xl", 0, "fp32"))
    overhead = result["train"]["register_step_overhead_pct"]["dit_xl fp32"]
    assert overhead == pytest.approx(100 * (row["step_s"] / plain["step_s"] - 1))
    compiled = next(r for r in rows if r["precision"] == "bf16-mixed+compile")
    assert compiled["compile_s"] > 0
    assert [r["batch"] for r in result["memory"]["rows"]] == [2, 4] and result["memory"]["grad_checkpointing"]["step_s"]
    assert {r["precision"] for r in result["sampling"]} == {"bf16-mixed", "32-true"}
    assert len(result["encoders"]) == 2 and all(r["img_per_s"] > 0 for r in result["encoders"])
    smoke = result["smoke"]
    assert smoke["fsdp"]["ok"] is None  # needs CUDA: skipped on the CPU, and said so
    assert smoke["ddp"]["ok"] and smoke["ddp"]["backend"] == "gloo", smoke["ddp"]["log"]
    assert smoke["cached_latents"]["ok"] and smoke["cached_latents"]["steps"] >= 1, smoke["cached_latents"]["log"]


@pytest.mark.slow
def test_values_only_loggers_read_are_logged_on_the_logging_steps_and_none_is_lost(run_train):
    import csv

    # grad_norm and skipped_steps are logged on Lightning's cadence alone; the loss every step (the progress bar):
    # the CSV must hold all three on exactly the same steps, as when all were logged every step.
    _, run_dir = run_train([*TINY_RUN, "trainer.max_steps=7", "trainer.log_every_n_steps=3",
                            "callbacks.sample_grid.every_n_steps=0"])  # fmt: skip
    rows = list(csv.DictReader((run_dir / "logs" / "metrics.csv").open()))
    steps = {key: sorted(int(r["step"]) for r in rows if r.get(key)) for key in
             ("train/loss", "train/grad_norm", "train/skipped_steps")}  # fmt: skip
    assert steps["train/loss"] == [2, 5] and steps["train/grad_norm"] == steps["train/skipped_steps"] == [2, 5]


@pytest.mark.slow
def test_the_overhead_benchmarks_bare_sampling_loop_makes_the_images_dsr_sample_makes(run_train, tmp_path):
    """`make bench` times `dsr.sample`'s generation path against a bare Euler-with-CFG loop: a like-for-like
    comparison only if both compute the same images from the same noise."""
    from benchmarks.overhead import bare_sampling_batch, dsr_sampling_batch, sampling_module

    _, run_dir = run_train([*TINY_RUN, "trainer.max_steps=3"])
    module = sampling_module(str(perturb_checkpoint(run_dir / "checkpoints" / "last.ckpt", scale=0.3)))
    bare_sampling_batch(module, 1, tmp_path)
    dsr_sampling_batch(module, 1, tmp_path)
    with np.load(tmp_path / "batch_1.npz") as bare, np.load(tmp_path / "shard_1.npz") as dsr:
        np.testing.assert_array_equal(bare["labels"], dsr["labels"])
        assert bare["images"].shape == dsr["images"].shape == (8, 16, 16, 3)
        difference = np.abs(bare["images"].astype(int) - dsr["images"].astype(int))
        assert difference.max() <= 1 and bare["images"].std() > 1  # rounding of float32 sums at most; not blank
