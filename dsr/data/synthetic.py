"""A class-conditional synthetic image set for CPU quickstarts and tests.

Each class is one image family, a coloured shape on a dark constant background: class k has colour
``COLOURS[k % len(COLOURS)]`` and shape ``SHAPES[k // len(COLOURS)]``, so classes 0..7 share the disk
and differ only in colour. Position and scale vary per image but are a pure function of (seed, index),
so the set needs no storage and any resolution is available. The images are deliberately simple: a tiny
diffusion model learns them in minutes, which makes class conditioning and guidance visible quickly.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

# Saturated, well-separated colours (RGB in [0, 1]); the order fixes the class -> colour map.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.1, 0.1),
    "green": (0.1, 0.9, 0.1),
    "blue": (0.15, 0.3, 1.0),
    "yellow": (1.0, 0.9, 0.1),
    "magenta": (0.95, 0.1, 0.95),
    "cyan": (0.1, 0.9, 0.95),
    "white": (0.95, 0.95, 0.95),
    "orange": (1.0, 0.55, 0.05),
}
SHAPES: tuple[str, ...] = ("disk", "square", "triangle", "ring", "cross")
BACKGROUND = 0.1  # grey level of every channel behind the shape
MAX_CLASSES = len(COLOURS) * len(SHAPES)

# Shape extent as a fraction of the image side, and the supersampling factor used for antialiasing.
MIN_SIZE, MAX_SIZE = 0.3, 0.6
# The held-out twin (`heldout()`): its own seed stream, and enough images for 64-dimensional feature statistics.
HELDOUT_SIZE, HELDOUT_SEED_OFFSET = 1024, 1_000_003
SUPERSAMPLE = 4


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Boolean inside-test of `shape` in its own frame, where the shape spans [-1, 1] on both axes.

    `dx` [1, W] and `dy` [H, 1] broadcast to the [H, W] mask; y points down, as in images.
    """
    if shape == "disk":
        return dx**2 + dy**2 <= 1.0
    if shape == "square":
        return (np.abs(dx) <= 1.0) & (np.abs(dy) <= 1.0)
    if shape == "triangle":  # apex at the top, base at the bottom
        return (dy <= 1.0) & (np.abs(dx) <= (dy + 1.0) / 2.0)
    if shape == "ring":
        r2 = dx**2 + dy**2
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if shape == "cross":
        ax, ay = np.abs(dx), np.abs(dy)
        return ((ax <= 0.3) & (ay <= 1.0)) | ((ay <= 0.3) & (ax <= 1.0))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_shape(
    shape: str,
    colour: tuple[float, float, float],
    centre: tuple[float, float],
    size: float,
    image_size: int,
    background: float = BACKGROUND,
) -> np.ndarray:
    """Render one antialiased shape; returns float32 [3, image_size, image_size] in [0, 1].

    `centre` = (x, y) and `size` (the side of the shape's bounding box) are fractions of the image side.
    Coverage is evaluated on a SUPERSAMPLE-times finer grid of sample points and area-averaged down, so
    edges stay smooth even at 16 px.
    """
    n = image_size * SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n  # sample-point centres in [0, 1]
    half = size / 2.0
    dx = ((coords - centre[0]) / half)[None, :]
    dy = ((coords - centre[1]) / half)[:, None]
    fine = shape_mask(shape, dx, dy).astype(np.float32)
    coverage = fine.reshape(image_size, SUPERSAMPLE, image_size, SUPERSAMPLE).mean(axis=(1, 3))
    rgb = np.asarray(colour, dtype=np.float32)[:, None, None]
    return background + coverage[None] * (rgb - np.float32(background))


class SyntheticShapes(Dataset):
    """`num_samples` images of `num_classes` shape x colour families; item i is (image [3, H, W], label).

    The label of item i is i % num_classes. Deterministic: item i depends only on (seed, i), identically
    across instances and processes.
    """

    def __init__(self, num_samples: int = 4096, image_size: int = 32, num_classes: int = 8, seed: int = 0) -> None:
        if not 1 <= num_classes <= MAX_CLASSES:
            raise ValueError(
                f"num_classes={num_classes} is out of range: SyntheticShapes has {len(COLOURS)} colours x "
                f"{len(SHAPES)} shapes, so at most {MAX_CLASSES} classes (data.num_classes)"
            )
        if num_samples < 1 or image_size < 1:
            raise ValueError(f"num_samples={num_samples} and image_size={image_size} must be positive")
        self.num_samples = num_samples
        self.image_size = image_size
        self.num_classes = num_classes
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    @property
    def class_names(self) -> list[str]:
        """Human-readable names, index = label, e.g. "red disk"."""
        return [" ".join(self._family(k)) for k in range(self.num_classes)]

    @staticmethod
    def _family(label: int) -> tuple[str, str]:
        """(colour name, shape name) of a class."""
        names = list(COLOURS)
        return names[label % len(names)], SHAPES[label // len(names)]

    def heldout(self) -> SyntheticShapes:
        """A held-out twin: the same families drawn from another seed, what generated shapes are compared with."""
        return SyntheticShapes(HELDOUT_SIZE, self.image_size, self.num_classes, self.seed + HELDOUT_SEED_OFFSET)

    def label(self, i: int) -> int:
        """Class of item i: round-robin, so every class has the same number of items (up to one)."""
        return i % self.num_classes

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for SyntheticShapes of length {self.num_samples}")
        i = i % self.num_samples
        label = self.label(i)
        colour, shape = self._family(label)
        # One generator per item, keyed by (seed, i): independent of access order and worker layout.
        rng = np.random.default_rng([self.seed, i])
        size = rng.uniform(MIN_SIZE, MAX_SIZE)
        # Keep the bounding box inside the image so every shape is seen whole.
        cx, cy = rng.uniform(size / 2.0, 1.0 - size / 2.0, size=2)
        image = render_shape(shape, COLOURS[colour], (cx, cy), size, self.image_size)
        return torch.from_numpy(image), label
