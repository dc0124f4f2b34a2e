"""The released checkpoints by name: ``maws:vit_h14``, ``maws:vit_h14_ft_in1k``, ``mae:vit_b16``,
``maws_clip:vit_b16_xlmr_b``, ...

Each name says what the file is (architecture, resolution, pooling, head, text tower), so a
user can write ``encoder=maws:vit_h14`` instead of a path and flags. Nothing is downloaded:
the file must be on disk, either at ``NAME@PATH`` (``encoder=maws:vit_h14@/ckpt/vit_h14.pt``)
or in a model folder (``$PREPRETRAIN_MODELS``, several separated by ``:``; default
``~/.cache/prepretrain/models``) under the official relative path (``pretrain/maws/vit_h14.pt``)
or as ``<kind>/<file name>``. A missing file fails with the places searched and the official
address to fetch it from by hand.

Names, files and shapes follow the MAWS release's ``model_builder.py`` (facebookresearch/maws
maws/model_builder.py): MAWS, MAE and MAWS-CLIP at 224 px without a head; the ``_ft_in1k`` finetunes at 512 px
(B, L) and 518 px (H, 2B, 6.5B) with a 1000-way head; all pool the CLS token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

OFFICIAL_ROOT = "https://dl.fbaipublicfiles.com/maws/"
MODELS_ENV = "PREPRETRAIN_MODELS"
DEFAULT_MODELS_DIR = Path("~/.cache/prepretrain/models")


@dataclass(frozen=True)
class Release:
    """One released checkpoint and what it holds."""

    kind: str  # maws | maws_clip | mae | mae_in1k | mae_in21k
    key: str  # vit_h14, vit_h14_ft_in1k, vit_b16_xlmr_b
    model: str  # image architecture (prepretrain registry name)
    file: str  # path under OFFICIAL_ROOT
    image_size: int = 224
    num_classes: int = 0
    global_pool: str = "token"
    text_model: str = ""  # xlmr_base | xlmr_large for maws_clip

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.key}"

    @property
    def url(self) -> str:
        return OFFICIAL_ROOT + self.file

    def metadata(self) -> dict[str, str]:
        """What the file would say about itself if it had metadata."""
        info = {"model": self.model, "image_size": str(self.image_size), "global_pool": self.global_pool,
                "release": self.name, "stage": self.kind}
        if self.num_classes:
            info["num_classes"] = str(self.num_classes)
        if self.text_model:
            info["vision_model"], info["text_model"] = self.model, self.text_model
        return info


def _releases() -> dict[str, Release]:
    found: list[Release] = []
    sizes = ("vit_b16", "vit_l16", "vit_h14", "vit_2b14", "vit_6.5b14")
    for model in sizes:
        found.append(Release("maws", model, model, f"pretrain/maws/{model}.pt"))
        found.append(Release("mae", model, model, f"pretrain/mae/{model}.pt"))
        size = 512 if model.endswith("16") else 518
        found.append(Release("maws", f"{model}_ft_in1k", model, f"finetune/in1k/maws/{model}_{size}.pt", size, 1000))
    found.append(Release("mae_in1k", "vit_2b14", "vit_2b14", "pretrain/mae_in1k/vit_2b14.pt"))
    found.append(Release("mae_in21k", "vit_l16", "vit_l16", "pretrain/mae_in21k/vit_l16.pt"))
    for model, text in (("vit_b16", "xlmr_b"), ("vit_l16", "xlmr_l"), ("vit_h14", "xlmr_l"), ("vit_2b14", "xlmr_l")):
        tower = "xlmr_base" if text == "xlmr_b" else "xlmr_large"
        key = f"{model}_{text}"
        found.append(Release("maws_clip", key, model, f"pretrain/clip/{key}.pt", text_model=tower))
    return {release.name: release for release in found}


RELEASES: dict[str, Release] = _releases()


def is_release_name(spec: str | Path) -> bool:
    """``kind:key`` (optionally ``@PATH``) where ``kind`` is a released kind; paths never look like this."""
    text = str(spec)
    return text.split(":", 1)[0] in {r.kind for r in RELEASES.values()} and ":" in text


def release(name: str) -> Release:
    base = name.split("@", 1)[0]
    if base not in RELEASES:
        kind = base.split(":", 1)[0]
        known = ", ".join(sorted(n for n in RELEASES if n.startswith(kind + ":"))) or ", ".join(sorted(RELEASES))
        raise FileNotFoundError(f"no released checkpoint named '{base}'; known: {known}")
    return RELEASES[base]


def model_dirs() -> list[Path]:
    """Where released files are looked for: ``$PREPRETRAIN_MODELS`` (``:``-separated), else the default."""
    value = os.environ.get(MODELS_ENV, "")
    dirs = [Path(part).expanduser() for part in value.split(os.pathsep) if part] if value else []
    return dirs or [DEFAULT_MODELS_DIR.expanduser()]


def locate(name: str) -> tuple[Release, Path]:
    """The release ``name`` names and its file on disk (``NAME@PATH``, or found in :func:`model_dirs`)."""
    entry = release(name)
    if "@" in name:
        path = Path(name.split("@", 1)[1]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{entry.name}: file not found: {path}")
        return entry, path
    tried = []
    for folder in model_dirs():
        for candidate in (folder / entry.file, folder / entry.kind / Path(entry.file).name):
            if candidate.is_file():
                return entry, candidate
            tried.append(str(candidate))
    raise FileNotFoundError(
        f"{entry.name}: the file is not on this machine (nothing is downloaded at run time). Fetch {entry.url} "
        f"into {tried[0]} (or set {MODELS_ENV}), or write {entry.name}@/path/to/file. Looked at: {', '.join(tried)}"
    )
