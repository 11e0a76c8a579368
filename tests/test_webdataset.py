"""webdataset shards: the writer (`python -m dsr.data.make_shards`) and the reader (`data=imagenet_wds`).

Images are compared with the ADM centre crop of the original files computed here, labels with torchvision's
ImageFolder; shard contents are read back with plain webdataset where the reader itself is under test.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from helpers import TINY_RUN, compose_script, compose_train
from hydra.utils import instantiate
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.transforms import functional as TF

from dsr.data.make_shards import run as make_shards
from dsr.data.make_shards import write_shards
from dsr.data.transforms import center_crop_arr
from dsr.data.webdataset import ShardDataModule

REPO = Path(__file__).resolve().parents[1]
SIZE = 16  # stored crops: a multiple of the quickstart's 4-px patches
# (class folder, file name, height, width, mode): sizes around 24-40 px, both orientations, one grey-scale file, a
# JPEG, and stems with dots (keys must not keep them).
FILES = [
    ("n01", "a.png", 24, 40, "RGB"),
    ("n01", "b.v2.png", 40, 24, "RGB"),
    ("n01", "c.png", 33, 33, "RGB"),
    ("n01", "d.jpg", 30, 26, "RGB"),
    ("n01", "e.png", 28, 36, "L"),
    ("n02", "a.png", 36, 28, "RGB"),
    ("n02", "b.png", 24, 24, "RGB"),
    ("n02", "c.png", 38, 31, "RGB"),
    ("n02", "d.png", 25, 39, "RGB"),
    ("n03", "a.png", 32, 32, "RGB"),
    ("n03", "b.v1.v2.png", 26, 35, "RGB"),
    ("n03", "c.png", 40, 40, "RGB"),
]
NUM_CLASSES = 3


def make_tree(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for folder, name, height, width, mode in FILES:
        (root / folder).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(root / folder / name)
    return root


def as_key(image: torch.Tensor) -> bytes:
    return image.numpy().tobytes()


def reference(tree: Path) -> dict[bytes, int]:
    """{crop tensor bytes: ImageFolder label} of every image, computed from the original files."""
    return {
        as_key(TF.to_tensor(center_crop_arr(Image.open(path).convert("RGB"), SIZE))): label
        for path, label in ImageFolder(str(tree)).samples
    }


def shard_contents(url: str | Path) -> list[tuple[bytes, int]]:
    """(image bytes, label) of a shard's samples in stored order, read by plain webdataset."""
    samples = wds.WebDataset(str(url), shardshuffle=False).decode("pil").to_tuple("png", "cls")
    return [(as_key(TF.to_tensor(image)), label) for image, label in samples]


def datamodule(root: Path, **overrides) -> ShardDataModule:
    kwargs = dict(image_size=SIZE, num_classes=NUM_CLASSES, global_batch_size=4, num_workers=0, flip=False)
    return ShardDataModule(root, **{**kwargs, **overrides})


def epoch(dm: ShardDataModule, rank: int = 0, world_size: int = 1, epoch: int = 0) -> list:
    dm.configure_batches(world_size)
    return list(dm.loader(rank, world_size, epoch))


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("imagefolder"))


@pytest.fixture(scope="module")
def shards(tree, tmp_path_factory) -> Path:
    """3 shards of 4 PNG crops, written by a pool of 2 processes."""
    out = tmp_path_factory.mktemp("shards") / "wds"
    write_shards(tree, out, image_size=SIZE, samples_per_shard=4, num_workers=2)
    return out


def test_shards_hold_every_crop_and_label_in_a_seeded_mixed_order(tree, shards, tmp_path):
    ref = reference(tree)
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["num_samples"] == len(FILES) == sum(s["num_samples"] for s in manifest["shards"])
    assert [s["name"] for s in manifest["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert manifest["classes"] == ImageFolder(str(tree)).classes
    assert (manifest["image_size"], manifest["format"], manifest["skipped"]) == (SIZE, "png", [])

    stored = [shard_contents(shards / s["name"]) for s in manifest["shards"]]
    assert sorted(x for shard in stored for x in shard) == sorted(ref.items())  # each image once, exact, labelled
    assert any(len({label for _, label in shard}) > 1 for shard in stored)  # not class-pure
    keys = [s["__key__"] for s in wds.WebDataset(str(shards / "shard-000000.tar"), shardshuffle=False)]
    assert all("." not in key and key.count("/") == 1 for key in keys)

    other = write_shards(tree, tmp_path / "seed1", image_size=SIZE, samples_per_shard=4, seed=1, num_workers=0)
    reordered = [x for s in other["shards"] for x in shard_contents(tmp_path / "seed1" / s["name"])]
    assert sorted(reordered) == sorted(ref.items())
    assert reordered != [x for shard in stored for x in shard]  # the order depends on the seed


def test_reader_yields_the_centre_crops_and_labels(tree, shards):
    ref = reference(tree)
    dm = datamodule(shards, epoch_length=120)  # 30 shard draws: every shard is met
    batches = epoch(dm)
    assert len(batches) == 30 and dm.steps_per_epoch() == 30
    seen = set()
    for images, labels in batches:
        assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == torch.float32 and labels.dtype == torch.int64
        for image, label in zip(images, labels, strict=True):
            assert ref[as_key(image)] == label  # bit-exact crop, and its ImageFolder label
            seen.add(as_key(image))
    assert seen == set(ref)
    assert dm.skipped == 0

    flipped = epoch(datamodule(shards, epoch_length=40, flip=True))
    mirrored = [as_key(TF.hflip(x)) in ref and as_key(x) not in ref for images, _ in flipped for x in images]
    assert all(as_key(x) in ref or as_key(TF.hflip(x)) in ref for images, _ in flipped for x in images)
    assert 0 < sum(mirrored) < len(mirrored)


def test_rerun_skips_finished_shards_and_rewrites_the_missing_one(tree, shards, tmp_path):
    out = tmp_path / "wds"
    shutil.copytree(shards, out)  # copy2: the original mtimes
    manifest = json.loads((out / "manifest.json").read_text())
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert write_shards(tree, out, image_size=SIZE, samples_per_shard=4, num_workers=0) == manifest
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes

    (out / "shard-000001.tar").unlink()  # an interrupted run: one shard never finished ...
    (out / "shard-000001.tar.tmp-12345").write_bytes(b"half a tar")  # ... and its temp file is left over
    assert write_shards(tree, out, image_size=SIZE, samples_per_shard=4, num_workers=0) == manifest
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", "settings.json", *mtimes])
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert after["shard-000001.tar"] != mtimes["shard-000001.tar"]
    assert {k: v for k, v in after.items() if k != "shard-000001.tar"} == {
        k: v for k, v in mtimes.items() if k != "shard-000001.tar"
    }
    assert shard_contents(out / "shard-000001.tar") == shard_contents(shards / "shard-000001.tar")
    with pytest.raises(ValueError, match="samples_per_shard"):  # other settings must not mix into these shards
        write_shards(tree, out, image_size=SIZE, samples_per_shard=5, num_workers=0)


def test_ranks_read_disjoint_shards_and_a_fixed_number_of_batches(shards):
    dm = datamodule(shards, epoch_length=12)  # 3 steps of 4 = 3 micro-batches of 2 per rank
    per_rank = []
    for rank in range(2):
        dm.configure_batches(2)
        loader = dm.loader(rank, 2)
        passes = [list(loader), list(loader)]  # two epochs
        assert [len(p) for p in passes] == [len(loader), len(loader)] == [3, 3]
        assert all(images.shape == (2, 3, SIZE, SIZE) for p in passes for images, _ in p)
        per_rank.append({as_key(x) for p in passes for images, _ in p for x in images})
    own = [
        {x for name in names for x, _ in shard_contents(shards / name)}
        for names in (["shard-000000.tar", "shard-000002.tar"], ["shard-000001.tar"])
    ]  # rank r owns shards r::2
    assert per_rank[0] <= own[0] and per_rank[1] <= own[1] and not per_rank[0] & per_rank[1]

    # With loader workers: the same number of batches per epoch, and each epoch's stream reaches the (persistent)
    # workers: the second pass of one loader is the first pass of a loader started at epoch 1.
    def with_workers(epoch: int) -> list:
        dm = datamodule(shards, epoch_length=12, num_workers=2)
        dm.configure_batches(2)
        loader = dm.loader(0, 2, epoch)
        return [list(loader), list(loader)]

    zero, one = with_workers(0), with_workers(1)
    assert [len(p) for p in zero] == [3, 3]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(zero[1], one[0], strict=True))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(zero[0], one[0], strict=True))

    # A stream is a function of (seed, epoch, rank): the same again, another for the next epoch.
    first, again, later = (epoch(datamodule(shards, epoch_length=20), epoch=e) for e in (0, 0, 1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, later, strict=True))

    with pytest.raises(ValueError, match="fewer than the 4 ranks"):
        epoch(dm, world_size=4)


def test_corrupt_samples_and_truncated_shards_are_skipped(tree, shards, tmp_path):
    ref = reference(tree)
    one = tmp_path / "one"
    write_shards(tree, one, image_size=SIZE, samples_per_shard=len(FILES), num_workers=0)
    shard = one / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    stored = list(wds.WebDataset(str(shard), shardshuffle=False).decode("pil"))
    broken = stored[5]  # a sample in the middle of the shard
    with wds.TarWriter(str(shard)) as writer:
        for name, data in members:
            key, ext = name.split(".", 1)
            writer.write({"__key__": key, ext: b"not an image" if (key, ext) == (broken["__key__"], "png") else data})

    # One pass over the one shard, no shuffle buffer: 11 good samples make one batch, the broken one is skipped.
    dm = datamodule(one, global_batch_size=len(FILES) - 1, epoch_length=len(FILES) - 1, shuffle_buffer=0)
    [(images, labels)] = epoch(dm)
    assert dm.skipped == 1
    assert all(ref[as_key(x)] == y for x, y in zip(images, labels, strict=True))
    assert set(ref) - {as_key(x) for x in images} == {as_key(TF.to_tensor(broken["png"]))}

    cut = tmp_path / "cut"
    shutil.copytree(shards, cut)
    with open(cut / "shard-000001.tar", "r+b") as f:
        f.truncate(os.path.getsize(cut / "shard-000001.tar") // 2)
    dm = datamodule(cut, epoch_length=60)
    batches = epoch(dm)
    assert len(batches) == 15 and dm.skipped > 0
    assert all(ref[as_key(x)] == y for images, labels in batches for x, y in zip(images, labels, strict=True))


def test_missing_shards_and_mismatched_settings_fail_clearly(tree, shards, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.root is not set.*IMAGENET_WDS_DIR.*dsr\.data\.make_shards"):
        datamodule(None)
    with pytest.raises(FileNotFoundError, match=r"data\.root=.*no manifest\.json.*dsr\.data\.make_shards"):
        datamodule(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"data\.image_size=32.*16px"):
        datamodule(shards, image_size=32)
    with pytest.raises(ValueError, match=r"data\.num_classes=1000.*3 classes"):
        datamodule(shards, num_classes=1000)

    with pytest.raises(FileNotFoundError, match=r"source is not set: set source="):
        write_shards(None, tmp_path / "out")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "x.png")
    with pytest.raises(FileNotFoundError, match=r"source=.*flat.*set source="):
        write_shards(tmp_path / "flat", tmp_path / "out")
    with pytest.raises(ValueError, match=r"output is not set"):
        write_shards(tree, None)


def test_unreadable_source_images_are_skipped_and_listed(tree, tmp_path):
    source = tmp_path / "tree"
    shutil.copytree(tree, source)
    (source / "n02" / "broken.png").write_bytes(b"not a png")
    manifest = make_shards(compose_script("make_shards", [f"source={source}", f"output={tmp_path / 'out'}",
                                                          f"image_size={SIZE}", "samples_per_shard=5",
                                                          "num_workers=0"]))  # fmt: skip
    assert manifest["skipped"] == [str(source / "n02" / "broken.png")]
    assert manifest["num_samples"] == len(FILES) == sum(s["num_samples"] for s in manifest["shards"])
    # A rerun finds the shards complete, and the skipped file again (it is missing from its shard).
    assert write_shards(source, tmp_path / "out", image_size=SIZE, samples_per_shard=5, num_workers=0) == manifest


def test_configs_compose_and_train_end_to_end(shards, run_train, tmp_path):
    cfg = compose_train(["data=imagenet_wds", f"data.root={shards}", f"data.image_size={SIZE}",
                         f"data.num_classes={NUM_CLASSES}"], tmp_path / "composed")  # fmt: skip
    dm = instantiate(cfg.data)
    assert isinstance(dm, ShardDataModule) and dm.dataset is None
    settings = (dm.global_batch_size, dm.num_workers, dm.shuffle_buffer, dm.flip, dm.epoch_length, dm.seed)
    assert settings == (1024, 16, 1000, True, len(FILES), cfg.seed)

    tiny = [o for o in TINY_RUN if not o.startswith("data.dataset.")]  # synthetic-only keys
    overrides = ["data=imagenet_wds", f"data.root={shards}", f"data.image_size={SIZE}",
                 f"data.num_classes={NUM_CLASSES}", "data.global_batch_size=4", "data.num_workers=0",
                 "data.epoch_length=16", "trainer.max_steps=6"]  # fmt: skip
    metrics, run_dir = run_train([*tiny, *overrides])
    assert math.isfinite(metrics["train/loss"])
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 6 and state["epoch"] == 1  # 4 steps per epoch: Lightning saw the epoch's length
    with open(run_dir / "logs" / "metrics.csv") as f:
        epochs = {int(row["step"]): int(row["epoch"]) for row in csv.DictReader(f) if row.get("train/loss")}
    assert epochs == {0: 0, 1: 0, 2: 0, 3: 0, 4: 1, 5: 1}


def test_cli_writes_jpeg_shards(tree, tmp_path):
    out = tmp_path / "jpg"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [f"source={tree}", f"output={out}", f"image_size={SIZE}", "samples_per_shard=5", "format=jpg",
            "num_workers=0"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "dsr.data.make_shards", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["num_samples"] for s in manifest["shards"]] == [5, 5, 2]
    assert (manifest["format"], manifest["quality"], manifest["source"]) == ("jpg", 95, str(tree))
    with tarfile.open(out / "shard-000000.tar") as tar:
        assert sorted({name.split(".")[1] for name in tar.getnames()}) == ["cls", "jpg"]
    assert sorted(os.listdir(out)) == ["manifest.json", "settings.json", *(s["name"] for s in manifest["shards"])]
    dm = datamodule(out, global_batch_size=len(FILES), epoch_length=len(FILES), shuffle_buffer=0)
    [(images, labels)] = epoch(dm)
    assert images.shape == (len(FILES), 3, SIZE, SIZE) and dm.skipped == 0
    assert set(labels.tolist()) <= set(range(NUM_CLASSES))
