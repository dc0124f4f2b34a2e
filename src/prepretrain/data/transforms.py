"""Image transforms shared by the stages (torchvision; ImageNet mean/std normalisation)."""

from __future__ import annotations

import math

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
