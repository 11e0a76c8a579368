"""LPIPS (VGG16) as a frozen perceptual loss, read from local files only.

The network is torchmetrics' LPIPS (`_LPIPS`): VGG16 features relu1_2 ... relu5_3, unit-normalised per position, squared
differences weighted by the learned 1x1 "lin" layers (LPIPS v0.1, the weights taming-transformers' `vgg.pth` holds,
shipped inside torchmetrics) and averaged over space. The VGG16 trunk is torchvision's ImageNet model, loaded from a
local copy of `vgg16-397923af.pth` rather than fetched through torch.hub.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.functional.image.lpips import _LPIPS

from dsr.utils.frozen import mark_frozen

VGG_WEIGHTS_FILE = "vgg16-397923af.pth"
VGG_WEIGHTS_URL = f"https://download.pytorch.org/models/{VGG_WEIGHTS_FILE}"
# torchvision's `features.i` -> the LPIPS trunk's five slices (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
VGG_SLICE_ENDS = (4, 9, 16, 23, 30)


def default_vgg_weights() -> Path:
    """Where torchvision would cache the VGG16 weights: $TORCH_HOME/hub/checkpoints/vgg16-397923af.pth."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG_WEIGHTS_FILE


def vgg_trunk_state_dict(torchvision_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision VGG16 `features.{i}.*` -> torchmetrics LPIPS `net.slice{s}.{i}.*` (the classifier is dropped)."""
    converted = {}
    for key, value in torchvision_state.items():
        if not key.startswith("features."):
            continue
        index = int(key.split(".")[1])
        if index >= VGG_SLICE_ENDS[-1]:
            continue
        slice_number = next(s for s, end in enumerate(VGG_SLICE_ENDS, start=1) if index < end)
        converted[f"net.slice{slice_number}.{key[len('features.') :]}"] = value
    return converted


class LPIPS(nn.Module):
    """Frozen LPIPS(VGG16): images [B, 3, H, W] in [0, 1] (mapped to [-1, 1] inside) -> distance.

    Args:
        vgg_weights: torchvision's `vgg16-397923af.pth`; None looks in the torch hub cache (`default_vgg_weights`).
        random_init: leave the VGG trunk at random initialisation (tests only; the distance is then meaningless).
    """

    def __init__(self, vgg_weights: str | os.PathLike | None = None, random_init: bool = False) -> None:
        super().__init__()
        # pretrained=True loads only the lin layers, from the file inside torchmetrics; pnet_rand=True builds the VGG
        # trunk with weights=None, so nothing is downloaded. The trunk is loaded below.
        self.net = _LPIPS(pretrained=True, net="vgg", pnet_rand=True, use_dropout=True, eval_mode=True)
        if not random_init:
            path = Path(vgg_weights).expanduser() if vgg_weights else default_vgg_weights()
            if not path.is_file():
                raise FileNotFoundError(
                    f"LPIPS VGG16 weights not found at {path}. Set module.lpips.vgg_weights=/path/to/"
                    f"{VGG_WEIGHTS_FILE} (or $DSR_VGG_WEIGHTS), or place the file in $TORCH_HOME/hub/checkpoints/; "
                    "it is torchvision's "
                    f"ImageNet VGG16, {VGG_WEIGHTS_URL}"
                )
            trunk = vgg_trunk_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            missing, unexpected = self.net.load_state_dict(trunk, strict=False)
            missing = [k for k in missing if k.startswith("net.")]
            if missing or unexpected:
                raise ValueError(f"module.lpips.vgg_weights={path} is not a torchvision VGG16 state dict")
        mark_frozen(self)

    def forward(self, x: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
        """x, y [B, 3, H, W] in [0, 1] -> the mean distance (scalar), or [B] with reduction="none"."""
        distance = self.net(x, y, normalize=True).flatten()  # [B]
        return distance.mean() if reduction == "mean" else distance
