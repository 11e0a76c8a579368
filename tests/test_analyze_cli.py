"""`python -m dsr.analyze` (encoder and DiT targets), the OutlierMonitor callback and the analysis notebook.

The encoder is test_ttr's tiny SigLIP with its weak planted register neuron B = (layer 1, neuron 21) only (A
silenced), saved with `save_pretrained` and loaded through `encoder.pretrained`: its images carry a marker on a
random patch per image, which B turns into a high-norm token from block 1 on. The DiT is a tiny quickstart run
(pixel encoder), whose input patch A_PATCH is made huge and whose diffusion registers are scaled up 1000x, so that
any register token counted as a patch would dominate the statistics.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY_RUN, A, B, compose_script, compose_train, planted_images, planted_vit
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from torch import Tensor
from torch.utils.data import Dataset
from transformers import SiglipVisionModel

from dsr.analysis.outliers import layer_statistics, max_median_ratio, token_norms
from dsr.analysis.statistics import OutlierStatistics
from dsr.analyze import run
from dsr.data.views import subset_indices
from dsr.lightning.callbacks import OutlierMonitor
from dsr.registers.hooks import capture_residual_stream
from dsr.registers.neurons import RegisterNeuronSet

REPO = Path(__file__).resolve().parents[1]
A_PATCH = 5  # marker A's patch: row 1, col 1 of the 4x4 grid


class PlantedImages(Dataset):
    """test_ttr's marked images as a dataset of (image, label): marker A (channel 0) on patch A_PATCH, marker B
    (channel 1, scaled by `b_scale`) on another random patch per image. Stored as x * 0.5 + 0.5, so that SigLIP's
    normalisation (mean = std = 0.5) and the pixel encoder's 2x - 1 both give back test_ttr's encoder inputs."""

    def __init__(self, num_samples: int = 24, image_size: int = 16, num_classes: int = 4, seed: int = 0,
                 b_scale: float = 1.0) -> None:  # fmt: skip
        if image_size != 16:
            raise ValueError("the planted images are 16x16: set data.image_size=16")
        x, self.pa, self.pb = planted_images(num_samples, seed=seed + 2, a_patch=A_PATCH)
        x[:, 1] *= b_scale
        self.inputs = x
        self.images = x * 0.5 + 0.5
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], i % self.num_classes


@pytest.fixture(scope="module")
def planted_encoder(tmp_path_factory) -> Path:
    """A tiny SigLIP directory whose only outliers come from register neuron B (block 1)."""
    model = planted_vit("siglip")
    with torch.no_grad():
        model.encoder.layers[A[0]].mlp.fc2.weight[:, A[1]] = 0
    path = tmp_path_factory.mktemp("encoder") / "planted-siglip"
    model.save_pretrained(path)
    return path


def encoder_overrides(model_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    return [
        "encoder=tiny",
        f"encoder.pretrained={model_dir}",
        "encoder.config=null",
        "encoder.resolution=16",
        "data=synthetic",
        "data.image_size=16",
        f"data.dataset._target_={__name__}.PlantedImages",
        "data.dataset.num_samples=24",
        "analyze.num_images=null",  # all 24, in order
        "analyze.batch_size=10",  # batches of 10, 10 and 4: the merged statistics must equal one pass
        "accelerator=cpu",
        f"analyze.output={out_dir}",
        *extra,
    ]


def assert_records_match(records: list[dict], direct: list[dict]) -> None:
    """Merged per-batch records against `layer_statistics` of all images at once."""
    assert len(records) == len(direct)
    for r, d in zip(records, direct, strict=True):
        for key, value in d.items():
            if key == "top_tokens":
                assert [(t["image"], t["index"]) for t in r[key]] == [(t["image"], t["index"]) for t in value]
            elif isinstance(value, float):
                assert r[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
            else:
                assert r[key] == value, key


def test_batched_statistics_equal_one_pass_over_all_images():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(11, 2 + 16 + 1, 8, generator=g)  # 2 prefix tokens, 4x4 patches, 1 suffix token
    x[torch.arange(11), 2 + torch.randint(0, 16, (11,), generator=g)] *= 20  # one outlier patch per image
    x[:, :2] *= 50  # large excluded tokens: must not count
    layers = [x, x * torch.linspace(0.5, 2.0, 8)]
    stats = OutlierStatistics([3, 7], tau=10.0, top_k=5, keep=3)
    for chunk in (slice(0, 4), slice(4, 5), slice(5, 11)):
        stats.update([h[chunk] for h in layers], num_prefix_tokens=2, num_suffix_tokens=1)
    direct = layer_statistics(layers, num_prefix_tokens=2, num_suffix_tokens=1, tau=10.0, top_k=5)
    for layer, d in zip([3, 7], direct, strict=True):
        d["layer"] = layer
    records = stats.records()
    assert_records_match([{k: v for k, v in r.items() if k != "num_excluded_tokens"} for r in records], direct)
    assert [r["num_excluded_tokens"] for r in records] == [3, 3]
    assert torch.equal(stats.norms(7), token_norms(layers[1], 2, 1))
    assert [k.shape for k in stats.kept()] == [(3, 16, 8), (3, 16, 8)]


def test_encoder_target_finds_the_planted_outlier_its_neuron_and_the_ttr_drop(planted_encoder, tmp_path, capsys):
    dataset = PlantedImages()
    out = run(compose_script("analyze", encoder_overrides(planted_encoder, tmp_path / "none", "analyze.discover=true",
                                                          "analyze.threshold=20")))  # fmt: skip
    report = json.loads((out / "stats.json").read_text())
    records = report["layers"]
    assert report["metadata"]["registers"] == "none" and report["metadata"]["num_images"] == 24
    ratios = [r["max_median_ratio"] for r in records]
    # Neuron B writes in block 1: no outlier after block 0, a strong one from block 1 on, on B's patch of each image.
    assert ratios[0] < 2.5 and ratios[1] > 4.0 and ratios[2] > 4.0
    for r in records[1:]:
        for token in r["top_tokens"]:
            assert (token["row"], token["col"]) == divmod(int(dataset.pb[token["image"]]), 4)
    assert all(r["num_excluded_tokens"] == 0 and r["num_patches"] == 16 for r in records)

    # The same numbers straight from the saved model on all images in one pass.
    model = SiglipVisionModel.from_pretrained(planted_encoder).eval()
    direct = layer_statistics(capture_residual_stream(model, dataset.inputs), top_k=8)
    assert_records_match([{k: v for k, v in r.items() if k != "num_excluded_tokens"} for r in records], direct)

    for name in ("max_median.png", "norm_histogram.png", "pca/pca000.png", "norm_maps/image03/norm_layer02.png"):
        assert (out / name).is_file(), name

    neurons_path = out / "register_neurons.json"
    neurons = RegisterNeuronSet.load(neurons_path)
    assert (neurons[0].layer, neurons[0].neuron) == B
    assert neurons.metadata["threshold"] == 20.0 and neurons.metadata["n_images"] == 24
    assert f"registers=ttr encoder.ttr_neurons={neurons_path.resolve()}" in capsys.readouterr().out

    # The same command with the found neurons as test-time registers: the outlier moves onto the register.
    out_ttr = run(compose_script("analyze", encoder_overrides(planted_encoder, tmp_path / "ttr", "registers=ttr",
                                                              f"encoder.ttr_neurons={neurons_path}")))  # fmt: skip
    report_ttr = json.loads((out_ttr / "stats.json").read_text())
    assert report_ttr["metadata"]["registers"] == "ttr"
    ttr = report_ttr["layers"]
    for layer in (1, 2):
        assert ttr[layer]["max_median_ratio"] < 2.5 < 4.0 < ratios[layer]
        assert ttr[layer]["num_excluded_tokens"] == 1  # the test-time register, kept out of the patch statistics
        assert ttr[layer]["excluded_norm_ratio"] > 4.0  # ... where the high norm now lives


@pytest.mark.slow
def test_cli_default_output_folder_and_errors_that_name_the_setting(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "DSR_ARTIFACTS": str(tmp_path / "artifacts")}
    args = [
        "encoder=tiny",
        "data=synthetic",
        "data.dataset.num_samples=8",
        "analyze.num_images=4",
        "analyze.num_maps=1",
    ]
    proc = subprocess.run([sys.executable, "-m", "dsr.analyze", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = tmp_path / "artifacts" / "tiny-none" / "analysis" / "stats.json"
    assert stats.is_file() and str(stats.relative_to(tmp_path)) in proc.stdout
    assert [r["layer"] for r in json.loads(stats.read_text())["layers"]] == [0, 1]

    with pytest.raises(ValueError, match=r"analyze\.ckpt="):
        run(compose_script("analyze", ["analyze.target=dit"]))
    with pytest.raises(FileNotFoundError, match=r"analyze\.ckpt="):
        run(compose_script("analyze", ["analyze.target=dit", f"analyze.ckpt={tmp_path / 'missing.ckpt'}"]))
    with pytest.raises(ValueError, match=r"analyze\.target="):
        run(compose_script("analyze", ["analyze.target=decoder"]))
    with pytest.raises(ValueError, match="no ViT"):
        run(compose_script("analyze", ["encoder=pixel", "data=synthetic", "analyze.num_images=2"]))
    with pytest.raises(ValueError, match=r"analyze\.layers"):
        run(compose_script("analyze", ["encoder=tiny", "data=synthetic", "analyze.layers=[5]"]))


@torch.no_grad()
def dit_patch_tokens(backbone, x_t: Tensor, t: Tensor, y: Tensor) -> list[Tensor]:
    """LightningDiT's forward written out without hooks: the patch tokens (the last N) after every block."""
    x = backbone.x_embedder(x_t) + backbone.pos_embed
    c = backbone.t_embedder(t) + backbone.y_embedder(y)
    rope, out = backbone.rope_tables(with_registers=False), []
    for i, block in enumerate(backbone.blocks):
        if backbone.registers is not None and i == backbone.register_start:
            x, rope = backbone.registers(x), backbone.rope_tables(with_registers=True)
        x = block(x, c, rope=rope)
        out.append(x[:, x.shape[1] - math.prod(backbone.grid_size) :])
    return out


def test_dit_target_and_outlier_monitor_on_a_tiny_run(run_train, tmp_path):
    from dsr.lightning.dit_module import DiTModule

    _, run_dir = run_train([*TINY_RUN, "callbacks.outlier_monitor.every_n_steps=2"])
    last = run_dir / "checkpoints" / "last.ckpt"

    # OutlierMonitor: every 2 steps, per block, computed on the training weights from the first 8 training images.
    rows = list(csv.DictReader((run_dir / "logs" / "metrics.csv").open()))
    logged = {int(r["step"]): r for r in rows if r.get("outliers/layer_00/max_median")}
    assert sorted(logged) == [2, 4, 6]
    for key in ("layer_00/max_median", "layer_01/max_median", "layer_01/top1_norm", "layer_01/median_norm"):
        assert all(float(r[f"outliers/{key}"]) > 0 for r in logged.values()), key
    assert (run_dir / "outliers" / "step_0000006.png").is_file()
    module = DiTModule.from_checkpoint(last)
    data = instantiate(module.run_config["data"]["dataset"])
    images, y = torch.stack([data[i][0] for i in range(8)]), torch.tensor([data[i][1] for i in range(8)])
    z = module.encoder.encode(images)
    x_t = 0.5 * z + 0.5 * torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    patches = dit_patch_tokens(module.backbone, x_t, torch.full((8,), 0.5), y)
    for layer, h in enumerate(patches):
        row = logged[6]
        ratio, top1 = max_median_ratio(h).mean().item(), token_norms(h).max().item()
        assert float(row[f"outliers/layer_{layer:02d}/max_median"]) == pytest.approx(ratio, rel=1e-4)
        assert float(row[f"outliers/layer_{layer:02d}/top1_norm"]) == pytest.approx(top1, rel=1e-4)

    # The DiT target on the checkpoint with its diffusion registers scaled up 1000x.
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    checkpoint["state_dict"]["ema.averages.0.registers.tokens"] *= 1000
    planted = run_dir / "checkpoints" / "planted.ckpt"
    torch.save(checkpoint, planted)
    overrides = [
        "analyze.target=dit", f"analyze.ckpt={planted}", "analyze.times=[0.3,0.7]", "analyze.num_images=12",
        "analyze.batch_size=5", "analyze.num_maps=2", "accelerator=cpu", "analyze.data_source=config",
        "data=synthetic", "data.image_size=16", "data.num_classes=4", f"data.dataset._target_={__name__}.PlantedImages",
        "data.dataset.num_samples=24", "+data.dataset.b_scale=0.0",
    ]  # fmt: skip
    out = run(compose_script("analyze", overrides))
    assert out == run_dir / "analysis" / "planted"
    assert (out / "max_median.png").is_file()

    module = DiTModule.from_checkpoint(planted)
    dataset = PlantedImages(b_scale=0.0)
    indices = subset_indices(24, 12, 0)
    z = module.encoder.encode(dataset.images[indices])
    y = torch.tensor(indices) % 4
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    for t in (0.3, 0.7):
        folder = out / f"t{t:.2f}"
        report = json.loads((folder / "stats.json").read_text())
        assert report["metadata"]["t"] == t and report["metadata"]["use_ema"] is True
        records = report["layers"]
        assert [r["layer"] for r in records] == [0, 1]  # one record per block
        assert [r["num_patches"] for r in records] == [16, 16]
        assert [r["num_excluded_tokens"] for r in records] == [0, 2]  # registers join at block 1
        assert records[1]["excluded_norm_ratio"] > 100  # the scaled registers: they would dominate if counted
        patches = dit_patch_tokens(module.ema.module, (1 - t) * z + t * noise, torch.full((12,), t), y)
        for r, h in zip(records, patches, strict=True):
            assert r["num_images"] == 12
            assert r["max_median_ratio"] == pytest.approx(max_median_ratio(h).mean().item(), rel=1e-4)
            assert r["norm_max"] == pytest.approx(token_norms(h).max().item(), rel=1e-4)
            assert r["max_median_ratio"] > 1.5 and all(tok["index"] == A_PATCH for tok in r["top_tokens"])
        for name in ("max_median.png", "pca/pca001.png", "norm_maps/image01/norm_layer01.png"):
            assert (folder / name).is_file(), name
    ratios = [json.loads((out / f"t{t:.2f}" / "stats.json").read_text())["layers"][1]["max_median_ratio"]
              for t in (0.3, 0.7)]  # fmt: skip
    assert ratios[0] > 2 * ratios[1]  # the planted patch fades into the noise as t grows


@pytest.mark.parametrize("head_num_registers", [None, 0])
def test_dit_dh_trunk_and_head_blocks_leave_their_registers_out(head_num_registers):
    from dsr.analysis.capture import dit_statistics
    from dsr.models.ddt import DiTDH

    torch.manual_seed(0)
    model = DiTDH(input_size=4, in_channels=8, hidden_size=32, depth=3, num_heads=2, head_hidden_size=48,
                  head_depth=2, head_num_heads=2, num_classes=4, num_registers=3, register_start=1,
                  head_num_registers=head_num_registers).eval()  # fmt: skip
    z, noise, y = torch.randn(6, 8, 4, 4), torch.randn(6, 8, 4, 4), torch.arange(6) % 4
    before = dit_statistics(model, z, y, noise, 0.5, batch_size=4, progress=False).records()
    with torch.no_grad():  # huge registers: the patch statistics must not move
        model.registers.tokens.mul_(1e3)
        if model.head_registers is not None:
            model.head_registers.tokens.mul_(1e3)
    after = dit_statistics(model, z, y, noise, 0.5, batch_size=4, progress=False).records()
    head = 3 if head_num_registers is None else 0  # without head registers the trunk's leave at the hand-off
    assert [r["num_excluded_tokens"] for r in after] == [0, 3, 3, head, head]
    assert [r["num_patches"] for r in after] == [16] * 5
    # Blocks before register_start see no registers at all; later ones only through attention.
    assert after[0]["max_median_ratio"] == pytest.approx(before[0]["max_median_ratio"], rel=1e-6)
    assert all(r["excluded_norm_ratio"] > 50 for r in after[1:3])
    assert all(r["max_median_ratio"] < 20 for r in after)


def test_outlier_monitor_restores_train_mode_and_ignores_modules_without_a_dit(tmp_path):
    cfg = compose_train(TINY_RUN, tmp_path)
    module = instantiate(cfg.module).train()

    class Recorder:
        def __init__(self) -> None:
            self.logged = []

        def log_metrics(self, metrics: dict, step: int) -> None:
            self.logged.append((step, metrics))

    recorder = Recorder()
    trainer = SimpleNamespace(datamodule=SimpleNamespace(dataset=instantiate(cfg.data.dataset)), loggers=[recorder],
                              global_step=3, is_global_zero=True)  # fmt: skip
    monitor = OutlierMonitor(every_n_steps=3, num_samples=4, t=0.25, use_ema=True, dirpath=str(tmp_path / "outliers"))
    monitor.setup(trainer, module, "fit")
    monitor.run(trainer, module, 3)
    assert module.training and module.backbone.training and module.ema.module.training
    step, metrics = recorder.logged[0]
    assert step == 3 and metrics == monitor.last_metrics
    assert set(metrics) == {f"outliers/layer_{i:02d}/{m}" for i in range(2) for m in ("max_median", "top1_norm",
                            "median_norm")} | {"outliers/max_median_peak"}  # fmt: skip
    assert (tmp_path / "outliers" / "step_0000003.png").is_file()

    decoder_stage = OutlierMonitor(every_n_steps=3)
    decoder_stage.setup(trainer, torch.nn.Linear(2, 2), "fit")  # no diffusion transformer: nothing to monitor
    assert decoder_stage.every_n_steps == 0


def test_notebook_runs_top_to_bottom_on_the_tiny_encoder(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    notebook = json.loads((REPO / "notebooks" / "outlier_analysis.ipynb").read_text())
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in cells), "clear the notebook's outputs"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    try:
        for i, cell in enumerate(cells):
            exec(compile("".join(cell["source"]), f"outlier_analysis.ipynb[{i}]", "exec"), namespace)
    finally:
        plt.close("all")
        GlobalHydra.instance().clear()
    assert namespace["ENCODER"] == "tiny"
    assert (tmp_path / "max_median.png").is_file() and (tmp_path / "register_neurons.json").is_file()
    assert len(namespace["ttr_stats"].layers) == len(namespace["stats"].layers) == 2
    assert [r["num_excluded_tokens"] for r in namespace["ttr_stats"].records()] == [1, 1]
    assert [r["num_excluded_tokens"] for r in namespace["dit_stats"][0.5].records()] == [0, 8, 8, 8]
