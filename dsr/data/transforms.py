"""ImageNet preprocessing: the ADM / DiT centre crop, an optional horizontal flip, and conversion to [0, 1].

No normalisation happens here: the encoder owns it, so every dataset hands over plain [0, 1] images.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from PIL import Image
from torch import Tensor
from torchvision import transforms as T


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """Square `image_size` crop from the centre of the image, resized as in ADM and DiT.

    Large images are first halved with a box filter while the short side is at least twice the target
    (cheap, alias-free downscaling); one bicubic resize then brings the short side to exactly
    `image_size`, and the long side is cropped symmetrically (the extra pixel, if odd, goes to the end).
    """
    while min(pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize((pil_image.width // 2, pil_image.height // 2), resample=Image.BOX)

    scale = image_size / min(pil_image.size)
    new_size = (round(pil_image.width * scale), round(pil_image.height * scale))
    pil_image = pil_image.resize(new_size, resample=Image.BICUBIC)

    left = (pil_image.width - image_size) // 2
    top = (pil_image.height - image_size) // 2
    return pil_image.crop((left, top, left + image_size, top + image_size))


def _to_rgb(pil_image: Image.Image) -> Image.Image:
    # Grey-scale and CMYK files exist in ImageNet; the model always sees three channels.
    return pil_image if pil_image.mode == "RGB" else pil_image.convert("RGB")


def train_transform(image_size: int, flip: bool = True) -> Callable[[Image.Image], Tensor]:
    """PIL image -> float32 tensor [3, image_size, image_size] in [0, 1]; centre crop, then a random flip.

    Built from module-level functions and `partial` so the transform pickles into spawned loader workers.
    """
    steps: list[Callable] = [T.Lambda(_to_rgb), T.Lambda(partial(center_crop_arr, image_size=image_size))]
    if flip:
        steps.append(T.RandomHorizontalFlip(p=0.5))
    steps.append(T.ToTensor())
    return T.Compose(steps)


def eval_transform(image_size: int) -> Callable[[Image.Image], Tensor]:
    """Deterministic version of `train_transform`: the centre crop without the flip."""
    return train_transform(image_size, flip=False)
