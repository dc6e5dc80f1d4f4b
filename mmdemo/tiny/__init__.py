"""Tiny, randomly initialised checkpoints of the real model architectures, built offline.

The demo normally runs BLIP, ViLT, CLIP, SigLIP, Whisper (transformers and faster-whisper) and
Stable Diffusion checkpoints from the Hugging Face Hub.  For tests and offline development this
package builds the *same architectures* at toy size (hidden size 32, 2 layers, 32x32 images, a
vocabulary of a few hundred tokens learnt from a small local corpus) in a few seconds and saves
them with ``save_pretrained``, so the ordinary loading code (``from_pretrained(folder)``,
``pipeline(task, model=folder)``, ``AutoPipelineForText2Image.from_pretrained(folder)``,
``faster_whisper.WhisperModel(folder)``) works on them unchanged.  Nothing here touches the network.

Each task names its tiny checkpoints (``TaskSpec.tiny_builders``: name -> :class:`TinyBuilder`); the
builders live in this package, one module per architecture family (:mod:`.blip`, :mod:`.clip`, ...).
:func:`mmdemo.tasks.build_tiny_models` builds those of every registered task.

Layout (``build_tiny_models(target_dir, builders)``, about 4 MB)::

    target_dir/
      .tiny-version        TINY_BUILDER_VERSION of the builders that made the folders below
      .build.lock          fcntl lock held while building
      blip-caption/  blip-vqa/  vilt-vqa/  clip/  siglip/  whisper/  whisper-ct2/  stable-diffusion/

Builds are reproducible: torch is seeded before each model and the tokenizers are learnt with a
deterministic byte-pair encoding, so the same builder version writes byte-identical files.

The weights are random, so outputs are meaningless.  Two documented tweaks of the random
initialisation make the text decoders write ordinary words instead of special tokens:

* BLIP: the LM head's output bias is -20 for special tokens ([PAD], [SEP], [DEC], ...) and -5 for
  "##" pieces, digits and punctuation.  [SEP] never wins, so generation runs to the length limit.
* Whisper: the output projection is tied to the token embeddings and has no bias, so the decoder's
  final layer-norm bias gets one large coordinate and the matching embedding column a small value:
  whole words (" cat") then score about +5, other text tokens about 0, special and timestamp
  tokens (and <|endoftext|>) about -5.  One saved generation config thus serves
  ``return_timestamps`` False and True alike; a ``suppress_tokens`` list covering the timestamp
  tokens would break ``return_timestamps=True``, whose first token must be a timestamp.  The
  saved config also limits generation to 16 new tokens and sets ``no_repeat_ngram_size=1``.
  Caveats of a random model: with ``return_timestamps=True`` only the opening timestamp is
  predicted, so chunks come back as ``(start, None)``, and as ``(None, None)`` once the pipeline
  merges 30 s chunks of long audio; faster-whisper runs to its own limit (224 tokens per 30 s
  window) with temperature fallback, still well under a second for 5 s of audio.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

TINY_BUILDER_VERSION: int = 2  # bump whenever a builder changes what it writes

MARKER_FILE = ".tiny-version"
LOCK_FILE = ".build.lock"


@dataclass(frozen=True)
class TinyBuilder:
    """Writes one tiny checkpoint into a folder. ``needs``: tiny models it is made from (built first,
    as siblings of its folder: ``whisper-ct2`` converts the finished ``whisper`` folder)."""

    build: Callable[[Path], None]
    needs: tuple[str, ...] = ()


def tiny_model_dir(target_dir: Path, name: str, builders: Mapping[str, TinyBuilder]) -> Path:
    """The folder that holds (or will hold) tiny model ``name`` under ``target_dir``."""
    if name not in builders:
        raise KeyError(f"unknown tiny model {name!r}; known: {', '.join(builders)}")
    return Path(target_dir) / name


def _with_dependencies(names: Iterable[str], builders: Mapping[str, TinyBuilder]) -> list[str]:
    """``names`` and what they are made from, dependencies first."""
    ordered: list[str] = []

    def visit(name: str) -> None:
        if name in ordered:
            return
        tiny_model_dir(Path("."), name, builders)  # refuses an unknown name
        for needed in builders[name].needs:
            visit(needed)
        ordered.append(name)

    for name in names:
        visit(name)
    return ordered


@contextlib.contextmanager
def _build_lock(target_dir: Path) -> Iterator[None]:
    with open(target_dir / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_marker(target_dir: Path) -> int | None:
    try:
        return int((target_dir / MARKER_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def _write_marker(target_dir: Path) -> None:
    tmp = target_dir / f"{MARKER_FILE}.tmp-{os.getpid()}"
    tmp.write_text(f"{TINY_BUILDER_VERSION}\n")
    os.replace(tmp, target_dir / MARKER_FILE)


def _remove_leftovers(target_dir: Path) -> None:
    """Delete temporary folders left by a build that crashed (we hold the lock, so none is live)."""
    for path in target_dir.glob(".*.tmp-*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _build_one(target_dir: Path, name: str, builders: Mapping[str, TinyBuilder]) -> None:
    """Build into a temporary sibling folder, then swap it into place."""
    final = tiny_model_dir(target_dir, name, builders)
    tmp = target_dir / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        builders[name].build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # os.replace cannot replace a non-empty folder: move the old one aside
        old = target_dir / f".{name}.old.tmp-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def build_tiny_models(
    target_dir: Path, builders: Mapping[str, TinyBuilder], force: bool = False, names: Iterable[str] | None = None
) -> dict[str, Path]:
    """Build (once) the tiny checkpoints of ``builders`` under target_dir/<name>; return name -> folder.

    ``names`` limits the build to some models (plus what they are made from, e.g. "whisper" for
    "whisper-ct2").  Folders built by the current TINY_BUILDER_VERSION are kept unless ``force``;
    after a version change every model folder is rebuilt.  Safe to call from several processes.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    target_dir = Path(target_dir)
    requested = list(builders) if names is None else list(dict.fromkeys(names))
    to_build = _with_dependencies(requested, builders)
    target_dir.mkdir(parents=True, exist_ok=True)

    with _build_lock(target_dir):
        _remove_leftovers(target_dir)
        if _read_marker(target_dir) != TINY_BUILDER_VERSION:
            # Folders from other builder versions must not survive under the new marker.
            (target_dir / MARKER_FILE).unlink(missing_ok=True)
            for child in target_dir.iterdir():
                if child.is_dir() and not child.name.startswith("."):
                    shutil.rmtree(child, ignore_errors=True)
        for name in to_build:
            if force or not tiny_model_dir(target_dir, name, builders).is_dir():
                _build_one(target_dir, name, builders)
        _write_marker(target_dir)

    return {name: tiny_model_dir(target_dir, name, builders) for name in requested}
