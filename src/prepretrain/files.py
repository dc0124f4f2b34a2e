"""Writing and reading artefacts safely: the one atomic write, the one safetensors metadata reader.

Every file that another process (a resumed run, the pipeline, a report, a user) may read is
written to a temporary name beside its destination and renamed over it, so a crash or a full
disk mid-write leaves either the old file or the new one, never half of one. This module is
the bottom layer: it imports nothing from the rest of the package.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    The temporary name is hidden, carries the process id (two writers never share one) and is
    removed when the block fails, so a failed write leaves nothing behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` and rename ``tmp`` onto ``path``; returns ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """UTF-8 text, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    """JSON with two-space indents; values JSON does not know (paths, numpy scalars) as strings."""
    return write_text(path, json.dumps(obj, indent=2, default=str))


# How the writers below report a failed write that is not an OSError: torch's zip writer raises a
# RuntimeError ("PytorchStreamWriter failed writing file ...: file write failed", "unexpected pos"),
# safetensors its own error naming the OS error code ("IoError(Os { code: 28, ... })").
_TORCH_WRITE_FAILED = ("file write failed", "unexpected pos", "PytorchStreamWriter failed")
_OS_CODE = re.compile(r"Os \{ code: (\d+)|\[Errno (\d+)\]")  # safetensors' IoError; an OSError inside a wrapper (DCP)
LOW_SPACE_BYTES = 64 << 20  # below this much free space, a failed write is taken for a full disk


def as_os_error(error: Exception, path: str | Path) -> OSError | None:
    """The OSError a failed write of ``path`` really was (so the CLI can say "no space left" and exit 5),
    or None when ``error`` is not a write failure."""
    import errno
    import shutil

    text = str(error)
    code = _OS_CODE.search(text)
    if code:
        number = int(code.group(1) or code.group(2))
        return OSError(number, os.strerror(number), str(path))
    if not any(marker in text for marker in _TORCH_WRITE_FAILED):
        return None
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        full = shutil.disk_usage(folder).free < LOW_SPACE_BYTES
    except OSError:
        full = False
    if full:
        return OSError(errno.ENOSPC, "No space left on device", str(path))
    return OSError(errno.EIO, f"write failed ({text.splitlines()[0][:200]})", str(path))


@contextmanager
def write_errors_as_os_errors(path: str | Path) -> Iterator[None]:
    """Re-raise a writer's non-OSError write failure as the OSError it was (see :func:`as_os_error`)."""
    try:
        yield
    except OSError:
        raise
    except Exception as error:  # noqa: BLE001 - only write failures are converted; the rest re-raised as is
        converted = as_os_error(error, path)
        if converted is None:
            raise
        raise converted from error


def save_safetensors(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                     dtype: torch.dtype | None = None) -> Path:
    """A safetensors file of CPU, contiguous tensors (optionally cast to ``dtype``), atomically."""
    from safetensors.torch import save_file

    tensors = {}
    for key, value in state.items():
        value = value.detach()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.cpu().contiguous()
    metadata = {k: str(v) for k, v in (metadata or {}).items()}
    with write_errors_as_os_errors(path):
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_torch(path: str | Path, obj: Any) -> Path:
    """``torch.save`` atomically and flushed to the disk before the rename (training checkpoints,
    whose readers use ``weights_only=True``): after a power cut the new name never points at
    data the disk did not get."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())

    with write_errors_as_os_errors(path):
        return atomic_write(path, write)


class UnsafeCheckpoint(ValueError):
    """A pickle that would run code to load: refused, never executed."""


def load_torch(path: str | Path) -> Any:
    """``torch.load`` that never runs code from the file (``weights_only=True``) and says
    clearly what it refused and what to do instead."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        what = f"it needs '{found.group(1)}'" if found else "it holds objects other than tensors and plain containers"
        raise UnsafeCheckpoint(
            f"{path}: refused to load: {what}, and loading it would run code from the file. prepretrain only "
            "reads tensors. If you trust where the file came from, convert it once in your own Python session "
            "(torch.load(..., weights_only=False), then safetensors.torch.save_file of its state dict) and pass "
            "the .safetensors file; otherwise get the checkpoint from its official source."
        ) from None


def file_sha256(path: str | Path, chunk_bytes: int = 8 << 20) -> str:
    """Content hash of a file, read in chunks (weights files can be tens of GB)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(path: str | Path, chunk_bytes: int = 8 << 20) -> str:
    """Content hash of a weights file that depends on its tensors only.

    A safetensors header holds the metadata as a map whose order the writer does not fix, so two
    saves of the same tensors differ in their bytes; here the header's tensor table is hashed in a
    canonical form (metadata left out) and then the data bytes. Other formats: the file's bytes."""
    import hashlib

    path = Path(path)
    if path.suffix != ".safetensors":
        return file_sha256(path, chunk_bytes)
    digest = hashlib.sha256(b"safetensors-tensors-v1")
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        try:
            header = json.loads(handle.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return file_sha256(path, chunk_bytes)  # not a readable header: the bytes are all we have
        header.pop("__metadata__", None)
        digest.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata in a safetensors header, read without loading tensors ({} for other formats)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor (on CPU) and the metadata of a safetensors file, in one read."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})


def read_keys(path: str | Path) -> list[str] | None:
    """Tensor names of a safetensors file from its header alone (None for other formats)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())
