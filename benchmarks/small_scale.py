"""The small-scale study (`make study`): the paper's two register claims tested on one CPU.

Every run is a `python -m dsr.<command> experiment=small_scale_<...>` (the real entry points), so a GPU user runs
the same study larger by adding overrides (`--extra backbone=dit_s data.image_size=32 trainer.max_steps=20000`):

    python -m benchmarks.small_scale [--study diffusion encoder] [--seeds 0 1 2] [--data digits shapes]
                                     [--extra KEY=VALUE ...]

- diffusion: a pixel-space DiT per dataset with registers none / 4 / 16 (joining at block 1, dropped before the
  final layer) x seeds, equal step budgets. Read back: the proxy FD and conditional accuracy curves (callbacks.fid
  with evaluation.features=proxy), the outlier statistics of every block over training (callbacks.outlier_monitor:
  max/median patch-token norm, registers excluded) and, for the first seed, over noise levels t (`dsr.analyze
  analyze.target=dit`: max/median, the share of tokens above k x median, the top tokens' positions).
- encoder: a small SigLIP with a planted outlier neuron (`dsr.registers.planted`), the same with test-time
  registers at that neuron, and its clean twin; each gets its own statistics (`dsr.stats`) and decoder (stage 1),
  then a DiT on the digits per seed (stage 2), scored on its decoded samples. Read back besides the curves: the
  encoder's outlier tokens and the decoder's reconstructions of held-out digits.

Runs live under outputs/small_scale/ and resume; the results JSON, plots and tables land in experiments/small_scale/.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "small_scale"
RUNS = ROOT / "outputs" / "small_scale"
VARIANTS = {"none": 0, "registers_4": 4, "registers_16": 16}
TIMES = [0.1, 0.3, 0.5, 0.7, 0.9]
KAPPA = "fraction_above_3x_median"

# The encoder side: (encoder option, encoder-side registers) per variant.
ENCODER_VARIANTS = {
    "planted": ("planted", "none"),
    "planted_ttr": ("planted", "ttr"),
    "clean": ("planted_clean", "none"),
}
# The study's SigLIP: the tiny encoder's width at 16 px, with a third block so the planted middle block has one after
# it; and its planted neuron: a tenth of the patches become outliers of about 10x the median patch norm.
STUDY_SIGLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=16,
                    patch_size=4)  # fmt: skip
PLANTED = dict(layer=1, neuron=7, share=0.1, strength=10.0)


def train(data: str, variant: str, seed: int, extra: list[str], runs: Path) -> tuple[Path, float]:
    name = f"{data}-{variant}-s{seed}"
    count = VARIANTS[variant]
    command = [sys.executable, "-m", "dsr.train", f"experiment=small_scale_{data}",
               f"registers={'none' if count == 0 else 'diffusion'}", f"backbone.num_registers={count}", f"seed={seed}",
               f"name={name}", f"paths.output_root={runs}", "trainer.enable_progress_bar=false", *extra]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return runs / name, time.perf_counter() - started


def analyze_over_t(run_dir: Path) -> dict:
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    out = run_dir / "analysis_over_t"
    if not (out / f"t{TIMES[-1]:.2f}" / "stats.json").is_file():
        times = "[" + ",".join(f"{t:g}" for t in TIMES) + "]"
        subprocess.run([sys.executable, "-m", "dsr.analyze", "analyze.target=dit", f"analyze.ckpt={ckpt}",
                        f"analyze.times={times}", "analyze.num_images=64", "analyze.num_workers=0",
                        f"analyze.output={out}", "accelerator=cpu"],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)  # fmt: skip
    over_t = {}
    for t in TIMES:
        layers = json.loads((out / f"t{t:.2f}" / "stats.json").read_text())["layers"]
        over_t[f"{t:g}"] = [
            {"layer": r["layer"], "max_median": r["max_median_ratio"], "share_above_3x_median": r.get(KAPPA),
             "top_tokens": [(tok["row"], tok["col"]) for tok in r.get("top_tokens", [])[:4]]}
            for r in layers
        ]  # fmt: skip
    return over_t


def read_metrics(run_dir: Path) -> dict:
    rows = list(csv.DictReader(open(run_dir / "logs" / "metrics.csv")))
    curves = {"step": [], "fd": [], "conditional_accuracy": [], "precision": [], "recall": []}
    for r in rows:
        if r.get("proxy/fd"):
            curves["step"].append(int(r["step"]) + 1)
            for key in ("fd", "conditional_accuracy", "precision", "recall"):
                curves[key].append(float(r[f"proxy/{key}"]) if r.get(f"proxy/{key}") else None)
    layers = sorted({k.split("/")[1] for r in rows for k in r if k.startswith("outliers/layer_") and r[k]})
    outliers = {"step": [], **{layer: [] for layer in layers}}
    for r in rows:
        if any(r.get(f"outliers/{layer}/max_median") for layer in layers):
            outliers["step"].append(int(r["step"]) + 1)
            for layer in layers:
                outliers[layer].append(float(r[f"outliers/{layer}/max_median"]))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    return {"curves": curves, "outliers": outliers, "final_loss": losses[-1] if losses else None}


def artifacts() -> Path:
    """paths.artifacts as the commands resolve it (they run in the repository root)."""
    return ROOT / os.environ.get("DSR_ARTIFACTS", "artifacts")


def _digits(split: str, count: int | None = None):
    import torch

    from dsr.data.digits import Digits

    data = Digits(split, image_size=STUDY_SIGLIP["image_size"])
    items = [data[i] for i in range(len(data) if count is None else count)]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def _latent_outliers(model, pixels, neurons: dict | None) -> dict:
    """Outlier statistics of the encoder's last residual stream (patch tokens, test-time registers excluded)."""
    from dsr.analysis.outliers import max_median_ratio, relative_fraction_above
    from dsr.registers.hooks import capture_residual_stream
    from dsr.registers.ttr import TestTimeRegisters

    with TestTimeRegisters(model, neurons or {}, num_registers=1):  # without neurons: a no-op
        last = capture_residual_stream(model, pixels, layers=[-1])[0]
    ratio = max_median_ratio(last)
    return {"max_median": float(ratio.mean()), "max_median_max": float(ratio.max()),
            "share_above_3x_median": float(relative_fraction_above(last, 3.0).mean())}  # fmt: skip


def build_encoders(folder: Path) -> dict:
    """The planted SigLIP and its clean twin as Hugging Face directories (what encoder=planted / planted_clean
    load), the planted neuron's list (encoder.ttr_neurons) and each variant's outlier statistics on held-out digits."""
    report = folder / "encoders.json"
    if report.is_file():
        return json.loads(report.read_text())
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from dsr.registers.neurons import RegisterNeuronSet
    from dsr.registers.planted import plant_outlier_neuron, silence_neuron

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SiglipVisionModel(SiglipVisionConfig(**STUDY_SIGLIP, vision_use_head=False)).eval()
    as_pixels = lambda images: (images - 0.5) / 0.5  # noqa: E731  (SigLIP's normalisation)
    calibration, heldout = as_pixels(_digits("train", 512)[0]), as_pixels(_digits("heldout")[0])
    before = _latent_outliers(model, heldout, None)
    neuron = plant_outlier_neuron(model, calibration, **PLANTED)
    neurons = {neuron.layer: [neuron.neuron]}
    model.save_pretrained(folder / "planted")
    RegisterNeuronSet([neuron], {"planted": PLANTED}).save(folder / "planted" / "register_neurons.json")
    outliers = {"random_init": before, "planted": _latent_outliers(model, heldout, None),
                "planted_ttr": _latent_outliers(model, heldout, neurons)}  # fmt: skip
    silence_neuron(model, neuron.layer, neuron.neuron)
    model.save_pretrained(folder / "clean")
    outliers["clean"] = _latent_outliers(model, heldout, None)
    summary = {"siglip": STUDY_SIGLIP, "planted": PLANTED, "last_block_outliers": outliers}
    report.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def reconstruction(variant: str, extra: list[str]) -> dict:
    """The variant's decoder on held-out digits: pixel MSE and the proxy classifier's accuracy on the
    reconstructions (1.00 on the originals)."""
    import hydra
    import torch

    from dsr.config import compose
    from dsr.data.digits import Digits
    from dsr.metrics.proxy import accuracy, proxy_for
    from dsr.utils.images import to_uint8

    encoder, registers = ENCODER_VARIANTS[variant]
    cfg = compose("train", ["experiment=small_scale_encoder", f"encoder={encoder}", f"registers={registers}", *extra],
                  run_dir=RUNS / "compose")  # fmt: skip
    codec = hydra.utils.instantiate(cfg.encoder).eval()
    images, labels = _digits("heldout")
    with torch.no_grad():
        decoded = codec.decode(codec.encode(images)).clamp(0, 1)
    net = proxy_for(Digits("train", image_size=STUDY_SIGLIP["image_size"]), cfg.evaluation.proxy_dir).network.net
    as_uint8 = lambda x: torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2)  # noqa: E731
    return {"mse": float(((decoded - images) ** 2).mean()), "proxy_accuracy": accuracy(net, as_uint8(decoded), labels)}


def train_encoder_variant(variant: str, seeds: list[int], extra: list[str], runs: Path) -> list[dict]:
    """Statistics, decoder and one DiT per seed for one (encoder, registers) pair; their results."""
    encoder, registers = ENCODER_VARIANTS[variant]
    common = [f"encoder={encoder}", f"registers={registers}", *extra]
    quiet = dict(check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dsr.stats", "experiment=small_scale_encoder", *common], **quiet)
    subprocess.run([sys.executable, "-m", "dsr.train", "experiment=small_scale_encoder_decoder", *common,
                    f"name=encoder-{variant}-decoder", f"paths.output_root={runs}",
                    "trainer.enable_progress_bar=false"], **quiet)  # fmt: skip
    stage1 = time.perf_counter() - started
    decoded = reconstruction(variant, extra)
    results = []
    for seed in seeds:
        name = f"encoder-{variant}-s{seed}"
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dsr.train", "experiment=small_scale_encoder", *common, f"seed={seed}",
                        f"name={name}", f"paths.output_root={runs}", "trainer.enable_progress_bar=false"],
                       **quiet)  # fmt: skip
        result = {"study": "encoder", "variant": variant, "seed": seed, "seconds": time.perf_counter() - started,
                  "stage1_seconds": stage1, "reconstruction": decoded, **read_metrics(runs / name)}  # fmt: skip
        fd, acc = result["curves"]["fd"][-1], result["curves"]["conditional_accuracy"][-1]
        print(f"encoder {variant} seed {seed}: FD {fd:.3f}, conditional accuracy {acc:.3f} "
              f"({result['seconds']:.0f} s)", flush=True)  # fmt: skip
        results.append(result)
    return results


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(results: list[dict]) -> list[dict]:
    table = []
    for data in dict.fromkeys(r["data"] for r in results):
        for variant in VARIANTS:
            runs = [r for r in results if r["data"] == data and r["variant"] == variant]
            if not runs:
                continue
            row = {"data": data, "variant": variant, "seeds": len(runs)}
            row["fd"] = mean_std([r["curves"]["fd"][-1] for r in runs])
            row["conditional_accuracy"] = mean_std([r["curves"]["conditional_accuracy"][-1] for r in runs])
            row["recall"] = mean_std([r["curves"]["recall"][-1] for r in runs])
            peaks = [max(v[-1] for k, v in r["outliers"].items() if k != "step") for r in runs]
            row["peak_max_median"] = mean_std(peaks)
            row["seconds"] = mean_std([r["seconds"] for r in runs])
            table.append(row)
    return table


def markdown(table: list[dict]) -> str:
    lines = ["| data | registers | proxy FD | conditional accuracy | recall | peak block max/median | s / run |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for row in table:
        cells = [f"{row[k][0]:.3f} ± {row[k][1]:.3f}" for k in ("fd", "conditional_accuracy", "recall")]
        cells.append(f"{row['peak_max_median'][0]:.2f} ± {row['peak_max_median'][1]:.2f}")
        cells.append(f"{row['seconds'][0]:.0f}")
        lines.append(f"| {row['data']} | {row['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize_encoder(results: list[dict], encoders: dict) -> list[dict]:
    table = []
    for variant in ENCODER_VARIANTS:
        runs = [r for r in results if r["variant"] == variant]
        if not runs:
            continue
        row = {"variant": variant, "seeds": len(runs), "encoder_outliers": encoders["last_block_outliers"][variant],
               "reconstruction": runs[0]["reconstruction"], "stage1_seconds": runs[0]["stage1_seconds"]}  # fmt: skip
        for key in ("fd", "conditional_accuracy", "recall"):
            row[key] = mean_std([r["curves"][key][-1] for r in runs])
        row["peak_max_median"] = mean_std([max(v[-1] for k, v in r["outliers"].items() if k != "step") for r in runs])
        row["seconds"] = mean_std([r["seconds"] for r in runs])
        table.append(row)
    return table


def markdown_encoder(table: list[dict]) -> str:
    lines = ["| encoder | latent max/median | share > 3x median | reconstruction MSE | proxy accuracy of "
             "reconstructions | proxy FD | conditional accuracy | recall | DiT peak block max/median | s / DiT run |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for row in table:
        outliers, decoded = row["encoder_outliers"], row["reconstruction"]
        cells = [f"{outliers['max_median']:.1f}", f"{outliers['share_above_3x_median']:.3f}",
                 f"{decoded['mse']:.4f}", f"{decoded['proxy_accuracy']:.3f}"]  # fmt: skip
        cells += [f"{row[k][0]:.3f} ± {row[k][1]:.3f}" for k in ("fd", "conditional_accuracy", "recall")]
        cells.append(f"{row['peak_max_median'][0]:.2f} ± {row['peak_max_median'][1]:.2f}")
        cells.append(f"{row['seconds'][0]:.0f}")
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_encoder(results: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"planted": "tab:red", "planted_ttr": "tab:blue", "clean": "tab:grey"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for variant, colour in colours.items():
        for i, r in enumerate(r for r in results if r["variant"] == variant):
            label = variant if i == 0 else None
            axes[0].plot(r["curves"]["step"], r["curves"]["fd"], color=colour, alpha=0.7, label=label)
            axes[1].plot(r["curves"]["step"], r["curves"]["conditional_accuracy"], color=colour, alpha=0.7, label=label)
    for ax, title in zip(axes, ["proxy FD of decoded samples (lower is better)", "conditional accuracy"], strict=True):
        ax.set_title(f"digits, encoder side: {title}", fontsize=9)
        ax.set_xlabel("DiT step")
        ax.legend()
    axes[0].set_yscale("log")
    fig.tight_layout()
    path = out / "encoder_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot(results: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    colours = {"none": "tab:grey", "registers_4": "tab:blue", "registers_16": "tab:orange"}
    datasets = list(dict.fromkeys(r["data"] for r in results))
    fig, axes = plt.subplots(len(datasets), 3, figsize=(15, 4 * len(datasets)), squeeze=False)
    for row, data in enumerate(datasets):
        for variant, colour in colours.items():
            runs = [r for r in results if r["data"] == data and r["variant"] == variant]
            for i, r in enumerate(runs):
                label = variant if i == 0 else None
                axes[row, 0].plot(r["curves"]["step"], r["curves"]["fd"], color=colour, alpha=0.7, label=label)
                axes[row, 1].plot(r["curves"]["step"], r["curves"]["conditional_accuracy"], color=colour, alpha=0.7,
                                  label=label)  # fmt: skip
                steps = r["outliers"]["step"]
                peak = [max(r["outliers"][k][j] for k in r["outliers"] if k != "step") for j in range(len(steps))]
                axes[row, 2].plot(steps, peak, color=colour, alpha=0.7, label=label)
        for col, title in enumerate(["proxy FD (lower is better)", "conditional accuracy", "peak block max/median"]):
            axes[row, col].set_title(f"{data}: {title}")
            axes[row, col].set_xlabel("step")
            axes[row, col].legend()
    fig.tight_layout()
    paths.append(out / "learning_curves.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    over_t = [r for r in results if r.get("over_t")]
    if over_t:
        fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
        for col, data in enumerate(datasets):
            for r in (r for r in over_t if r["data"] == data):
                for t, layers in r["over_t"].items():
                    axes[0, col].plot([x["layer"] for x in layers], [x["max_median"] for x in layers],
                                      color=colours[r["variant"]], alpha=0.3 + 0.7 * float(t),
                                      label=f"{r['variant']} t={t}")  # fmt: skip
            axes[0, col].set_title(f"{data}: max/median per block (seed {over_t[0]['seed']}, darker = noisier)")
            axes[0, col].set_xlabel("block")
            axes[0, col].legend(fontsize=6, ncol=3)
        fig.tight_layout()
        paths.append(out / "outliers_over_t.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def run_diffusion_study(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    results = []
    plan = [(d, v, s) for d in args.data for s in args.seeds for v in VARIANTS]
    for i, (data, variant, seed) in enumerate(plan):
        run_dir, seconds = train(data, variant, seed, args.extra, args.runs)
        result = {"data": data, "variant": variant, "seed": seed, "seconds": seconds, **read_metrics(run_dir)}
        if seed == args.seeds[0]:
            result["over_t"] = analyze_over_t(run_dir)
        results.append(result)
        fd, acc = result["curves"]["fd"][-1], result["curves"]["conditional_accuracy"][-1]
        print(f"[{i + 1}/{len(plan)}] {data} {variant} seed {seed}: FD {fd:.3f}, conditional accuracy {acc:.3f} "
              f"({seconds:.0f} s)", flush=True)  # fmt: skip
    table = summarize(results)
    (args.out / "table.md").write_text(markdown(table) + "\n")
    for path in plot(results, args.out):
        print(f"plot: {path}")
    print(markdown(table))
    return {"wall_seconds": time.perf_counter() - started, "table": table, "runs": results}


def run_encoder_study(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    encoders = build_encoders(artifacts() / "small_scale_encoders")
    results = []
    for variant in ENCODER_VARIANTS:
        results += train_encoder_variant(variant, args.seeds, args.extra, args.runs)
    table = summarize_encoder(results, encoders)
    (args.out / "encoder_table.md").write_text(markdown_encoder(table) + "\n")
    print(f"plot: {plot_encoder(results, args.out)}")
    print(markdown_encoder(table))
    return {"wall_seconds": time.perf_counter() - started, "encoders": encoders, "table": table, "runs": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", nargs="+", choices=["diffusion", "encoder"], default=["diffusion", "encoder"])
    parser.add_argument("--data", nargs="+", default=["digits", "shapes"], help="datasets of the diffusion study")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every run")
    parser.add_argument("--runs", type=Path, default=RUNS, help="where the runs live (they resume)")
    parser.add_argument("--out", type=Path, default=OUT, help="where results, plots and the table go")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.chdir(ROOT)  # the commands resolve paths.artifacts and outputs from here
    started = time.perf_counter()
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if "runs" in results:  # written before the encoder study existed: the diffusion study's alone
        results = {"diffusion": results}
    for study in args.study:
        results[study] = (run_diffusion_study if study == "diffusion" else run_encoder_study)(args)
        results[study]["extra"] = args.extra
        results_path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wall time: {(time.perf_counter() - started) / 60:.1f} min; results: {results_path}")


if __name__ == "__main__":
    main()
