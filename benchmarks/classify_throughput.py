"""``prepretrain classify`` beside a plain timm + torchvision evaluation loop, same model, same images.

    OMP_NUM_THREADS=2 python benchmarks/classify_throughput.py --images 384 --model vit_s16 --workers 1
    python benchmarks/classify_throughput.py --device cuda --images 5000 --model vit_b16 --batch 256 --workers 12

Writes an ImageFolder of JPEGs (ImageNet-like sizes, WordNet-id folders) and a 1000-way classifier
file, then alternates the two paths for ``--rounds`` rounds and prints images/s of each (median
round) and their ratio. The baseline is what a researcher writes by hand: ``torchvision``'s
``ImageFolder`` + ``Resize``/``CenterCrop``/``ToTensor``/``Normalize`` (bicubic, crop 0.875),
a ``DataLoader`` with the same batch size and workers, ``torch.inference_mode``, logits to the
CPU, top-1 counted. ``classify`` runs with the same transform (``eval_crop=0.875``) and writes its
``predictions.csv`` and ``results.json`` as usual; both paths must agree on top-1 (checked).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import datasets
from torchvision import transforms as T

from prepretrain.config import build_config
from prepretrain.data.images.transforms import IMAGENET_MEAN, IMAGENET_STD
from prepretrain.data.readers.releases import imagenet_wnids
from prepretrain.evaluate.classify import ClassifyConfig, run_classify
from prepretrain.files import save_safetensors
from prepretrain.models.vit import create_vit, vit_shape


def write_images(root: Path, count: int, classes: int = 10, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    wnids = imagenet_wnids()
    for index in range(count):
        folder = root / wnids[index % classes * 97]
        folder.mkdir(parents=True, exist_ok=True)
        width, height = int(rng.integers(400, 500)), int(rng.integers(330, 400))
        small = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.BILINEAR)  # smooth, JPEG-like content
        image.save(folder / f"{index:06d}.JPEG", quality=90)


def baseline(root: Path, model_file: Path, model: str, size: int, batch: int, workers: int,
             device: torch.device) -> tuple[float, int]:
    start = time.perf_counter()
    net = create_vit(model, num_classes=1000, img_size=size)
    net.load_state_dict(torch.load(model_file, map_location="cpu", weights_only=True))
    net = net.to(device).eval()
    transform = T.Compose([T.Resize(int(size / 0.875), interpolation=T.InterpolationMode.BICUBIC),
                           T.CenterCrop(size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    folder = datasets.ImageFolder(str(root), transform=transform)
    wnids = imagenet_wnids()
    to_model = torch.tensor([wnids.index(c) for c in folder.classes])
    loader = torch.utils.data.DataLoader(folder, batch_size=batch, num_workers=workers, shuffle=False)
    hits = 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    with torch.inference_mode(), autocast:
        for images, labels in loader:
            logits = net(images.to(device, non_blocking=True)).float().cpu()
            hits += int((logits.argmax(1) == to_model[labels]).sum())
    return len(folder) / (time.perf_counter() - start), hits


def prepretrain_classify(root: Path, model_file: Path, model: str, size: int, batch: int, workers: int,
                         device: str, out: Path) -> tuple[float, int]:
    start = time.perf_counter()
    cfg = build_config(ClassifyConfig, None, [f"model={model_file}", f"data={root}", f"arch={model}",
                                              f"batch_size={batch}", f"num_workers={workers}", "eval_crop=0.875",
                                              f"image_size={size}", f"device={device}", "progress=false",
                                              f"out_dir={out}"])
    results = run_classify(cfg)
    return results["num_images"] / (time.perf_counter() - start), round(results["top1"] * results["num_images"] / 100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--model", default="vit_s16")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    size = vit_shape(args.model).img_size
    with tempfile.TemporaryDirectory() as tmp:
        root, model_file = Path(tmp) / "val", Path(tmp) / "model.pt"
        write_images(root, args.images)
        torch.manual_seed(0)
        state = create_vit(args.model, num_classes=1000).state_dict()
        torch.save(state, model_file)
        save_safetensors(Path(tmp) / "model.safetensors", state)
        figures: dict[str, list[float]] = {"timm + torchvision loop": [], "prepretrain classify": []}
        for round_ in range(args.rounds):
            rate, base_hits = baseline(root, model_file, args.model, size, args.batch, args.workers, device)
            figures["timm + torchvision loop"].append(rate)
            rate, our_hits = prepretrain_classify(root, Path(tmp) / "model.safetensors", args.model, size, args.batch,
                                                  args.workers, args.device, Path(tmp) / f"out{round_}")
            figures["prepretrain classify"].append(rate)
            if base_hits != our_hits:
                raise SystemExit(f"the two paths disagree on top-1: {base_hits} vs {our_hits} hits")
    print(f"{args.images} JPEGs (~450x365) -> {args.model} at {size} px, batch {args.batch}, {args.workers} loader "
          f"workers, {args.device}, torch threads {torch.get_num_threads()}; median of {args.rounds} rounds")
    medians = {name: statistics.median(rates) for name, rates in figures.items()}
    for name, rate in medians.items():
        print(f"  {name:<24} {rate:8.1f} images/s   rounds: {', '.join(f'{r:.1f}' for r in figures[name])}")
    print(f"  ratio classify / loop: {medians['prepretrain classify'] / medians['timm + torchvision loop']:.2f}")


if __name__ == "__main__":
    main()
