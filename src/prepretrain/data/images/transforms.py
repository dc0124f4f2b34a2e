"""Image transforms shared by the stages (torchvision; ImageNet mean/std normalisation)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pretrain_transform(image_size: int, min_scale: float = 0.2, flip: bool = True) -> T.Compose:
    """MAE/WSP augmentation: RandomResizedCrop(scale min-1, bicubic) + horizontal flip."""
    steps = [T.RandomResizedCrop(image_size, scale=(min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC)]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


def eval_transform(image_size: int, crop_fraction: float = 0.875) -> T.Compose:
    """Resize (bicubic) then center-crop; small images (<= 64 px) are resized straight to size."""
    resize = image_size if image_size <= 64 else int(math.floor(image_size / crop_fraction))
    return T.Compose(
        [
            T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def crop_eval_transform(image_size: int, eval_crop: str = "auto") -> T.Compose:
    """The evaluation transform named by ``eval_crop``: ``auto`` = :func:`eval_transform`'s default
    (crop 0.875, small images resized straight to size); a fraction f in (0, 1] = resize the shorter side
    to floor(size / f) then center-crop, at every size; ``squash`` = resize to (size, size), aspect
    ratio not kept (MAWS's released evaluation)."""
    choice = str(eval_crop).strip().lower()
    if choice == "auto":
        return eval_transform(image_size)
    if choice == "squash":
        resize = T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC)
        return T.Compose([resize, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    fraction = parse_crop_fraction(choice)
    return T.Compose(
        [
            T.Resize(int(math.floor(image_size / fraction)), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def parse_crop_fraction(text: str) -> float:
    """A crop fraction in (0, 1] from text; ValueError otherwise."""
    try:
        fraction = float(text)
    except ValueError:
        raise ValueError(f"expected auto, squash or a crop fraction in (0, 1]; got '{text}'") from None
    if not (math.isfinite(fraction) and 0 < fraction <= 1):
        raise ValueError(f"a crop fraction must be in (0, 1]; got '{text}'")
    return fraction


def decode_hint(image_size: int, min_scale: float) -> int:
    """Smallest shorter side that still lets a random-resized crop avoid upsampling (draft mode)."""
    return int(math.ceil(image_size / math.sqrt(min_scale)))


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Normalised (N, 3, H, W) -> [0, 1] pixels, for pictures."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


def to_pil(image: torch.Tensor) -> Image.Image:
    array = (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)


class ZeroBitPosterize:
    """timm's posterize keeping 0 bits as a black image. timm's RandAugment posterize reaches 0 bits
    (the "increasing" variant at magnitude 10, the plain one below 2.5, both within ``mstd`` noise);
    Pillow used to return black there (what the reference runs saw) and now raises. A class, not a
    closure, so transforms holding it pickle for loader workers under any start method."""

    def __init__(self, original: Callable[..., Image.Image]):
        self.original = original

    def __call__(self, image: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
        if bits_to_keep <= 0:
            return Image.new(image.mode, image.size)  # keeping no bit leaves 0 everywhere
        return self.original(image, bits_to_keep, **kwargs)
