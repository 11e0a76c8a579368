"""Real images that need no download: scikit-learn's handwritten digits (UCI optdigits test set).

1,797 grey 8x8 images of the digits 0-9 (values 0-16), shipped inside scikit-learn. They are split once,
deterministically and stratified by class, into a training split (80 %, 1,437 images) and a held-out split (20 %,
360 images) that sample quality is measured against (the proxy FD of `dsr.metrics.proxy`). Each image is upscaled
bilinearly to `image_size` and its grey level repeated on 3 channels, so every encoder path accepts it. There is
no random flip: a mirrored digit is another glyph (or none).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

NUM_CLASSES = 10
HELDOUT_FRACTION = 0.2
SPLITS = ("train", "heldout")


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images / 16.0).astype(np.float32), bunch.target.astype(np.int64)


@lru_cache(maxsize=4)
def split_indices(seed: int = 0) -> dict[str, np.ndarray]:
    """Indices of each split into the 1,797 images: stratified by class, sorted, disjoint, a function of `seed`."""
    from sklearn.model_selection import train_test_split

    _, labels = _digits()
    train, heldout = train_test_split(
        np.arange(len(labels)), test_size=HELDOUT_FRACTION, stratify=labels, random_state=seed
    )
    return {"train": np.sort(train), "heldout": np.sort(heldout)}


class Digits(Dataset):
    """One split of the digits; item i is (image [3, image_size, image_size] in [0, 1], label 0-9).

    Args:
        split: "train" or "heldout".
        image_size: side of the upscaled images (bilinear from 8 px).
        num_classes: must be 10 (data.num_classes); present so the config states it like every dataset.
        seed: of the split (0: the split every number in this project was measured on).
    """

    def __init__(self, split: str = "train", image_size: int = 32, num_classes: int = NUM_CLASSES, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"data.dataset.split={split!r}: choose one of {SPLITS}")
        if num_classes != NUM_CLASSES:
            raise ValueError(f"the digits have {NUM_CLASSES} classes: set data.num_classes=10 (got {num_classes})")
        if image_size < 8:
            raise ValueError(f"data.image_size={image_size}: the digits are 8 px, choose 8 or more")
        self.split = split
        self.image_size = image_size
        self.num_classes = num_classes
        self.seed = seed
        self.indices = split_indices(seed)[split]

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def class_names(self) -> list[str]:
        return [str(k) for k in range(NUM_CLASSES)]

    @property
    def labels(self) -> np.ndarray:
        return _digits()[1][self.indices]

    def heldout(self) -> Digits:
        """The held-out split at the same size: what generated digits are compared with."""
        return Digits("heldout", self.image_size, self.num_classes, self.seed)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        images, labels = _digits()
        index = int(self.indices[i])
        image = torch.from_numpy(images[index])[None, None]
        if self.image_size != image.shape[-1]:
            image = F.interpolate(image, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        return image[0].clamp(0, 1).expand(3, -1, -1).contiguous(), int(labels[index])
