"""Content-addressed media files under ``<data_dir>/media``: each image or audio stored once.

A media *ref* is ``<sha256 hex>.<extension>``, and its file lives at ``media/<first two hex>/<ref>``.
Refs are computed from content, never taken from an upload's name, and :meth:`MediaStore.path_for`
refuses anything that is not of that exact form, so no stored path can leave the media folder.

* Images are decoded and normalised by :func:`mmdemo.media.load_image` (size and pixel limits),
  then stored as PNG without any metadata (:func:`mmdemo.media.encode_png`: no EXIF, no GPS
  position). Their ref is the pixel digest (:func:`mmdemo.media.image_digest`), so the same picture
  uploaded as JPEG, as PNG or a hundred times is one file.
* Audio is kept as uploaded (after :func:`mmdemo.media.load_audio` checked that it decodes and is
  within the size and duration limits); its ref is the SHA-256 of its bytes. Audio given as samples
  (gradio's ``(rate, array)``) is stored as 16-bit FLAC.

Files are written atomically: a temporary file in the same folder, fsync, rename, fsync of the folder.
A file under its final name is therefore always complete.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

from ..errors import AudioTooLongError, InvalidAudioError
from ..media import DEFAULT_LIMITS, MediaLimits, encode_png, image_digest, load_audio, load_image
from .errors import InvalidMediaRefError, StoreError

MediaKind = Literal["image", "audio"]

AUDIO_EXTENSIONS = ("wav", "flac", "mp3", "ogg", "webm", "m4a", "bin")
REF_PATTERN = re.compile(r"[0-9a-f]{64}\.(?:png|" + "|".join(AUDIO_EXTENSIONS) + r")")
_TEMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"


@dataclass(frozen=True, eq=False)
class PreparedMedia:
    """Validated media, ready to be written: its ref, its kind and how to make the exact bytes to store.

    The bytes are made on first use only: media already stored (same ref) is never encoded again.
    """

    ref: str
    kind: MediaKind
    encode: Callable[[], bytes]

    @functools.cached_property
    def data(self) -> bytes:
        return self.encode()


def check_ref(ref: Any) -> str:
    """Return ``ref`` if it is a media ref (``<64 hex>.<ext>``), else raise :class:`InvalidMediaRefError`."""
    if not isinstance(ref, str) or not REF_PATTERN.fullmatch(ref):
        raise InvalidMediaRefError(f"{str(ref)[:80]!r} is not a media reference (a content hash).")
    return ref


def sniff_audio_extension(data: bytes) -> str:
    """The file extension of an audio file, from its first bytes (never from its name)."""
    head = data[:16]
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "mp3"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "webm"
    if head[4:8] == b"ftyp":
        return "m4a"
    return "bin"


class MediaStore:
    """Media files of one data directory. Thread-safe: writes of one ref are idempotent."""

    def __init__(self, root: Path, limits: MediaLimits = DEFAULT_LIMITS):
        self.root = Path(root)
        self.limits = limits

    # --- preparing (validation, no writes) -----------------------------------------------------

    def prepare_image(self, source: Any) -> PreparedMedia:
        """Decode, check and strip an image (anything :func:`load_image` takes); nothing is written."""
        image = load_image(source, self.limits)
        return PreparedMedia(f"{image_digest(image)}.png", "image", functools.partial(encode_png, image))

    def prepare_audio(self, source: Any) -> PreparedMedia:
        """Check an audio upload and keep its bytes as they are; nothing is written.

        ``source``: a path, bytes, a binary file object, datasets' ``{"bytes", "path"}``, or decoded
        samples (gradio's ``(rate, array)``, ``{"array", "sampling_rate"}``, :class:`mmdemo.media.Audio`),
        which are stored as FLAC.
        """
        if isinstance(source, dict) and source.get("array") is None and source.get("raw") is None:
            source = source.get("bytes") or source.get("path")
        limit = self.limits.max_upload_bytes
        if isinstance(source, (str, os.PathLike)):
            load_audio(source, None, self.limits)  # size, format and duration, with media's messages
            with open(source, "rb") as fh:
                data = fh.read(limit + 1)
            if len(data) > limit:
                raise AudioTooLongError("The audio file grew while it was being stored; upload it again.")
            return self._prepared_audio(data)
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
        elif hasattr(source, "read"):
            data = source.read(limit + 1)
            if not isinstance(data, (bytes, bytearray)):
                raise InvalidAudioError("The audio file must be opened in binary mode.")
            data = bytes(data)
        else:
            audio = load_audio(source, None, self.limits)
            return self._prepared_audio(_encode_flac(audio.samples, audio.sampling_rate))
        load_audio(data, None, self.limits)  # refuses more than max_upload_bytes first
        return self._prepared_audio(data)

    @staticmethod
    def _prepared_audio(data: bytes) -> PreparedMedia:
        ref = f"{hashlib.sha256(data).hexdigest()}.{sniff_audio_extension(data)}"
        return PreparedMedia(ref, "audio", lambda: data)

    # --- files -----------------------------------------------------------------------------------

    def path_for(self, ref: str) -> Path:
        """The file of ``ref``; refuses anything that is not a media ref, so no path can escape."""
        check_ref(ref)
        return self.root / ref[:2] / ref

    def exists(self, ref: str) -> bool:
        return self.path_for(ref).is_file()

    def read_bytes(self, ref: str) -> bytes:
        return self.path_for(ref).read_bytes()

    def write(self, media: PreparedMedia) -> bool:
        """Store ``media`` durably unless already there. Returns True when a file was written."""
        path = self.path_for(media.ref)
        if path.is_file():
            return False
        try:
            self._ensure_dir(path.parent)
            fd, tmp = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(media.data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                _unlink_quietly(Path(tmp))
                raise
            _fsync_dir(path.parent)
        except OSError as exc:
            raise StoreError(f"The {media.kind} could not be stored: {exc.strerror or exc}.") from exc
        return True

    def _ensure_dir(self, directory: Path) -> None:
        if directory.is_dir():
            return
        missing = [d for d in (directory, *directory.parents) if not d.exists()]
        directory.mkdir(parents=True, exist_ok=True)
        for created in missing:  # make each new folder's entry durable in its parent
            _fsync_dir(created.parent)

    # --- deleting --------------------------------------------------------------------------------

    def move_to_trash(self, ref: str) -> Path | None:
        """Rename the file of ``ref`` out of the way (undoable); None if there was no file."""
        path = self.path_for(ref)
        trash = path.with_name(f"{_TRASH_PREFIX}{uuid.uuid4().hex}-{ref}")
        try:
            os.replace(path, trash)
        except FileNotFoundError:
            return None
        return trash

    def restore_from_trash(self, trash: Path, ref: str) -> None:
        os.replace(trash, self.path_for(ref))

    def empty_trash(self, trash: Iterable[Path]) -> None:
        for path in trash:
            _unlink_quietly(path)
        for directory in {path.parent for path in trash}:
            _fsync_dir(directory)

    def sweep(self, referenced: set[str], older_than: float = 3600.0, *,
              written_after: float | None = None) -> list[str]:
        """Remove files no record refers to, and leftovers of interrupted writes or deletes.

        Only files older than ``older_than`` seconds are touched, so that media written just before
        its record is committed are left alone, and (``written_after``: a time stamp) none written
        before then. Returns what was removed.
        """
        removed: list[str] = []
        cutoff = time.time() - older_than
        floor = written_after if written_after is not None else float("-inf")
        if not self.root.is_dir():
            return removed
        for directory in self.root.iterdir():
            if not directory.is_dir() or not re.fullmatch(r"[0-9a-f]{2}", directory.name):
                continue
            for path in directory.iterdir():
                name = path.name
                stray = name.startswith((_TEMP_PREFIX, _TRASH_PREFIX))
                if not stray and (not REF_PATTERN.fullmatch(name) or name in referenced):
                    continue
                try:
                    if floor <= path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed.append(name)
                except FileNotFoundError:
                    pass
        return removed


def _encode_flac(samples: Any, rate: int) -> bytes:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
