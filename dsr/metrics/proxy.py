"""A proxy for FID where Inception and ImageNet are out of reach: a small CNN classifier trained in-project.

For a dataset with a held-out split (`data=digits`, `data=synthetic`: anything with a `heldout()` method), the
classifier is trained on the training split (deterministic, about 10 s on 2 CPU cores) and cached under
`<root>/<dataset>-<hash>/`, where the hash covers the training and held-out images, their labels and this module's
source: other data or changed code rebuild it, nothing else does. Its penultimate layer (64 features, well below
the 360 held-out digits, so the covariance is not singular) plays Inception's pool features, and its logits give:

- **FD**: the Frechet distance of generated vs held-out features, through the same code as FID (torch-fidelity's
  statistics-to-metric function, cross-checked; the same reference-statistics cache);
- **conditional accuracy**: the share of samples generated for class y that it classifies as y;
- **precision / recall** (k = 3) in its feature space.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from dsr.metrics.features import FeatureNetwork
from dsr.utils.files import atomic_write
from dsr.utils.images import to_uint8

log = logging.getLogger(__name__)

FEATURE_DIM = 64
INPUT_SIZE = 16  # every image is resized to this before the network (the digits are 8 px)
# Training: Adam with a cosine decay over a fixed number of samples seen (not epochs, so small datasets stay fast),
# random shifts of up to SHIFT pixels.
TRAIN_IMAGES, BATCH_SIZE, LR, SHIFT, SEED = 40_000, 64, 1e-3, 1, 0


class ProxyNet(nn.Module):
    """Five 3x3 convolutions (32, 32, 64, 64, 128 channels, two 2x poolings), global average pooling, a 64-wide
    feature layer and the class logits. Input: images in [0, 1], [B, 3, 16, 16]."""

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.ReLU()]

        self.body = nn.Sequential(
            *conv(3, width), *conv(width, width), nn.MaxPool2d(2),
            *conv(width, 2 * width), *conv(2 * width, 2 * width), nn.MaxPool2d(2),
            *conv(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.features = nn.Linear(4 * width, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.features(self.body((x - 0.5) / 0.5))
        return features, self.head(F.relu(features))


def _prepare(images: Tensor) -> Tensor:
    """uint8 [B, 3, H, W] -> float [B, 3, 16, 16] in [0, 1]."""
    x = images.float() / 255.0
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x


class ProxyFeatures(FeatureNetwork):
    """A trained `ProxyNet` as a metric network: (features [B, 64], logits [B, K]) of uint8 images."""

    distance = "fd"
    log_prefix = "proxy"
    feature_dim = FEATURE_DIM

    def __init__(self, net: ProxyNet, tag: str) -> None:
        super().__init__()
        self.net = net.eval()
        self.tag = tag
        self.num_logits = net.head.out_features

    @property
    def cache_tag(self) -> str:
        return f"proxy-{self.tag}"

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        self.net.eval()
        return self.net(_prepare(images.to(self.device)))

    def logit_scores(self, logits: Tensor, labels: Tensor | None) -> dict[str, float]:
        if labels is None:
            return {}
        return {"conditional_accuracy": conditional_accuracy(logits, labels)}


def conditional_accuracy(logits: Tensor, labels: Tensor) -> float:
    """The share of samples whose predicted class is the class they were generated for."""
    labels = torch.as_tensor(labels).long()
    return float((logits.argmax(dim=1) == labels).float().mean())


def train_proxy(images: Tensor, labels: Tensor, num_classes: int, progress: bool = False) -> ProxyNet:
    """Train a `ProxyNet` on uint8 images [N, 3, H, W] with labels [N]; deterministic for given inputs. The caller's
    random state is left as it was (a training run may call this mid-run), and gradients are on even under no_grad."""
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(SEED)
        return _train(ProxyNet(num_classes), images, labels, progress)


def _train(net: ProxyNet, images: Tensor, labels: Tensor, progress: bool) -> ProxyNet:
    generator = torch.Generator().manual_seed(SEED)
    x, y = _prepare(images), labels.long()
    steps = -(-TRAIN_IMAGES // BATCH_SIZE)
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    net.train()
    for _ in tqdm(range(steps), desc="proxy classifier", disable=not progress, leave=False):
        batch = torch.randint(len(x), (BATCH_SIZE,), generator=generator)
        shift = torch.randint(-SHIFT, SHIFT + 1, (2,), generator=generator).tolist()
        inputs = torch.roll(x[batch], shifts=shift, dims=(-2, -1))  # the background wraps in: no new edges
        loss = F.cross_entropy(net(inputs)[1], y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return net.eval()


@torch.no_grad()
def accuracy(net: ProxyNet, images: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    logits = torch.cat([net(_prepare(images[i : i + batch_size]))[1] for i in range(0, len(images), batch_size)])
    return conditional_accuracy(logits, labels)


def dataset_arrays(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """A map-style dataset of (image [3, H, W] in [0, 1], label) -> (uint8 [N, H, W, 3], int64 [N]), as samples are
    stored (ADM's layout)."""
    images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return to_uint8(torch.stack(images)), np.asarray(labels, dtype=np.int64)


@dataclass
class Proxy:
    """A dataset's proxy classifier and its held-out reference (an ADM-style npz: arr_0 images, arr_1 labels)."""

    network: ProxyFeatures
    reference: Path
    heldout_accuracy: float
    folder: Path


def _fingerprint(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256(inspect.getsource(inspect.getmodule(_fingerprint)).encode())
    for array in arrays:
        digest.update(str((array.dtype, array.shape)).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def check_proxy_data(dataset: Dataset) -> None:
    if not hasattr(dataset, "heldout"):
        raise ValueError(
            f"evaluation.features=proxy needs a dataset with a held-out split (data=digits or data=synthetic); "
            f"{type(dataset).__name__} has none: use evaluation.features=inception (with an FID reference) or turn "
            "the evaluation off with callbacks.fid.every_n_steps=0"
        )


def proxy_for(dataset: Dataset, root: str | Path, num_classes: int | None = None, progress: bool = False) -> Proxy:
    """The proxy classifier of `dataset` (its training split) and its held-out reference, trained on first use and
    cached under `root`."""
    check_proxy_data(dataset)
    num_classes = num_classes or dataset.num_classes
    train_images, train_labels = dataset_arrays(dataset)
    heldout_images, heldout_labels = dataset_arrays(dataset.heldout())
    tag = _fingerprint(train_images, train_labels, heldout_images, heldout_labels)
    folder = Path(root) / f"{type(dataset).__name__.lower()}-{tag}"
    weights, reference, report = folder / "proxy.pt", folder / "heldout.npz", folder / "proxy.json"
    if not (weights.is_file() and reference.is_file() and report.is_file()):
        started = time.perf_counter()
        as_nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)  # noqa: E731
        net = train_proxy(as_nchw(train_images), torch.from_numpy(train_labels), num_classes, progress=progress)
        held = accuracy(net, as_nchw(heldout_images), torch.from_numpy(heldout_labels))
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(reference, lambda f: np.savez(f, arr_0=heldout_images, arr_1=heldout_labels))
        atomic_write(weights, lambda f: torch.save({"state_dict": net.state_dict(), "num_classes": num_classes}, f))
        summary = {"dataset": type(dataset).__name__, "train_images": len(train_images),
                   "heldout_images": len(heldout_images), "heldout_accuracy": held,
                   "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
        atomic_write(report, lambda f: f.write(json.dumps(summary, indent=2).encode() + b"\n"))  # last: complete
        log.info("proxy classifier of %s: held-out accuracy %.4f (%s)", summary["dataset"], held, folder)
    stored = torch.load(weights, map_location="cpu", weights_only=True)
    net = ProxyNet(int(stored["num_classes"]))
    net.load_state_dict(stored["state_dict"])
    held = json.loads(report.read_text())["heldout_accuracy"]
    return Proxy(ProxyFeatures(net, tag), reference, held, folder)
