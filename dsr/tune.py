"""Sweep the choices made after training (guidance scale, interval, EMA, solver) and pick the best one.

    python -m dsr.tune ckpt=<path> sampler.guidance.scale=1.0:3.0:0.1 ema=0.9999,0.9996 num_samples=8000

Axes: `ema`, and any setting under `sampler` given as several values: a list `[1.0,1.5]`, a comma list `1.0,1.5`,
Hydra's `range(1.0,3.0,0.5)` (stop excluded) or `start:stop:step` (stop included when it lies on the grid). The grid
is their product, swept in the order given (the first axis slowest). The sampler group itself can be set as for
`dsr.sample` (`sampler=heun`, `sampler/guidance=autoguidance sampler.guidance.guide_ckpt=...`).

Each point generates `num_samples` class-balanced images with per-index seeds (image i has the same label and initial
noise at every point, so points differ only in the swept setting), batch by batch, streamed straight into features
(no images are written) and scored against the reference, whose features are computed once and cached by content:
FID, Inception Score, precision and recall (`features=inception`), or FD, conditional accuracy, precision and recall in
the proxy classifier of the training data (`features=proxy`, the built-in datasets).

Writes to `output` (default `<run dir>/tune/<ckpt stem>-<sampler>-n<num_samples>-seed<seed>`):
- `points.jsonl`: one line per finished point, rewritten atomically after each; a killed sweep run again with the same
  command skips the finished points (`settings.json` records the rest: other settings in the same `output` are
  refused; a grid extended along the same axes reuses its points),
- `table.csv`, `table.json`: one row per point, the axes, the scores, velocity evaluations per sample and seconds,
- `<fid|fd>_vs_<axis>.png` (one line per value of the other axes, e.g. per EMA) and `precision_recall.png`,
and prints the best point (lowest FID / FD) with the `dsr.sample` command of the 50K run. With `wandb=<project>` the
table and plots are logged to a W&B run.
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import logging
import math
import re
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm.auto import tqdm

from dsr.config import build, check_positive_ints, entry_point, required_file, resolved_config
from dsr.utils.files import atomic_write, guard_settings, run_dir_of

if TYPE_CHECKING:
    import torch

# torch, Lightning and the models are imported where the run needs them, so `--help` answers without them.

log = logging.getLogger("dsr.tune")

FEATURES = ("inception", "proxy")
POINTS = "points.jsonl"
_RANGE = re.compile(r"^\s*(-?[\d.eE+-]+)\s*:\s*(-?[\d.eE+-]+)\s*:\s*([\d.eE+-]+)\s*$")


# -------------------------------------------------------------------------------------------------------
# the grid
# -------------------------------------------------------------------------------------------------------


def axis_values(value: Any) -> list | None:
    """The values of a swept setting (a list, or a "start:stop:step" string), or None for a single value."""
    if isinstance(value, ListConfig | list | tuple):
        values = list(OmegaConf.to_container(value) if isinstance(value, ListConfig) else value)
        if not values:
            raise ValueError("an axis needs at least one value")
        return values
    if isinstance(value, str):
        match = _RANGE.match(value)
        if match:
            start, stop, step = (float(g) for g in match.groups())
            if step <= 0 or stop < start:
                raise ValueError(f"{value!r}: a range start:stop:step needs step > 0 and stop >= start")
            count = math.floor((stop - start) / step + 1e-9) + 1
            return [round(start + i * step, 10) for i in range(count)]
    return None


def grid_axes(cfg: DictConfig) -> dict[str, list]:
    """{setting: values} of every swept setting: `ema` and the leaves of `sampler` that hold several values."""
    axes = {}
    ema = axis_values(cfg.ema)
    if ema is not None:
        axes["ema"] = ema

    def walk(node: DictConfig, prefix: str) -> None:
        for key in node:
            if OmegaConf.is_missing(node, key):
                continue
            value, path = node[key], f"{prefix}.{key}"
            if isinstance(value, DictConfig):
                walk(value, path)
                continue
            values = axis_values(value)
            if values is not None:
                axes[path] = values

    walk(cfg.sampler, "sampler")
    return axes


def grid_points(axes: dict[str, list]) -> list[dict[str, Any]]:
    """The product of the axes, the first axis slowest: [{setting: value}, ...] ([{}] without axes)."""
    keys = list(axes)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(axes[k] for k in keys))]


def point_config(cfg: DictConfig, point: dict[str, Any]) -> DictConfig:
    """`cfg` with the point's values in place of the axes."""
    out = copy.deepcopy(cfg)
    for key, value in point.items():
        OmegaConf.update(out, key, value, merge=False)
    return out


def point_label(point: dict[str, Any]) -> str:
    return ", ".join(f"{k.removeprefix('sampler.')}={v}" for k, v in point.items()) or "(one point)"


def sweeps_as_lists(argv: Sequence[str]) -> list[str]:
    """Command-line sweeps (`ema=0.9999,0.9996`, `x=range(1,3,0.5)`) as the lists this command sweeps itself
    (`ema=[0.9999,0.9996]`), since Hydra would otherwise read them as a multirun."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(arg.startswith("-") for arg in argv):
        return list(argv)
    parser, out = OverridesParser.create(), []
    for arg in argv:
        try:
            override = parser.parse_override(arg)
        except Exception:  # noqa: BLE001 (Hydra reports it when it parses the same line)
            out.append(arg)
            continue
        if override.is_sweep_override() and not override.is_hydra_override():
            values = ",".join(override.sweep_string_iterator())
            out.append(f"{override.get_key_element()}=[{values}]")
        else:
            out.append(arg)
    return out


# -------------------------------------------------------------------------------------------------------
# scoring a point
# -------------------------------------------------------------------------------------------------------


def feature_network(cfg: DictConfig, module: Any) -> tuple[Any, str]:
    """The feature network and the reference of `features`; the training data's proxy for features=proxy."""
    from dsr.metrics.inception import InceptionFeatures, resolve_inception_weights
    from dsr.metrics.proxy import proxy_for

    if cfg.features not in FEATURES:
        raise ValueError(f"features={cfg.features!r}: choose one of {FEATURES}")
    if cfg.features == "proxy":
        data = (
            cfg.data.dataset
            if cfg.get("data") is not None
            else (module.run_config or {}).get("data", {}).get("dataset")
        )
        if data is None:
            raise ValueError("features=proxy needs the data the model imitates: add data=digits or data=synthetic")
        proxy = proxy_for(build(OmegaConf.create(data)) if isinstance(data, dict) else build(data), cfg.proxy_dir)
        return proxy.network, str(proxy.reference)
    if cfg.reference is None:
        raise ValueError("reference is not set: reference=<ADM reference batch, image folder or statistics .npz>")
    if not Path(str(cfg.reference)).exists():
        raise FileNotFoundError(f"reference={cfg.reference} not found")
    return InceptionFeatures(resolve_inception_weights(cfg.inception_weights)), str(cfg.reference)


def score_point(
    module: Any,
    network: Any,
    reference: Any,
    reference_features: torch.Tensor | None,
    *,
    num_samples: int,
    num_classes: int,
    seed: int,
    batch_size: int,
    ema: Any,
    precision_recall: bool,
    desc: str = "",
) -> dict:
    """Generate the point's samples batch by batch into features and score them; returns the scores and the mean
    velocity evaluations per sample."""
    import torch

    from dsr.diffusion.generation import generate_shard
    from dsr.metrics.evaluation import feature_scores

    features, logits, labels, nfe = [], [], [], []
    bar = tqdm(total=num_samples, unit="img", desc=desc, disable=not sys.stderr.isatty(), leave=False)
    for start in range(0, num_samples, batch_size):
        indices = np.arange(start, min(start + batch_size, num_samples))
        images, batch_labels = generate_shard(
            module, indices, num_classes=num_classes, seed=seed, batch_size=batch_size, ema=ema
        )
        nfe.append(module.solver.last_nfe)
        f, logit = network.extract(images, batch_size=batch_size, device=module.device)
        features.append(f)
        logits.append(logit)
        labels.append(torch.from_numpy(batch_labels))
        bar.update(len(indices))
    bar.close()
    scores = feature_scores(torch.cat(features), torch.cat(logits), torch.cat(labels), network, reference,
                            reference_features, precision_recall)  # fmt: skip
    return {**scores, "nfe": float(np.mean(nfe))}


# -------------------------------------------------------------------------------------------------------
# files
# -------------------------------------------------------------------------------------------------------


def read_points(out_dir: Path) -> list[dict]:
    path = out_dir / POINTS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_points(out_dir: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    atomic_write(out_dir / POINTS, lambda f: f.write(text.encode()))


def table_rows(points: list[dict[str, Any]], rows: list[dict]) -> list[dict]:
    """The finished rows in grid order, flat: the axes, then the scores."""
    by_point = {json.dumps(r["point"], sort_keys=True): r for r in rows}
    table = []
    for point in points:
        row = by_point.get(json.dumps(point, sort_keys=True))
        if row is not None:
            table.append({**point, **row["scores"], "seconds": row["seconds"]})
    return table


def write_table(out_dir: Path, table: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in table for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    atomic_write(out_dir / "table.csv", lambda f: f.write(buffer.getvalue().encode()))
    atomic_write(out_dir / "table.json", lambda f: f.write((json.dumps(table, indent=2) + "\n").encode()))


def write_plots(out_dir: Path, axes: dict[str, list], table: list[dict], distance: str, best: dict) -> list[Path]:
    """The metric against the first numeric axis (other than `ema` when there is another), one line per value of the
    other axes; precision against recall when measured."""
    from dsr.analysis.figures import plot_precision_recall, plot_sweep

    numeric = [k for k, v in axes.items() if len(v) > 1 and all(isinstance(x, int | float) for x in v)]
    x_axis = next((k for k in numeric if k != "ema"), numeric[0] if numeric else None)
    paths = []
    if x_axis is not None:
        others = [k for k in axes if k != x_axis]
        series: dict[str, tuple[list, list]] = {}
        for row in table:
            label = ", ".join(f"{k.removeprefix('sampler.')}={row[k]}" for k in others) or distance
            xs, ys = series.setdefault(label, ([], []))
            xs.append(row[x_axis])
            ys.append(row[distance])
        name = x_axis.removeprefix("sampler.").replace(".", "_")
        path = out_dir / f"{distance}_vs_{name}.png"
        title = f"{distance.upper()} against {x_axis}"
        best_xy = (best[x_axis], best[distance])
        paths.append(plot_sweep(series, path, xlabel=x_axis, ylabel=distance.upper(), best=best_xy, title=title))
    measured = [r for r in table if r.get("precision") is not None and r.get("recall") is not None]
    if measured:
        points = {point_label({k: r[k] for k in axes}): (r["recall"], r["precision"]) for r in measured}
        paths.append(plot_precision_recall(points, out_dir / "precision_recall.png", title="precision against recall"))
    return paths


def sample_command(ckpt: Path, best: dict[str, Any], fixed: Sequence[str]) -> str:
    """The dsr.sample command of the 50K run at the best point: the user's sampler settings, then the point's."""
    swept = [f"{k}={v}" for k, v in best.items()]
    args = ["python", "-m", "dsr.sample", f"ckpt={ckpt}", *fixed, *swept, "num_samples=50000"]
    return " ".join(shlex.quote(a) for a in args)


# -------------------------------------------------------------------------------------------------------
# the run
# -------------------------------------------------------------------------------------------------------


def validate(cfg: DictConfig) -> Path:
    check_positive_ints(cfg, ("num_samples", "batch_size"))
    return required_file(cfg, "ckpt", "python -m dsr.tune ckpt=<path to a training checkpoint> <axes>")


def fixed_overrides(axes: dict[str, list]) -> list[str]:
    """The command line's sampler settings that are not swept (repeated in the printed dsr.sample command)."""
    if not HydraConfig.initialized():
        return []
    task = HydraConfig.get().overrides.task
    keep = []
    for override in task:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith("sampler") and key not in axes:
            keep.append(override)
    return keep


def run(cfg: DictConfig) -> dict:
    """Score every point of the grid (skipping finished ones), write the table and plots; returns the best row."""
    from dsr.lightning.dit_module import DiTModule
    from dsr.metrics.reference import default_cache_dir, reference_statistics
    from dsr.utils.devices import resolve_device

    ckpt = validate(cfg)
    axes = grid_axes(cfg)
    points = grid_points(axes)
    device = resolve_device(cfg.accelerator)
    module = DiTModule.from_checkpoint(ckpt, map_location="cpu").to(device).eval()
    for point in points:  # an EMA the checkpoint lacks fails before any sampling
        module.sampling_model(str(point.get("ema", cfg.ema)))
    model_classes = int(module.sampling_model(str(points[0].get("ema", cfg.ema))).null_class)
    num_classes = model_classes if cfg.get("num_classes") is None else int(cfg.num_classes)
    network, reference_path = feature_network(cfg, module)
    network = network.to(device)

    sampler = HydraConfig.get().runtime.choices.get("sampler", "sampler") if HydraConfig.initialized() else "sampler"
    out_dir = (
        Path(str(cfg.output)).expanduser().resolve()
        if cfg.get("output")
        else run_dir_of(ckpt) / "tune" / f"{ckpt.stem}-{sampler}-n{cfg.num_samples}-seed{cfg.seed}"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = {
        "ckpt": str(ckpt),
        "num_samples": int(cfg.num_samples),
        "seed": int(cfg.seed),
        "num_classes": num_classes,
        "features": str(cfg.features),
        "reference": reference_path,
        "precision_recall": bool(cfg.precision_recall),
        # The settings every point shares; the axes' values are not (a grid extended later reuses its points).
        "fixed": OmegaConf.to_container(point_config(cfg, dict.fromkeys(axes, "swept")).sampler, resolve=True),
        "ema": "swept" if "ema" in axes else str(cfg.ema),
        "axes": list(axes),
    }
    guard_settings(out_dir, fingerprint, "output")  # points made with other settings are never mixed in

    reference, reference_features = reference_statistics(
        reference_path, network, Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(),
        batch_size=cfg.batch_size, device=device, need_features=bool(cfg.precision_recall),
    )  # fmt: skip
    rows = read_points(out_dir)
    done = {json.dumps(r["point"], sort_keys=True) for r in rows}
    log.info("%d point(s) of %d sample(s) -> %s (%d already done)", len(points), cfg.num_samples, out_dir,
             sum(json.dumps(p, sort_keys=True) in done for p in points))  # fmt: skip
    guide = None
    for k, point in enumerate(points):
        if json.dumps(point, sort_keys=True) in done:
            continue
        config = point_config(cfg, point)
        guidance = instantiate(config.sampler.guidance)
        if guide is not None and getattr(guidance, "guide_ckpt", None) == guide[0]:
            guidance.attach(guide[1])  # the same guide: loaded once for the sweep
        module.use_sampler(instantiate(config.sampler.solver), guidance, str(config.sampler.precision),
                           config.sampler.shift)  # fmt: skip
        if getattr(guidance, "guide", None) is not None:
            guide = (guidance.guide_ckpt, guidance.guide)
        started = time.perf_counter()
        scores = score_point(
            module, network, reference, reference_features, num_samples=int(cfg.num_samples),
            num_classes=num_classes, seed=int(cfg.seed), batch_size=int(cfg.batch_size), ema=str(config.ema),
            precision_recall=bool(cfg.precision_recall), desc=f"point {k + 1}/{len(points)}",
        )  # fmt: skip
        rows.append({"point": point, "scores": scores, "seconds": round(time.perf_counter() - started, 2)})
        write_points(out_dir, rows)
        log.info("point %d/%d %s: %s %.4f", k + 1, len(points), point_label(point), network.distance,
                 scores[network.distance])  # fmt: skip

    table = table_rows(points, rows)
    write_table(out_dir, table)
    distance = network.distance
    best = min(table, key=lambda r: r[distance])
    plots = write_plots(out_dir, axes, table, distance, best)
    best_point = {k: best[k] for k in axes}
    command = sample_command(ckpt, best_point, fixed_overrides(axes))
    summary = {"best": best_point, distance: best[distance], "command": command}
    atomic_write(out_dir / "best.json", lambda f: f.write((json.dumps(summary, indent=2) + "\n").encode()))
    if cfg.get("wandb"):
        log_to_wandb(str(cfg.wandb), out_dir, table, plots, resolved_config(cfg))
    print(f"best: {point_label(best_point)} ({distance} {best[distance]:.4f}); table: {out_dir / 'table.csv'}")
    print(command, flush=True)
    return best


def log_to_wandb(project: str, out_dir: Path, table: list[dict], plots: list[Path], config: dict) -> None:
    """The table and plots as one W&B run of `project` (offline with WANDB_MODE=offline)."""
    import wandb

    run = wandb.init(project=project, dir=str(out_dir), config=config, job_type="tune", name=out_dir.name)
    columns = list(dict.fromkeys(k for row in table for k in row))
    run.log({
        "tune/table": wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in table]),
        **{f"tune/{p.stem}": wandb.Image(str(p)) for p in plots},
    })  # fmt: skip
    run.finish()


@entry_point("tune")
def _tune(cfg: DictConfig) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run(cfg)


def main() -> dict:
    sys.argv[1:] = sweeps_as_lists(sys.argv[1:])  # before Hydra reads a comma list as a multirun
    return _tune()


if __name__ == "__main__":
    main()
