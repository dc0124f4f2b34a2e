"""Decoding and random-resized-crop augmentation on tensors: batched on the GPU, the same code on CPU.

Why: JPEG decoding plus a Pillow random-resized crop costs 2-4 ms per image on one core
(BENCHMARKS.md, ``prepretrain bench data``), so feeding one H100 running MAE-B needs a dozen cores. Two ways
out, both here:

* **Per sample, in DataLoader workers (CPU).** :class:`TensorRandomResizedCrop` replaces
  torchvision's PIL ``RandomResizedCrop -> ToTensor -> Normalize``: it crops a *view* of
  the decoded pixels (no copy) and resizes it with torch's antialiased bicubic kernel on
  ``uint8``, which is several times faster than Pillow's bicubic (PIL-SIMD is not on PyPI)
  and matches it closely, then flips the small ``uint8`` result. Nothing is converted to
  float per sample; :class:`NormalizeImages`, given to ``RecordDataset(batch_transform=)``,
  converts the collated ``uint8`` batch once. With a source opened with ``pixels="tensor"``
  (``decode.load_tensor``) Pillow is skipped entirely: 1.8-2.1x the samples/s per core of
  the Pillow + torchvision pipeline (BENCHMARKS.md).
* **Per batch, on a device.** :class:`BatchAugment` takes the *encoded* bytes of a batch,
  decodes all JPEGs in one ``torchvision.io.decode_jpeg(list, device="cuda")`` call
  (nvJPEG), and crops, resizes, flips and normalises on the GPU, so the host only reads
  files. On CPU the same class runs the same steps with libjpeg-turbo, which is how the
  tests exercise it. Training uses it with ``decode=gpu`` (``prepretrain.data.images.pixels``).

Crop boxes follow ``torchvision.transforms.RandomResizedCrop.get_params`` (area fraction
uniform in ``scale``, log-uniform aspect ratio, 10 attempts, then a centre crop with the
ratio clamped), sampled for a whole batch at once by :func:`sample_crop_boxes`.

Bad input keeps the project's policy (``prepretrain.data.images.decode``): the header is checked
on the host first (format, size limit against decompression bombs, EXIF orientation, which
nvJPEG does not apply), anything that is not a plain RGB/greyscale JPEG or that the fast
decoder rejects goes through Pillow's :func:`~prepretrain.data.images.decode.load_image`, and what
cannot be decoded is reported as ``(reason, key)`` in ``_skipped`` like the loader does.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from prepretrain.data.images.decode import (
    DEFAULT_MAX_PIXELS,
    FAST_JPEG_MODES,
    apply_orientation,
    decode_jpeg_tensors,
    jpeg_looks_complete,
    load_image,
    pil_to_tensor,
    probe_image,
)
from prepretrain.data.images.transforms import IMAGENET_MEAN, IMAGENET_STD
from prepretrain.data.records import BadSample


def sample_crop_boxes(
    sizes: torch.Tensor | Sequence[tuple[int, int]],
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> torch.Tensor:
    """Random-resized-crop boxes ``(top, left, height, width)`` for images of ``sizes`` ``(height, width)``.

    The distribution of torchvision's ``RandomResizedCrop.get_params`` (per image: up to
    ``attempts`` draws of an area fraction in ``scale`` and a log-uniform aspect ratio in
    ``ratio``; the first that fits wins; otherwise the largest centred crop with the ratio
    clamped), drawn for all images with one ``torch.rand`` call on the CPU, so the boxes do
    not depend on the device or the batch size of the caller. Returns int64 ``(N, 4)``.
    """
    sizes = torch.as_tensor(sizes, dtype=torch.float64).reshape(-1, 2)
    uniform = torch.rand(len(sizes), attempts, 4, generator=generator, dtype=torch.float64)
    return crop_boxes_from_uniform(sizes, uniform, scale, ratio)


def crop_boxes_from_uniform(
    sizes: torch.Tensor, uniform: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float]
) -> torch.Tensor:
    """:func:`sample_crop_boxes` given its uniform draws ``(N, attempts, 4)``: (area, aspect, top, left)."""
    sizes = torch.as_tensor(sizes, dtype=torch.float64).reshape(-1, 2)
    heights, widths = sizes[:, 0], sizes[:, 1]
    area = (heights * widths)[:, None] * (scale[0] + (scale[1] - scale[0]) * uniform[..., 0])
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_low + (log_high - log_low) * uniform[..., 1])
    crop_w = torch.round(torch.sqrt(area * aspect))
    crop_h = torch.round(torch.sqrt(area / aspect))
    fits = (crop_w > 0) & (crop_h > 0) & (crop_w <= widths[:, None]) & (crop_h <= heights[:, None])
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # first attempt that fits (0 when none)

    def chosen(values: torch.Tensor) -> torch.Tensor:
        return values.gather(1, first).squeeze(1)

    height, width = chosen(crop_h), chosen(crop_w)
    top = torch.floor(chosen(uniform[..., 2]) * (heights - height + 1))
    left = torch.floor(chosen(uniform[..., 3]) * (widths - width + 1))

    image_ratio = widths / heights
    too_tall, too_wide = image_ratio < min(ratio), image_ratio > max(ratio)
    fallback_w = torch.where(too_wide, torch.round(heights * max(ratio)), widths)
    fallback_h = torch.where(too_tall, torch.round(widths / min(ratio)), heights)
    fallback_top = torch.div(heights - fallback_h, 2, rounding_mode="floor")
    fallback_left = torch.div(widths - fallback_w, 2, rounding_mode="floor")
    found = fits.any(dim=1)
    boxes = torch.stack(
        [
            torch.where(found, top, fallback_top),
            torch.where(found, left, fallback_left),
            torch.where(found, height, fallback_h),
            torch.where(found, width, fallback_w),
        ],
        dim=1,
    )
    return boxes.long()


def crop_box_from_uniform(
    height: int, width: int, uniform: Sequence[Sequence[float]], scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """One image's box from its draws, in plain Python: the per-sample path, where a few
    dozen tiny tensor ops would cost more than the resize. Same arithmetic as
    :func:`crop_boxes_from_uniform` (float64, round half to even, floor)."""
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for area_draw, aspect_draw, top_draw, left_draw in uniform:
        area = height * width * (scale[0] + (scale[1] - scale[0]) * area_draw)
        aspect = math.exp(log_low + (log_high - log_low) * aspect_draw)
        crop_w, crop_h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = math.floor(top_draw * (height - crop_h + 1))
            left = math.floor(left_draw * (width - crop_w + 1))
            return top, left, crop_h, crop_w
    image_ratio = width / height
    crop_w, crop_h = width, height
    if image_ratio < min(ratio):
        crop_h = round(width / min(ratio))
    elif image_ratio > max(ratio):
        crop_w = round(height * max(ratio))
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def resized_crop(
    image: torch.Tensor, box: Sequence[int] | torch.Tensor, size: int, *, flip: bool = False,
    float_kernel: bool | None = None,
) -> torch.Tensor:
    """Crop ``box`` (top, left, height, width) of a ``uint8`` ``(C, H, W)`` image and resize it to ``size``.

    Antialiased bicubic, as Pillow's bicubic resize (which always filters over the whole
    footprint when shrinking). The crop is a view, so only the output is written. On CPU
    the ``uint8`` kernel is used and the result is ``uint8``; elsewhere (``float_kernel``,
    default: not on CPU) the kernel runs in float32 and the result is float32 in [0, 255],
    clamped but not rounded, because it is about to be normalised anyway.
    """
    top, left, height, width = (int(value) for value in box)
    crop = image[None, :, top : top + height, left : left + width]
    if float_kernel is None:
        float_kernel = image.device.type != "cpu"
    if float_kernel:
        out = F.interpolate(crop.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        out = out.clamp_(0, 255)
    else:
        out = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    out = out[0]
    return out.flip(-1) if flip else out


def normalize_uint8(images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """``(N, C, H, W)`` pixels in [0, 255] (uint8 or float) -> float32 ``(x / 255 - mean) / std``.

    Once per batch (and on the device when the batch is there) instead of per-sample
    ``ToTensor`` + ``Normalize``: a conversion and two in-place passes. (``torch.addcmul``
    with these broadcast per-channel operands looks fused but is 20x slower on CPU.)
    The input is never modified.
    """
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=images.device).view(1, -1, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=images.device).view(1, -1, 1, 1)
    return images.to(torch.float32, copy=True).mul_(scale).add_(shift)


def _pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> ``uint8`` ``(3, H, W)`` view with channels-last strides (one copy, by Pillow)."""
    with warnings.catch_warnings():
        # np.asarray over Pillow's bytes is read-only; nothing here writes to it.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(image)).permute(2, 0, 1)


class TensorRandomResizedCrop:
    """Per-sample ``RandomResizedCrop(size, scale, ratio, bicubic)`` + horizontal flip, to ``uint8``.

    A drop-in for the pixel part of ``transforms.pretrain_transform`` that never leaves
    ``uint8``: pair it with ``RecordDataset(..., batch_transform=NormalizeImages())`` so the
    batch is normalised once. Uses the global torch RNG, which ``RecordDataset`` seeds per
    sample position, so augmentation is reproducible and resumable like every other
    transform. Accepts an RGB PIL image or a ``uint8`` ``(3, H, W)`` tensor.
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True, attempts: int = 10):
        self.size = size
        self.scale = scale
        self.ratio = ratio
        self.flip = flip
        self.attempts = attempts

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        pixels = _pil_to_uint8(image) if isinstance(image, Image.Image) else image
        draws = torch.rand(self.attempts + 1, 4, dtype=torch.float64).tolist()
        box = crop_box_from_uniform(pixels.shape[-2], pixels.shape[-1], draws[:-1], self.scale, self.ratio)
        flip = self.flip and draws[-1][0] < 0.5
        return resized_crop(pixels, box, self.size, flip=flip)

    def __repr__(self) -> str:
        return f"TensorRandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio}, flip={self.flip})"


class NormalizeImages:
    """Batch transform: ``batch[key]`` uint8 ``(N, 3, H, W)`` -> normalised float32 (ImageNet mean/std).

    For ``RecordDataset(batch_transform=...)``: runs in the DataLoader worker after
    collation, once per batch. A picklable class (not a lambda) so spawned workers get it.
    """

    def __init__(self, key: str = "image", mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        self.key = key
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.key in batch:
            batch[self.key] = normalize_uint8(batch[self.key], self.mean, self.std)
        return batch


def decode_batch(
    encoded: Sequence[bytes],
    keys: Sequence[str],
    device: torch.device | str = "cpu",
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[list[torch.Tensor | None], list[tuple[str, str]]]:
    """Decode encoded images to upright RGB ``uint8`` ``(3, H, W)`` tensors on ``device``.

    Plain RGB/greyscale JPEGs that end with their end-of-image marker go to
    ``torchvision.io.decode_jpeg`` in one call (nvJPEG's batched decoder on CUDA, which does
    not notice truncation); everything else, and any JPEG that call rejects, goes through
    Pillow (``load_image``), which either decodes it or names the reason. Returns one
    entry per input (``None`` where it was bad) and the ``(reason, key)`` of the bad ones.
    """
    device = torch.device(device)
    images: list[torch.Tensor | None] = [None] * len(encoded)
    orientation = [1] * len(encoded)
    bad: list[tuple[str, str]] = []
    fast: list[int] = []
    slow: list[int] = []
    for index, (data, key) in enumerate(zip(encoded, keys)):
        try:
            info = probe_image(data, key, max_pixels=max_pixels)
        except BadSample as error:
            bad.append((error.reason, error.key))
            continue
        if info.format == "JPEG" and info.mode in FAST_JPEG_MODES and jpeg_looks_complete(data):
            fast.append(index)
            orientation[index] = info.orientation
        else:
            slow.append(index)
    if fast:
        try:
            decoded = decode_jpeg_tensors([encoded[i] for i in fast], device)
        except RuntimeError:  # one bad file fails the whole call: retry one by one
            decoded = []
            for index in fast:
                try:
                    decoded.append(decode_jpeg_tensors([encoded[index]], device)[0])
                except RuntimeError:
                    decoded.append(None)
        for index, image in zip(fast, decoded):
            if image is None:
                slow.append(index)  # Pillow names what is wrong (truncated, unreadable) or decodes it
            else:
                images[index] = apply_orientation(image, orientation[index])
    for index in sorted(slow):
        try:
            image = load_image(encoded[index], keys[index], max_pixels=max_pixels)
        except BadSample as error:
            bad.append((error.reason, error.key))
            continue
        images[index] = pil_to_tensor(image).contiguous().to(device, non_blocking=True)
    return images, bad


_ATTEMPTS = 10  # crop attempts per image, as torchvision


def _seeded_draws(seed: int, attempts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's crop draws ``(attempts, 4)`` and flip decision from a generator seeded by
    ``seed``: the draws :class:`TensorRandomResizedCrop` makes under the same seed, so both
    paths crop and flip a sample identically."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.rand(attempts + 1, 4, generator=generator, dtype=torch.float64)
    return draws[:-1], draws[-1, 0] < 0.5


class BatchAugment:
    """Encoded images -> a normalised, randomly cropped and flipped float32 batch on ``device``.

    ``__call__(encoded, keys)`` returns what ``collate_skipping_bad`` returns for a batch:
    ``{"image": (n_good, 3, size, size), "_skipped": [(reason, key), ...], "_seen": N}``.
    Crop boxes and flips come from ``generator`` (CPU), so a seeded generator gives the same
    augmentation on CPU and GPU. Pixel values differ from the CPU ``uint8`` path only by
    rounding on CPU (uint8 resize) versus GPU (float32), and on a GPU by nvJPEG's decode,
    which upsamples chroma differently from libjpeg-turbo: about 1 level of 255 on average,
    more at sharp colour edges (measured on an H200: mean 1.0, max 90).
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        device: torch.device | str = "cpu",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.size = size
        self.scale = scale
        self.ratio = ratio
        self.flip = flip
        self.device = torch.device(device)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.max_pixels = max_pixels

    def __call__(self, encoded: Sequence[bytes], keys: Sequence[str] | None = None,
                 generator: torch.Generator | None = None, keep_index: bool = False,
                 seeds: Sequence[int] | None = None) -> dict[str, Any]:
        """``keep_index=True`` adds ``"_kept"``: the input positions of the images in the batch.
        ``seeds`` (one per input) draw each image's crop and flip from its own generator, so an
        image's augmentation does not depend on the rest of the batch; otherwise ``generator``
        draws them for the whole batch."""
        keys = list(keys) if keys is not None else [str(index) for index in range(len(encoded))]
        images, bad = decode_batch(encoded, keys, self.device, max_pixels=self.max_pixels)
        good = [image for image in images if image is not None]
        batch: dict[str, Any] = {"_skipped": bad, "_seen": len(encoded)}
        if keep_index:
            batch["_kept"] = [index for index, image in enumerate(images) if image is not None]
        if not good:
            return batch
        sizes = [image.shape[-2:] for image in good]
        if seeds is not None:
            draws = [_seeded_draws(seeds[index], _ATTEMPTS) for index, image in enumerate(images) if image is not None]
            boxes = crop_boxes_from_uniform(torch.tensor(sizes), torch.stack([u for u, _ in draws]), self.scale,
                                            self.ratio)
            flips = torch.stack([flip for _, flip in draws])
        else:
            boxes = sample_crop_boxes(sizes, self.scale, self.ratio, generator)
            flips = torch.rand(len(good), generator=generator) < 0.5
        if not self.flip:
            flips.zero_()
        crops = torch.stack(
            [
                resized_crop(image, box, self.size, flip=bool(flip))
                for image, box, flip in zip(good, boxes.tolist(), flips.tolist())
            ]
        )
        batch["image"] = normalize_uint8(crops, self.mean, self.std)
        return batch


__all__ = [
    "BatchAugment",
    "NormalizeImages",
    "TensorRandomResizedCrop",
    "crop_box_from_uniform",
    "crop_boxes_from_uniform",
    "decode_batch",
    "normalize_uint8",
    "resized_crop",
    "sample_crop_boxes",
]
