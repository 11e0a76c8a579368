"""Pack an ImageFolder tree (ImageNet train) into webdataset shards of centre-cropped images.

    python -m dsr.data.make_shards source=/datasets/imagenet/train output=/scratch/imagenet256-wds [format=jpg]
    python -m dsr.train data=imagenet_wds data.root=/scratch/imagenet256-wds ...

Each sample is the ADM centre crop (`center_crop_arr`) of one image at `image_size`, stored as PNG (lossless: the
reader then yields exactly the tensors of `data=imagenet`) or JPEG at `quality`, under the key `<class folder>/<file
stem>` with its class index (the ImageFolder label) as `cls`. The images are visited in a seeded random order, so
every shard mixes classes (class-sorted folders would give class-pure shards, which no shuffle buffer undoes);
shard k holds positions [k * samples_per_shard, (k + 1) * samples_per_shard) of that order.

Each pool task writes one whole shard under a temporary name and renames it when complete: an interrupted run leaves
no partial shard, and running the same command again skips the shards already there (don't run two writers on one
output at once). Unreadable images are skipped, counted and listed in the manifest. `manifest.json` is written last:
a folder without one is incomplete, and the reader refuses it.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image
from tqdm.auto import tqdm

from dsr.config import entry_point
from dsr.utils.files import atomic_write, guard_settings, remove_stale_temps, write_manifest

# webdataset and torchvision (which import torch) are imported where they are used, so `--help` answers without them.

log = logging.getLogger("dsr.make_shards")

FORMATS = {"png": "PNG", "jpg": "JPEG"}  # tar member extension -> PIL format
_SOURCE_HINT = "set source=/path/to/imagenet/train (or $IMAGENET_TRAIN_DIR): a folder with one sub-folder per class"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


@dataclass(frozen=True)
class ShardJob:
    """One shard to write: its index and its (path, label) samples, in order."""

    index: int
    samples: list[tuple[str, int]]
    source: str
    output: str
    image_size: int
    image_format: str
    quality: int


@dataclass(frozen=True)
class ShardResult:
    index: int
    num_samples: int  # samples in the shard
    skipped: list[str]  # source files that could not be read
    written: bool  # False: the shard was already there


def sample_key(path: str, source: str) -> str:
    """`<class folder>/<file stem>`: webdataset splits a member name at the first dot of its last component into key
    and extension, so dots inside the stem become underscores; the slash is kept (webdataset accepts it)."""
    stem = os.path.splitext(os.path.relpath(path, source))[0]
    return stem.replace(os.sep, "/").replace(".", "_")


def encode_image(path: str, image_size: int, image_format: str, quality: int) -> bytes:
    """The file's ADM centre crop [image_size x image_size] in RGB, encoded as PNG or JPEG."""
    from dsr.data.transforms import center_crop_arr

    with Image.open(path) as image:
        crop = center_crop_arr(image.convert("RGB"), image_size)
    buffer = io.BytesIO()
    options = {"quality": quality} if image_format == "jpg" else {}
    crop.save(buffer, format=FORMATS[image_format], **options)
    return buffer.getvalue()


def _existing_shard(job: ShardJob, path: Path) -> ShardResult:
    """A shard written by an earlier run: its sample count, and the planned files it lacks (skipped back then)."""
    import webdataset as wds

    with tarfile.open(path) as tar:
        present = {wds.tariterators.base_plus_ext(name)[0] for name in tar.getnames()}
    skipped = [p for p, _ in job.samples if sample_key(p, job.source) not in present]
    return ShardResult(job.index, len(present), skipped, written=False)


def write_shard(job: ShardJob) -> ShardResult:
    """Write shard `job.index` (a pool task), or only count it when it already exists."""
    import webdataset as wds

    path = Path(job.output) / shard_name(job.index)
    if path.is_file():
        return _existing_shard(job, path)
    skipped: list[str] = []
    count = 0

    def write(file) -> None:
        nonlocal count
        with wds.TarWriter(file) as tar:
            for source_path, label in job.samples:
                try:
                    image = encode_image(source_path, job.image_size, job.image_format, job.quality)
                except Exception:  # noqa: BLE001 - PIL raises many types on broken files; none may stop the run
                    skipped.append(source_path)
                    continue
                tar.write({"__key__": sample_key(source_path, job.source), job.image_format: image, "cls": label})
                count += 1

    atomic_write(path, write)
    return ShardResult(job.index, count, skipped, written=True)


def list_images(source: str | os.PathLike | None) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names in label order, [(absolute path, label)]) of an ImageFolder tree, listed by torchvision."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if source is None or str(source) == "":
        raise FileNotFoundError(f"source is not set: {_SOURCE_HINT}")
    root = os.path.abspath(os.path.expanduser(str(source)))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"source={str(source)!r} not found: {_SOURCE_HINT}")
    try:
        classes, class_to_idx = find_classes(root)
        samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as err:  # no class folders, or a class folder without images
        raise FileNotFoundError(f"source={str(source)!r}: {err}; {_SOURCE_HINT}") from err
    return classes, samples


def worker_context() -> multiprocessing.context.BaseContext:
    """Workers start from a fresh forkserver (spawn where there is none), never by forking this process: a fork copies
    the locks its other threads (tqdm's monitor, a logger, a caller's threads) hold at that moment, and a worker that
    waits on one of them never returns (seen as a hung pool after earlier work in the same process)."""
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)


def write_shards(
    source: str | os.PathLike,
    output: str | os.PathLike,
    image_size: int = 256,
    samples_per_shard: int = 1000,
    image_format: str = "png",
    quality: int = 95,
    seed: int = 0,
    num_workers: int | None = None,
) -> dict:
    """Write the images of the ImageFolder tree `source` as shards `output/shard-%06d.tar`; return the manifest.

    `num_workers` processes write one shard each at a time (None: one per CPU; 0: in this process).
    """
    if output is None or str(output) == "":
        raise ValueError("output is not set: set output=/path/to/shards (or $IMAGENET_WDS_DIR)")
    if image_format not in FORMATS:
        raise ValueError(f"format={image_format!r}: choose one of {sorted(FORMATS)}")
    if image_size <= 0 or samples_per_shard <= 0:
        raise ValueError(f"image_size={image_size} and samples_per_shard={samples_per_shard} must be positive")
    classes, samples = list_images(source)
    source = os.path.abspath(os.path.expanduser(str(source)))
    out_dir = Path(output).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "source": source,
        "num_images": len(samples),
        "image_size": image_size,
        "samples_per_shard": samples_per_shard,
        "format": image_format,
        "quality": quality if image_format == "jpg" else None,
        "seed": seed,
    }
    guard_settings(out_dir, settings, "output")

    order = np.random.default_rng(seed).permutation(len(samples))
    jobs = [
        ShardJob(k, [samples[i] for i in order[start : start + samples_per_shard]], source, str(out_dir),
                 image_size, image_format, quality)
        for k, start in enumerate(range(0, len(samples), samples_per_shard))
    ]  # fmt: skip
    remove_stale_temps(out_dir / shard_name(job.index) for job in jobs)
    if num_workers is None:
        num_workers = os.cpu_count() or 1
    num_workers = min(num_workers, len(jobs))
    results: list[ShardResult] = []
    pool = worker_context().Pool(num_workers) if num_workers > 0 else None
    try:
        stream = pool.imap_unordered(write_shard, jobs) if pool else map(write_shard, jobs)
        with tqdm(total=len(samples), unit="img", desc=f"writing {len(jobs)} shards") as bar:
            for result in stream:
                results.append(result)
                bar.update(result.num_samples + len(result.skipped))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()

    results.sort(key=lambda r: r.index)
    skipped = sorted(path for r in results for path in r.skipped)
    for path in skipped:
        log.warning("skipped unreadable image %s", path)
    manifest = {
        "shards": [{"name": shard_name(r.index), "num_samples": r.num_samples} for r in results],
        "num_samples": sum(r.num_samples for r in results),
        "classes": classes,
        "image_size": image_size,
        "format": image_format,
        "quality": settings["quality"],
        "seed": seed,
        "samples_per_shard": samples_per_shard,
        "source": source,
        "skipped": skipped,
    }
    write_manifest(out_dir, manifest)
    written = sum(r.written for r in results)
    print(
        f"{manifest['num_samples']} images in {len(results)} shards ({written} written now, "
        f"{len(results) - written} already there; {len(skipped)} unreadable skipped): {out_dir}",
        flush=True,
    )
    return manifest


def run(cfg: DictConfig) -> dict:
    """`write_shards` with the CLI's config."""
    return write_shards(
        cfg.source,
        cfg.output,
        image_size=cfg.image_size,
        samples_per_shard=cfg.samples_per_shard,
        image_format=cfg.format,
        quality=cfg.quality,
        seed=cfg.seed,
        num_workers=cfg.num_workers,
    )


@entry_point("make_shards")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
