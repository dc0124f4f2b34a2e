"""MAE pre-pretraining: what the stage builds (the loop is ``prepretrain.train.engine``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import torch
from torch import nn

from ..config import ConfigError, TrainConfig
from ..data.images.pixels import train_pixels
from ..data.images.transforms import decode_hint, denormalize, eval_transform
from ..data.loader import ImageOnly, RecordDataset, eval_loader
from ..data.readers.open import open_stage_data
from ..data.records import Record
from ..models.checkpoints import load_strict, read_state_dict
from ..models.mae import MaskedAutoencoder, create_mae, mae_forward_flops
from ..models.resolve import encoder_metadata, resolve_weights
from ..models.vit import VIT_SHAPES, check_model_and_size, resolve_name
from ..train.engine import Stage, TrainData
from ..train.run import Run


@dataclass
class MAEConfig(TrainConfig):
    """MAE recipe. Defaults are the CPU demo; configs/mae_*.yaml hold the paper recipes."""

    stage_name = "mae"
    model: str = "vit_micro4"
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    decoder_embed_dim: int = 128  # reference: 512
    decoder_depth: int = 2  # reference: 8
    decoder_num_heads: int = 4  # reference: 16
    min_crop_scale: float = 0.2
    init: str = ""  # start from an MAE "full" checkpoint: a file or an MAE run directory (its mae_full.safetensors)
    eval_images: int = 256  # held-out images for the validation loss; 0 = no validation loss
    # CPU-demo schedule (the paper: blr 1.5e-4, batch 4096, warmup 40 of 800 epochs)
    blr: float = 1.5e-3
    epochs: float = 8.0
    warmup_epochs: float = 1.0

    # Every numeric key this class defines, with its interval (config.check_bounds).
    bounds = {
        "mask_ratio": "(0, 1)", "decoder_embed_dim": "> 0", "decoder_depth": "> 0", "decoder_num_heads": "> 0",
        "min_crop_scale": "(0, 1]", "eval_images": ">= 0",
    }

    def validate(self) -> None:
        super().validate()
        check_model_and_size(self.model, self.image_size)
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ConfigError("decoder_num_heads", f"must divide decoder_embed_dim {self.decoder_embed_dim}")
        if self.decoder_embed_dim % 4:
            raise ConfigError("decoder_embed_dim", "must be a multiple of 4 (2-D sin-cos embedding)")


class MaskedSample:
    """Record -> ``{"image", "noise"}``: the pixels and the sample's own mask noise ``(L,)``.

    Drawn in the loader under the sample's seed (like its crop), so which patches are masked
    depends only on the sample's position in the stream: the same on 1 or N ranks, with any
    micro-batch split, and again after a resume. A class, so loader workers can pickle it.
    """

    def __init__(self, image_transform: Any, num_patches: int):
        self.image_transform = image_transform
        self.num_patches = num_patches

    def __call__(self, record: Record) -> dict[str, Any]:
        image = self.image_transform(record.image)
        return {"image": image, "noise": torch.rand(self.num_patches)}


class MAEStage(Stage):
    name = "mae"
    cfg: MAEConfig

    def build_model(self, run: Run) -> MaskedAutoencoder:
        cfg = self.cfg
        model = create_mae(
            cfg.model,
            img_size=cfg.image_size,
            decoder_embed_dim=cfg.decoder_embed_dim,
            decoder_depth=cfg.decoder_depth,
            decoder_num_heads=cfg.decoder_num_heads,
            norm_pix_loss=cfg.norm_pix_loss,
        )
        if cfg.init:
            load_strict(model, read_state_dict(resolve_weights(cfg.init, "mae").path))
        return model

    def train_data(self, run: Run) -> TrainData:
        cfg = self.cfg
        pixels = train_pixels(cfg.decode, cfg.data, cfg.image_size, cfg.min_crop_scale)
        source = open_stage_data(cfg, "train", pixels=pixels.pixels,
                                 min_size_hint=decode_hint(cfg.image_size, cfg.min_crop_scale))
        patch = VIT_SHAPES[resolve_name(cfg.model)].patch_size
        sample = MaskedSample(pixels.sample, (cfg.image_size // patch) ** 2)
        dataset = RecordDataset(source, sample, batch_transform=pixels.batch)
        return TrainData(dataset, len(source), device_transform=pixels.device)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        loss, _, _ = model(batch["image"], mask_ratio=self.cfg.mask_ratio, noise=batch.get("noise"))
        return loss, {}

    def flops_per_sample(self) -> float:
        cfg = self.cfg
        model = create_mae(cfg.model, img_size=cfg.image_size, device="meta")
        return 3 * mae_forward_flops(model.shape, cfg.mask_ratio, cfg.decoder_embed_dim, cfg.decoder_depth)

    # ---------------------------------------------------------------- evaluation
    def _val_images(self, count: int) -> torch.Tensor | None:
        cfg = self.cfg
        if count <= 0:
            return None
        try:
            source = open_stage_data(cfg, "val")
        except (FileNotFoundError, KeyError, ValueError):
            return None
        if len(source) == 0:
            return None
        dataset = RecordDataset(source, ImageOnly(eval_transform(cfg.image_size)))
        images = []
        for batch in eval_loader(dataset, batch_size=min(count, 256)):
            if "image" in batch:
                images.append(batch["image"])
            if sum(len(x) for x in images) >= count:
                break
        return torch.cat(images)[:count] if images else None

    def evaluate(self, model: nn.Module, run: Run) -> dict[str, float]:
        """Validation loss on held-out images with masking fixed by a seeded generator."""
        images = self._val_images(self.cfg.eval_images)
        if images is None:
            return {}
        device = run.device
        generator = torch.Generator().manual_seed(1234)
        total, count = 0.0, 0
        with torch.no_grad():
            for chunk in images.split(128):
                num_patches = (self.cfg.image_size // model.patch_size) ** 2
                noise = torch.rand(len(chunk), num_patches, generator=generator)
                loss, _, _ = model(chunk.to(device), self.cfg.mask_ratio, noise=noise.to(device))
                total += float(loss) * len(chunk)
                count += len(chunk)
        return {"val_loss": total / count}

    def finish(self, model: nn.Module, run: Run) -> dict[str, Any]:
        """Export the full MAE and its encoder (safetensors) and a reconstruction grid."""
        run.save_weights("mae_full.safetensors", model.state_dict())
        encoder = run.save_weights("encoder.safetensors", model.encoder_state_dict(),
                                   encoder_metadata(self.cfg.model, self.cfg.image_size))
        images = self._val_images(8)
        if images is not None:
            save_reconstruction_grid(model, images.to(run.device), run.path("reconstructions.png"),
                                     self.cfg.mask_ratio)
        return {"encoder": str(encoder), "model": self.cfg.model}


def save_reconstruction_grid(model: MaskedAutoencoder, images: torch.Tensor, path: Path, mask_ratio: float,
                             seed: int = 0) -> Path:
    """PNG grid, one row per image: original | masked | reconstruction | reconstruction + visible."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the non-interactive backend

    num_patches = (images.shape[-1] // model.patch_size) ** 2
    noise = torch.rand(len(images), num_patches, generator=torch.Generator().manual_seed(seed)).to(images.device)
    out = model.reconstruct(images, mask_ratio, noise)
    titles = ["original", "masked", "reconstruction", "reconstruction + visible"]
    keys = ["original", "masked", "reconstruction", "pasted"]
    fig, axes = plt.subplots(len(images), 4, figsize=(8, 2 * len(images)), squeeze=False)
    for row in range(len(images)):
        for col, key in enumerate(keys):
            pixels = denormalize(out[key][row : row + 1])[0]
            if key == "masked":
                keep = (out["masked"][row : row + 1].abs().sum(1, keepdim=True) > 0).float()
                pixels = pixels * keep[0] + 0.5 * (1 - keep[0])
            axes[row][col].imshow(pixels.permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            axes[row][col].axis("off")
            if row == 0:
                axes[row][col].set_title(titles[col], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
