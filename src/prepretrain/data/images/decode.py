"""Turn whatever bytes a user has into an RGB ``PIL.Image``, or a counted ``BadSample``.

Real image collections are messy: scraped JPEGs cut off mid-download, text files named
``.jpg``, CMYK print scans, 16-bit PNGs, logos with alpha, phone photos stored sideways with
an EXIF orientation tag, and the occasional decompression bomb. Every source funnels its
bytes through :func:`load_image` so that all of them are handled the same way and every
failure becomes a ``BadSample`` with a short, countable ``reason``:

=================  ===================================================================
``missing_file``   the path does not exist
``empty``          zero bytes
``not_image``      Pillow cannot identify it and it has no known image signature
``unreadable``     it looks like an image (signature or header) but cannot be decoded
``truncated``      the image data ends early
``too_large``      more pixels than ``max_pixels`` (decompression-bomb guard)
``unsupported_mode``  a pixel mode with no sensible RGB conversion
=================  ===================================================================

Decoding is the data-pipeline bottleneck (a few hundred JPEG/s per core: BENCHMARKS.md,
``prepretrain bench data``), so :func:`load_image` also offers JPEG *draft mode*: with
``min_size_hint`` the libjpeg decoder scales by 1/2, 1/4 or 1/8 while decoding (DCT scaling), which
is several times faster than a full decode followed by a resize when the training crop is small.

:func:`load_tensor` is the same policy with a tensor result: plain JPEGs are decoded by
libjpeg-turbo straight into a ``uint8`` tensor (``torchvision.io.decode_jpeg``), skipping
Pillow's per-image overhead and its copy out of its own pixel storage, which together cost
a third of a decode; everything else still goes through :func:`load_image`. Sources return
such tensors when built with ``pixels="tensor"``.

Global Pillow state (``Image.MAX_IMAGE_PIXELS``, ``ImageFile.LOAD_TRUNCATED_IMAGES``) is
never changed: a library that flips process-wide switches breaks its callers.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from prepretrain.data.records import BadSample

# Extensions :func:`image_files` lists (compared lower-cased). These are the formats Pillow
# decodes without plugins and that appear in practice in photo collections; anything else in
# a folder (READMEs, .txt captions, .json sidecars) is ignored rather than counted as bad.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

# Background for images with an alpha channel. Transparent pixels store arbitrary colour
# values (often black or leftover garbage), so dropping alpha exposes noise; web images
# with transparency (logos, product shots, stickers) are designed to be shown on a light
# page, so compositing on white reproduces what a person saw when they tagged them.
ALPHA_BACKGROUND: tuple[int, int, int] = (255, 255, 255)

# Leading bytes of the formats we list. Used only to tell "this is not an image at all"
# (a text file called .jpg) from "this is an image whose header is damaged".
_SIGNATURES: tuple[bytes, ...] = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",  # PNG
    b"GIF87a",
    b"GIF89a",
    b"BM",  # BMP
    b"II*\x00",  # TIFF little-endian
    b"MM\x00*",  # TIFF big-endian
)

DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own error threshold (2 x MAX_IMAGE_PIXELS)
# What sources return in Record.image: an RGB PIL image, a uint8 (3, H, W) tensor, or the
# encoded file (EncodedImage, header checked) for decoding on the training device.
PIXEL_FORMATS = ("pil", "tensor", "bytes")
FAST_JPEG_MODES = ("RGB", "L")  # JPEGs torchvision converts to RGB exactly as Pillow does
_EXIF_ORIENTATION = 0x0112


def _looks_like_image(data: bytes) -> bool:
    if data.startswith(_SIGNATURES):
        return True
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def _read_bytes(path_or_bytes: str | os.PathLike | bytes | bytearray | memoryview, key: str) -> bytes:
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return bytes(path_or_bytes)
    try:
        with open(path_or_bytes, "rb") as handle:
            return handle.read()
    except FileNotFoundError as error:
        raise BadSample(key, "missing_file", str(path_or_bytes)) from error
    except IsADirectoryError as error:
        raise BadSample(key, "not_image", "is a directory") from error
    except OSError as error:  # permissions, I/O errors on flaky network filesystems
        raise BadSample(key, "unreadable", f"{type(error).__name__}: {error}") from error


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float greyscale to 8 bits instead of clipping.

    Pillow's ``convert("RGB")`` clips ``I;16`` values above 255 to white, which turns most
    16-bit images (medical, scientific, raw-derived PNGs) into a blank white frame.
    ``I;16*`` is scaled by 1/257 (full 16-bit range); ``I`` is treated as 16-bit data when
    it fits in [0, 65535] (how Pillow loads 16-bit PNG/TIFF) and otherwise min-max
    normalised; ``F`` is taken as [0, 1] when it fits there, else min-max normalised.
    """
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16"):
        scaled = values / 257.0
    else:
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if image.mode == "I" and low >= 0 and high <= 65535:
            scaled = values / 257.0
        elif image.mode == "F" and low >= 0 and high <= 1.0:
            scaled = values * 255.0
        elif high > low:
            scaled = (values - low) * (255.0 / (high - low))
        else:
            scaled = np.zeros_like(values)
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def to_rgb(image: Image.Image, key: str = "<image>") -> Image.Image:
    """Convert any Pillow mode to RGB with the policy documented in this module.

    Alpha (RGBA, LA, La, RGBa, PA and palette images with a ``transparency`` entry) is
    composited on :data:`ALPHA_BACKGROUND` (white). CMYK, YCbCr, L, 1 and plain palette
    images use Pillow's conversions; 16-bit and float greyscale are rescaled (see
    :func:`_sixteen_bit_to_rgb`). ICC profiles are ignored: colour management costs more
    than the decode and the model does not need it.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return _sixteen_bit_to_rgb(image)
    has_alpha = (
        mode in {"RGBA", "LA", "La", "RGBa", "PA"}
        or (mode == "P" and "transparency" in image.info)
        or (mode in {"L", "RGB"} and "transparency" in image.info)
    )
    try:
        if has_alpha:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise BadSample(key, "unsupported_mode", f"{mode}: {error}") from error


def _draft_request(min_size_hint: int) -> tuple[int, int]:
    """The size to request from ``Image.draft`` so the shorter side stays >= the hint.

    Pillow's JPEG ``draft`` picks the largest scale s in {8, 4, 2, 1} with
    s <= min(W // w, H // h) and returns ceil(W / s) x ceil(H / s); asking for a square of
    the hint therefore keeps both sides >= hint (ceil(side / s) >= side / s >= hint).
    """
    return (min_size_hint, min_size_hint)


def load_image(
    path_or_bytes: str | os.PathLike | bytes | bytearray | memoryview,
    key: str,
    *,
    min_size_hint: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode a file path or encoded bytes into an upright RGB image.

    ``min_size_hint``: for JPEGs, decode at a reduced size (1/2, 1/4 or 1/8) whose shorter
    side is still >= the hint. Pass the smallest source resolution the transform needs,
    e.g. ``crop_size / sqrt(min_crop_scale)`` for random-resized-crop, so no crop is ever
    upsampled more than it would be from the full image. Other formats ignore it.

    ``max_pixels``: images with more pixels (width x height, read from the header before
    any pixel is decoded) raise ``BadSample(reason="too_large")``. Pillow's own global
    guard (``Image.MAX_IMAGE_PIXELS``) still applies first and is also reported as
    ``too_large``; to accept bigger images raise that global in your program, this
    function never changes it.

    Raises ``BadSample`` (see the module docstring for reasons); never returns a partial
    (truncated) image, because a grey band in a training image is a silent corruption.
    """
    image = _open_checked(_read_bytes(path_or_bytes, key), key, max_pixels)
    width, height = image.size
    if min_size_hint and image.format in {"JPEG", "MPO"} and min(width, height) > min_size_hint:
        # draft() must run before load(); it only changes how libjpeg decodes.
        image.draft("RGB", _draft_request(int(min_size_hint)))

    try:
        image.load()
    except Image.DecompressionBombError as error:
        raise BadSample(key, "too_large", str(error)) from error
    except ValueError as error:
        # Pillow raises ValueError("Decompressed Data Too Large") for zlib bombs in PNG text.
        reason = "too_large" if "too large" in str(error).lower() else "unreadable"
        raise BadSample(key, reason, str(error)) from error
    except (OSError, SyntaxError, EOFError, IndexError, struct.error) as error:
        reason = "truncated" if "truncated" in str(error).lower() else "unreadable"
        raise BadSample(key, reason, f"{type(error).__name__}: {error}") from error

    upright = image
    try:
        # Checking the tag first avoids exif_transpose's full-image copy for the common
        # upright case (it returns image.copy() when there is nothing to do).
        if image.getexif().get(_EXIF_ORIENTATION, 1) in range(2, 9):
            upright = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not cost an otherwise good image
        upright = image
    return to_rgb(upright, key)


def _open_checked(data: bytes, key: str, max_pixels: int) -> Image.Image:
    """Parse the header only (no pixel is decoded) and apply the size limits."""
    if not data:
        raise BadSample(key, "empty")
    try:
        with warnings.catch_warnings():
            # We enforce our own limit below; Pillow's warning band (MAX_IMAGE_PIXELS to 2x)
            # would otherwise print once per large image.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise BadSample(key, "too_large", str(error)) from error
    except UnidentifiedImageError as error:
        reason = "unreadable" if _looks_like_image(data) else "not_image"
        raise BadSample(key, reason, "cannot identify image") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise BadSample(key, "unreadable", f"{type(error).__name__}: {error}") from error

    width, height = image.size
    if width * height > max_pixels:
        raise BadSample(key, "too_large", f"{width}x{height} > {max_pixels} pixels")
    if width == 0 or height == 0:
        raise BadSample(key, "unreadable", f"zero-sized image {width}x{height}")
    return image


@dataclass(frozen=True)
class ImageInfo:
    """What the header of an encoded image says, before any pixel is decoded."""

    format: str  # Pillow's format name: "JPEG", "PNG", ...
    mode: str  # Pillow's mode of the stored pixels: "RGB", "L", "CMYK", ...
    width: int  # as stored, before the EXIF orientation is applied
    height: int
    orientation: int  # EXIF orientation 1-8 (1 = upright; 5-8 swap width and height)

    @property
    def upright_size(self) -> tuple[int, int]:
        """(width, height) of the image as shown, after the EXIF orientation."""
        return (self.height, self.width) if self.orientation in (5, 6, 7, 8) else (self.width, self.height)


def probe_image(
    path_or_bytes: str | os.PathLike | bytes | bytearray | memoryview,
    key: str,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ImageInfo:
    """Read an image's header with the same checks as :func:`load_image`, decoding nothing.

    For decoders other than Pillow (``torchvision.io.decode_jpeg`` on the GPU): they need
    to know the format and mode before they start, must not be handed a decompression bomb,
    and do not apply the EXIF orientation themselves. Raises the same ``BadSample`` reasons
    as :func:`load_image` for everything a header reveals (``empty``, ``not_image``,
    ``too_large``...); damage further in the file is found only by decoding.
    """
    image = _open_checked(_read_bytes(path_or_bytes, key), key, max_pixels)
    try:
        orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block: decode as stored, as load_image does
        orientation = 1
    if orientation not in range(1, 9):
        orientation = 1
    return ImageInfo(str(image.format), image.mode, image.size[0], image.size[1], orientation)


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Make a ``(C, H, W)`` image upright from its EXIF orientation (as ``ImageOps.exif_transpose``)."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(image, -1, dims=(-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(image, 1, dims=(-2, -1))
    return image


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> writable ``uint8`` ``(3, H, W)`` (channels-last strides: a view of one HWC copy)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def jpeg_looks_complete(data: bytes) -> bool:
    """True when a JPEG ends with its end-of-image marker (trailing zero padding allowed).

    nvJPEG returns a cut-off JPEG as an image with a grey or garbage tail instead of failing,
    so the batched GPU decoder only gets files that end properly; the rest go through Pillow,
    which either decodes them (harmless trailing bytes) or reports ``truncated``.
    """
    return data.rstrip(b"\x00").endswith(b"\xff\xd9")


def decode_jpeg_tensors(encoded: list[bytes], device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """``torchvision.io.decode_jpeg`` of several JPEGs to RGB (one nvJPEG batch on CUDA); raises on any bad one."""
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in encoded]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision >= 0.29 flags its decoders as deprecated (TorchCodec)
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))


def load_tensor(
    path_or_bytes: str | os.PathLike | bytes | bytearray | memoryview,
    key: str,
    *,
    min_size_hint: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> torch.Tensor:
    """:func:`load_image` with an upright RGB ``uint8`` ``(3, H, W)`` tensor as result.

    Plain RGB/greyscale JPEGs are decoded by ``torchvision.io.decode_jpeg`` unless draft
    mode would shrink them (``min_size_hint`` at most half the shorter side): DCT scaling
    beats any full decode. Other formats, CMYK JPEGs, and JPEGs torchvision rejects go
    through :func:`load_image`, so failures carry the same ``BadSample`` reasons.
    """
    data = _read_bytes(path_or_bytes, key)
    info = probe_image(data, key, max_pixels=max_pixels)
    drafted = bool(min_size_hint) and min(info.width, info.height) >= 2 * int(min_size_hint or 0)
    if info.format == "JPEG" and info.mode in FAST_JPEG_MODES and not drafted and jpeg_looks_complete(data):
        try:
            (image,) = decode_jpeg_tensors([data])
        except RuntimeError:
            pass  # Pillow decides: truncated, unreadable, or something libjpeg-turbo's strict mode refused
        else:
            return apply_orientation(image, info.orientation)
    return pil_to_tensor(load_image(data, key, min_size_hint=min_size_hint, max_pixels=max_pixels))


class EncodedImage(bytes):
    """An image file's bytes with the key of its sample (``pixels="bytes"``), so a decoder
    running later, on another device, can still name the sample it could not read."""

    key: str

    def __new__(cls, data: bytes, key: str) -> EncodedImage:
        obj = super().__new__(cls, data)
        obj.key = key
        return obj

    def __reduce__(self) -> tuple[Any, tuple[bytes, str]]:
        return EncodedImage, (bytes(self), self.key)


def load_pixels(
    path_or_bytes: str | os.PathLike | bytes | bytearray | memoryview,
    key: str,
    *,
    pixels: str = "pil",
    min_size_hint: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image | torch.Tensor | EncodedImage:
    """:func:`load_image` (``pixels="pil"``), :func:`load_tensor` (``pixels="tensor"``), or
    the file's bytes after the header checks of :func:`probe_image` (``pixels="bytes"``:
    empty, non-image and oversized files fail here, in the loader worker)."""
    if pixels == "bytes":
        data = _read_bytes(path_or_bytes, key)
        probe_image(data, key, max_pixels=max_pixels)
        return EncodedImage(data, key)
    if pixels == "tensor":
        return load_tensor(path_or_bytes, key, min_size_hint=min_size_hint, max_pixels=max_pixels)
    return load_image(path_or_bytes, key, min_size_hint=min_size_hint, max_pixels=max_pixels)


def check_pixel_format(pixels: str) -> str:
    if pixels not in PIXEL_FORMATS:
        raise ValueError(f"pixels must be one of {PIXEL_FORMATS}, got {pixels!r}")
    return pixels


def image_files(root: str | os.PathLike) -> list[Path]:
    """All image files under ``root`` (recursively), sorted by relative path.

    Hidden files and hidden directories (name starting with ``.``) are skipped: they are
    editor backups, ``.DS_Store``/``._foo.jpg`` macOS resource forks and VCS internals,
    never training data. The order is by POSIX relative path so it is identical on every
    machine and filesystem, which sample indices (and resume positions) depend on.
    Symlinked files are listed; symlinked directories are not followed (no cycles).
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"not a directory: {root}")
    found: list[tuple[str, Path]] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [name for name in subdirs if not name.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                path = Path(directory, name)
                found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]
