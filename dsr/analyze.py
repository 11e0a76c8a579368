"""Outlier-token analysis: per-layer token-norm statistics of a frozen ViT encoder or a diffusion transformer,
norm maps, PCA-to-RGB images of patch features, max/median across layers, and register-neuron discovery.

    python -m dsr.analyze encoder=siglip2_b data=imagenet [analyze.num_images=64]         # the plain encoder
    python -m dsr.analyze encoder=siglip2_b registers=ttr                                  # with test-time registers
    python -m dsr.analyze encoder=siglip2_b analyze.discover=true [analyze.rounds=2]       # + register neurons
    python -m dsr.analyze analyze.target=dit analyze.ckpt=outputs/<run>/checkpoints/last.ckpt [analyze.times=[0.5]]

`target=encoder` runs the encoder as configured (with `registers=ttr` its hooks are active) on a seeded subset of
the configured data and writes, under `analyze.output` (default `${paths.latent_dir}/analysis`): `stats.json`
(per-layer records of `dsr.analysis.outliers.layer_statistics`, over patch tokens of the residual stream before
the final norm), `norm_maps/imageXX/norm_layerYY.png`, `pca/pcaXXX.png` (last analysed layer), `max_median.png`
and `norm_histogram.png` (patch norms at `analyze.detect_layer`, to place the discovery threshold). With
`analyze.discover=true` it also finds register neurons on the plain encoder and writes `register_neurons.json`.

`target=dit` loads a training checkpoint (EMA weights by default), encodes images with its own encoder, noises
them at each of `analyze.times` (t = 0 data, t = 1 noise; fixed seeded noise, the images' labels) and does the same
per time for every block's output (diffusion-register tokens excluded), under `<run dir>/analysis/<checkpoint>/tX.XX`
plus a `max_median.png` with one line per time.

The measurements, statistics and figures live in `dsr.analysis`; this module is the command.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from dsr.config import build, entry_point

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

# torch, the encoders and the figures are imported where the analysis needs them, so `--help` answers without them.
log = logging.getLogger("dsr.analyze")


def _loader(data: DictConfig, num_images: int | None, batch_size: int, num_workers: int, seed: int) -> DataLoader:
    """A seeded subset of `num_images` of the dataset (all with None), random flips off, in a fixed order."""
    from torch.utils.data import DataLoader, Subset

    from dsr.data.views import subset_indices, without_flip

    dataset = build(without_flip(data.dataset))
    indices = subset_indices(len(dataset), num_images, seed)
    return DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers)


def yields_latents(loader: DataLoader) -> bool:
    """Whether the loader's dataset is a latent cache (see `ImageDataModule.yields_latents`)."""
    return getattr(loader.dataset.dataset, "yields_latents", False)


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _first_round(value: Any) -> Any:
    """A discovery setting's value for the first round (settings may hold one value per round)."""
    return value[0] if isinstance(value, list) else value


def analyze_encoder(cfg: DictConfig) -> Path:
    """`analyze.target=encoder`: statistics and figures of the configured encoder, and optionally discovery."""
    from dsr.analysis.capture import build_encoder, discover_neurons, encoder_statistics, layer_indices, vit_of
    from dsr.analysis.report import save_report, summary
    from dsr.registers.hooks import ViTAdapter
    from dsr.registers.neurons import NoOutliersError
    from dsr.utils.devices import resolve_device

    a = cfg.analyze
    device = resolve_device(cfg.accelerator)
    codec = build_encoder(cfg.encoder).to(device)
    model = vit_of(codec)
    num_layers = ViTAdapter.from_model(model).num_layers
    layers = layer_indices(_plain(a.layers), num_layers)
    detect = layer_indices([_first_round(_plain(a.detect_layer))], num_layers, "analyze.detect_layer")[0]
    if detect not in layers:
        layers = sorted({*layers, detect})  # the histogram at the detection layer guides the threshold
    latent_dir = Path(cfg.paths.latent_dir)
    out_dir = Path(a.output) if a.output else latent_dir / "analysis"
    registers = getattr(codec, "registers", "none")
    label = latent_dir.name

    loader = _loader(cfg.data, a.num_images, a.batch_size, a.num_workers, a.seed)
    if yields_latents(loader):
        raise ValueError(
            "the data yields cached latents, not images; the encoder analysis needs images: "
            "set data=<an image dataset> (e.g. data=imagenet or data=synthetic)"
        )
    log.info("outlier statistics of %s (registers=%s) over %d images on %s", label, registers,
             len(loader.dataset), device)  # fmt: skip
    stats = encoder_statistics(codec, loader, layers=layers, tau=a.tau, top_k=a.top_k_tokens, keep=a.num_maps)
    metadata = {
        "target": "encoder",
        "encoder": _plain(cfg.encoder.get("pretrained")) or cfg.encoder._target_,
        "registers": registers,
        "model_id": ViTAdapter.from_model(model).model_id(),
        "num_images": stats.num_images,
        "seed": a.seed,
        "data": _plain(cfg.data.dataset.get("_target_")),
        "tau": a.tau,
    }
    paths = save_report(stats, out_dir, label=label, metadata=metadata, num_maps=a.num_maps,
                        histogram_layer=detect, threshold=_first_round(_plain(a.threshold)) if a.discover else None,
                        title=f"{label}: patch-token norm max / median")  # fmt: skip
    print(summary(stats.records()), flush=True)
    print(f"outlier statistics: {paths['stats']}\nfigures:            {out_dir}", flush=True)

    if a.discover:
        count = a.discover_num_images or a.num_images
        batches = _loader(cfg.data, count, a.batch_size, a.num_workers, a.seed)
        try:
            found = discover_neurons(
                codec, batches, rounds=a.rounds, threshold=_plain(a.threshold), detect_layer=_plain(a.detect_layer),
                top_k=_plain(a.top_k), layer_range=_plain(a.layer_range), sparsity_filter=a.sparsity_filter,
                num_registers=int(cfg.encoder.get("num_test_time_registers", 1) or 1),
            )  # fmt: skip
        except NoOutliersError as err:
            norms = stats.norms(detect)
            raise NoOutliersError(
                f"{err}. Set analyze.threshold below the outliers' norms: at layer {detect} the patch norms have "
                f"median {norms.median():.1f}, 99th percentile {norms.flatten().quantile(0.99):.1f} and maximum "
                f"{norms.max():.1f} (histogram: {paths.get('histogram')})"
            ) from None
        found.metadata.update(encoder=metadata["encoder"], num_images=len(batches.dataset), seed=a.seed)
        neurons_path = found.save(out_dir / "register_neurons.json").resolve()
        option = "ttr" if a.rounds == 1 else "recursive_ttr"
        top = ", ".join(f"({n.layer}, {n.neuron})" for n in found[:5])
        print(
            f"register neurons (layer, neuron), best first: {top}{' ...' if len(found) > 5 else ''}\n"
            f"register neurons: {neurons_path}\n"
            f"use them with:    registers={option} encoder.{option}_neurons={neurons_path}",
            flush=True,
        )
    return out_dir


def analyze_dit(cfg: DictConfig) -> Path:
    """`analyze.target=dit`: statistics and figures of a checkpoint's DiT blocks at each of `analyze.times`."""
    import torch
    from tqdm.auto import tqdm

    from dsr.analysis.capture import backbone_blocks, dit_statistics, layer_indices
    from dsr.analysis.figures import plot_max_median_ratio
    from dsr.analysis.report import save_report, summary
    from dsr.lightning.dit_module import DiTModule
    from dsr.utils.devices import resolve_device
    from dsr.utils.files import load_tensors, run_dir_of

    a = cfg.analyze
    if not a.ckpt:
        raise ValueError(
            "analyze.target=dit needs analyze.ckpt=<a dsr.train checkpoint, e.g. outputs/<run>/checkpoints/last.ckpt>"
        )
    ckpt = Path(a.ckpt).expanduser()
    if not ckpt.is_file():
        raise FileNotFoundError(f"analyze.ckpt={a.ckpt} does not exist")
    times = [float(t) for t in (_plain(a.times) if isinstance(_plain(a.times), list) else [a.times])]
    for t in times:
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"analyze.times={times}: every t must lie in [0, 1] (t = 0 data, t = 1 noise)")
    if a.data_source not in ("checkpoint", "config"):
        raise ValueError(f"analyze.data_source={a.data_source!r}: choose checkpoint or config")
    device = resolve_device(cfg.accelerator)
    module = DiTModule.from_checkpoint(ckpt).to(device).eval()
    backbone = module.ema.module if a.use_ema else module.backbone
    layers = layer_indices(_plain(a.layers), len(backbone_blocks(backbone)))
    out_dir = Path(a.output) if a.output else run_dir_of(ckpt) / "analysis" / ckpt.stem

    data = OmegaConf.create(module.run_config["data"]) if a.data_source == "checkpoint" else cfg.data
    loader = _loader(data, a.num_images, a.batch_size, a.num_workers, a.seed)
    module.yields_latents = yields_latents(loader)
    latents, labels = [], []
    for x, y in tqdm(loader, desc="encoding", unit="batch"):
        z, y = module.latents((x.to(device), y.to(device)))
        latents.append(z.cpu())
        labels.append(y.cpu())
    latents, labels = torch.cat(latents), torch.cat(labels)
    generator = torch.Generator().manual_seed(int(a.seed))
    noise = torch.randn(latents.shape, generator=generator)  # the same noise at every t: times are comparable

    checkpoint_step = load_tensors(ckpt, "analyze.ckpt").get("global_step")
    series = {}
    for t in times:
        stats = dit_statistics(backbone, latents, labels, noise, t, batch_size=a.batch_size, layers=layers,
                               tau=a.tau, top_k=a.top_k_tokens, keep=a.num_maps)  # fmt: skip
        metadata = {
            "target": "dit",
            "ckpt": str(ckpt),
            "global_step": checkpoint_step,
            "use_ema": bool(a.use_ema),
            "t": t,
            "num_images": stats.num_images,
            "seed": a.seed,
            "num_registers": int(getattr(backbone, "num_registers", 0) or 0),
            "register_start": int(getattr(backbone, "register_start", 0) or 0),
            "in_context_len": int(getattr(backbone, "in_context_len", 0) or 0),  # JiT's class tokens
            "in_context_start": int(getattr(backbone, "in_context_start", 0) or 0),
            "tau": a.tau,
        }
        paths = save_report(stats, out_dir / f"t{t:.2f}", label=f"t={t:g}", metadata=metadata,
                            num_maps=a.num_maps, title=f"{ckpt.stem}, t={t:g}")  # fmt: skip
        series[f"t={t:g}"] = stats.max_median()
        print(f"t={t:g}\n{summary(stats.records())}\noutlier statistics: {paths['stats']}", flush=True)
    plot = plot_max_median_ratio(series, out_dir / "max_median.png", title=f"{ckpt.stem}: DiT block outputs",
                                 layers=layers)  # fmt: skip
    print(f"max/median over times: {plot}\nfigures:               {out_dir}", flush=True)
    return out_dir


def run(cfg: DictConfig) -> Path:
    """Run the analysis `cfg.analyze.target` asks for; returns the output folder."""
    target = cfg.analyze.target
    if target == "encoder":
        return analyze_encoder(cfg)
    if target == "dit":
        return analyze_dit(cfg)
    raise ValueError(f"analyze.target={target!r}: choose encoder or dit")


@entry_point("analyze")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
