"""Synthesised sample media for tests: normal, odd-but-valid and hostile images and audio.

Every ``write_*`` function writes one file into the given folder and returns its path; the
``*_bytes`` and ``*_array`` helpers return data. Nothing here imports pytest, so any test (or a script
building demo assets) can reuse it. Files that need an encoder which may be missing (the ``ffmpeg``
binary or PyAV's encoders) come from :func:`write_browser_audio`, which returns ``None`` when it cannot
make the file, so callers can skip.

Known content, for assertions:

* :func:`write_exif_jpeg`: stored 80x40, left half red and right half blue, EXIF Orientation 6
  ("rotate 90 degrees clockwise to display"), so a correct loader returns 40x80 with red on top and
  blue below. Its EXIF also carries a GPS position (``GPS_LATITUDE``), camera make and model.
* :func:`write_rgba_png`: 4x1; pixel 0 fully transparent red, 1 opaque green, 2 black at alpha 128,
  3 opaque blue.
* :func:`write_palette_png`: 4x2 palette image; left half index 0 (red, fully transparent), right
  half index 1 (blue, opaque).
* :func:`write_grey16_png`: 256x1 16-bit greyscale ramp from 0 to ``max_value``.
* :func:`write_cmyk_jpeg`: 16x16 pure cyan (C=255, M=Y=K=0).
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image

RED = (255, 0, 0)
BLUE = (0, 0, 255)
GPS_LATITUDE = (51.0, 28.0, 38.5)
EXIF_ORIENTATION = 0x0112


def _folder(folder: str | os.PathLike[str]) -> Path:
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- images ---------------------------------------------------------------------------------------


def exif_bytes(orientation: int = 6, gps: bool = True) -> bytes:
    """An EXIF block with an orientation tag, camera make/model, a date and (optionally) GPS."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    exif[ExifTags.Base.Make] = "TestCam"
    exif[ExifTags.Base.Model] = "Model 1"
    exif[ExifTags.Base.DateTime] = "2024:05:01 12:34:56"
    if gps:
        gps_ifd = exif.get_ifd(ExifTags.IFD.GPSInfo)
        gps_ifd[ExifTags.GPS.GPSLatitudeRef] = "N"
        gps_ifd[ExifTags.GPS.GPSLatitude] = GPS_LATITUDE
        gps_ifd[ExifTags.GPS.GPSLongitudeRef] = "W"
        gps_ifd[ExifTags.GPS.GPSLongitude] = (0.0, 7.0, 39.9)
    return exif.tobytes()


def two_colour_image(size: tuple[int, int] = (80, 40)) -> Image.Image:
    """RGB image, left half red, right half blue."""
    width, height = size
    img = Image.new("RGB", size, BLUE)
    img.paste(RED, (0, 0, width // 2, height))
    return img


def write_exif_jpeg(folder, name: str = "rotated_gps.jpg", orientation: int = 6) -> Path:
    """80x40 JPEG (left red, right blue) with EXIF orientation and GPS; see the module doc."""
    path = _folder(folder) / name
    two_colour_image().save(path, "JPEG", quality=95, exif=exif_bytes(orientation))
    return path


def write_rgba_png(folder, name: str = "rgba.png") -> Path:
    path = _folder(folder) / name
    img = Image.new("RGBA", (4, 1))
    img.putdata([(255, 0, 0, 0), (0, 255, 0, 255), (0, 0, 0, 128), (0, 0, 255, 255)])
    img.save(path, "PNG")
    return path


def write_palette_png(folder, name: str = "palette_transparent.png") -> Path:
    path = _folder(folder) / name
    img = Image.new("P", (4, 2))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    img.putdata([0, 0, 1, 1, 0, 0, 1, 1])
    img.save(path, "PNG", transparency=0)
    return path


def write_palette_png_opaque(folder, name: str = "palette.png") -> Path:
    path = _folder(folder) / name
    img = Image.new("P", (4, 2))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    img.putdata([0, 0, 1, 1, 0, 0, 1, 1])
    img.save(path, "PNG")
    return path


def write_grey16_png(folder, name: str = "grey16.png", max_value: int = 65535) -> Path:
    """256x1 16-bit greyscale PNG ramping from 0 to ``max_value``."""
    path = _folder(folder) / name
    ramp = np.round(np.linspace(0, max_value, 256)).astype(np.uint16).reshape(1, 256)
    Image.fromarray(ramp).save(path, "PNG")  # mode I;16
    return path


def write_cmyk_jpeg(folder, name: str = "cmyk.jpg") -> Path:
    path = _folder(folder) / name
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(path, "JPEG", quality=95)
    return path


def write_animated_gif(folder, name: str = "animated.gif") -> Path:
    """Two frames: red, then blue."""
    path = _folder(folder) / name
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    frames[0].save(path, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def write_animated_webp(folder, name: str = "animated.webp") -> Path:
    path = _folder(folder) / name
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    frames[0].save(path, "WEBP", save_all=True, append_images=frames[1:], duration=100, lossless=True)
    return path


def noise_image(size: tuple[int, int] = (256, 256), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def write_truncated_jpeg(folder, name: str = "truncated.jpg", keep: float = 0.5) -> Path:
    """A noisy 256x256 JPEG cut off after ``keep`` of its bytes."""
    buffer = io.BytesIO()
    noise_image().save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    path = _folder(folder) / name
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def write_truncated_png(folder, name: str = "truncated.png", keep: float = 0.5) -> Path:
    """A noisy 256x256 PNG cut off after ``keep`` of its bytes (in the middle of its pixel data)."""
    buffer = io.BytesIO()
    noise_image().save(buffer, "PNG")
    data = buffer.getvalue()
    path = _folder(folder) / name
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def random_bytes(size: int = 4096, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def write_random_bytes(folder, name: str = "random.png", size: int = 4096, seed: int = 0) -> Path:
    """Random bytes under an image (or audio) file name."""
    path = _folder(folder) / name
    path.write_bytes(random_bytes(size, seed))
    return path


def write_text_file(folder, name: str = "notes.wav") -> Path:
    """A plain text file with a media file name."""
    path = _folder(folder) / name
    path.write_text("This is not a sound file, just some text.\n" * 20)
    return path


def write_empty_file(folder, name: str = "empty.png") -> Path:
    path = _folder(folder) / name
    path.write_bytes(b"")
    return path


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


@lru_cache(maxsize=8)
def bomb_png_bytes(width: int = 30000, height: int = 30000) -> bytes:
    """A valid 1-bit black PNG of width x height pixels, built without allocating the pixels.

    30000x30000 (900 megapixels) compresses to about 110 KB: a decompression bomb.
    """
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    rows_per_block = max(1, (1 << 20) // len(row))
    compressor = zlib.compressobj(9)
    parts = []
    full_blocks, rest = divmod(height, rows_per_block)
    block = row * rows_per_block
    for _ in range(full_blocks):
        parts.append(compressor.compress(block))
    parts.append(compressor.compress(row * rest))
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


def write_bomb_png(folder, width: int = 30000, height: int = 30000, name: str | None = None) -> Path:
    path = _folder(folder) / (name or f"bomb_{width}x{height}.png")
    path.write_bytes(bomb_png_bytes(width, height))
    return path


# --- audio ----------------------------------------------------------------------------------------


def speech_like_array(
    seconds: float = 2.0, rate: int = 44100, channels: int = 2, dtype: str = "int16"
) -> np.ndarray:
    """A speech-like signal: a 150-3000 Hz sweep plus a few harmonics with a syllable-rate envelope.

    Shape (frames,) for one channel, (frames, channels) otherwise; the channels differ slightly.
    Peak amplitude is about 0.6 of full scale. ``dtype`` is int16, int32, uint8, float32 or float64.
    """
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    f0, f1 = 150.0, 3000.0
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * max(seconds, 1e-9)))
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t) ** 2
    base = 0.35 * np.sin(phase) + 0.15 * np.sin(2 * np.pi * 220 * t) + 0.1 * np.sin(2 * np.pi * 440 * t)
    chans = [base * envelope * (1.0 - 0.1 * c) for c in range(channels)]
    signal = np.stack(chans, axis=1) if channels > 1 else chans[0]
    if dtype in ("float32", "float64"):
        return signal.astype(dtype)
    if dtype == "uint8":
        return np.round(signal * 127 + 128).astype(np.uint8)
    info = np.iinfo(dtype)
    return np.round(signal * info.max).astype(dtype)


def write_wav(folder, name: str, data: np.ndarray, rate: int, subtype: str | None = None) -> Path:
    import soundfile as sf

    path = _folder(folder) / name
    sf.write(str(path), data, rate, format="WAV", subtype=subtype)
    return path


def write_speech_like_wav(
    folder, name: str = "speech_like.wav", seconds: float = 2.0, rate: int = 44100, channels: int = 2
) -> Path:
    """44.1 kHz stereo int16 WAV of :func:`speech_like_array`."""
    return write_wav(folder, name, speech_like_array(seconds, rate, channels), rate, "PCM_16")


def write_silent_wav(folder, name: str = "silent.wav", seconds: float = 1.0, rate: int = 16000) -> Path:
    return write_wav(folder, name, np.zeros(int(seconds * rate), np.int16), rate, "PCM_16")


def write_zero_length_wav(folder, name: str = "zero_length.wav", rate: int = 16000) -> Path:
    """A well-formed WAV header with no samples at all."""
    return write_wav(folder, name, np.zeros(0, np.int16), rate, "PCM_16")


def write_long_wav(folder, name: str = "long.wav", seconds: float = 3.0, rate: int = 8000) -> Path:
    """A mono 8 kHz WAV ``seconds`` long: longer than a small test limit such as 1 second."""
    return write_wav(folder, name, speech_like_array(seconds, rate, 1), rate, "PCM_16")


def write_soundfile_audio(folder, fmt: str = "ogg", seconds: float = 2.0, rate: int = 44100) -> Path:
    """OGG (Vorbis), MP3 or FLAC written by soundfile itself (no ffmpeg needed)."""
    import soundfile as sf

    fmt = fmt.lower()
    path = _folder(folder) / f"speech_like.{fmt}"
    data = speech_like_array(seconds, rate, 2, "float32")
    if fmt == "ogg":
        sf.write(str(path), data, rate, format="OGG", subtype="VORBIS")
    elif fmt == "mp3":
        sf.write(str(path), data, rate, format="MP3", subtype="MPEG_LAYER_III")
    elif fmt == "flac":
        sf.write(str(path), data, rate, format="FLAC", subtype="PCM_16")
    else:
        raise ValueError(f"soundfile cannot write {fmt}")
    return path


_FFMPEG_CODECS = {"m4a": "aac", "aac": "aac", "mp4": "aac", "webm": "libopus", "opus": "libopus",
                  "mp3": "libmp3lame", "ogg": "libvorbis"}
_PYAV_CODECS = {"m4a": "aac", "mp4": "aac", "webm": "libopus", "opus": "libopus", "ogg": "libvorbis",
                "mp3": "libmp3lame"}


def _ffmpeg_encode(src: Path, dst: Path, codec: str, extra: list[str]) -> bool:
    ffmpeg = shutil.which("ffmpeg")
    if not ffmpeg:
        return False
    cmd = [ffmpeg, "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-i", str(src),
           "-c:a", codec, *extra, str(dst)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return dst.exists() and dst.stat().st_size > 0


def _pyav_encode(data: np.ndarray, rate: int, dst: Path, codec: str) -> bool:
    try:
        import av
    except ImportError:
        return False
    try:
        planar = np.ascontiguousarray(data.T.astype(np.float32))  # (channels, samples)
        layout = "stereo" if planar.shape[0] == 2 else "mono"
        with av.open(str(dst), mode="w") as container:
            stream = container.add_stream(codec, rate=rate, layout=layout)
            frame = av.AudioFrame.from_ndarray(planar, format="fltp", layout=layout)
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
    except Exception:
        return False
    return dst.exists() and dst.stat().st_size > 0


def write_browser_audio(
    folder, ext: str = "m4a", seconds: float = 2.0, rate: int = 48000, prefer: str = "ffmpeg"
) -> Path | None:
    """What a browser records: m4a / mp4 (AAC), webm / opus (Opus), or mp3 / ogg.

    Made with the ``ffmpeg`` binary when present, otherwise with PyAV's encoders. Returns None when
    neither can make it (the caller should skip). The audio is :func:`speech_like_array`, stereo.
    """
    ext = ext.lower()
    folder = _folder(folder)
    dst = folder / f"browser_{seconds:g}s.{ext}"
    data = speech_like_array(seconds, rate, 2, "float32")
    order = ["ffmpeg", "pyav"] if prefer == "ffmpeg" else ["pyav", "ffmpeg"]
    for tool in order:
        if tool == "ffmpeg" and ext in _FFMPEG_CODECS:
            src = write_wav(folder, f"_src_{seconds:g}s_{rate}.wav", data, rate, "FLOAT")
            extra = ["-b:a", "64k"]
            if ext == "opus":
                extra += ["-f", "opus"]
            if _ffmpeg_encode(src, dst, _FFMPEG_CODECS[ext], extra):
                return dst
        if tool == "pyav" and ext in _PYAV_CODECS:
            target_rate = 48000 if _PYAV_CODECS[ext] == "libopus" else rate
            payload = data
            if target_rate != rate:
                import soxr

                payload = soxr.resample(data, rate, target_rate)
            if _pyav_encode(payload, target_rate, dst, _PYAV_CODECS[ext]):
                return dst
    return None


def write_espeak_wav(folder, text: str = "Hello world. This is a test.", name: str = "speech.wav"):
    """Real synthetic speech from the ``espeak-ng`` binary, or None when it is not installed."""
    espeak = shutil.which("espeak-ng")
    if not espeak:
        return None
    path = _folder(folder) / name
    try:
        subprocess.run([espeak, "-w", str(path), text], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return path if path.exists() and path.stat().st_size > 44 else None


def wav_header(data_bytes: int, rate: int = 16000, channels: int = 1, bits: int = 16) -> bytes:
    """A 44-byte PCM WAV header announcing ``data_bytes`` bytes of samples."""
    block_align = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block_align, block_align, bits)
    riff_size = min(4 + 8 + len(fmt) + 8 + data_bytes, 0xFFFFFFFF)
    return (b"RIFF" + struct.pack("<I", riff_size) + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt))
            + fmt + b"data" + struct.pack("<I", min(data_bytes, 0xFFFFFFFF)))


def write_huge_header_wav(folder, name: str = "huge_header.wav", seconds: float = 1.0) -> Path:
    """A WAV whose header claims ~4 GB of samples (~37 hours at 16 kHz) but holds ``seconds``."""
    samples = speech_like_array(seconds, 16000, 1)
    path = _folder(folder) / name
    path.write_bytes(wav_header(0xFFFFFFF0) + samples.astype("<i2").tobytes())
    return path


def write_huge_header_flac(folder, name: str = "huge_header.flac") -> Path:
    """A FLAC whose STREAMINFO claims 2**36 - 1 samples (about 50 days at 16 kHz) but holds 1 s."""
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, speech_like_array(1.0, 16000, 1, "float32"), 16000, format="FLAC")
    data = bytearray(buffer.getvalue())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO comes first
    offset = 8 + 10  # marker + block header, then min/max block and frame sizes
    packed = int.from_bytes(data[offset : offset + 8], "big")
    packed |= (1 << 36) - 1  # total samples: the low 36 bits
    data[offset : offset + 8] = packed.to_bytes(8, "big")
    data[offset + 8 : offset + 24] = bytes(16)  # MD5 of the audio: 0 means "unknown"
    path = _folder(folder) / name
    path.write_bytes(bytes(data))
    return path


def write_streamed_webm(folder, name: str = "streamed.webm", seconds: float = 3.0) -> Path | None:
    """A WebM/Opus file written to a pipe, as MediaRecorder does: no duration in its header.

    Needs the ``ffmpeg`` binary; returns None without it.
    """
    ffmpeg = shutil.which("ffmpeg")
    if not ffmpeg:
        return None
    folder = _folder(folder)
    src = write_wav(folder, f"_src_{seconds:g}s_48000.wav",
                    speech_like_array(seconds, 48000, 2, "float32"), 48000, "FLOAT")
    cmd = [ffmpeg, "-hide_banner", "-loglevel", "error", "-nostdin", "-i", str(src),
           "-c:a", "libopus", "-f", "webm", "pipe:1"]
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    if not out:
        return None
    path = folder / name
    path.write_bytes(out)
    return path


def swapped_primaries_icc() -> bytes:
    """An RGB ICC profile that is sRGB with its red and blue primaries swapped (named "swap").

    Pure red pixels tagged with it are really blue: a loader that applies ICC profiles turns them blue.
    """
    from PIL import ImageCms

    profile = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    count = struct.unpack(">I", profile[128:132])[0]
    entries = {}
    for i in range(count):
        sig, offset, size = struct.unpack(">4sII", profile[132 + 12 * i : 144 + 12 * i])
        entries[sig] = (132 + 12 * i, offset, size)
    (pos_r, off_r, size_r), (pos_b, off_b, size_b) = entries[b"rXYZ"], entries[b"bXYZ"]
    profile[pos_r + 4 : pos_r + 12] = struct.pack(">II", off_b, size_b)
    profile[pos_b + 4 : pos_b + 12] = struct.pack(">II", off_r, size_r)
    profile[84:100] = bytes(16)  # profile ID (an MD5): 0 means "not computed"
    data = bytes(profile).replace(b"sRGB", b"swap")
    return data.replace("sRGB".encode("utf-16-be"), "swap".encode("utf-16-be"))
