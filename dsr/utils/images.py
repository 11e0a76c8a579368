"""Images in [0, 1] as the 8-bit images they are saved and scored as."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def quantize(images: Tensor) -> Tensor:
    """Images [..., H, W] in [0, 1] (any range: clamped) -> uint8 of the same shape: round(x * 255) clamped to
    [0, 255] (torch's round, half to even)."""
    return (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)


def to_uint8(images: Tensor) -> np.ndarray:
    """Images [B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3] (channels last, on the CPU) as `quantize` rounds them."""
    return quantize(images).permute(0, 2, 3, 1).contiguous().cpu().numpy()
