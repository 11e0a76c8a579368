"""ImageNet (or any one-folder-per-class image tree) as a dataset of ([3, S, S] in [0, 1], label).

A file that is an image in an unusual form is converted: grey, grey + alpha, CMYK and palette images become RGB (a
palette's transparency through RGBA), 16- and 32-bit integer images are scaled to 8 bits, and a 1-pixel image is
resized like any other. A file that does not decode (a truncated JPEG, another file under an image name) never stops
training: it is logged once by name, counted, and the next readable image of the folder takes its place in the batch
(the epoch keeps its length and every batch its size). The count is shared by the loader's workers and logged once
per epoch (`data/skipped_images`, by the `SkippedImages` callback).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from dsr.data.transforms import train_transform

log = logging.getLogger(__name__)

_HINT = (
    "point data.dataset.root (or $IMAGENET_TRAIN_DIR) at an ImageNet-style folder "
    "(one sub-folder per class, e.g. /datasets/imagenet/train), or use data=synthetic"
)


def check_root(root: str | None) -> str:
    """`root` expanded, once it is known to be a folder with class sub-folders; FileNotFoundError saying what to set
    otherwise. Cheap (one directory listing): `dsr.train` calls it before building anything."""
    if root is None or str(root) == "":
        raise FileNotFoundError(f"data.dataset.root is not set: {_HINT}")
    path = os.path.expanduser(str(root))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data.dataset.root={str(root)!r} not found: {_HINT}")
    with os.scandir(path) as entries:
        has_class_dirs = any(entry.is_dir() for entry in entries)
    if not has_class_dirs:
        raise FileNotFoundError(f"data.dataset.root={str(root)!r} has no class sub-folders: {_HINT}")
    return path


def load_rgb(path: str) -> Image.Image:
    """The image at `path`, decoded in full and as 8-bit RGB (see the module docstring for the conversions)."""
    with Image.open(path) as image:
        image.load()  # decode now: a truncated file fails here, not later in a transform
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit PNG / TIFF: keep the top 8 bits of 16
            values = np.asarray(image, dtype=np.int64)
            scale = 257.0 if image.mode != "I" or values.max() > 255 else 1.0
            return Image.fromarray(np.clip(values / scale, 0, 255).round().astype(np.uint8)).convert("RGB")
        if image.mode == "P" and "transparency" in image.info:
            return image.convert("RGBA").convert("RGB")
        return image.convert("RGB") if image.mode != "RGB" else image.copy()


class ImageTree(ImageFolder):
    """`ImageFolder` that converts unusual images and steps over files that do not decode (module docstring)."""

    def __init__(self, root: str, transform=None) -> None:
        super().__init__(root, transform=transform, loader=load_rgb)
        self._skipped = torch.zeros(1, dtype=torch.long).share_memory_()  # shared with the loader's workers
        self._reported: set[int] = set()

    @property
    def skipped(self) -> int:
        """Files that did not decode, counted over every process reading this dataset."""
        return int(self._skipped.item())

    def __getitem__(self, index: int):
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            try:
                return super().__getitem__(i)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                self._skipped += 1
                if i not in self._reported:  # once per file and process, however often it is drawn
                    self._reported.add(i)
                    log.warning("skipped unreadable image %s (%s)", self.samples[i][0], error)
        raise RuntimeError(f"no image under {self.root} decodes")


def imagenet_folder(root: str | None, image_size: int = 256, flip: bool = True) -> ImageTree:
    """An `ImageFolder` over `root` with the ADM centre crop (and random flip when `flip`).

    Labels are the indices of the sorted class-folder names, i.e. the standard 0..999 order of the
    ImageNet synsets. The root is checked here, at construction, so a wrong path fails at start-up
    rather than in the first loader worker.
    """
    path = check_root(root)
    try:
        return ImageTree(path, transform=train_transform(image_size, flip=flip))
    except FileNotFoundError as err:  # class folders exist but hold no readable images
        raise FileNotFoundError(f"data.dataset.root={str(root)!r}: {err}; {_HINT}") from err
