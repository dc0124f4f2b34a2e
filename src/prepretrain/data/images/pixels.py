"""How training stages turn stored images into augmented, normalised batches (``decode=``).

Every pretraining stage (MAE, WSP, LiT with ``augment=true``) applies the same image
augmentation: a random-resized crop (bicubic) and a horizontal flip, then ImageNet
normalisation. ``decode=`` picks where and how that happens:

* ``pil``: Pillow decode (draft mode for large JPEGs) + torchvision's PIL transforms, per
  sample in the loader workers. The reference implementation's path.
* ``tensor`` (what ``auto`` means): sources return ``uint8`` tensors (libjpeg-turbo via
  ``torchvision.io``, or Pillow draft mode when that shrinks the image);
  :class:`~prepretrain.data.images.tensors.TensorRandomResizedCrop` crops and resizes in ``uint8``;
  :class:`~prepretrain.data.images.tensors.NormalizeImages` converts the collated batch once. 1.8-2.1x
  the Pillow path per core (``prepretrain bench data``, BENCHMARKS.md).
* ``gpu``: loader workers only read the encoded files (and check their headers); the
  training device decodes the whole micro-batch in one ``decode_jpeg`` call (nvJPEG on
  CUDA) and crops, flips and normalises it there (:class:`DeviceAugment`), so the host
  does almost no pixel work. Needs file-based data (the synthetic set is drawn in memory).
  On a CPU device the same steps run on the CPU, which is how the tests check it.

The distribution of crops and flips is the same in all three (torchvision's
``RandomResizedCrop.get_params``); the pixels differ by resize rounding only. Crops are
seeded by sample position (``gpu``: position within the micro-batch as collated), so
every path resumes exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from prepretrain.config import DECODE_MODES, decode_problem
from prepretrain.data.images.tensors import BatchAugment, NormalizeImages, TensorRandomResizedCrop
from prepretrain.data.images.transforms import pretrain_transform
from prepretrain.data.loader import sample_seed


def resolve_decode(decode: str, data: str) -> str:
    """``auto`` -> ``tensor``; the checks of ``TrainConfig.validate`` for callers without a config."""
    problem = decode_problem(decode, data)
    if problem:
        raise ValueError(f"decode: {problem}")
    return "tensor" if decode == "auto" else decode


class _PassEncoded:
    """Per-sample step of ``decode=gpu``: the encoded file goes to the batch untouched."""

    def __call__(self, image: Any) -> Any:
        return image


@dataclass
class TrainPixels:
    """One decode mode, as the pieces a stage plugs in.

    ``pixels``: what ``open_data(pixels=...)`` must return in ``Record.image``;
    ``sample``: the per-sample image transform (in loader workers);
    ``batch``: the per-batch transform after collation (in loader workers), or None;
    ``device``: the per-batch transform on the training device (``TrainData.device_transform``), or None.
    """

    mode: str
    pixels: str
    sample: Callable[[Any], Any]
    batch: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    device: DeviceAugment | None = None


def train_pixels(decode: str, data: str, image_size: int, min_scale: float, flip: bool = True) -> TrainPixels:
    """The pieces of decode mode ``decode`` for crops of ``image_size`` with area scale ``(min_scale, 1)``."""
    mode = resolve_decode(decode, data)
    if mode == "pil":
        return TrainPixels(mode, "pil", pretrain_transform(image_size, min_scale, flip=flip))
    if mode == "tensor":
        return TrainPixels(mode, "tensor", TensorRandomResizedCrop(image_size, (min_scale, 1.0), flip=flip),
                           batch=NormalizeImages())
    return TrainPixels(mode, "bytes", _PassEncoded(), device=DeviceAugment(image_size, (min_scale, 1.0), flip=flip))


class DeviceAugment:
    """``decode=gpu``: a collated batch of encoded images -> normalised crops on the device.

    ``batch[key]`` is the list of :class:`~prepretrain.data.images.decode.EncodedImage` the loader
    collated. Files the device decoder cannot read are dropped from every per-sample entry
    of the batch (tensors and lists of the same length) and reported in ``_skipped`` with
    their reason and key, like the loader's skips, so the engine counts them and stops above
    ``max_bad_fraction``.
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.2, 1.0), flip: bool = True, key: str = "image"):
        self.size = size
        self.scale = scale
        self.flip = flip
        self.key = key

    def __call__(self, batch: dict[str, Any], device: torch.device, *, seed: int, position: int) -> dict[str, Any]:
        """Decode and augment ``batch`` on ``device``; the ``j``-th image's crop and flip are
        drawn from ``sample_seed(seed, position + j)`` (``position``: the micro-batch's first
        global sample position), so they do not depend on batch layout or device."""
        encoded = batch.get(self.key)
        if encoded is None:  # every sample was already skipped in the workers
            return batch
        keys = [getattr(item, "key", str(index)) for index, item in enumerate(encoded)]
        seeds = [sample_seed(seed, position + index) for index in range(len(encoded))]
        augment = BatchAugment(self.size, self.scale, flip=self.flip, device=device)
        out = augment(encoded, keys, keep_index=True, seeds=seeds)
        count = len(encoded)
        kept = out.pop("_kept")
        batch = dict(batch)
        if len(kept) < count:
            index = torch.tensor(kept, dtype=torch.long)
            for name, value in list(batch.items()):
                if name.startswith("_") or name == self.key:
                    continue
                if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == count:
                    batch[name] = value.index_select(0, index.to(value.device))
                elif isinstance(value, list) and len(value) == count:
                    batch[name] = [value[i] for i in kept]
        batch["_skipped"] = list(batch.get("_skipped", [])) + out["_skipped"]
        if "image" in out:
            batch[self.key] = out["image"]
        else:
            batch.pop(self.key)
        return batch


__all__ = ["DECODE_MODES", "DeviceAugment", "TrainPixels", "resolve_decode", "train_pixels"]
