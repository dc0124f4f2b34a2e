"""``prepretrain bench data``: decode + random-resized-crop + flip throughput of each input path.

Every path turns the same JPEG files into the same kind of training batch (normalised
float ``(N, 3, S, S)``, RandomResizedCrop(S, scale min_scale-1, bicubic) + horizontal
flip), one process, ``threads`` torch threads, so samples/s divided by ``threads`` is a
per-core figure. Except ``baseline``, each path is a training stage's ``decode=`` mode
exactly as the stages build it (``data.images.pixels.train_pixels``, ``train_loader``). Paths,
side by side with their ratio to the first:

``baseline``   what most training scripts do: ``Image.open().convert("RGB")``, torchvision
               ``RandomResizedCrop`` (Pillow bicubic) + flip + ``ToTensor`` + ``Normalize``
               per sample, ``DataLoader`` default collate. No project code.
``draft``      ``decode=pil``: a file source decoding with Pillow and
               ``min_size_hint = decode_hint(S, min_scale)`` (JPEG draft mode, which only
               helps once the shorter side exceeds twice the hint), the same torchvision
               transform.
``tensor``     ``decode=tensor`` (the default): the source decodes to tensors
               (torchvision.io/libjpeg-turbo straight into a uint8 tensor, no Pillow),
               ``gpu.TensorRandomResizedCrop`` (crop a view, torch's uint8 antialiased bicubic
               resize, uint8 flip) and ``gpu.NormalizeImages`` on the collated batch: no
               per-sample float work.
``batch_cpu``  ``decode=gpu`` with the CPU as the device: the loader reads files and checks
               headers, ``DeviceAugment`` decodes and augments the batch: the GPU path's code
               measured on the host.
``gpu``        ``decode=gpu`` on CUDA: nvJPEG batched decode and augmentation on the device
               (only when CUDA is available; the host reads files and checks headers).

The images are generated (photo-like: smooth colour fields, edges and fine texture, so
they compress like photos rather than like noise or flat colour) into a temporary folder,
``num_images`` of them between ``min_width`` x 3/4 and ``max_width`` x 3/4 pixels at JPEG
``quality``; or ``images_dir`` points at a folder of your own JPEGs.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from prepretrain.config import ConfigError
from prepretrain.data.images.decode import image_files
from prepretrain.data.images.pixels import train_pixels
from prepretrain.data.images.transforms import IMAGENET_MEAN, IMAGENET_STD, decode_hint
from prepretrain.data.loader import ImageOnly, RecordDataset, SampleStream, train_loader
from prepretrain.data.readers.open import open_source

PATHS = ("baseline", "draft", "tensor", "batch_cpu", "gpu")


@dataclass
class BenchDataConfig:
    """Settings of ``prepretrain bench data`` (``key=value`` overrides)."""

    num_images: int = 200
    image_size: int = 224  # output crop side
    min_scale: float = 0.2  # RandomResizedCrop area fraction range: (min_scale, 1)
    min_width: int = 500  # generated images are W x round(3W/4), W uniform in [min_width, max_width]
    max_width: int = 800
    quality: int = 90
    images_dir: str = ""  # a folder of your own JPEGs instead of generated ones
    batch_size: int = 32
    repeats: int = 3  # timed passes per path (interleaved); the median is reported
    paths: tuple[str, ...] = PATHS  # "gpu" is skipped without CUDA
    device: str = "auto"  # for the gpu path: auto | cuda | cuda:N
    threads: int = 1  # torch threads (run with OMP_NUM_THREADS=1 for per-core numbers)
    seed: int = 0
    json_out: str = ""  # also write the results here

    # Every numeric key this class defines, with its interval (config.check_bounds).
    bounds = {
        "num_images": "> 0", "image_size": "> 0", "min_scale": "(0, 1]", "min_width": "> 0", "max_width": "> 0",
        "quality": "[1, 100]", "batch_size": "> 0", "repeats": "> 0", "threads": "> 0", "seed": "any",
    }

    def validate(self) -> None:
        if self.max_width < self.min_width:
            raise ConfigError("max_width", f"must be >= min_width {self.min_width}, got {self.max_width}")
        unknown = [name for name in self.paths if name not in PATHS]
        if unknown or not self.paths:
            raise ConfigError("paths", f"choose from {', '.join(PATHS)}; got {list(self.paths)}")
        if not (self.device in ("auto", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError("device", f"the gpu path runs on auto, cuda or cuda:N, got '{self.device}'")
        if self.images_dir and not Path(self.images_dir).is_dir():
            raise ConfigError("images_dir", f"not a directory: {self.images_dir}")


# ---------------------------------------------------------------------------------- images
def photo_like(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A synthetic photograph: what matters for decode speed is how it compresses.

    Smooth colour regions (large-scale structure, most of a photo), a few hard-edged
    shapes (object boundaries) and low-amplitude fine texture (sensor noise, foliage),
    which puts a q90 JPEG of 640x480 near 2 bits per pixel, as typical web photos are.
    """
    coarse = Image.fromarray(rng.integers(0, 256, (height // 64 + 2, width // 64 + 2, 3), dtype=np.uint8))
    image = coarse.resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1 = x0 + int(rng.integers(width // 16 + 1, width // 2 + 2))
        y1 = y0 + int(rng.integers(height // 16 + 1, height // 2 + 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    texture = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    texture = texture.filter(ImageFilter.GaussianBlur(1.0))
    return Image.blend(image, texture, 0.25)


def write_benchmark_images(out_dir: Path, cfg: BenchDataConfig) -> list[Path]:
    """``cfg.num_images`` photo-like JPEGs (seeded), 4:3, widths in [min_width, max_width]."""
    rng = np.random.default_rng(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(cfg.num_images):
        width = int(rng.integers(cfg.min_width, cfg.max_width + 1))
        path = out_dir / f"{index:06d}.jpg"
        photo_like(width, round(width * 3 / 4), rng).save(path, format="JPEG", quality=cfg.quality)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------- paths
class PlainFolder(Dataset):
    """The baseline: torchvision's ImageFolder loader without the project (Pillow open + convert)."""

    def __init__(self, files: list[Path], transform: Callable[[Image.Image], torch.Tensor]):
        self.files = files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        with open(self.files[index], "rb") as handle:
            image = Image.open(handle).convert("RGB")
        return self.transform(image)


def _baseline_pass(files: list[Path], cfg: BenchDataConfig) -> Callable[[], int]:
    transform = T.Compose(
        [
            T.RandomResizedCrop(cfg.image_size, scale=(cfg.min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    loader = DataLoader(PlainFolder(files, transform), batch_size=cfg.batch_size, shuffle=False, num_workers=0)

    def run() -> int:
        return sum(len(batch) for batch in loader)

    return run


def _stage_pass(folder: Path, count: int, cfg: BenchDataConfig, decode: str,
                device: torch.device | None = None) -> Callable[[], int]:
    """What a training stage's loader does with ``decode=`` (and, for ``gpu``, its device transform)."""
    pixels = train_pixels(decode, str(folder), cfg.image_size, cfg.min_scale)
    # A FolderSource lists the same sorted files as image_files, so indices < count are the benchmark's files.
    source = open_source(folder, kind="folder", min_size_hint=decode_hint(cfg.image_size, cfg.min_scale),
                         pixels=pixels.pixels)
    dataset = RecordDataset(source, ImageOnly(pixels.sample), pixels.batch)
    batches = math.ceil(count / cfg.batch_size)
    stream = SampleStream(count, cfg.batch_size, seed=cfg.seed)

    def run() -> int:
        iterator = iter(train_loader(dataset, stream, num_workers=0))
        seen = 0
        for index in range(batches):
            batch = next(iterator)
            if pixels.device is not None:
                batch = pixels.device(batch, device, seed=cfg.seed, position=index * cfg.batch_size)
            assert batch["image"].dtype == torch.float32
            seen += batch["_seen"]
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        return seen

    return run


def _gpu_device(cfg: BenchDataConfig) -> torch.device | None:
    if not torch.cuda.is_available():
        return None
    return torch.device("cuda" if cfg.device == "auto" else cfg.device)


# ------------------------------------------------------------------------------------- run
def run_data_benchmark(cfg: BenchDataConfig) -> dict[str, Any]:
    """Time each path on the same files; print a table and return the figures."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    temporary = None
    try:
        if cfg.images_dir:
            folder = Path(cfg.images_dir)
            files = image_files(folder)[: cfg.num_images]
            if not files:
                raise ConfigError("images_dir", f"no images in {folder}")
        else:
            temporary = tempfile.TemporaryDirectory(prefix="prepretrain-bench-data-")
            folder = Path(temporary.name)
            files = write_benchmark_images(folder, cfg)
        return _run(cfg, folder, files)
    finally:
        torch.set_num_threads(threads_before)
        if temporary is not None:
            temporary.cleanup()


def _run(cfg: BenchDataConfig, folder: Path, files: list[Path]) -> dict[str, Any]:
    gpu = _gpu_device(cfg)
    builders: dict[str, Callable[[], Callable[[], int]]] = {
        "baseline": lambda: _baseline_pass(files, cfg),
        "draft": lambda: _stage_pass(folder, len(files), cfg, "pil"),
        "tensor": lambda: _stage_pass(folder, len(files), cfg, "tensor"),
        "batch_cpu": lambda: _stage_pass(folder, len(files), cfg, "gpu", torch.device("cpu")),
    }
    if gpu is not None:
        builders["gpu"] = lambda: _stage_pass(folder, len(files), cfg, "gpu", gpu)
    names = [name for name in cfg.paths if name in builders]
    if "baseline" not in names:
        names.insert(0, "baseline")  # ratios need it
    passes = {name: builders[name]() for name in names}
    for run in passes.values():
        run()  # warm-up: page cache, lazy imports, CUDA/nvJPEG initialisation
    rates: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(cfg.repeats):  # interleaved, so load from other jobs hits every path alike
        for name, run in passes.items():
            start = time.perf_counter()
            seen = run()
            rates[name].append(seen / (time.perf_counter() - start))

    sizes = [Image.open(path).size for path in files]
    megapixels = statistics.mean(w * h for w, h in sizes) / 1e6
    kilobytes = statistics.mean(os.path.getsize(path) for path in files) / 1024
    baseline = statistics.median(rates["baseline"])
    results: dict[str, Any] = {
        "images": len(files),
        "mean_megapixels": round(megapixels, 3),
        "mean_kilobytes": round(kilobytes, 1),
        "image_size": cfg.image_size,
        "min_scale": cfg.min_scale,
        "threads": cfg.threads,
        "batch_size": cfg.batch_size,
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(gpu) if gpu is not None else None,
        "paths": {},
    }
    for name in names:
        median = statistics.median(rates[name])
        results["paths"][name] = {
            "samples_per_s": round(median, 1),
            "samples_per_s_per_core": round(median / cfg.threads, 1),
            "ratio": round(median / baseline, 2),
            "all_runs": [round(rate, 1) for rate in rates[name]],
        }
    _print(results, cfg, skipped=[name for name in cfg.paths if name not in builders])
    if cfg.json_out:
        Path(cfg.json_out).write_text(json.dumps(results, indent=2))
    return results


def _print(results: dict[str, Any], cfg: BenchDataConfig, skipped: list[str]) -> None:
    print(
        f"decode + RandomResizedCrop({cfg.image_size}, scale {cfg.min_scale}-1, bicubic) + flip + normalise: "
        f"{results['images']} JPEGs, mean {results['mean_megapixels']:.2f} MP, {results['mean_kilobytes']:.0f} KB; "
        f"1 process, {cfg.threads} thread(s), batch {cfg.batch_size}, median of {cfg.repeats}"
    )
    print(f"{'path':<10} {'samples/s':>10} {'per core':>9} {'vs baseline':>12}   runs")
    for name, figures in results["paths"].items():
        runs = ", ".join(f"{rate:.0f}" for rate in figures["all_runs"])
        print(
            f"{name:<10} {figures['samples_per_s']:>10.1f} {figures['samples_per_s_per_core']:>9.1f} "
            f"{figures['ratio']:>11.2f}x   {runs}"
        )
    if results["gpu"]:
        print(f"gpu: {results['gpu']} (host: 1 thread reads files and headers)")
    for name in skipped:
        print(f"{name}: skipped (CUDA not available)")


__all__ = ["PATHS", "BenchDataConfig", "photo_like", "run_data_benchmark", "write_benchmark_images"]
