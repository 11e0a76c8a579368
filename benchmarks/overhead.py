"""The trainer against a bare loop, side by side (`make bench`): how much of a step dsr's machinery costs.

Training: steady-state seconds per optimizer step of `python -m dsr.train` (the module, trainer, callbacks and logger
a real run uses, with the datamodule's loader) against a bare PyTorch loop over the same composed model, data, loss,
AdamW and EMA (what RAE's and JiT's training scripts do: draw noise and t, loss, backward, step, one foreach EMA
update, the loss read back every `log_every_n_steps`). Sampling: steady-state seconds per batch of `python -m
dsr.sample` (per-index noise, the sampler with CFG, decoding, a shard on disk per batch) against a bare Euler loop
with CFG over the same checkpoint that decodes and writes each batch too; and, on one module in one process,
alternating, the training function `python -m dsr.train` runs (`dsr.train.train`) against the same bare loop, and
`dsr.sample`'s generation path (`generate_shard`) against the bare sampling loop batch by batch, which separates the
loops' own cost from the differences between processes.

Every measurement runs in a fresh process, a few seconds after the previous one ended, trainer and bare loop in
pairs (`--pairs`) whose order alternates, so a busy machine slows both sides of a pair alike. A training step's time
is the time between the ends of two optimizer steps, averaged over the steps after `--warmup` (the trainer's from
`benchmarks.step_timer.StepTimer`); a sampling batch's is the difference between the generation loops of runs of `n`
and `n + k` batches (dsr.sample logs its loop's time), which leaves out the first batch's warm-up as the bare loop
does. The ratio is bare time / dsr time, the trainer's throughput as a share of the bare loop's: 1 means no
overhead. Results: benchmarks/results/overhead-cpu.json.

    python -m benchmarks.overhead [--models quickstart dit_s dit_xl_cut] [--pairs 3] [--in-process-pairs 4]
                                  [--no-sampling]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# CPU-sized models on the quickstart's data (32 px synthetic shapes, 4x4 pixel patches: 8x8 tokens of 48 channels),
# each with 8 diffusion registers. The micro-batch makes one step a few tenths of a second on 2 cores.
MODELS: dict[str, list[str]] = {
    "quickstart": [],  # dit_tiny: 96 wide, 4 blocks, batch 32 (the `make train` model)
    "dit_s": ["backbone=dit_s", "backbone.hidden_size=384", "backbone.depth=12", "backbone.num_heads=6",
              "backbone.register_start=4", "data.global_batch_size=8"],
    "dit_xl_cut": ["backbone=dit_xl", "backbone.hidden_size=1152", "backbone.depth=2", "backbone.num_heads=16",
                   "backbone.register_start=1", "data.global_batch_size=4"],
}  # fmt: skip
BASE = ["experiment=quickstart", "callbacks.fid.every_n_steps=0", "resume=false"]
SAMPLING = {"batch_size": 8, "num_steps": 25, "scale": 1.5}
# runs of n and n + k batches per model: k batches of several seconds in all, so start-up noise stays small
SAMPLING_BATCHES = {"quickstart": (2, 14), "dit_s": (1, 4), "dit_xl_cut": (1, 4)}
STEPS = {"quickstart": 120, "dit_s": 30, "dit_xl_cut": 30}  # measured steps: a window of 10-15 s each
SETTLE_S = 5.0


def seconds_per_step(times: list[float], warmup: int) -> float:
    """Mean time between the ends of consecutive steps after `warmup` steps."""
    window = times[warmup:]
    return (window[-1] - window[0]) / (len(window) - 1)


# -------------------------------------------------------------------------------------------------------
# training
# -------------------------------------------------------------------------------------------------------


def dsr_training(model: str, warmup: int, steps: int, out: Path) -> tuple[float, float]:
    """Seconds per step of `python -m dsr.train` (a fresh process) and seconds from its launch to the end of its
    first step; leaves its run (and last.ckpt) under `out`."""
    times = out / "times.json"
    overrides = [*BASE, *MODELS[model], f"trainer.max_steps={warmup + steps + 1}", f"paths.output_root={out}",
                 "name=run", "+callbacks.step_timer._target_=benchmarks.step_timer.StepTimer",
                 f"+callbacks.step_timer.path={times}"]  # fmt: skip
    launch = time.time()
    subprocess.run([sys.executable, "-m", "dsr.train", *overrides], cwd=ROOT, check=True, capture_output=True)
    record = json.loads(times.read_text())
    return seconds_per_step(record["times"][: warmup + steps], warmup), record["first_step_wall"] - launch


def bare_training(model: str, warmup: int, steps: int) -> float:
    """Seconds per step of a bare loop over the composed model, data, loss, AdamW and EMA (run in this process)."""
    import torch

    from dsr.config import build, compose

    cfg = compose("train", [*BASE, *MODELS[model]])
    torch.manual_seed(cfg.seed)
    datamodule, module = build(cfg.data), build(cfg.module)
    datamodule.configure_batches(1)
    backbone, encoder, transport = module.backbone, module.encoder, module.transport
    ema = [t for t in module.ema.module.parameters()]
    params = list(backbone.parameters())
    optimizer = module.optimizer_factory(params)
    decay, log_every = float(cfg.module.ema_decay), int(cfg.trainer.log_every_n_steps)
    backbone.train()
    times, running, step = [], torch.zeros(()), 0
    while step < warmup + steps:
        for x, y in datamodule.train_dataloader():
            with torch.no_grad():
                z = encoder.encode(x)
            noise = torch.randn_like(z)
            t = transport.sample_time(len(y), z.shape[1:])
            y = backbone.y_embedder.drop_labels(y, torch.rand(len(y)))
            loss = transport.training_loss(backbone, z, y, noise=noise, t=t).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
            running += loss.detach()
            step += 1
            if step % log_every == 0:
                running.item(), running.zero_()  # the loss read back on the logging cadence
            times.append(time.perf_counter())
            if step == warmup + steps:
                break
    return seconds_per_step(times, warmup)


# -------------------------------------------------------------------------------------------------------
# sampling
# -------------------------------------------------------------------------------------------------------


def dsr_sampling(ckpt: Path, batches: int, out: Path) -> float:
    """Seconds of the generation loop of a fresh `python -m dsr.sample` run of `batches` batches (its own log line:
    per-index noise, sampling, decoding and writing each shard; start-up and the final gather left out)."""
    size = SAMPLING["batch_size"]
    overrides = [f"ckpt={ckpt}", f"num_samples={batches * size}", f"batch_size={size}", f"shard_size={size}",
                 f"sampler.solver.num_steps={SAMPLING['num_steps']}", f"sampler.guidance.scale={SAMPLING['scale']}",
                 f"output={out}", "accelerator=cpu", "devices=1"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "dsr.sample", *overrides], cwd=ROOT, check=True, capture_output=True,
                          text=True)  # fmt: skip
    found = re.search(r"sampling: \d+ images in ([\d.]+) s", done.stdout + done.stderr)
    if found is None:
        raise RuntimeError(f"dsr.sample printed no timing line:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return float(found.group(1))


def sampling_module(ckpt: str) -> Any:
    """The checkpoint's DiTModule with the sampler `dsr.sample` builds from the same settings (25-point Euler, CFG)."""
    from hydra.utils import instantiate

    from dsr.config import compose
    from dsr.lightning.dit_module import DiTModule

    cfg = compose("sample", [f"ckpt={ckpt}", f"sampler.solver.num_steps={SAMPLING['num_steps']}",
                             f"sampler.guidance.scale={SAMPLING['scale']}"])  # fmt: skip
    module = DiTModule.from_checkpoint(ckpt, map_location="cpu").eval()
    sampler = cfg.sampler
    module.use_sampler(
        instantiate(sampler.solver), instantiate(sampler.guidance), str(sampler.precision), sampler.shift
    )
    return module


def bare_sampling_batch(module: Any, b: int, out: Path) -> None:
    """Batch `b` of a bare Euler loop with CFG (one pass on the doubled batch), decoded and written as an npz. Its
    noise and labels are `dsr.sample`'s (per-index generators), so both loops make the same images."""
    import numpy as np
    import torch

    from dsr.diffusion.generation import noise_for
    from dsr.diffusion.samplers import time_grid

    model, transport = module.ema.module, module.transport
    size, scale = SAMPLING["batch_size"], SAMPLING["scale"]
    grid = time_grid(SAMPLING["num_steps"], transport.shift_for(module.latent_shape), transport.sample_t_end)
    grid = grid.float().tolist()
    indices = np.arange(b * size, (b + 1) * size)
    with torch.no_grad():
        x = noise_for(indices, module.latent_shape, seed=0) * transport.noise_scale
        y = torch.from_numpy(indices) % model.null_class
        y2 = torch.cat([y, torch.full_like(y, model.null_class)])
        for t, t_next in zip(grid[:-1], grid[1:], strict=True):
            x2, t2 = torch.cat([x, x]), torch.full((2 * size,), t)
            v_cond, v_null = transport.velocity(model(x2, t2, y2), x2, t2).chunk(2)
            x = x + (t_next - t) * (v_null + scale * (v_cond - v_null))
        images = (module.encoder.decode(x).clamp(0, 1) * 255).round().to(torch.uint8)
    np.savez(out / f"batch_{b}.npz", images=images.permute(0, 2, 3, 1).numpy(), labels=y.numpy())


def dsr_sampling_batch(module: Any, b: int, out: Path) -> None:
    """Batch `b` through `dsr.sample`'s generation path (`generate_shard`: per-index noise, the configured sampler
    and guidance, decoding, uint8), written as an npz."""
    import numpy as np

    from dsr.diffusion.generation import generate_shard

    size = SAMPLING["batch_size"]
    indices = np.arange(b * size, (b + 1) * size)
    images, labels = generate_shard(module, indices, num_classes=int(module.ema.module.null_class), seed=0,
                                    batch_size=size)  # fmt: skip
    np.savez(out / f"shard_{b}.npz", images=images, labels=labels)


def bare_sampling(ckpt: str, batches: int, out: str) -> float:
    """Seconds per batch of the bare loop after one warm-up batch (run in this process)."""
    module = sampling_module(ckpt)
    times = []
    for b in range(batches + 1):
        bare_sampling_batch(module, b, Path(out))
        times.append(time.perf_counter())
    return (times[-1] - times[0]) / batches


def compare_sampling_in_process(model: str, ckpt: Path, pairs: int, scratch: Path) -> dict:
    """Seconds per batch of `dsr_sampling_batch` and `bare_sampling_batch` on one module in one process, alternating
    (after a warm-up batch of each): what separates the two generation loops without the noise between processes."""
    module = sampling_module(str(ckpt))
    out = scratch / f"in-process-{model}"
    out.mkdir(parents=True, exist_ok=True)
    sides = {"dsr": dsr_sampling_batch, "bare": bare_sampling_batch}
    seconds: dict[str, list[float]] = {"dsr": [], "bare": []}
    for side in sides.values():
        side(module, 0, out)
    for pair in range(pairs):
        for name in ("dsr", "bare") if pair % 2 == 0 else ("bare", "dsr"):
            start = time.perf_counter()
            sides[name](module, pair + 1, out)
            seconds[name].append(time.perf_counter() - start)
        print(f"  {model} sampling in one process, pair {pair}: generate_shard {seconds['dsr'][-1]:.2f} s/batch, "
              f"bare {seconds['bare'][-1]:.2f} s/batch", flush=True)  # fmt: skip
    ratios = [b / d for b, d in zip(seconds["bare"], seconds["dsr"], strict=True)]
    return {"model": model, **SAMPLING, "dsr_s_per_batch": spread(seconds["dsr"]),
            "bare_s_per_batch": spread(seconds["bare"]), "ratio": spread(ratios)}  # fmt: skip


# -------------------------------------------------------------------------------------------------------
# the side-by-side runs
# -------------------------------------------------------------------------------------------------------


def bare_in_subprocess(kind: str, *args: str) -> float:
    """Run a bare loop in a fresh process (as the dsr side runs) and return its seconds."""
    command = [sys.executable, "-m", "benchmarks.overhead", "--bare", kind, *args]
    done = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def settle() -> None:
    """Pause between measured processes: the memory of the one that just ended is still being reclaimed, which slowed
    whichever process came next (before this, the side measured second was the slower one in most pairs)."""
    time.sleep(SETTLE_S)


def compare_training(model: str, pairs: int, warmup: int, steps: int, scratch: Path) -> tuple[dict, Path]:
    dsr_s, bare_s, first_step = [], [], []
    for pair in range(pairs):
        out = scratch / f"{model}-{pair}"

        def dsr_side(out=out) -> None:
            settle()
            seconds, start_up = dsr_training(model, warmup, steps, out)
            dsr_s.append(seconds)
            first_step.append(start_up)

        def bare_side() -> None:
            settle()
            bare_s.append(bare_in_subprocess("train", model, str(warmup), str(steps)))

        for side in (dsr_side, bare_side) if pair % 2 == 0 else (bare_side, dsr_side):  # alternate which goes first
            side()
        print(f"  {model} pair {pair}: dsr.train {dsr_s[-1] * 1e3:.1f} ms/step, bare {bare_s[-1] * 1e3:.1f} ms/step",
              flush=True)  # fmt: skip
    ratios = [b / d for b, d in zip(bare_s, dsr_s, strict=True)]
    row = {"model": model, "overrides": MODELS[model], "warmup": warmup, "steps": steps,
           "dsr_s_per_step": spread(dsr_s), "bare_s_per_step": spread(bare_s), "ratio": spread(ratios),
           "dsr_launch_to_first_step_s": spread(first_step)}  # fmt: skip
    return row, scratch / f"{model}-0" / "run" / "checkpoints" / "last.ckpt"


def compare_training_in_process(model: str, pairs: int, warmup: int, steps: int, scratch: Path) -> dict:
    """Seconds per step of the real training function (`dsr.train.train`, what `python -m dsr.train` calls after
    composing) and of `bare_training`, alternating in this one process: the same comparison without the differences
    between processes, which on this machine move a ratio by up to 15%."""
    from dsr.config import compose
    from dsr.train import train

    dsr_s, bare_s = [], []
    for pair in range(pairs):
        out = scratch / f"in-process-{model}-{pair}"

        def dsr_side(out=out) -> None:
            times = out / "times.json"
            overrides = [*BASE, *MODELS[model], f"trainer.max_steps={warmup + steps + 1}",
                         "+callbacks.step_timer._target_=benchmarks.step_timer.StepTimer",
                         f"+callbacks.step_timer.path={times}"]  # fmt: skip
            train(compose("train", overrides, run_dir=out / "run"))
            dsr_s.append(seconds_per_step(json.loads(times.read_text())["times"][: warmup + steps], warmup))

        def bare_side() -> None:
            bare_s.append(bare_training(model, warmup, steps))

        for side in (dsr_side, bare_side) if pair % 2 == 0 else (bare_side, dsr_side):
            side()
        print(f"  {model} training in one process, pair {pair}: dsr.train {dsr_s[-1] * 1e3:.1f} ms/step, "
              f"bare {bare_s[-1] * 1e3:.1f} ms/step", flush=True)  # fmt: skip
    ratios = [b / d for b, d in zip(bare_s, dsr_s, strict=True)]
    return {"model": model, "warmup": warmup, "steps": steps, "dsr_s_per_step": spread(dsr_s),
            "bare_s_per_step": spread(bare_s), "ratio": spread(ratios)}  # fmt: skip


def compare_sampling(model: str, ckpt: Path, pairs: int, scratch: Path) -> dict:
    few, many = SAMPLING_BATCHES[model]
    dsr_s, bare_s = [], []
    for pair in range(pairs):

        def dsr_side(pair=pair) -> None:
            runs = []
            for n in (few, many):
                settle()
                runs.append(dsr_sampling(ckpt, n, scratch / f"sample-{model}-{pair}-{n}"))
            dsr_s.append((runs[1] - runs[0]) / (many - few))

        def bare_side(pair=pair) -> None:
            folder = scratch / f"bare-{model}-{pair}"
            folder.mkdir(parents=True, exist_ok=True)
            settle()
            bare_s.append(bare_in_subprocess("sample", str(ckpt), str(many - few), str(folder)))

        for side in (dsr_side, bare_side) if pair % 2 == 0 else (bare_side, dsr_side):
            side()
        print(f"  {model} sampling pair {pair}: dsr.sample {dsr_s[-1]:.2f} s/batch, bare {bare_s[-1]:.2f} s/batch",
              flush=True)  # fmt: skip
    ratios = [b / d for b, d in zip(bare_s, dsr_s, strict=True)]
    return {"model": model, **SAMPLING, "batches": [few, many], "dsr_s_per_batch": spread(dsr_s),
            "bare_s_per_batch": spread(bare_s), "ratio": spread(ratios)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default: STEPS, per model)")
    parser.add_argument("--no-sampling", action="store_true")
    parser.add_argument(
        "--in-process-pairs", type=int, default=4, help="pairs of the one-process comparisons (0: none)"
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "overhead-cpu.json"))
    parser.add_argument("--bare", nargs="+", help=argparse.SUPPRESS)  # one bare measurement, in a fresh process
    args = parser.parse_args()
    if args.bare:
        kind, *rest = args.bare
        seconds = (
            bare_training(rest[0], int(rest[1]), int(rest[2]))
            if kind == "train"
            else bare_sampling(rest[0], int(rest[1]), rest[2])
        )
        print(seconds)
        return

    os.environ.setdefault("WANDB_MODE", "offline")
    results = {"training": [], "training_in_process": [], "sampling": [], "sampling_in_process": []}
    with tempfile.TemporaryDirectory(prefix="dsr-overhead-") as scratch:
        for model in args.models:
            steps = args.steps or STEPS[model]
            row, ckpt = compare_training(model, args.pairs, args.warmup, steps, Path(scratch))
            results["training"].append(row)
            if args.in_process_pairs:
                results["training_in_process"].append(
                    compare_training_in_process(model, args.in_process_pairs, args.warmup, steps, Path(scratch))
                )
            if not args.no_sampling:
                results["sampling"].append(compare_sampling(model, ckpt, args.pairs, Path(scratch)))
                if args.in_process_pairs:
                    results["sampling_in_process"].append(
                        compare_sampling_in_process(model, ckpt, args.in_process_pairs, Path(scratch))
                    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\n{'model':12} {'what':19} {'dsr':>12} {'bare':>12} {'ratio median [min, max]':>26}")
    rows = (("training", "ms/step", "s_per_step"), ("training_in_process", "ms/step", "s_per_step"),
            ("sampling", "s/batch", "s_per_batch"), ("sampling_in_process", "s/batch", "s_per_batch"))  # fmt: skip
    for kind, unit, key in rows:
        for row in results[kind]:
            factor = 1e3 if kind.startswith("training") else 1.0
            ratio = row["ratio"]
            print(
                f"{row['model']:12} {kind:19} {row['dsr_' + key]['median'] * factor:8.1f} {unit[:2]:>3} "
                f"{row['bare_' + key]['median'] * factor:8.1f} {unit[:2]:>3} "
                f"{ratio['median']:10.3f} [{ratio['min']:.3f}, {ratio['max']:.3f}]"
            )
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
