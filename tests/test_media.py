"""Tests of mmdemo.media: image and audio decoding, normalisation and limits."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import time
import warnings
from dataclasses import FrozenInstanceError
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageFile

sys.path.insert(0, str(Path(__file__).resolve().parent))  # media_samples, whatever the import mode

import media_samples as ms  # noqa: E402

from mmdemo import media  # noqa: E402
from mmdemo.errors import (  # noqa: E402
    AudioTooLongError,
    ImageTooLargeError,
    InvalidAudioError,
    InvalidImageError,
    InvalidInputError,
)
from mmdemo.media import (  # noqa: E402
    Audio,
    MediaLimits,
    encode_png,
    image_digest,
    load_audio,
    load_image,
    strip_image_metadata,
)

# Words that betray a raw library message rather than one written for a person.
RAW_WORDS = ("cannot identify", "Errno", "PIL", "libsndfile", "Traceback", "NoneType", "psf_")


def assert_readable(exc: BaseException) -> str:
    message = str(exc)
    assert message and message[0].isupper() and message.rstrip().endswith((".", ")")), message
    for word in RAW_WORDS:
        assert word not in message, message
    return message


@pytest.fixture(scope="session")
def d(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("media_samples")


def pil(path) -> Image.Image:
    """Image.open without leaving a file handle open."""
    return Image.open(io.BytesIO(Path(path).read_bytes()))


def px(img: Image.Image, xy) -> tuple[int, ...]:
    return tuple(img.getpixel(xy))


def close(actual, expected, tol: int = 3) -> bool:
    return all(abs(int(a) - int(e)) <= tol for a, e in zip(actual, expected))


# --- limits ---------------------------------------------------------------------------------------


def test_limits_defaults_and_validation():
    limits = MediaLimits()
    assert limits.max_image_pixels == 40_000_000
    assert limits.max_upload_bytes == 50 * 1024 * 1024
    assert limits.max_audio_seconds == 600.0
    assert limits.silence_threshold == 1e-4
    with pytest.raises(FrozenInstanceError):
        limits.max_image_pixels = 1  # type: ignore[misc]
    for bad in ({"max_image_pixels": 0}, {"max_upload_bytes": -1}, {"max_audio_seconds": 0}):
        with pytest.raises(ValueError):
            MediaLimits(**bad)


def test_errors_are_value_errors():
    for cls in (InvalidImageError, ImageTooLargeError, InvalidAudioError, AudioTooLongError):
        assert issubclass(cls, InvalidInputError) and issubclass(cls, ValueError)


# --- images: normal and odd-but-valid inputs -----------------------------------------------------


def test_exif_orientation_is_applied(d):
    path = ms.write_exif_jpeg(d)
    assert pil(path).size == (80, 40)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (40, 80)
    assert close(px(img, (20, 10)), ms.RED, 6)  # the left (red) half is now on top
    assert close(px(img, (20, 70)), ms.BLUE, 6)
    assert img.getexif().get(ms.EXIF_ORIENTATION) in (None, 1)


def test_every_kind_of_source_gives_the_same_image(d, tmp_path):
    path = ms.write_exif_jpeg(d)
    data = path.read_bytes()

    class ReadOnly:  # a non-seekable stream, like an upload body
        def __init__(self, raw):
            self.buffer = io.BytesIO(raw)

        def read(self, n=-1):
            return self.buffer.read(n)

    results = [
        load_image(path),
        load_image(str(path)),
        load_image(data),
        load_image(bytearray(data)),
        load_image(io.BytesIO(data)),
        load_image(ReadOnly(data)),
        load_image(Image.open(io.BytesIO(data))),
    ]
    digests = {image_digest(img) for img in results}
    assert len(digests) == 1
    assert {img.size for img in results} == {(40, 80)}


def test_image_is_fully_loaded(tmp_path, d):
    copy = tmp_path / "gone.png"
    copy.write_bytes(ms.write_rgba_png(d).read_bytes())
    img = load_image(copy)
    copy.unlink()
    assert px(img, (3, 0)) == (0, 0, 255)


def test_rgba_is_composited_on_white(d):
    img = load_image(ms.write_rgba_png(d))
    assert img.mode == "RGB" and img.size == (4, 1)
    assert px(img, (0, 0)) == (255, 255, 255)  # fully transparent red -> white
    assert px(img, (1, 0)) == (0, 255, 0)
    assert close(px(img, (2, 0)), (127, 127, 127), 1)  # black at half alpha
    assert px(img, (3, 0)) == (0, 0, 255)


def test_palette_with_transparency(d):
    img = load_image(ms.write_palette_png(d))
    assert img.mode == "RGB" and img.size == (4, 2)
    assert px(img, (0, 0)) == (255, 255, 255)  # transparent index -> white
    assert px(img, (3, 1)) == (0, 0, 255)


def test_palette_without_transparency(d):
    img = load_image(ms.write_palette_png_opaque(d))
    assert px(img, (0, 0)) == (255, 0, 0) and px(img, (3, 1)) == (0, 0, 255)


def test_grey16_is_scaled_to_8_bit(d):
    assert pil(ms.write_grey16_png(d)).mode.startswith("I")
    img = load_image(ms.write_grey16_png(d))
    assert img.mode == "RGB" and img.size == (256, 1)
    assert px(img, (0, 0)) == (0, 0, 0) and px(img, (255, 0)) == (255, 255, 255)
    assert close(px(img, (128, 0)), (128, 128, 128), 1)


def test_grey16_uses_the_actual_range(d):
    # 12-bit data in a 16-bit container: 4095 becomes white, not a dark grey.
    img = load_image(ms.write_grey16_png(d, "grey12.png", max_value=4095))
    assert px(img, (0, 0)) == (0, 0, 0) and px(img, (255, 0)) == (255, 255, 255)
    # values that already fit 8 bits stay as they are
    img = load_image(ms.write_grey16_png(d, "grey8in16.png", max_value=200))
    assert px(img, (255, 0)) == (200, 200, 200)


def test_cmyk_jpeg(d):
    img = load_image(ms.write_cmyk_jpeg(d))
    assert img.mode == "RGB" and close(px(img, (8, 8)), (0, 255, 255), 4)


@pytest.mark.parametrize("writer", [ms.write_animated_gif, ms.write_animated_webp])
def test_animated_images_give_the_first_frame(d, writer):
    img = load_image(writer(d))
    assert img.mode == "RGB" and img.size == (8, 8)
    assert close(px(img, (4, 4)), ms.RED, 2)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_common_formats(fmt):
    buffer = io.BytesIO()
    ms.two_colour_image().save(buffer, fmt)
    img = load_image(buffer.getvalue())
    assert img.mode == "RGB" and img.size == (80, 40)
    assert close(px(img, (5, 5)), ms.RED, 8) and close(px(img, (75, 35)), ms.BLUE, 8)


def _mode_cases():
    i16b = Image.frombytes("I;16B", (2, 1), struct.pack(">HH", 0, 65535))
    i32 = Image.fromarray(np.array([[-1000, 0, 1000]], np.int32))
    f01 = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    fbig = Image.fromarray(np.array([[-50.0, 0.0, 5000.0]], np.float32))
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (0, 255)])
    pa = Image.new("PA", (2, 1))
    pa.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pa.putdata([(1, 0), (1, 255)])
    return [
        ("1", Image.new("1", (2, 1), 1), [(255, 255, 255)] * 2),
        ("L", Image.new("L", (2, 1), 77), [(77, 77, 77)] * 2),
        ("LA", la, [(255, 255, 255), (0, 0, 0)]),
        ("La", Image.new("La", (2, 1), (0, 0)), [(255, 255, 255)] * 2),
        ("PA", pa, [(255, 255, 255), (255, 0, 0)]),
        ("RGBa", Image.new("RGBa", (2, 1), (0, 0, 0, 0)), [(255, 255, 255)] * 2),
        ("RGBX", Image.new("RGBX", (2, 1), (1, 2, 3, 0)), [(1, 2, 3)] * 2),
        ("I;16", Image.new("I;16", (2, 1), 65535), [(255, 255, 255)] * 2),
        ("I;16B", i16b, [(0, 0, 0), (255, 255, 255)]),
        ("I", i32, [(0, 0, 0), (128, 128, 128), (255, 255, 255)]),
        ("F 0..1", f01, [(0, 0, 0), (128, 128, 128), (255, 255, 255)]),
        ("F wide", fbig, [(0, 0, 0), (3, 3, 3), (255, 255, 255)]),
        ("CMYK", Image.new("CMYK", (2, 1), (0, 0, 0, 255)), [(0, 0, 0)] * 2),
        ("YCbCr", Image.new("YCbCr", (2, 1), (128, 128, 128)), [(128, 128, 128)] * 2),
        ("LAB", Image.new("LAB", (2, 1), (255, 128, 128)), [(255, 255, 255)] * 2),
        ("HSV", Image.new("HSV", (2, 1), (0, 255, 255)), [(255, 0, 0)] * 2),
    ]


@pytest.mark.parametrize("name,img,expected", _mode_cases(), ids=[c[0] for c in _mode_cases()])
def test_pil_modes_are_normalised(name, img, expected):
    out = load_image(img)
    assert out.mode == "RGB" and out.size == img.size
    assert out is not img
    for x, value in enumerate(expected):
        assert close(px(out, (x, 0)), value, 2), (name, x, px(out, (x, 0)), value)


def test_float_and_16_bit_tiff_files(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.array([[0.0, 0.25, 1.0]], np.float32)).save(path)
    assert pil(path).mode == "F"
    assert [px(load_image(path), (x, 0))[0] for x in range(3)] == [0, 64, 255]
    path16 = tmp_path / "grey16.tif"
    Image.fromarray(np.array([[0, 1000, 2000]], np.uint16)).save(path16)
    assert [px(load_image(path16), (x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_pil_image_with_exif_orientation_is_transposed(d):
    opened = pil(ms.write_exif_jpeg(d))
    out = load_image(opened)
    assert out.size == (40, 80) and opened.size == (80, 40)


@pytest.mark.parametrize(
    "array,expected",
    [
        (np.full((3, 2), 9, np.uint8), (9, 9, 9)),
        (np.full((3, 2, 1), 9, np.uint8), (9, 9, 9)),
        (np.full((3, 2, 3), (1, 2, 3), np.uint8), (1, 2, 3)),
        (np.full((3, 2, 4), (1, 2, 3, 0), np.uint8), (255, 255, 255)),
        (np.full((3, 2, 4), (1, 2, 3, 255), np.uint8), (1, 2, 3)),
        (np.full((3, 2, 2), (0, 0), np.uint8), (255, 255, 255)),
        (np.full((3, 2, 3), 0.5, np.float32), (128, 128, 128)),
        (np.full((3, 2, 3), 1.7, np.float64), (255, 255, 255)),  # clipped into 0..1
        (np.ones((3, 2), bool), (255, 255, 255)),
    ],
)
def test_numpy_arrays(array, expected):
    img = load_image(array)
    assert img.mode == "RGB" and img.size == (2, 3)
    assert px(img, (1, 2)) == expected


def test_numpy_uint16_is_scaled_by_its_range():
    ramp = np.linspace(0, 65535, 256).astype(np.uint16).reshape(1, 256)
    img = load_image(ramp)
    assert px(img, (0, 0)) == (0, 0, 0) and px(img, (255, 0)) == (255, 255, 255)
    rgb = np.zeros((1, 2, 3), np.uint16)
    rgb[0, 1] = (4095, 0, 2048)
    assert close(px(load_image(rgb), (1, 0)), (255, 0, 128), 1)


def test_icc_profile_is_converted_to_srgb():
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), ms.RED).save(buffer, "PNG", icc_profile=ms.swapped_primaries_icc())
    img = load_image(buffer.getvalue())
    assert close(px(img, (0, 0)), ms.BLUE, 3)  # "red" in a red/blue-swapped space is blue
    assert "icc_profile" not in img.info


def test_srgb_and_broken_icc_profiles_leave_pixels_alone():
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for icc in (srgb, b"definitely not a profile"):
        buffer = io.BytesIO()
        Image.new("RGB", (2, 2), (10, 200, 30)).save(buffer, "PNG", icc_profile=icc)
        assert px(load_image(buffer.getvalue()), (1, 1)) == (10, 200, 30)


# --- images: refusals -------------------------------------------------------------------------------


UNREADABLE = "not an image we can read"
DAMAGED = "damaged or incomplete"


@pytest.mark.parametrize(
    "make,phrase",
    [
        (ms.write_truncated_jpeg, DAMAGED),
        (ms.write_truncated_png, DAMAGED),
        (lambda d: ms.write_random_bytes(d, "random.png"), UNREADABLE),
        (lambda d: ms.write_text_file(d, "notes.png"), UNREADABLE),
        (lambda d: ms.write_empty_file(d, "empty.png"), "empty"),
    ],
    ids=["truncated-jpeg", "truncated-png", "random-bytes", "text-file", "empty-file"],
)
def test_bad_image_files_are_refused(d, make, phrase):
    path = make(d)
    for source in (path, path.read_bytes(), io.BytesIO(path.read_bytes())):
        with pytest.raises(InvalidImageError) as info:
            load_image(source)
        assert phrase in assert_readable(info.value)


def test_unreadable_message_lists_the_formats(d):
    with pytest.raises(InvalidImageError) as info:
        load_image(ms.random_bytes())
    assert str(info.value) == "The file is not an image we can read (PNG, JPEG, WebP, GIF, BMP, TIFF)."


def test_truncated_images_are_never_half_decoded(d):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    for keep in (0.3, 0.6, 0.9):
        with pytest.raises(InvalidImageError):
            load_image(ms.write_truncated_jpeg(d, f"cut{keep}.jpg", keep))
        with pytest.raises(InvalidImageError):
            load_image(ms.write_truncated_png(d, f"cut{keep}.png", keep))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    "source,phrase",
    [
        (None, "No image was given."),
        (b"", "empty"),
        ("/nonexistent/folder/cat.png", "could not be found"),
        (12345, UNREADABLE),
        (io.StringIO("text"), "binary"),
        (np.array([[1.0, np.nan]]), "invalid values"),
        (np.zeros((2, 2, 5), np.uint8), "shape"),
        (np.zeros((2, 2, 3, 1), np.uint8), "shape"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.array([["a"]], dtype=object), "not made of numbers"),
    ],
    ids=["none", "empty-bytes", "missing-path", "int", "text-stream", "nan", "5-channels", "4-d",
         "zero-size", "object"],
)
def test_bad_image_sources_are_refused(source, phrase):
    with pytest.raises(InvalidImageError) as info:
        load_image(source)
    assert phrase in assert_readable(info.value)


def test_folder_is_refused(tmp_path):
    with pytest.raises(InvalidImageError) as info:
        load_image(tmp_path)
    assert "folder" in assert_readable(info.value)


def test_exotic_formats_are_not_opened(tmp_path):
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto showpage\n%%EOF\n"
    with pytest.raises(InvalidImageError):
        load_image(eps)  # never handed to Ghostscript


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(
    "width,height,phrase",
    [
        (10000, 5000, "The image is 10000x5000 pixels; the limit is 40 megapixels."),
        (12000, 12000, "The image is 12000x12000 pixels; the limit is 40 megapixels."),
        (30000, 30000, "The image has 900 megapixels; the limit is 40 megapixels."),
    ],
)
def test_decompression_bombs_are_refused_from_the_header(d, width, height, phrase):
    path = ms.write_bomb_png(d, width, height)
    assert path.stat().st_size < 200_000  # tiny file, huge image
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError) as info:
        load_image(path)
    assert time.perf_counter() - start < 0.5
    assert str(info.value) == phrase
    assert_readable(info.value)


def test_bomb_warning_raised_as_error_is_still_a_typed_refusal(d):
    path = ms.write_bomb_png(d, 12000, 12000)
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageTooLargeError):
            load_image(path, MediaLimits(max_image_pixels=10**9))
    assert Image.MAX_IMAGE_PIXELS == before


def test_pixel_limit_applies_to_every_source(d):
    small = MediaLimits(max_image_pixels=1000)
    path = ms.write_exif_jpeg(d)  # 80x40 = 3200 pixels
    for source in (path, path.read_bytes(), pil(path), np.zeros((40, 80, 3), np.uint8)):
        with pytest.raises(ImageTooLargeError) as info:
            load_image(source, small)
        assert "the limit is 0.001 megapixels" in assert_readable(info.value)


def test_upload_size_is_checked_before_decoding(d, monkeypatch):
    limits = MediaLimits(max_upload_bytes=1000)
    data = ms.random_bytes(4096)  # would be "not an image" if it were decoded
    path = ms.write_random_bytes(d, "big.png", 4096)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded despite the size limit")

    monkeypatch.setattr(media.Image, "open", no_decoding)
    class Stream:  # not seekable: its size cannot be known without reading it all
        def read(self, n=-1):
            return data[:n]

    messages = set()
    for source in (data, path, io.BytesIO(data)):
        with pytest.raises(ImageTooLargeError) as info:
            load_image(source, limits)
        messages.add(assert_readable(info.value))
    assert messages == {"The image file is 4 KB; the limit for uploads is 1000 bytes."}
    with pytest.raises(ImageTooLargeError) as info:
        load_image(Stream(), limits)
    assert str(info.value) == "The image file is larger than the limit for uploads (1000 bytes)."


def test_pil_globals_are_untouched(d):
    before = Image.MAX_IMAGE_PIXELS
    load_image(ms.write_exif_jpeg(d))
    with pytest.raises(ImageTooLargeError):
        load_image(ms.write_bomb_png(d, 10000, 5000))
    assert Image.MAX_IMAGE_PIXELS == before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --- metadata, PNG encoding, digests --------------------------------------------------------------


def _png_chunks(data: bytes) -> list[bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        chunks.append(data[pos + 4 : pos + 8])
        pos += 12 + length
    return chunks


def test_strip_image_metadata_removes_exif_and_gps(d):
    path = ms.write_exif_jpeg(d)
    raw = pil(path)
    assert raw.getexif().get_ifd(ExifTags.IFD.GPSInfo)  # the sample really has GPS
    assert b"TestCam" in path.read_bytes()
    for image in (raw, load_image(path)):
        clean = strip_image_metadata(image)
        assert clean.info == {}
        assert len(clean.getexif()) == 0
        assert clean.size == image.size and clean.mode == image.mode
        assert clean.tobytes() == image.tobytes()
        for fmt in ("JPEG", "PNG", "WEBP"):
            buffer = io.BytesIO()
            clean.save(buffer, fmt)
            stored = buffer.getvalue()
            assert b"TestCam" not in stored and b"Exif" not in stored and b"eXIf" not in stored
            reopened = Image.open(io.BytesIO(stored))
            assert len(reopened.getexif()) == 0
            assert not reopened.getexif().get_ifd(ExifTags.IFD.GPSInfo)


def test_strip_drops_text_chunks_and_icc_but_keeps_palettes(d):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "secret location")
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), (1, 2, 3)).save(buffer, "PNG", pnginfo=info, icc_profile=b"x" * 10)
    opened = Image.open(buffer)
    opened.load()
    assert "Comment" in opened.info
    clean = strip_image_metadata(opened)
    assert clean.info == {}
    palette = pil(ms.write_palette_png(d))
    clean = strip_image_metadata(palette)
    assert clean.mode == "P" and clean.info.get("transparency") == 0
    assert load_image(clean).tobytes() == load_image(palette).tobytes()


def test_encode_png_has_no_metadata_and_round_trips(d):
    img = load_image(ms.write_exif_jpeg(d))
    assert "exif" in img.info  # load_image keeps it: stripping is an explicit step
    data = encode_png(img)
    assert set(_png_chunks(data)) == {b"IHDR", b"IDAT", b"IEND"}
    assert b"TestCam" not in data
    back = Image.open(io.BytesIO(data))
    assert back.mode == "RGB" and back.tobytes() == img.tobytes()
    assert encode_png(img) == data  # deterministic
    assert Image.open(io.BytesIO(encode_png(Image.new("CMYK", (2, 2))))).mode == "RGB"


def test_image_digest(d):
    path = ms.write_exif_jpeg(d)
    img = load_image(path)
    digest = image_digest(img)
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert image_digest(strip_image_metadata(img)) == digest  # metadata does not count
    assert image_digest(path) == digest and image_digest(path.read_bytes()) == digest
    changed = img.copy()
    changed.putpixel((0, 0), (0, 0, 0))
    assert image_digest(changed) != digest
    # same bytes, different shape
    assert image_digest(Image.new("RGB", (2, 1), 5)) != image_digest(Image.new("RGB", (1, 2), 5))
    # a palette image and its RGB conversion look the same, so hash the same
    palette = pil(ms.write_palette_png_opaque(d))
    assert image_digest(palette) == image_digest(palette.convert("RGB"))


# --- the same bytes are decoded once ---------------------------------------------------------------


def counting_decodes(monkeypatch) -> list[int]:
    """The sizes of the files :mod:`mmdemo.media` decodes from now on (one entry per decode)."""
    decoded: list[int] = []
    original = media._open_image_bytes

    def counted(data, limits):
        decoded.append(len(data))
        return original(data, limits)

    monkeypatch.setattr(media, "_open_image_bytes", counted)
    return decoded


def new_photo(folder: Path, seed: int) -> Path:
    """A JPEG no test has decoded yet (random pixels)."""
    path = folder / f"photo-{seed}.jpg"
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


def test_the_same_bytes_are_decoded_once_whatever_the_source(tmp_path, monkeypatch):
    decoded = counting_decodes(monkeypatch)
    path = new_photo(tmp_path, 1)
    data = path.read_bytes()
    first = load_image(path)
    again = [load_image(str(path)), load_image(data), load_image(io.BytesIO(data))]
    assert decoded == [len(data)]
    assert {image_digest(img) for img in [first, *again]} == {image_digest(first)}
    load_image(new_photo(tmp_path, 2))  # other bytes: decoded
    assert len(decoded) == 2


def test_a_kept_image_is_never_handed_out(tmp_path, monkeypatch):
    """Each caller gets an image of its own: what one caller draws on, the next never sees."""
    decoded = counting_decodes(monkeypatch)
    path = new_photo(tmp_path, 3)
    first = load_image(path)
    untouched = px(first, (0, 0))
    first.putpixel((0, 0), (1, 2, 3))
    second = load_image(path)
    second.putpixel((1, 1), (4, 5, 6))
    third = load_image(path)
    assert len(decoded) == 1 and len({id(first), id(second), id(third)}) == 3
    assert px(third, (0, 0)) == untouched and px(third, (1, 1)) == px(first, (1, 1))


def test_a_kept_image_still_meets_the_pixel_limit_of_each_call(tmp_path):
    path = new_photo(tmp_path, 4)  # 64x48 = 3072 pixels
    load_image(path)
    with pytest.raises(ImageTooLargeError) as info:
        load_image(path, MediaLimits(max_image_pixels=3000))
    assert str(info.value) == "The image is 64x48 pixels; the limit is 0.003 megapixels."


def test_decoded_images_are_bounded_by_their_size():
    kept = media.DecodedImages(max_bytes=2 * 10 * 10 * 3)  # two 10x10 RGB images
    images = {key: Image.new("RGB", (10, 10), (n, 0, 0)) for n, key in enumerate((b"a", b"b", b"c"))}
    for key in (b"a", b"b"):
        kept.put(key, images[key])
    assert kept.get(b"a") is not None  # now the most recently used
    kept.put(b"c", images[b"c"])
    assert kept.get(b"b") is None and px(kept.get(b"a"), (0, 0)) == (0, 0, 0) and kept.get(b"c") is not None
    kept.put(b"big", Image.new("RGB", (20, 20)))  # larger than the bound: not kept, nothing dropped
    assert kept.get(b"big") is None and kept.get(b"a") is not None and kept.get(b"c") is not None


# --- audio: decoding and normalisation ------------------------------------------------------------


def assert_audio(audio: Audio, rate: int, seconds: float, rel: float = 0.01):
    assert isinstance(audio, Audio)
    assert audio.sampling_rate == rate
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert audio.samples.flags.c_contiguous
    assert np.isfinite(audio.samples).all()
    assert np.abs(audio.samples).max() <= 1.0
    assert audio.duration == pytest.approx(seconds, rel=rel)
    assert audio.duration == len(audio.samples) / rate


def test_stereo_44k_wav_becomes_mono_16k(d):
    path = ms.write_speech_like_wav(d)
    audio = load_audio(path)
    assert_audio(audio, 16000, 2.0)
    assert 0.4 < np.abs(audio.samples).max() < 0.7


def test_mono_mix_is_the_channel_mean_and_resampling_is_soxr(d):
    import soxr

    stereo = ms.speech_like_array(1.0, 44100, 2)
    audio = load_audio((44100, stereo))
    expected = soxr.resample((stereo / 32768.0).mean(axis=1).astype(np.float32), 44100, 16000, "HQ")
    assert len(audio.samples) == len(expected)
    np.testing.assert_allclose(audio.samples, expected, atol=1e-5)


def test_no_resampling_when_the_rate_already_matches():
    data = ms.speech_like_array(1.0, 16000, 2)
    audio = load_audio((16000, data))
    np.testing.assert_allclose(audio.samples, (data / 32768.0).mean(axis=1), atol=1e-6)
    keep = load_audio((22050, ms.speech_like_array(1.0, 22050, 1)), target_rate=None)
    assert keep.sampling_rate == 22050 and len(keep.samples) == 22050


def test_int16_is_scaled_into_minus_one_to_one():
    data = np.array([32767, -32768, 0, 16384, -16384] * 200, np.int16)
    audio = load_audio((8000, data), target_rate=8000)
    np.testing.assert_allclose(audio.samples[:5], [32767 / 32768, -1.0, 0.0, 0.5, -0.5], atol=1e-6)
    stereo = np.stack([data, data], axis=1)  # gradio's (n, channels)
    np.testing.assert_allclose(load_audio((8000, stereo), 8000).samples, audio.samples)


@pytest.mark.parametrize("dtype", ["int16", "int32", "uint8", "float32", "float64"])
def test_pcm_types_are_scaled_alike(dtype):
    reference = ms.speech_like_array(0.5, 16000, 1, "float64")
    audio = load_audio((16000, ms.speech_like_array(0.5, 16000, 1, dtype)))
    np.testing.assert_allclose(audio.samples, reference, atol=0.02 if dtype == "uint8" else 1e-4)


def test_channels_first_arrays_are_accepted():
    data = ms.speech_like_array(0.5, 16000, 2, "float32")
    a = load_audio((16000, data))
    b = load_audio((16000, data.T.copy()))
    np.testing.assert_allclose(a.samples, b.samples)


def test_dict_tuple_and_audio_sources(d):
    data = ms.speech_like_array(1.0, 22050, 1, "float32")
    reference = load_audio((22050, data))
    assert_audio(reference, 16000, 1.0)
    for source in (
        {"raw": data, "sampling_rate": 22050},
        {"array": data, "sampling_rate": 22050},
        (data, 22050),
        [22050, data],
    ):
        if isinstance(source, list):
            source = tuple(source)
        np.testing.assert_array_equal(load_audio(source).samples, reference.samples)
    again = load_audio(reference)
    np.testing.assert_array_equal(again.samples, reference.samples)
    path = ms.write_speech_like_wav(d)
    from_bytes = load_audio({"bytes": path.read_bytes(), "path": None})
    from_path = load_audio({"bytes": None, "path": str(path)})
    np.testing.assert_array_equal(from_bytes.samples, from_path.samples)


def test_every_file_source_gives_the_same_audio(d):
    path = ms.write_speech_like_wav(d)
    reference = load_audio(path).samples
    for source in (str(path), path.read_bytes(), io.BytesIO(path.read_bytes())):
        np.testing.assert_array_equal(load_audio(source).samples, reference)
    with open(path, "rb") as fh:
        np.testing.assert_array_equal(load_audio(fh).samples, reference)


@pytest.mark.parametrize("fmt", ["ogg", "mp3", "flac"])
def test_soundfile_formats(d, fmt):
    audio = load_audio(ms.write_soundfile_audio(d, fmt))
    assert_audio(audio, 16000, 2.0, rel=0.02)
    assert np.abs(audio.samples).max() > 0.3


@pytest.fixture(scope="session")
def browser_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser")
    return {ext: ms.write_browser_audio(folder, ext) for ext in ("m4a", "webm", "opus")}


@pytest.mark.parametrize("ext,via_pyav", [("m4a", True), ("webm", True), ("opus", False)])
def test_browser_formats_decode_through_the_pyav_fallback(browser_files, ext, via_pyav, monkeypatch):
    path = browser_files[ext]
    if path is None:
        pytest.skip(f"neither the ffmpeg binary nor PyAV can encode {ext} here")
    calls = []
    real = media._decode_with_pyav
    monkeypatch.setattr(media, "_decode_with_pyav", lambda *a: calls.append(1) or real(*a))
    audio = load_audio(path)
    assert calls == ([1] if via_pyav else [])  # libsndfile reads Ogg Opus itself
    # AAC adds encoder priming samples, so allow a few percent on the length
    assert_audio(audio, 16000, 2.0, rel=0.03)
    assert np.abs(audio.samples).max() > 0.3


def test_real_speech_from_espeak(d):
    path = ms.write_espeak_wav(d)
    if path is None:
        pytest.skip("espeak-ng is not installed")
    audio = load_audio(path)
    assert audio.sampling_rate == 16000 and audio.duration > 0.5


def test_float_audio_louder_than_full_scale_is_brought_back():
    data = ms.speech_like_array(0.5, 16000, 1, "float32") * 4
    audio = load_audio((16000, data))
    assert np.abs(audio.samples).max() == pytest.approx(1.0, abs=1e-6)


def test_audio_is_a_frozen_value():
    audio = load_audio((16000, ms.speech_like_array(0.25, 16000, 1)))
    assert audio.duration == pytest.approx(0.25)
    with pytest.raises(FrozenInstanceError):
        audio.sampling_rate = 8000  # type: ignore[misc]
    assert "16000 Hz" in repr(audio)


# --- audio: refusals ------------------------------------------------------------------------------


NOT_AUDIO = "not audio we can read (WAV, FLAC, OGG, MP3, M4A, AAC, WebM, Opus)."


@pytest.mark.parametrize(
    "make,error,phrase",
    [
        (ms.write_silent_wav, InvalidAudioError, "silent"),
        (ms.write_zero_length_wav, InvalidAudioError, "empty"),
        (lambda d: ms.write_empty_file(d, "empty.wav"), InvalidAudioError, "empty"),
        (lambda d: ms.write_text_file(d, "notes.wav"), InvalidAudioError, NOT_AUDIO),
        (lambda d: ms.write_random_bytes(d, "noise.wav", 20000, 3), InvalidAudioError, NOT_AUDIO),
        (ms.write_truncated_png, InvalidAudioError, NOT_AUDIO),
    ],
    ids=["silent", "zero-length", "zero-bytes", "text", "random", "an-image"],
)
def test_bad_audio_files_are_refused_quickly(d, make, error, phrase):
    path = make(d)
    start = time.perf_counter()
    with pytest.raises(error) as info:
        load_audio(path)
    assert time.perf_counter() - start < 2.0
    assert phrase in assert_readable(info.value)


@pytest.mark.parametrize(
    "source,phrase",
    [
        (None, "No audio was given."),
        (b"", "empty"),
        ("/nonexistent/voice.wav", "could not be found"),
        ((16000, np.zeros(0, np.int16)), "empty"),
        ((16000, np.zeros(16000, np.int16)), "silent"),
        ((16000, np.full(16000, 1e-5, np.float32)), "silent"),
        ((16000, np.array([0.5, np.nan] * 100, np.float32)), "invalid sample values"),
        ((16000, np.array([0.5, np.inf] * 100, np.float32)), "invalid sample values"),
        ((0, np.ones(100, np.int16)), "invalid sampling rate (0 Hz)"),
        ((-8000, np.ones(100, np.int16)), "invalid sampling rate"),
        ((None, np.ones(100, np.int16)), "no valid sampling rate"),
        ({"raw": np.ones(100, np.float32), "sampling_rate": 0}, "invalid sampling rate"),
        ({"raw": np.ones(100, np.float32)}, "no valid sampling rate"),
        ({"text": "hello"}, "missing"),
        (np.ones(100, np.float32), "no sampling rate"),
        ((16000, np.ones((2, 3, 100))), "shape"),
        ((16000, np.ones(100, bool)), "not made of numbers"),
        (3.14, "not audio we can read"),
    ],
    ids=["none", "empty-bytes", "missing-path", "zero-length", "silent", "near-silent", "nan",
         "inf", "rate-0", "rate-negative", "rate-none", "dict-rate-0", "dict-no-rate", "dict-empty",
         "bare-array", "3-d", "bool", "float"],
)
def test_bad_audio_sources_are_refused(source, phrase):
    with pytest.raises(InvalidAudioError) as info:
        load_audio(source)
    assert phrase in assert_readable(info.value)


def test_silence_threshold_is_configurable():
    quiet = (16000, ms.speech_like_array(0.5, 16000, 1, "float32") * 0.01)
    assert load_audio(quiet).duration == pytest.approx(0.5)
    with pytest.raises(InvalidAudioError):
        load_audio(quiet, limits=MediaLimits(silence_threshold=0.1))


def test_bad_target_rate_is_a_programming_error():
    for bad in (0, -16000, 16000.5, "16000", True):
        with pytest.raises(ValueError):
            load_audio((16000, np.ones(10)), target_rate=bad)


def test_length_is_checked_from_the_header_before_decoding(d, monkeypatch):
    import soundfile

    path = ms.write_long_wav(d)  # 3 s
    limits = MediaLimits(max_audio_seconds=1.0)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded samples despite the length limit")

    monkeypatch.setattr(soundfile.SoundFile, "read", no_decoding)
    monkeypatch.setattr(soundfile.SoundFile, "blocks", no_decoding)
    with pytest.raises(AudioTooLongError) as info:
        load_audio(path, limits=limits)
    assert str(info.value) == "The audio is 3 seconds long; the limit is 1 second."


def test_long_arrays_are_refused():
    with pytest.raises(AudioTooLongError) as info:
        load_audio((8000, np.ones(8000 * 3, np.int16)), limits=MediaLimits(max_audio_seconds=2))
    assert "3 seconds long" in assert_readable(info.value)


def test_default_limit_is_ten_minutes():
    with pytest.raises(AudioTooLongError) as info:
        load_audio((100, np.ones(100 * 601, np.float32)))
    assert str(info.value) == "The audio is 10 minutes 1 second long; the limit is 10 minutes."


def test_wav_header_with_zero_sampling_rate_is_refused():
    data = ms.wav_header(32000, rate=0) + ms.speech_like_array(1.0, 16000, 1).astype("<i2").tobytes()
    with pytest.raises(InvalidAudioError) as info:
        load_audio(data)
    assert NOT_AUDIO in assert_readable(info.value)


def test_upload_size_limit_for_audio(d):
    path = ms.write_speech_like_wav(d)  # about 350 KB
    limits = MediaLimits(max_upload_bytes=100_000)
    for source in (path, path.read_bytes(), io.BytesIO(path.read_bytes())):
        with pytest.raises(AudioTooLongError) as info:
            load_audio(source, limits=limits)
        assert "the limit for uploads is" in assert_readable(info.value)


def test_huge_flac_header_is_refused_fast(d):
    path = ms.write_huge_header_flac(d)
    start = time.perf_counter()
    with pytest.raises(AudioTooLongError) as info:
        load_audio(path)
    assert time.perf_counter() - start < 0.5
    assert "hours" in assert_readable(info.value)


def test_huge_wav_header_is_bounded_by_the_file_size(d):
    # Streamed WAVs often claim ~4 GB: read what is really there, quickly, without allocating 4 GB.
    path = ms.write_huge_header_wav(d)
    start = time.perf_counter()
    audio = load_audio(path)
    assert time.perf_counter() - start < 0.5
    assert audio.duration == pytest.approx(1.0, rel=0.01)
    with pytest.raises(AudioTooLongError):
        load_audio(path, limits=MediaLimits(max_audio_seconds=0.5))


def test_browser_file_length_is_checked_from_the_header(browser_files):
    path = browser_files["m4a"] or browser_files["webm"]
    if path is None:
        pytest.skip("no encoder for browser formats here")
    with pytest.raises(AudioTooLongError) as info:
        load_audio(path, limits=MediaLimits(max_audio_seconds=1.0))
    assert "2 seconds long; the limit is 1 second" in assert_readable(info.value)


def test_streamed_webm_without_duration_is_limited_while_decoding(d):
    path = ms.write_streamed_webm(d)
    if path is None:
        pytest.skip("the ffmpeg binary is not installed")
    assert_audio(load_audio(path), 16000, 3.0)
    with pytest.raises(AudioTooLongError) as info:
        load_audio(path, limits=MediaLimits(max_audio_seconds=1.0))
    assert "longer than the limit of 1 second" in assert_readable(info.value)


def test_truncated_browser_recording_keeps_what_was_recorded(browser_files):
    path = browser_files["webm"]
    if path is None:
        pytest.skip("no WebM encoder here")
    data = path.read_bytes()
    audio = load_audio(data[: len(data) // 2])
    assert 0.5 < audio.duration < 1.9


# --- import hygiene -------------------------------------------------------------------------------


def test_no_torch_and_lazy_pyav(d):
    path = ms.write_speech_like_wav(d)
    code = (
        "import sys; import mmdemo.media as m; "
        f"m.load_audio({str(path)!r}); m.load_image(m.np.zeros((2, 2, 3), m.np.uint8)); "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'av' not in sys.modules, 'av imported for a wav'"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
