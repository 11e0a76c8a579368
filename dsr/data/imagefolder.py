"""ImageNet (or any one-folder-per-class image tree) as a dataset of ([3, S, S] in [0, 1], label)."""

from __future__ import annotations

import os

from torchvision.datasets import ImageFolder

from dsr.data.transforms import train_transform

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


def imagenet_folder(root: str | None, image_size: int = 256, flip: bool = True) -> ImageFolder:
    """An `ImageFolder` over `root` with the ADM centre crop (and random flip when `flip`).

    Labels are the indices of the sorted class-folder names, i.e. the standard 0..999 order of the
    ImageNet synsets. The root is checked here, at construction, so a wrong path fails at start-up
    rather than in the first loader worker.
    """
    path = check_root(root)
    try:
        return ImageFolder(path, transform=train_transform(image_size, flip=flip))
    except FileNotFoundError as err:  # class folders exist but hold no readable images
        raise FileNotFoundError(f"data.dataset.root={str(root)!r}: {err}; {_HINT}") from err
