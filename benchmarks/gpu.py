"""The prepared GPU check (`make bench-gpu`): one command, about 4 minutes on one H100 / H200, that measures what a
run's cost depends on and writes benchmarks/results/<gpu>.json plus printed tables.

- Training throughput of the XL backbones (DiT-XL and DiT-DH-XL with and without 36 registers at fp32, TF32,
  bf16-mixed and bf16-mixed + regional compile; SiT-XL and JiT-H at bf16-mixed): images/s, achieved TFLOP/s and MFU
  from analytic FLOPs (a training step = 3 forwards) against the nominal dense bf16 peak and a bf16 matmul measured
  here, and the registers' step-time overhead; the compile time.
- Peak memory of DiT-XL (bf16-mixed) at micro-batch 32 / 64 / 128 / 256 and the largest power of two that fits, and
  with `backbone.grad_checkpointing` at 256 (memory saved, time paid); the step with and without the non-finite
  guard.
- 50-step Euler sampling with CFG for DiT-XL at bf16-mixed and fp32 (images/s); encoder throughput in bf16 for
  SigLIP2-B, So400M and DINOv2-B at their real sizes (random init).
- Smoke runs of `python -m dsr.train`: FSDP at world size 1 (a step, a sharded checkpoint, a resumed step), DDP over
  NCCL at world size 1, and training from cached latents.

`--smoke` runs the same code on the CPU with tiny sizes (the test suite does), so the check cannot rot before someone
has a GPU. The GPU machine has torch, Lightning, timm and transformers but not Hydra, OmegaConf or torchdata:
`make gpu-wheels` downloads them into `.whl/` and `make bench-gpu` installs them from there first.

    python -m benchmarks.gpu [--smoke] [--out FILE] [--only train memory sampling encoders smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
NOMINAL_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4}  # dense (no sparsity), SXM; by a name's first match
SECTIONS = ("train", "memory", "sampling", "encoders", "smoke")
LATENT = (768, 16, 16)  # SigLIP2-B / DINOv2-B latents at 256 px: 256 tokens
PIXELS = (3, 256, 256)  # JiT-H/16's input: 256 tokens
TINY = {  # --smoke: every backbone at a width the CPU runs in a fraction of a second
    "dit": ["backbone.hidden_size=64", "backbone.depth=2", "backbone.num_heads=2", "backbone.register_start=1"],
    "dit_dh": ["backbone.hidden_size=64", "backbone.depth=2", "backbone.num_heads=2", "backbone.register_start=1",
               "backbone.head_hidden_size=96", "backbone.head_num_heads=2"],
    "jit": ["backbone.hidden_size=64", "backbone.depth=4", "backbone.num_heads=2", "backbone.register_start=2",
            "backbone.in_context_start=2", "backbone.in_context_len=4", "backbone.bottleneck_dim=16"],
}  # fmt: skip


def family(backbone: str) -> str:
    return "dit_dh" if backbone.startswith("dit_dh") else "jit" if backbone.startswith("jit") else "dit"


class Check:
    """The sizes of one run of the check: the real ones on a GPU, tiny ones with `--smoke`."""

    def __init__(self, smoke: bool) -> None:
        self.smoke = smoke
        self.device = torch.device("cpu" if smoke else "cuda")
        self.latent = (16, 4, 4) if smoke else LATENT
        self.pixels = (3, 32, 32) if smoke else PIXELS
        self.batch = 4 if smoke else 64
        self.warmup, self.steps = (1, 2) if smoke else (3, 8)
        self.memory_batches = (2, 4) if smoke else (32, 64, 128, 256)
        self.sample_batch = {"bf16-mixed": 4, "32-true": 2} if smoke else {"bf16-mixed": 64, "32-true": 16}
        self.sample_steps = 5 if smoke else 50

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn: Callable[[], Any], warmup: int | None = None, steps: int | None = None) -> float:
        """Seconds per call of fn, after warm-up calls, from one synchronised interval."""
        for _ in range(self.warmup if warmup is None else warmup):
            fn()
        self.synchronize()
        start, steps = time.perf_counter(), self.steps if steps is None else steps
        for _ in range(steps):
            fn()
        self.synchronize()
        return (time.perf_counter() - start) / steps


# -------------------------------------------------------------------------------------------------------
# peak
# -------------------------------------------------------------------------------------------------------


def nominal_peak(name: str) -> float | None:
    return next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in name), None)


def matmul_tflops(check: Check) -> float:
    """TFLOP/s of a large bf16 matmul here (8192^3 on a GPU; what MFU is also measured against)."""
    n = 256 if check.smoke else 8192
    dtype = torch.float32 if check.smoke else torch.bfloat16
    a, b = (torch.randn(n, n, device=check.device, dtype=dtype) for _ in range(2))
    seconds = check.timed(lambda: a @ b, warmup=3, steps=10)
    return 2 * n**3 / seconds / 1e12


# -------------------------------------------------------------------------------------------------------
# training
# -------------------------------------------------------------------------------------------------------


def build_backbone(check: Check, name: str, num_registers: int, extra: list[str] = ()) -> tuple[torch.nn.Module, Any]:
    """A backbone from its config (random init) on the check's device, and its factory (for analytic FLOPs)."""
    from hydra.utils import instantiate

    from dsr.config import compose

    overrides = [f"backbone={name}", f"backbone.num_registers={num_registers}", "data=imagenet", *extra]
    if check.smoke:
        overrides += TINY[family(name)]
    cfg = compose("train", overrides)
    factory = instantiate(cfg.backbone)
    shape = check.pixels if family(name) == "jit" else check.latent
    torch.manual_seed(0)
    return factory(in_channels=shape[0], input_size=shape[1:]).to(check.device), factory


PRECISIONS = {  # name -> (matmul_precision, autocast to bf16, compiled)
    "fp32": ("highest", False, False),
    "tf32": ("high", False, False),
    "bf16-mixed": ("high", True, False),
    "bf16-mixed+compile": ("high", True, True),
}


def train_step(check: Check, model: torch.nn.Module, autocast: bool, guard: bool = False) -> Callable[[], None]:
    """One optimizer step as `DiTModule` takes it: flow-matching loss, backward, the guard (optional), fused AdamW,
    the EMA's foreach update."""
    from dsr.diffusion.transport import Transport
    from dsr.lightning.training import EMAs, NonFiniteGuard

    shape = check.pixels if hasattr(model, "in_context_len") else check.latent
    transport = Transport(prediction="x")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    ema = EMAs(model, [0.9999])
    checker = NonFiniteGuard(list(model.named_parameters()), check.device) if guard else None
    x = torch.randn(check.batch, *shape, device=check.device)
    y = torch.randint(0, 1000, (check.batch,), device=check.device)

    def step() -> None:
        with torch.autocast(check.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = transport.training_loss(model, x, y).loss
        loss.backward()
        skip = None
        if checker is not None:
            loss = loss.detach()
            skip, _ = checker.check(optimizer, loss, ~torch.isfinite(loss), 0, 0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model, skip=skip)

    return step


def train_row(check: Check, name: str, num_registers: int, precision: str, peaks: dict) -> dict:
    from dsr.models.profile import analytic_forward_flops
    from dsr.utils.devices import apply_matmul_precision, compile_backbone

    matmul, autocast, compiled = PRECISIONS[precision]
    apply_matmul_precision(matmul)
    model, factory = build_backbone(check, name, num_registers)
    compile_s = None
    step = train_step(check, model, autocast)
    if compiled:
        # The smoke run traces with Dynamo only (no Inductor code generation, which takes minutes on a CPU).
        compile_backbone(model, {"regional": True, **({"backend": "eager"} if check.smoke else {})})
        start = time.perf_counter()
        step()
        check.synchronize()
        compile_s = time.perf_counter() - start
    seconds = check.timed(step)
    shape = check.pixels if family(name) == "jit" else check.latent
    flops = 3 * analytic_forward_flops(factory, shape) * check.batch / seconds
    row = {"backbone": name, "num_registers": num_registers, "precision": precision, "batch": check.batch,
           "step_s": seconds, "img_per_s": check.batch / seconds, "tflops": flops / 1e12,
           "compile_s": compile_s}  # fmt: skip
    for key, peak in peaks.items():
        row[f"mfu_vs_{key}"] = flops / 1e12 / peak if peak else None
    del model, step
    torch._dynamo.reset()
    return row


def training(check: Check, peaks: dict) -> dict:
    rows = []
    for name in ("dit_xl", "dit_dh_xl"):
        for registers in (0, 36):
            for precision in PRECISIONS:
                rows.append(train_row(check, name, registers, precision, peaks))
                print_row("train", rows[-1])
    for name in ("sit_xl", "jit_h"):
        rows.append(train_row(check, name, 0, "bf16-mixed", peaks))
        print_row("train", rows[-1])
    overhead = {}
    for name in ("dit_xl", "dit_dh_xl"):
        for precision in PRECISIONS:
            plain, registers = (next(r["step_s"] for r in rows if (r["backbone"], r["num_registers"], r["precision"])
                                     == (name, n, precision)) for n in (0, 36))  # fmt: skip
            overhead[f"{name} {precision}"] = 100 * (registers / plain - 1)
    return {"rows": rows, "register_step_overhead_pct": overhead}


def peak_memory(check: Check, batch: int, grad_checkpointing: bool = False) -> dict:
    """Peak GPU memory and step time of DiT-XL (bf16-mixed) at one micro-batch; `oom: true` if it does not fit."""
    from dsr.utils.devices import apply_matmul_precision

    apply_matmul_precision("high")
    extra = ["backbone.grad_checkpointing=true"] if grad_checkpointing else []
    saved, check.batch = check.batch, batch
    try:
        model, _ = build_backbone(check, "dit_xl", 0, extra)
        step = train_step(check, model, autocast=True)
        if check.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        seconds = check.timed(step, warmup=1, steps=2)
        peak = torch.cuda.max_memory_allocated() / 2**30 if check.device.type == "cuda" else None
        return {"batch": batch, "grad_checkpointing": grad_checkpointing, "peak_gib": peak, "step_s": seconds,
                "oom": False}  # fmt: skip
    except torch.OutOfMemoryError:
        return {"batch": batch, "grad_checkpointing": grad_checkpointing, "oom": True}
    finally:
        check.batch = saved
        model = step = None
        if check.device.type == "cuda":
            torch.cuda.empty_cache()


def memory(check: Check) -> dict:
    rows = [peak_memory(check, b) for b in check.memory_batches]
    largest = check.memory_batches[-1]
    while not check.smoke and not rows[-1]["oom"] and largest < 8192:  # doubling until it no longer fits
        largest *= 2
        rows.append(peak_memory(check, largest))
    fits = [r["batch"] for r in rows if not r["oom"]]
    checkpointed = peak_memory(check, check.memory_batches[-1], grad_checkpointing=True)
    plain = next(r for r in rows if r["batch"] == check.memory_batches[-1])
    for row in [*rows, checkpointed]:
        print_row("memory", row)
    guard = {}
    for guarded in (False, True):
        model, _ = build_backbone(check, "dit_xl", 0)
        guard["guarded_step_s" if guarded else "step_s"] = check.timed(train_step(check, model, True, guard=guarded))
        del model
    guard["overhead_pct"] = 100 * (guard["guarded_step_s"] / guard["step_s"] - 1)
    saving = None
    if plain.get("peak_gib") and checkpointed.get("peak_gib"):
        saving = {"memory_saved_pct": 100 * (1 - checkpointed["peak_gib"] / plain["peak_gib"]),
                  "time_cost_pct": 100 * (checkpointed["step_s"] / plain["step_s"] - 1)}  # fmt: skip
    return {"rows": rows, "largest_fitting_batch": max(fits) if fits else None, "grad_checkpointing": checkpointed,
            "grad_checkpointing_vs_plain": saving, "nonfinite_guard": guard}  # fmt: skip


# -------------------------------------------------------------------------------------------------------
# sampling and encoders
# -------------------------------------------------------------------------------------------------------


def sampling(check: Check) -> list[dict]:
    """Images/s of 50-point Euler sampling with CFG (scale 1.5, the doubled batch at every step) for DiT-XL."""
    from dsr.diffusion.guidance import ClassifierFreeGuidance
    from dsr.diffusion.samplers import ODESampler, sampling_autocast
    from dsr.diffusion.transport import Transport
    from dsr.utils.devices import apply_matmul_precision

    rows = []
    for precision, batch in check.sample_batch.items():
        apply_matmul_precision("highest" if precision == "32-true" else "high")
        model, _ = build_backbone(check, "dit_xl", 0)
        model.eval()
        transport, solver = Transport(prediction="x"), ODESampler("euler", num_steps=check.sample_steps)
        y = torch.randint(0, 1000, (batch,), device=check.device)
        noise = torch.randn(batch, *check.latent, device=check.device)
        fn = ClassifierFreeGuidance(scale=1.5).velocity_fn(model, y, model.null_class, transport)

        @torch.no_grad()
        def sample(fn=fn, noise=noise, precision=precision, solver=solver, transport=transport) -> None:
            with sampling_autocast(precision, check.device):
                solver.integrate(fn, noise, transport.shift_for(check.latent), t_end=transport.sample_t_end)

        seconds = check.timed(sample, warmup=1, steps=1)
        rows.append({"backbone": "dit_xl", "precision": precision, "batch": batch, "num_steps": check.sample_steps,
                     "seconds": seconds, "img_per_s": batch / seconds})  # fmt: skip
        print_row("sampling", rows[-1])
        del model
    return rows


def encoders(check: Check) -> list[dict]:
    from benchmarks.run import encoder_throughput

    names = ["tiny siglip", "tiny dinov2_reg"] if check.smoke else ["siglip2_b", "siglip2_so400m", "dinov2_b_reg"]
    rows = []
    for name in names:
        rows.append(encoder_throughput(name, 4 if check.smoke else 128, 1 if check.smoke else 5, check.device))
        print_row("encoders", rows[-1])
    return rows


# -------------------------------------------------------------------------------------------------------
# smoke runs of the real entry point
# -------------------------------------------------------------------------------------------------------

TINY_RUN = ["experiment=quickstart_rae", "encoder.stats=null", "encoder.decoder=null", "data.dataset.num_samples=64",
            "data.global_batch_size=8", "data.num_workers=0", "callbacks.sample_grid=null",
            "callbacks.fid.every_n_steps=0", "callbacks.outlier_monitor.every_n_steps=0", "trainer.devices=1",
            "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "logger=csv"]  # fmt: skip


def command(module: str, *overrides: str, cwd: Path) -> tuple[bool, float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", module, *overrides], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
                          timeout=600)  # fmt: skip
    return done.returncode == 0, time.perf_counter() - start, (done.stdout + done.stderr)[-1500:]


def last_step(run_dir: Path) -> int | None:
    """The last step the run logged (its CSV logger's `step` column)."""
    import csv

    steps = [int(row["step"]) for f in run_dir.rglob("metrics.csv") for row in csv.DictReader(f.open()) if row["step"]]
    return max(steps) if steps else None


def smoke_runs(check: Check) -> dict:
    accelerator = "cpu" if check.smoke else "gpu"
    results = {}
    with tempfile.TemporaryDirectory(prefix="dsr-gpu-check-") as scratch:
        root = Path(scratch)
        common = [*TINY_RUN, f"trainer.accelerator={accelerator}", f"paths.output_root={root}"]
        if check.smoke:
            results["fsdp"] = {"ok": None, "skipped": "FSDP needs CUDA devices"}
        else:
            first = command("dsr.train", *common, "name=fsdp", "trainer.strategy=fsdp", "trainer.max_steps=1", cwd=root)
            second = command("dsr.train", *common, "name=fsdp", "trainer.strategy=fsdp", "trainer.max_steps=2",
                             cwd=root)  # fmt: skip
            sharded = (root / "fsdp" / "checkpoints" / "last.ckpt").is_dir()
            failed = None if first[0] and second[0] else second[2] if first[0] else first[2]
            results["fsdp"] = {"ok": first[0] and second[0] and sharded, "sharded_checkpoint": sharded,
                               "steps": last_step(root / "fsdp"), "seconds": first[1] + second[1],
                               "log": failed}  # fmt: skip
        ok, seconds, log = command("dsr.train", *common, "name=ddp", "trainer.strategy=ddp", "trainer.max_steps=2",
                                   cwd=root)  # fmt: skip
        backend = "gloo" if check.smoke else "nccl"
        results["ddp"] = {"ok": ok, "backend": backend, "seconds": seconds, "log": None if ok else log}
        cache = root / "cache"
        cached = command("dsr.cache_latents", "experiment=quickstart_rae", "encoder.stats=null", "encoder.decoder=null",
                         "data.dataset.num_samples=64", f"cache.output={cache}", f"accelerator={accelerator}",
                         "devices=1", cwd=root)  # fmt: skip
        trained = command("dsr.train", *[o for o in common if not o.startswith("data.dataset.")], "name=latents",
                          "data=latents", f"data.dataset.root={cache}", "data.image_size=32", "data.num_classes=8",
                          "trainer.max_steps=2", cwd=root)  # fmt: skip
        ok = cached[0] and trained[0]
        results["cached_latents"] = {"ok": ok, "seconds": cached[1] + trained[1], "steps": last_step(root / "latents"),
                                     "log": None if ok else (trained[2] if cached[0] else cached[2])}  # fmt: skip
    for name, row in results.items():
        status = "ok" if row["ok"] else "skipped" if row["ok"] is None else "FAILED"
        seconds = "" if row.get("seconds") is None else f"  {row['seconds']:.0f} s"
        print(f"smoke     {name:15} {status}{seconds}", flush=True)
    return results


# -------------------------------------------------------------------------------------------------------
# output
# -------------------------------------------------------------------------------------------------------


def print_row(section: str, row: dict) -> None:
    fields = []
    for key, value in row.items():
        if isinstance(value, float):
            fields.append(f"{key}={value:.3g}")
        elif value is not None and not isinstance(value, (list, dict)):
            fields.append(f"{key}={value}")
    print(f"{section:9} " + " ".join(fields), flush=True)


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (the test suite's run)")
    parser.add_argument("--out", default=None, help="the JSON file (default benchmarks/results/<gpu>.json)")
    parser.add_argument("--only", nargs="*", choices=SECTIONS, default=list(SECTIONS))
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu needs a CUDA device; --smoke runs it on the CPU with tiny sizes")
    check, started = Check(args.smoke), time.perf_counter()
    name = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name()
    measured = matmul_tflops(check)
    peaks = {"nominal": None if args.smoke else nominal_peak(name), "measured_matmul": measured}
    results: dict[str, Any] = {"device": name, "torch": torch.__version__, "smoke": args.smoke,
                               "peak_tflops": peaks, "sections_s": {}}  # fmt: skip
    print(f"{name}: torch {torch.__version__}; bf16 matmul {measured:.0f} TFLOP/s here, nominal {peaks['nominal']}")
    runs = {
        "train": lambda: training(check, peaks),
        "memory": lambda: memory(check),
        "sampling": lambda: sampling(check),
        "encoders": lambda: encoders(check),
        "smoke": lambda: smoke_runs(check),
    }
    for section in args.only:
        start = time.perf_counter()
        results[section] = runs[section]()
        results["sections_s"][section] = time.perf_counter() - start
    results["total_s"] = time.perf_counter() - started
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"{device_slug(name)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"done in {results['total_s']:.0f} s; written to {out}")
    return results


if __name__ == "__main__":
    main()
