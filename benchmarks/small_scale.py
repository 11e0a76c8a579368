"""The small-scale study (`make study`): what diffusion registers do to a pixel-space DiT on one CPU.

Every run is `python -m dsr.train experiment=small_scale_<data> ...` (the real entry point), so a GPU user runs the
same study larger by adding overrides (`--extra backbone=dit_s data.image_size=32 trainer.max_steps=20000`):

    python -m benchmarks.small_scale [--seeds 0 1 2] [--data digits shapes] [--extra KEY=VALUE ...]

For each dataset, registers none / 4 / 16 (joining at block 1, dropped before the final layer) x seeds, equal step
budgets. Read back: the proxy FD and conditional accuracy curves (callbacks.fid with evaluation.features=proxy), the
outlier statistics of every block over training (callbacks.outlier_monitor: max/median patch-token norm, registers
excluded) and, for the first seed, over noise levels t (`dsr.analyze analyze.target=dit`: max/median, the share of
tokens above k x median, the top tokens' positions). Runs live under outputs/small_scale/ and resume; the results
JSON, plots and the table land in experiments/small_scale/.
"""

from __future__ import annotations

import argparse
import csv
import json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["digits", "shapes"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every run")
    parser.add_argument("--runs", type=Path, default=RUNS, help="where the runs live (they resume)")
    parser.add_argument("--out", type=Path, default=OUT, help="where results, plots and the table go")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
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
    wall = time.perf_counter() - started
    (out / "results.json").write_text(
        json.dumps({"wall_seconds": wall, "extra": args.extra, "table": table, "runs": results}, indent=1) + "\n"
    )
    (out / "table.md").write_text(markdown(table) + "\n")
    for path in plot(results, out):
        print(f"plot: {path}")
    print(markdown(table))
    print(f"wall time: {wall / 60:.1f} min; results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
