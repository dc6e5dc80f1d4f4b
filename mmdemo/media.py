"""Image and audio decoding, normalisation and limits.

Everything a model sees from a person goes through here first:

* :func:`load_image` turns a path, bytes, a file object, a PIL image or a numpy array into a fully
  decoded RGB :class:`PIL.Image.Image`, after checking the upload size and the pixel count (from the
  header, before any pixel is decoded) and refusing truncated or corrupt files.
* :func:`load_audio` turns a path, bytes, a file object, gradio's ``(rate, array)`` tuple or a
  ``{"array"|"raw", "sampling_rate"}`` dict into :class:`Audio`: float32 mono in -1..1 at the target
  rate, after checking the upload size and the duration (from the header where the format gives one).
* :func:`strip_image_metadata`, :func:`encode_png` and :func:`image_digest` prepare images for storage.

Every refusal is one of the typed errors of :mod:`mmdemo.errors`, with a message written for a person.
Nothing here imports torch; PyAV (``av``) is imported only when soundfile cannot read a file.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import (
    AudioTooLongError,
    ImageTooLargeError,
    InvalidAudioError,
    InvalidImageError,
    MMDemoError,
)

__all__ = [
    "Audio",
    "DEFAULT_LIMITS",
    "IMAGE_FORMATS",
    "MAX_ASPECT_RATIO",
    "MediaLimits",
    "encode_png",
    "fit_aspect_ratio",
    "image_digest",
    "load_audio",
    "load_image",
    "strip_image_metadata",
]


@dataclass(frozen=True)
class MediaLimits:
    """Limits applied to every upload. The defaults suit a public demo."""

    max_image_pixels: int = 40_000_000
    max_upload_bytes: int = 50 * 1024 * 1024
    max_audio_seconds: float = 600.0
    silence_threshold: float = 1e-4  # peak amplitude under which audio counts as silent

    def __post_init__(self) -> None:
        if self.max_image_pixels <= 0:
            raise ValueError("max_image_pixels must be positive")
        if self.max_upload_bytes <= 0:
            raise ValueError("max_upload_bytes must be positive")
        if not self.max_audio_seconds > 0:
            raise ValueError("max_audio_seconds must be positive")
        if self.silence_threshold < 0:
            raise ValueError("silence_threshold must not be negative")


DEFAULT_LIMITS = MediaLimits()
MAX_ASPECT_RATIO = 4.0  # images for models: a longer side more than 4x the shorter one is padded

# Formats we let PIL open. Restricting them keeps exotic decoders (EPS runs Ghostscript, for one)
# away from uploads. JPEG includes MPO, what many phone cameras write. AVIF only where PIL has it.
IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
_open_formats: tuple[str, ...] | None = None


def _pil_formats() -> tuple[str, ...]:
    """IMAGE_FORMATS that this PIL build can open (Image.open fails on an unknown format name)."""
    global _open_formats
    if _open_formats is None:
        Image.init()
        _open_formats = tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)
    return _open_formats
_IMAGE_FORMATS_TEXT = "PNG, JPEG, WebP, GIF, BMP, TIFF"
_AUDIO_FORMATS_TEXT = "WAV, FLAC, OGG, MP3, M4A, AAC, WebM, Opus"

_MIB = 1024 * 1024
_WHITE = (255, 255, 255, 255)


# --- wording ---------------------------------------------------------------------------------------


def _fmt_bytes(n: int) -> str:
    if n >= _MIB:
        value = n / _MIB
        return f"{value:.0f} MB" if value >= 10 or value == int(value) else f"{value:.1f} MB"
    if n >= 1024:
        return f"{n / 1024:.0f} KB"
    return f"{n} bytes"


def _fmt_megapixels(pixels: float) -> str:
    mp = pixels / 1_000_000
    text = f"{mp:.0f}" if mp >= 100 else f"{mp:.3g}"
    return f"{text} megapixel" if text == "1" else f"{text} megapixels"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _fmt_seconds(seconds: float) -> str:
    if seconds < 60:
        text = f"{seconds:.1f}".rstrip("0").rstrip(".")
        return f"{text} second" if text == "1" else f"{text} seconds"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    parts = []
    if hours:
        parts.append(_plural(hours, "hour"))
    if minutes:
        parts.append(_plural(minutes, "minute"))
    if secs and not hours:
        parts.append(_plural(secs, "second"))
    return " ".join(parts) if parts else "0 seconds"


def _name_of(path: str | os.PathLike[str]) -> str:
    return Path(path).name or str(path)


# --- reading raw bytes ----------------------------------------------------------------------------


def _read_upload(
    source: Any,
    limits: MediaLimits,
    *,
    what: str,
    invalid: type[MMDemoError],
    too_large: type[MMDemoError],
) -> bytes | None:
    """Return the bytes of a path / bytes / file-like source, or None for any other kind of source.

    The size limit is checked before reading (from the file size) and again while reading, so a file
    that grows, or a stream without a size, never makes us read more than ``max_upload_bytes + 1``.
    """
    limit = limits.max_upload_bytes

    def too_big(size: int | None) -> MMDemoError:
        if size is None:
            return too_large(
                f"The {what} file is larger than the limit for uploads ({_fmt_bytes(limit)})."
            )
        return too_large(
            f"The {what} file is {_fmt_bytes(size)}; the limit for uploads is {_fmt_bytes(limit)}."
        )

    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise invalid(f"The {what} file '{_name_of(path)}' could not be found.")
        if not os.path.isfile(path):
            raise invalid(f"The path '{_name_of(path)}' is a folder, not an {what} file.")
        size = os.path.getsize(path)
        if size > limit:
            raise too_big(size)
        try:
            with open(path, "rb") as fh:
                data = fh.read(limit + 1)
        except OSError as exc:
            raise invalid(f"The {what} file '{_name_of(path)}' could not be opened.") from exc
    elif hasattr(source, "read"):
        try:
            data = source.read(limit + 1)
        except (OSError, ValueError) as exc:
            raise invalid(f"The {what} file could not be read.") from exc
        if isinstance(data, str):
            raise invalid(f"The {what} file was opened as text; it must be opened in binary mode.")
        if data is None:
            data = b""
        data = bytes(data)
        if len(data) > limit:
            raise too_big(_stream_size(source, len(data)))
    else:
        return None
    if len(data) > limit:
        raise too_big(len(data))
    if not data:
        raise invalid(f"The {what} file is empty (0 bytes).")
    return data


def _stream_size(stream: Any, already_read: int) -> int | None:
    """Best guess of a stream's full size after ``already_read`` bytes were read; None if unknown."""
    try:
        if not stream.seekable():
            return None
        here = stream.tell()
        end = stream.seek(0, io.SEEK_END)
        stream.seek(here)
        return max(end, already_read)
    except Exception:
        return None


# --- images ---------------------------------------------------------------------------------------


def _check_pixels(size: tuple[int, int], limits: MediaLimits) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"The image is empty ({width}x{height} pixels).")
    if width * height > limits.max_image_pixels:
        raise ImageTooLargeError(
            f"The image is {width}x{height} pixels; "
            f"the limit is {_fmt_megapixels(limits.max_image_pixels)}."
        )


def _load_pixels(img: Image.Image, limits: MediaLimits, damaged: str) -> None:
    """Decode ``img``'s pixels within ``limits``: the size is checked from the header first, and
    bombs and broken data become readable errors (``damaged`` is the message for the latter)."""
    _check_pixels(img.size, limits)  # from the header, before a single pixel is decoded
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb_error(exc, limits) from exc
    except MemoryError:
        raise
    except Exception as exc:  # "image file is truncated", broken data streams, CRC errors...
        raise InvalidImageError(damaged) from exc
    _check_pixels(img.size, limits)  # a few formats only know the final size after loading


def _bomb_error(exc: BaseException, limits: MediaLimits) -> ImageTooLargeError:
    """Word PIL's own decompression-bomb refusal (raised inside Image.open) for a person."""
    limit = limits.max_image_pixels
    pil_limit = Image.MAX_IMAGE_PIXELS
    if isinstance(exc, Image.DecompressionBombError) and pil_limit:
        limit = min(limit, 2 * pil_limit)
    elif pil_limit:
        limit = min(limit, pil_limit)
    match = re.search(r"\((\d+) pixels\)", str(exc))
    if match:
        return ImageTooLargeError(
            f"The image has {_fmt_megapixels(int(match.group(1)))}; "
            f"the limit is {_fmt_megapixels(limit)}."
        )
    return ImageTooLargeError(
        f"The image has more pixels than we can safely open (over {_fmt_megapixels(limit)})."
    )


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale integer or float pixel data of any range to uint8, by the range actually used.

    Integer data whose values already fit 0..255 is kept as it is. Other integer data (16-bit, 32-bit,
    12-bit in a 16-bit container...) is stretched so that its maximum becomes 255 (and its minimum 0
    when it goes below zero). Float data in 0..1 is multiplied by 255, float data in 0..255 kept, any
    other float range stretched; NaN and infinities become 0.
    """
    if values.dtype == np.uint8:
        return values
    if values.dtype == np.bool_:
        return values.astype(np.uint8) * 255
    data = values
    if data.dtype.kind == "f":
        data = np.nan_to_num(data.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
    if data.size == 0:
        return data.astype(np.uint8)
    lo = min(float(data.min()), 0.0)
    hi = float(data.max())
    if data.dtype.kind == "f":
        if lo >= 0.0 and hi <= 1.0:
            return np.rint(data * 255.0).astype(np.uint8)
        if lo >= 0.0 and hi <= 255.0:
            return np.rint(data).astype(np.uint8)
    elif lo >= 0 and hi <= 255:
        return data.astype(np.uint8)
    if hi <= lo:
        return np.zeros(data.shape, np.uint8)
    out = data.astype(np.float32)
    out -= lo
    out *= 255.0 / (hi - lo)
    np.rint(out, out=out)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")


_SRGB_PROFILE: Any = None


def _apply_icc(img: Image.Image) -> Image.Image:
    """Convert pixels described by an embedded ICC profile (Display P3, Adobe RGB, CMYK...) to sRGB.

    The result no longer carries the profile. Any failure (a broken profile, one that does not match
    the image mode) leaves the image as it was: colour management is a nicety, never a refusal.
    """
    global _SRGB_PROFILE
    icc = img.info.get("icc_profile")
    if not icc or img.mode not in ("RGB", "RGBA", "CMYK", "L"):
        return img
    try:
        from PIL import ImageCms

        source_profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        description = (ImageCms.getProfileDescription(source_profile) or "").lower()
        info = {k: v for k, v in img.info.items() if k != "icc_profile"}
        if "srgb" in description:
            out = img.copy()
        else:
            if _SRGB_PROFILE is None:
                _SRGB_PROFILE = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
            out_mode = "RGBA" if img.mode == "RGBA" else "RGB"
            out = ImageCms.profileToProfile(img, source_profile, _SRGB_PROFILE, outputMode=out_mode)
            if out is None:  # only when inPlace=True; keeps type checkers calm
                return img
        out.info = info
        return out
    except Exception:
        return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Return an RGB version of ``img`` (possibly ``img`` itself when it already is RGB)."""
    mode = img.mode
    has_transparency = "transparency" in img.info
    if mode == "RGB" and not has_transparency:
        return img
    if mode in ("RGBA", "LA", "PA", "RGBa") or (mode in ("P", "L", "RGB", "1") and has_transparency):
        try:
            return _composite_on_white(img.convert("RGBA"))
        except (ValueError, OSError):
            if mode not in ("P", "L", "RGB", "1"):
                raise
            return img.convert("RGB")  # a broken transparency entry: ignore it
    if mode == "La":  # luminance premultiplied by alpha, which PIL cannot convert itself
        arr = np.asarray(img).astype(np.float32)
        lum, alpha = arr[..., 0], arr[..., 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            lum = np.where(alpha > 0, lum * 255.0 / alpha, 0.0)
        la = np.stack([np.clip(np.rint(lum), 0, 255), alpha], axis=-1).astype(np.uint8)
        return _composite_on_white(Image.fromarray(la).convert("RGBA"))
    if mode.startswith("I") or mode == "F":  # I;16, I;16B, I;16L, I;16N, I (32-bit), F (float)
        return Image.fromarray(_scale_to_uint8(np.asarray(img))).convert("RGB")
    try:
        return img.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV, RGBX...
    except (ValueError, OSError) as exc:
        raise InvalidImageError(
            f"The image uses a colour format we cannot convert ({mode})."
        ) from exc


def _normalise(img: Image.Image) -> Image.Image:
    """EXIF-orient, colour-manage and convert a loaded image to a new RGB image."""
    try:
        oriented = ImageOps.exif_transpose(img)
    except Exception:  # a corrupt EXIF block: keep the pixels as stored
        oriented = img
    if oriented is None:
        oriented = img
    managed = _apply_icc(oriented)
    rgb = _to_rgb(managed)
    if rgb is img:
        rgb = img.copy()
    if managed.mode != "RGB":  # a profile left behind describes the old mode, not these pixels
        rgb.info.pop("icc_profile", None)
    rgb.info.pop("transparency", None)
    return rgb


def _image_from_array(array: Any, limits: MediaLimits) -> Image.Image:
    arr = np.asarray(array)
    if arr.dtype.kind not in "biuf":
        raise InvalidImageError(
            "The picture data is not made of numbers, so it cannot be shown as an image."
        )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (2, 3, 4)):
        raise InvalidImageError(
            f"The picture data has the shape {tuple(arr.shape)}; an image must be height x width, "
            "or height x width x 1, 2, 3 or 4 colour channels."
        )
    height, width = arr.shape[:2]
    _check_pixels((width, height), limits)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise InvalidImageError(
                "The picture data contains invalid values (not-a-number or infinity)."
            )
        arr8 = np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        arr8 = _scale_to_uint8(arr)
    img = Image.fromarray(np.ascontiguousarray(arr8))
    return _to_rgb(img) if img.mode != "RGB" else img


def _open_image_bytes(data: bytes, limits: MediaLimits) -> Image.Image:
    unreadable = f"The file is not an image we can read ({_IMAGE_FORMATS_TEXT})."
    try:
        opened = Image.open(io.BytesIO(data), formats=_pil_formats())
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb_error(exc, limits) from exc
    except UnidentifiedImageError as exc:
        raise InvalidImageError(unreadable) from exc
    except MemoryError:
        raise
    except Exception as exc:  # PIL raises many types for mangled headers
        raise InvalidImageError(unreadable) from exc
    with opened as img:
        _load_pixels(img, limits, "The image file is damaged or incomplete (it may have been cut off during "
                     "upload), so it cannot be read.")
        return _normalise(img)


def load_image(source: Any, limits: MediaLimits = DEFAULT_LIMITS, *,
               max_aspect_ratio: float | None = None) -> Image.Image:
    """Decode ``source`` into a new, fully loaded RGB PIL image.

    ``source`` may be a path (str / PathLike), bytes, a binary file object, a PIL image or a numpy
    array (HxW or HxWxC with C in 1..4; uint8, bool, float in 0..1, uint16 or other integers).

    Refuses with :class:`InvalidImageError` (not an image, truncated, corrupt, empty) or
    :class:`ImageTooLargeError` (more bytes than ``limits.max_upload_bytes``, checked before decoding,
    or more pixels than ``limits.max_image_pixels``, checked from the header before decoding).

    Normalises: EXIF orientation; embedded ICC profiles to sRGB; transparency composited on white
    (RGBA, LA, PA, P with transparency); 1, L, P, CMYK, YCbCr, LAB to RGB; 16/32-bit and float
    images scaled to 8-bit by the range they actually use; animated images give their first frame.
    With ``max_aspect_ratio`` (images for models), a longer strip is padded (see :func:`fit_aspect_ratio`).
    """
    image = _load_image(source, limits)
    return image if max_aspect_ratio is None else fit_aspect_ratio(image, max_aspect_ratio, limits)


def fit_aspect_ratio(image: Image.Image, max_ratio: float = MAX_ASPECT_RATIO,
                     limits: MediaLimits = DEFAULT_LIMITS) -> Image.Image:
    """``image`` centred on white bands that make it at most ``max_ratio`` times wider than tall (or taller
    than wide); ``image`` itself when it already is. Model processors fail on extreme strips (ViLT's
    resize rounds the short side to 0) or blow them up (CLIP scales the short side to 224 before cropping).

    A strip so long that its padded canvas would exceed ``limits.max_image_pixels`` is shrunk first.
    """
    width, height = image.size
    long_side, short_side = max(width, height), min(width, height)
    if long_side <= max_ratio * short_side:
        return image
    longest = math.isqrt(int(limits.max_image_pixels * max_ratio))  # canvas: longest x longest / max_ratio
    if long_side > longest:
        scale = longest / long_side
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        long_side = max(width, height)
    padded_side = math.ceil(long_side / max_ratio)
    size = (width, padded_side) if width >= height else (padded_side, height)
    canvas = Image.new("RGB", size, (255, 255, 255))
    canvas.paste(image, ((size[0] - width) // 2, (size[1] - height) // 2))
    return canvas


def _load_image(source: Any, limits: MediaLimits) -> Image.Image:
    if source is None:
        raise InvalidImageError("No image was given.")
    if isinstance(source, Image.Image):
        _load_pixels(source, limits, "The image is damaged or incomplete, so it cannot be read.")
        return _normalise(source)
    if isinstance(source, np.ndarray):
        return _image_from_array(source, limits)
    data = _read_upload(
        source, limits, what="image", invalid=InvalidImageError, too_large=ImageTooLargeError
    )
    if data is None:
        raise InvalidImageError(
            f"The input is not an image we can read ({_IMAGE_FORMATS_TEXT})."
        )
    key = hashlib.sha256(data).digest()
    image = _decoded_images.get(key)
    if image is not None:
        _check_pixels(image.size, limits)  # decoded under other limits, perhaps
        return image
    image = _open_image_bytes(data, limits)
    _decoded_images.put(key, image)
    return image.copy()


class DecodedImages:
    """Images recently decoded from file bytes, by the SHA-256 of those bytes, least recently used first out.

    One request's upload is read several times: checked before it joins the queue (a browser's click checks
    it once more), prepared for the model, and again when its result is recorded. Decoding a photo costs
    far more than hashing its bytes, so the same bytes are decoded once. Callers get a copy, never the kept
    image; the pixel limit is checked again on every hit. Bounded by the decoded size (``max_bytes``); an
    image larger than that is not kept. Thread-safe.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._images: OrderedDict[bytes, Image.Image] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: bytes) -> Image.Image | None:
        """A copy of the image decoded from bytes with digest ``key``; None when not kept."""
        with self._lock:
            image = self._images.get(key)
            if image is None:
                return None
            self._images.move_to_end(key)
        return image.copy()

    def put(self, key: bytes, image: Image.Image) -> None:
        """Keep ``image`` (the caller hands out copies of it only) under ``key``."""
        size = _decoded_bytes(image)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._images:
                return
            self._images[key] = image
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, dropped = self._images.popitem(last=False)
                self._bytes -= _decoded_bytes(dropped)

    def clear(self) -> None:
        with self._lock:
            self._images.clear()
            self._bytes = 0


def _decoded_bytes(image: Image.Image) -> int:
    return image.width * image.height * len(image.getbands())


DECODED_IMAGES_BYTES = 128 * 1024 * 1024  # about three decoded 12 MP photos
_decoded_images = DecodedImages(DECODED_IMAGES_BYTES)


def strip_image_metadata(image: Image.Image) -> Image.Image:
    """Return a copy of ``image`` with the same pixels and no metadata at all.

    EXIF (camera, GPS position, time), XMP, IPTC, text chunks, comments and ICC profiles are dropped.
    Images from :func:`load_image` are already converted to sRGB, so they need no profile. Only the
    palette and the transparency entry of palette images survive, since they are part of the pixels.
    """
    image.load()
    clean = Image.frombytes(image.mode, image.size, image.tobytes())
    if image.mode in ("P", "PA") and image.palette is not None:
        palette_mode = image.palette.mode
        palette = image.getpalette(palette_mode)
        if palette is not None:
            clean.putpalette(palette, rawmode=palette_mode)
    if image.mode in ("P", "L", "RGB", "1") and "transparency" in image.info:
        clean.info["transparency"] = image.info["transparency"]
    return clean


_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}


def encode_png(image: Image.Image) -> bytes:
    """Encode ``image`` as PNG bytes without any metadata (see :func:`strip_image_metadata`).

    Modes PNG cannot hold (CMYK, YCbCr, LAB, F...) are converted to RGB first. The output is
    deterministic for given pixels.
    """
    if image.mode not in _PNG_MODES:
        image = _to_rgb(image)
    clean = strip_image_metadata(image)
    buffer = io.BytesIO()
    clean.save(buffer, format="PNG", compress_level=1)  # ~4x faster than the default, files ~20% larger
    return buffer.getvalue()


def image_digest(image: Any) -> str:
    """SHA-256 hex digest of an image's content: its RGB pixels and size, never its metadata.

    Images that look the same after normalisation (an RGB image and the palette image it came from,
    a copy with stripped EXIF) share a digest. Anything :func:`load_image` accepts may be passed;
    a PIL image is hashed as it is (no EXIF rotation is applied to it here).
    """
    if not isinstance(image, Image.Image):
        image = load_image(image)
    image.load()
    rgb = image if image.mode == "RGB" and "transparency" not in image.info else _to_rgb(image)
    width, height = rgb.size
    digest = hashlib.sha256()
    digest.update(f"mmdemo-image-v1\0RGB\0{width}x{height}\0".encode("ascii"))
    digest.update(rgb.tobytes())
    return digest.hexdigest()


# --- audio ----------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Audio:
    """Decoded audio: float32 mono samples in -1..1 and their sampling rate in Hz."""

    samples: np.ndarray
    sampling_rate: int

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return len(self.samples) / self.sampling_rate if self.sampling_rate > 0 else 0.0

    def __repr__(self) -> str:
        return f"Audio({self.duration:.2f} s at {self.sampling_rate} Hz, {len(self.samples)} samples)"


# Rates above this are not audio a person recorded; refusing them also bounds what we allocate.
_MAX_SAMPLING_RATE = 768_000
_MAX_CHANNELS = 64
_BLOCK_FRAMES = 65_536
# soundfile formats whose samples are stored uncompressed, so that the file size bounds the length.
_UNCOMPRESSED_CONTAINERS = {"WAV", "WAVEX", "RF64", "W64", "AIFF", "AU", "CAF", "NIST", "IRCAM"}
_PCM_BYTES = {
    "PCM_S8": 1, "PCM_U8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4,
    "FLOAT": 4, "DOUBLE": 8, "ULAW": 1, "ALAW": 1,
}


def _too_long(seconds: float, limits: MediaLimits) -> AudioTooLongError:
    return AudioTooLongError(
        f"The audio is {_fmt_seconds(seconds)} long; "
        f"the limit is {_fmt_seconds(limits.max_audio_seconds)}."
    )


def _check_rate(rate: Any) -> int:
    try:
        value = float(rate)
    except (TypeError, ValueError):
        raise InvalidAudioError(
            "The audio has no valid sampling rate (the number of samples per second)."
        ) from None
    if not math.isfinite(value) or value <= 0 or value != int(value):
        raise InvalidAudioError(f"The audio has an invalid sampling rate ({rate} Hz).")
    if value > _MAX_SAMPLING_RATE:
        raise InvalidAudioError(
            f"The audio has an unusual sampling rate ({int(value)} Hz) that we do not support."
        )
    return int(value)


def _pcm_to_float(array: np.ndarray) -> np.ndarray:
    """Integer PCM to float32 in -1..1; float data to float32 as it is."""
    kind = array.dtype.kind
    if kind == "f":
        return array.astype(np.float32, copy=False)
    info = np.iinfo(array.dtype)
    if kind == "i":
        return (array.astype(np.float32) / float(-int(info.min))).astype(np.float32, copy=False)
    mid = (int(info.max) + 1) / 2.0  # unsigned: 8-bit WAV style, centred on 128
    return ((array.astype(np.float32) - mid) / mid).astype(np.float32, copy=False)


class _MonoStream:
    """Collects decoded blocks as mono float32, resampling as it goes, and enforces the limits.

    Memory stays bounded by the *output* length, whatever the input rate or channel count.
    """

    def __init__(self, rate: int, target_rate: int | None, limits: MediaLimits):
        self.rate = rate
        self.out_rate = target_rate or rate
        self.limits = limits
        self.max_frames = limits.max_audio_seconds * rate
        self.frames = 0
        self.peak = 0.0
        self.chunks: list[np.ndarray] = []
        self.resampler = None
        if self.out_rate != rate:
            import soxr

            self.resampler = soxr.ResampleStream(rate, self.out_rate, 1, dtype="float32", quality="HQ")

    def add(self, block: np.ndarray) -> None:
        """Add one block shaped (frames,) or (frames, channels), float32."""
        if block.ndim == 2:
            mono = block[:, 0] if block.shape[1] == 1 else block.mean(axis=1, dtype=np.float32)
        else:
            mono = block
        mono = np.ascontiguousarray(mono, dtype=np.float32)
        if not mono.size:
            return
        self.frames += mono.size
        if self.frames > self.max_frames:
            raise AudioTooLongError(
                f"The audio is longer than the limit of {_fmt_seconds(self.limits.max_audio_seconds)}."
            )
        if not np.isfinite(mono).all():
            raise InvalidAudioError(
                "The audio contains invalid sample values (not-a-number or infinity)."
            )
        self.peak = max(self.peak, float(np.abs(mono).max()))
        if self.resampler is not None:
            self.chunks.append(self.resampler.resample_chunk(mono))
        else:
            self.chunks.append(mono.copy())

    def finish(self) -> Audio:
        if self.frames == 0:
            raise InvalidAudioError("The audio is empty: it contains no sound at all (0 seconds).")
        if self.peak < self.limits.silence_threshold:
            raise InvalidAudioError(
                "The audio is silent: nothing was recorded. Check the microphone and try again."
            )
        if self.resampler is not None:
            self.chunks.append(self.resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        samples = np.concatenate(self.chunks) if len(self.chunks) > 1 else self.chunks[0]
        samples = np.ascontiguousarray(samples, dtype=np.float32)
        if self.peak > 1.0:  # float data louder than full scale: bring it back to -1..1
            samples = samples / np.float32(self.peak)
        np.clip(samples, -1.0, 1.0, out=samples)
        if samples.size == 0:
            raise InvalidAudioError("The audio is too short to use (less than one sample).")
        return Audio(samples=samples, sampling_rate=self.out_rate)


def _audio_from_array(
    array: Any, rate: Any, target_rate: int | None, limits: MediaLimits
) -> Audio:
    rate = _check_rate(rate)
    arr = np.asarray(array)
    if arr.dtype.kind not in "iuf":
        raise InvalidAudioError("The audio data is not made of numbers, so it cannot be played.")
    if arr.ndim == 2 and arr.shape[0] <= 16 < arr.shape[1]:
        arr = arr.T  # channels first (librosa / torch style): make it (samples, channels)
    if arr.ndim not in (1, 2):
        raise InvalidAudioError(
            f"The audio data has the shape {tuple(arr.shape)}; expected samples or "
            "samples x channels."
        )
    if arr.ndim == 2 and not 0 < arr.shape[1] <= _MAX_CHANNELS:
        raise InvalidAudioError(f"The audio has {arr.shape[1]} channels; that is not supported.")
    frames = arr.shape[0]
    if frames == 0:
        raise InvalidAudioError("The audio is empty: it contains no sound at all (0 seconds).")
    if frames / rate > limits.max_audio_seconds:
        raise _too_long(frames / rate, limits)
    stream = _MonoStream(rate, target_rate, limits)
    for start in range(0, frames, _BLOCK_FRAMES * 4):
        stream.add(_pcm_to_float(arr[start : start + _BLOCK_FRAMES * 4]))
    return stream.finish()


def _decode_with_soundfile(data: bytes, target_rate: int | None, limits: MediaLimits) -> Audio:
    import soundfile as sf

    with sf.SoundFile(io.BytesIO(data)) as f:
        rate = _check_rate(f.samplerate)
        channels = f.channels
        if not 0 < channels <= _MAX_CHANNELS:
            raise InvalidAudioError(f"The audio has {channels} channels; that is not supported.")
        frames = max(int(f.frames), 0)
        frame_bytes = _PCM_BYTES.get(f.subtype)
        if frame_bytes and f.format in _UNCOMPRESSED_CONTAINERS:
            # An uncompressed file cannot hold more frames than its bytes allow; streamed WAVs
            # often claim 4 GB of data. The decode loop below still enforces the limit.
            frames = min(frames, len(data) // (frame_bytes * channels))
        if frames / rate > limits.max_audio_seconds:
            raise _too_long(frames / rate, limits)  # from the header, before decoding
        stream = _MonoStream(rate, target_rate, limits)
        while True:
            block = f.read(_BLOCK_FRAMES, dtype="float32", always_2d=True)
            if not len(block):
                break
            stream.add(block)
    return stream.finish()


def _decode_with_pyav(data: bytes, target_rate: int | None, limits: MediaLimits) -> Audio:
    import av  # lazily: only browser formats (m4a, webm, opus, aac...) need it

    container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    try:
        if not container.streams.audio:  # a picture, a silent video, text taken for ANSI art...
            raise InvalidAudioError(
                f"The file has no sound in it: it is not audio we can read ({_AUDIO_FORMATS_TEXT})."
            )
        stream = container.streams.audio[0]
        duration = None
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / av.time_base
        if duration is not None and duration > limits.max_audio_seconds:
            raise _too_long(duration, limits)  # from the header, before decoding
        resampler = av.AudioResampler(format="fltp")  # keeps the first frame's layout and rate
        mono: _MonoStream | None = None

        def take(frames: list[Any]) -> None:
            nonlocal mono
            for frame in frames:
                arr = frame.to_ndarray()  # (channels, samples) for planar float
                if mono is None:
                    mono = _MonoStream(_check_rate(frame.sample_rate), target_rate, limits)
                mono.add(arr.T)

        try:
            for packet in container.demux(stream):
                try:
                    decoded = packet.decode()
                except av.error.InvalidDataError:
                    continue  # one damaged packet: skip it, as players do
                for frame in decoded:
                    take(resampler.resample(frame))
            take(resampler.resample(None))
        except MMDemoError:
            raise
        except Exception:
            if mono is None or mono.frames == 0:
                raise
            # A recording cut off at the end (browser tab closed): keep what was decoded.
        if mono is None:
            raise InvalidAudioError("The audio is empty: it contains no sound at all (0 seconds).")
        return mono.finish()
    finally:
        container.close()


def _decode_audio_bytes(data: bytes, target_rate: int | None, limits: MediaLimits) -> Audio:
    try:
        return _decode_with_soundfile(data, target_rate, limits)
    except MMDemoError:
        raise
    except MemoryError:
        raise
    except Exception:
        pass  # not a format libsndfile knows (or it failed half way): try FFmpeg's decoders
    try:
        return _decode_with_pyav(data, target_rate, limits)
    except MMDemoError:
        raise
    except MemoryError:
        raise
    except Exception as exc:
        raise InvalidAudioError(
            f"The file is not audio we can read ({_AUDIO_FORMATS_TEXT})."
        ) from exc


def load_audio(
    source: Any, target_rate: int | None = 16000, limits: MediaLimits = DEFAULT_LIMITS
) -> Audio:
    """Decode ``source`` into float32 mono samples in -1..1 at ``target_rate`` Hz.

    ``source`` may be a path, bytes, a binary file object, gradio's ``(sampling_rate, ndarray)``
    tuple (int16 / int32 / uint8 / float; shape (n,) or (n, channels)), a dict with
    ``"array"`` or ``"raw"`` and ``"sampling_rate"`` (or datasets' ``{"bytes", "path"}``), or an
    :class:`Audio`. ``target_rate=None`` keeps the source's rate.

    Files are decoded with soundfile (WAV, FLAC, OGG, MP3...) and, failing that, with PyAV (M4A,
    AAC, WebM, Opus, MP4: what browsers record). Channels are averaged; the rate is converted with
    soxr (high quality) only when it differs.

    Refuses with :class:`InvalidAudioError` (unreadable, empty, silent, bad sampling rate, NaN or
    infinite samples) or :class:`AudioTooLongError` (longer than ``limits.max_audio_seconds``,
    checked from the header before decoding where the format has one, or a file larger than
    ``limits.max_upload_bytes``).
    """
    if target_rate is not None:
        if isinstance(target_rate, bool) or not isinstance(target_rate, (int, np.integer)):
            raise ValueError(f"target_rate must be a positive integer, not {target_rate!r}")
        if target_rate <= 0:
            raise ValueError(f"target_rate must be a positive integer, not {target_rate!r}")
        target_rate = int(target_rate)
    if source is None:
        raise InvalidAudioError("No audio was given.")
    if isinstance(source, Audio):
        return _audio_from_array(source.samples, source.sampling_rate, target_rate, limits)
    if isinstance(source, tuple) and len(source) == 2:
        first, second = source
        if isinstance(first, np.ndarray) and not isinstance(second, np.ndarray):
            first, second = second, first  # (array, rate)
        return _audio_from_array(second, first, target_rate, limits)
    if isinstance(source, dict):
        array = source.get("array")
        if array is None:
            array = source.get("raw")
        if array is not None:
            return _audio_from_array(array, source.get("sampling_rate"), target_rate, limits)
        if source.get("bytes"):
            source = source["bytes"]
        elif source.get("path"):
            source = source["path"]
        else:
            raise InvalidAudioError(
                "The audio data is missing (expected 'array' or 'raw' with 'sampling_rate')."
            )
    if isinstance(source, np.ndarray):
        raise InvalidAudioError(
            "The audio has no sampling rate; pass (sampling_rate, samples) instead."
        )
    data = _read_upload(
        source, limits, what="audio", invalid=InvalidAudioError, too_large=AudioTooLongError
    )
    if data is None:
        raise InvalidAudioError(f"The input is not audio we can read ({_AUDIO_FORMATS_TEXT}).")
    return _decode_audio_bytes(data, target_rate, limits)


def save_images(images: list[Any], out: Path, settings: dict[str, Any], seeds: list[int] | None = None) -> list[str]:
    """Write PNGs (``out``, or ``out-1.png``... for several) with the settings in their metadata, and each
    image's own seed where ``seeds`` gives them."""
    from PIL.PngImagePlugin import PngInfo

    out.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images, start=1):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}-{index}{out.suffix or '.png'}")
        info = PngInfo()
        info.add_text("parameters", json.dumps({**settings, "seed": seeds[index - 1]} if seeds else settings))
        image.save(path, format="PNG", pnginfo=info)
        paths.append(str(path))
    return paths
