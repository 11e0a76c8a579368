"""Benchmarks (`make bench`): model size and FLOPs of every backbone config and of a diffusers DiT-XL/2 with added
registers, training / sampling throughput, and encoder throughput (tiny encoders, and random-init encoders of the
real sizes) on this machine. Results go to benchmarks/results/<device>.json and are printed as tables.

    python -m benchmarks.run [--backbones dit_tiny dit_s] [--batch 64] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from torch.utils.flop_counter import FlopCounterMode

from dsr.config import compose
from dsr.diffusion.guidance import ClassifierFreeGuidance
from dsr.diffusion.samplers import ODESampler
from dsr.diffusion.transport import Transport
from dsr.encoders.dinov2 import DINOv2
from dsr.encoders.siglip2 import SigLIP2
from dsr.models.profile import register_overhead

ROOT = Path(__file__).resolve().parents[1]
RAE_LATENT = (768, 16, 16)  # SigLIP2-B / DINOv2-B latents at 256 px


def backbone_factory(name: str, num_registers: int = 36):
    cfg = compose("train", [f"backbone={name}", f"backbone.num_registers={num_registers}", "data=imagenet"])
    return instantiate(cfg.backbone), cfg


def size_table() -> list[dict]:
    rows = []
    for name in ("dit_s", "dit_b", "dit_l", "dit_xl"):
        factory, _ = backbone_factory(name)
        rows.append({"backbone": name, "latent": list(RAE_LATENT), **register_overhead(factory, RAE_LATENT)})
    return rows


def plugged_registers_overhead(num_registers: int = 36, start: int = 8) -> dict:
    """Parameters and forward GFLOPs of a diffusers DiT-XL/2 at 256 px (32x32x4 latents, learned sigma) with and
    without diffusion registers added by `dsr.registers.plug`, measured on the meta device."""
    from diffusers import DiTTransformer2DModel

    from dsr.registers.plug import add_diffusion_registers

    with torch.device("meta"):
        model = DiTTransformer2DModel(out_channels=8)  # the DiT-XL/2 defaults
        x, t, y = torch.zeros(1, 4, 32, 32), torch.zeros(1), torch.zeros(1, dtype=torch.long)

    def measure() -> tuple[float, float]:
        with FlopCounterMode(display=False) as counter:
            model(x, timestep=t, class_labels=y)
        return sum(p.numel() for p in model.parameters()) / 1e6, counter.get_total_flops() / 1e9

    params, gflops = measure()
    add_diffusion_registers(model, num_registers, start)
    params_reg, gflops_reg = measure()
    return {
        "model": "diffusers DiTTransformer2DModel (DiT-XL/2, 256 px)", "num_registers": num_registers, "start": start,
        "params_M_without_registers": params, "params_M_with_registers": params_reg,
        "gflops_without_registers": gflops, "gflops_with_registers": gflops_reg,
    }  # fmt: skip


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def throughput(
    name: str, latent: tuple[int, int, int], batch: int, steps: int, device: torch.device, bf16: bool
) -> dict:
    factory, _ = backbone_factory(name)
    torch.manual_seed(0)
    model = factory(in_channels=latent[0], input_size=latent[1:], num_classes=1000).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    transport = Transport(prediction="x")
    x = torch.randn(batch, *latent, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def train_step():
        with autocast:
            loss = transport.training_loss(model, x, y).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train_s = timed(train_step, steps, device)
    solver = ODESampler("euler", num_steps=51)
    guidance = ClassifierFreeGuidance(scale=1.5)

    @torch.no_grad()
    def sample():
        with autocast:
            fn = guidance.velocity_fn(model, y, model.null_class, transport)
            solver.integrate(fn, torch.randn_like(x), transport.shift_for(latent), t_end=transport.sample_t_end)

    sample_s = timed(sample, max(1, steps // 10), device)
    return {
        "backbone": name,
        "latent": list(latent),
        "batch": batch,
        "bf16": bf16,
        "train_step_s": train_s,
        "train_img_per_s": batch / train_s,
        "sample_50step_cfg_s": sample_s,
        "sample_img_per_s": batch / sample_s,
    }


def guidance_sampling_speed(
    name: str, latent: tuple[int, int, int], batch: int, device: torch.device, bf16: bool, repeats: int = 3
) -> dict:
    """Seconds of a 50-point Euler sample: unguided, CFG on the whole grid (the doubled batch at every step), CFG
    inside t in [0.1, 1] (the unconditional half skipped on the steps below 0.1), and AutoGuidance with a guide as
    large as the model (one forward of each per step: CFG's cost, without the null labels)."""
    from dsr.diffusion.guidance import AutoGuidance, Guide
    from dsr.diffusion.samplers import time_grid

    factory, _ = backbone_factory(name)
    torch.manual_seed(0)
    model = factory(in_channels=latent[0], input_size=latent[1:], num_classes=1000).to(device).eval()
    guide = factory(in_channels=latent[0], input_size=latent[1:], num_classes=1000).to(device).eval()
    transport = Transport(prediction="x")
    shift = transport.shift_for(latent)
    solver = ODESampler("euler", num_steps=50)
    y = torch.randint(0, 1000, (batch,), device=device)
    noise = torch.randn(batch, *latent, device=device)
    autoguidance = AutoGuidance("-", scale=1.5)
    autoguidance.attach(Guide(guide, transport))
    variants = {
        "unguided": ClassifierFreeGuidance(scale=1.0),
        "cfg_whole_grid": ClassifierFreeGuidance(scale=1.5),
        "cfg_interval_0.1_1": ClassifierFreeGuidance(scale=1.5, t_min=0.1),
        "autoguidance": autoguidance,
    }
    seconds = {}
    for key, guidance in variants.items():

        @torch.no_grad()
        def sample(guidance=guidance):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                fn = guidance.velocity_fn(model, y, model.null_class, transport)
                solver.integrate(fn, noise, shift, t_end=transport.sample_t_end)

        seconds[key] = timed(sample, repeats, device)
    steps = time_grid(50, shift, transport.sample_t_end)[:-1]
    return {
        "backbone": name, "latent": list(latent), "batch": batch, "bf16": bf16, "shift": shift,
        "steps_below_0.1": int((steps < 0.1).sum()), "steps": len(steps),
        "seconds": seconds,
        "speedup_interval_vs_whole_grid": seconds["cfg_whole_grid"] / seconds["cfg_interval_0.1_1"],
    }  # fmt: skip


def nonfinite_guard_cost(
    name: str, latent: tuple[int, int, int], batch: int, steps: int, device: torch.device, bf16: bool
) -> dict:
    """Seconds per training step (fused AdamW) without and with `NonFiniteGuard.check` between the backward and the
    step: the per-block gradient norms and the on-device skip decision."""
    from dsr.lightning.training import NonFiniteGuard

    factory, _ = backbone_factory(name)
    torch.manual_seed(0)
    model = factory(in_channels=latent[0], input_size=latent[1:], num_classes=1000).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    guard = NonFiniteGuard(list(model.named_parameters()), device)
    transport = Transport(prediction="x")
    x = torch.randn(batch, *latent, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step(guarded: bool):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = transport.training_loss(model, x, y).loss
        loss.backward()
        if guarded:
            guard.check(optimizer, loss.detach(), ~torch.isfinite(loss.detach()), 0, 0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    plain = timed(lambda: step(False), steps, device)
    guarded = timed(lambda: step(True), steps, device)
    return {"backbone": name, "latent": list(latent), "batch": batch, "step_s": plain, "guarded_step_s": guarded,
            "overhead_pct": 100 * (guarded / plain - 1)}  # fmt: skip


def saved_activation_bytes(fn, model: torch.nn.Module) -> int:
    """Bytes of the distinct tensors autograd saves for the backward pass while `fn()` runs, `model`'s parameters left
    out (they are held anyway): the activation memory `backbone.grad_checkpointing` trades for recomputation,
    measurable on any device. A checkpointed block's inputs, which the checkpoint keeps itself, are not counted."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def grad_checkpointing_cost(
    name: str, latent: tuple[int, int, int], batch: int, steps: int, device: torch.device
) -> dict:
    """Saved-for-backward memory and step time of a training step without and with `backbone.grad_checkpointing`."""
    rows = {}
    for checkpointed in (False, True):
        cfg = compose("train", [f"backbone={name}", "data=imagenet", f"backbone.grad_checkpointing={checkpointed}"])
        torch.manual_seed(0)
        model = instantiate(cfg.backbone)(in_channels=latent[0], input_size=latent[1:], num_classes=1000).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        transport = Transport(prediction="x")
        x = torch.randn(batch, *latent, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)

        def step(model=model, optimizer=optimizer, transport=transport, x=x, y=y):
            transport.training_loss(model, x, y).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        saved = saved_activation_bytes(lambda model=model, transport=transport, x=x, y=y: transport.training_loss(
            model, x, y).loss, model)  # fmt: skip
        rows["checkpointed" if checkpointed else "plain"] = {"saved_MiB": saved / 2**20,
                                                              "step_s": timed(step, steps, device)}  # fmt: skip
    plain, checkpointed = rows["plain"], rows["checkpointed"]
    return {"backbone": name, "latent": list(latent), "batch": batch, **rows,
            "memory_saved_pct": 100 * (1 - checkpointed["saved_MiB"] / plain["saved_MiB"]),
            "time_cost_pct": 100 * (checkpointed["step_s"] / plain["step_s"] - 1)}  # fmt: skip


def compile_times(name: str, latent: tuple[int, int, int], batch: int, device: torch.device) -> dict:
    """Seconds to the end of the first training step (Inductor's compilation included) with the whole backbone
    compiled and with each block compiled on its own (`compile={regional: true}`), and steady step times."""
    from dsr.utils.devices import compile_backbone

    out = {"backbone": name, "latent": list(latent), "batch": batch}
    for regional in (False, True):
        torch._dynamo.reset()
        cfg = compose("train", [f"backbone={name}", "data=imagenet"])
        torch.manual_seed(0)
        model = instantiate(cfg.backbone)(in_channels=latent[0], input_size=latent[1:], num_classes=1000).to(device)
        compile_backbone(model, {"regional": regional})
        transport = Transport(prediction="x")
        x = torch.randn(batch, *latent, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)
        start = time.perf_counter()
        transport.training_loss(model, x, y).loss.backward()
        key = "regional" if regional else "whole"
        out[f"{key}_first_step_s"] = time.perf_counter() - start
        out[f"{key}_step_s"] = timed(lambda m=model, x=x, y=y, tr=transport: tr.training_loss(m, x, y).loss.backward(),
                                     3, device)  # fmt: skip
    torch._dynamo.reset()
    return out


# Random-init encoders with each family's tiny test config and the released checkpoints' real sizes.
ENCODERS = {
    "tiny siglip": (SigLIP2, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=32, patch_size=4), 32),
    "tiny dinov2_reg": (DINOv2, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=28, patch_size=7, num_register_tokens=4), 28),
    "tiny dinov2": (DINOv2, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=28, patch_size=7), 28),
    "siglip2_b": (SigLIP2, dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                image_size=256, patch_size=16), 256),
    "siglip2_so400m": (SigLIP2, dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                     num_attention_heads=16, image_size=224, patch_size=14), 224),
    "dinov2_b_reg": (DINOv2, dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                  image_size=518, patch_size=14, num_register_tokens=4), 224),
}  # fmt: skip


def encoder_throughput(name: str, batch: int, repeats: int, device: torch.device) -> dict:
    """Images/s of `tokens` (resize, normalise, frozen forward) on 256 px images (32 px for the tiny ones)."""
    family, config, resolution = ENCODERS[name]
    image_size = 32 if name.startswith("tiny") else 256
    codec = family(pretrained=None, config=config, resolution=resolution, image_size=image_size).to(device)
    images = torch.rand(batch, 3, image_size, image_size, device=device)
    seconds = timed(lambda: codec.tokens(images), repeats, device)
    return {
        "encoder": name,
        "latent": list(codec.latent_shape),
        "batch": batch,
        "bf16": codec.precision == "bf16-mixed" and device.type == "cuda",
        "img_per_s": batch / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="*", default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    backbones = args.backbones or (["dit_b", "dit_xl"] if on_gpu else ["dit_tiny"])
    latent = RAE_LATENT if on_gpu else (48, 8, 8)  # CPU: the quickstart's 32x32 pixel latents
    batch = args.batch or (64 if on_gpu else 64)

    results = {
        "device": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "sizes": size_table(),
        "plugged_registers": plugged_registers_overhead(),
        "throughput": [throughput(b, latent, batch, args.steps, device, bf16=on_gpu) for b in backbones],
        "guidance": [guidance_sampling_speed(b, latent, batch, device, bf16=on_gpu) for b in backbones],
        "nonfinite_guard": [nonfinite_guard_cost(b, latent, batch, args.steps, device, on_gpu) for b in backbones],
        "encoders": [
            encoder_throughput(name, 256 if name.startswith("tiny") or on_gpu else 4, 3, device) for name in ENCODERS
        ],
        "grad_checkpointing": grad_checkpointing_cost("dit_xl" if on_gpu else "dit_s", latent, batch // 4 or 1,
                                                      args.steps, device),
        "compile": compile_times("dit_xl" if on_gpu else "dit_s", latent, batch // 8 or 1, device),
    }  # fmt: skip
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{'gpu' if on_gpu else 'cpu'}.json"
    out.write_text(json.dumps(results, indent=2))

    print(f"{'backbone':10} {'params M':>9} {'+reg':>9} {'GFLOPs':>8} {'+reg':>8}")
    for row in results["sizes"]:
        print(
            f"{row['backbone']:10} {row['params_M_without_registers']:9.2f} {row['params_M_with_registers']:9.2f} "
            f"{row['gflops_without_registers']:8.1f} {row['gflops_with_registers']:8.1f}"
        )
    plugged = results["plugged_registers"]
    print(
        f"{plugged['model']} + {plugged['num_registers']} registers from block {plugged['start']}: params "
        f"{plugged['params_M_without_registers']:.2f} -> {plugged['params_M_with_registers']:.2f} M, GFLOPs "
        f"{plugged['gflops_without_registers']:.1f} -> {plugged['gflops_with_registers']:.1f}"
    )
    print(f"\n{'backbone':10} {'latent':>14} {'batch':>6} {'train img/s':>12} {'sample img/s (50 Euler, CFG)':>30}")
    for row in results["throughput"]:
        print(
            f"{row['backbone']:10} {str(tuple(row['latent'])):>14} {row['batch']:6d} {row['train_img_per_s']:12.1f} "
            f"{row['sample_img_per_s']:30.2f}"
        )
    print(f"\n{'backbone':10} {'unguided s':>11} {'CFG s':>8} {'CFG [0.1,1] s':>14} {'AutoGuidance s':>15}")
    for row in results["guidance"]:
        t = row["seconds"]
        print(
            f"{row['backbone']:10} {t['unguided']:11.3f} {t['cfg_whole_grid']:8.3f} {t['cfg_interval_0.1_1']:14.3f} "
            f"{t['autoguidance']:15.3f}  ({row['steps_below_0.1']} of {row['steps']} steps below t = 0.1)"
        )
    for row in results["nonfinite_guard"]:
        print(
            f"{row['backbone']:10} train step {row['step_s'] * 1e3:.1f} ms, with the non-finite guard "
            f"{row['guarded_step_s'] * 1e3:.1f} ms ({row['overhead_pct']:+.1f}%)"
        )
    print(f"\n{'encoder':16} {'latent':>16} {'batch':>6} {'bf16':>5} {'img/s':>9}")
    for row in results["encoders"]:
        print(
            f"{row['encoder']:16} {str(tuple(row['latent'])):>16} {row['batch']:6d} {str(row['bf16']):>5} "
            f"{row['img_per_s']:9.1f}"
        )
    g = results["grad_checkpointing"]
    print(f"\n{g['backbone']} batch {g['batch']}: grad checkpointing saves {g['memory_saved_pct']:.0f}% of the saved "
          f"activations ({g['plain']['saved_MiB']:.0f} -> {g['checkpointed']['saved_MiB']:.0f} MiB) for "
          f"{g['time_cost_pct']:+.0f}% step time")  # fmt: skip
    c = results["compile"]
    print(f"{c['backbone']}: first step {c['whole_first_step_s']:.1f} s compiled whole, "
          f"{c['regional_first_step_s']:.1f} s regionally; then {c['whole_step_s'] * 1e3:.0f} / "
          f"{c['regional_step_s'] * 1e3:.0f} ms per step")  # fmt: skip
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
