"""Speech recognition with Whisper, through transformers or faster-whisper (CTranslate2).

Audio of any common format and rate is decoded, mixed to mono and resampled to 16 kHz before the
model sees it; audio longer than 30 s is transcribed in 30 s chunks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from ..catalog import ModelSpec
from ..errors import InvalidInputError
from ..media import Audio, MediaLimits, load_audio
from ..registry import Placement
from .base import Task, load_kwargs

SAMPLING_RATE = 16_000
CHUNK_SECONDS = 30


@dataclass(frozen=True)
class SpeechRequest:
    audio: Any
    language: str | None = None  # None or "auto": detect
    translate: bool = False  # translate into English instead of transcribing
    timestamps: bool = False


@dataclass
class WhisperBundle:
    backend: str  # "transformers" or "ctranslate2"
    model: Any  # a transformers ASR pipeline, or a faster_whisper.WhisperModel
    languages: frozenset[str]
    placement: Placement
    memory_bytes: int | None = None


class SpeechTask(Task):
    task = "automatic-speech-recognition"
    Request = SpeechRequest

    def prepare(self, inputs: Mapping[str, Any], limits: MediaLimits, spec: ModelSpec) -> SpeechRequest:
        request = SpeechRequest(**self._known_fields(inputs))
        language = (request.language or "").strip().lower()
        return replace(
            request,
            audio=load_audio(request.audio, SAMPLING_RATE, limits),
            language=None if language in ("", "auto") else language,
            translate=bool(request.translate),
            timestamps=bool(request.timestamps),
        )

    def load(self, spec: ModelSpec, location: str, placement: Placement) -> WhisperBundle:
        if spec.kind == "faster-whisper":
            return _load_faster_whisper(spec, location, placement)
        from transformers import WhisperForConditionalGeneration, WhisperProcessor, pipeline

        kwargs = load_kwargs(spec, placement)
        processor = WhisperProcessor.from_pretrained(location, **kwargs)
        model = WhisperForConditionalGeneration.from_pretrained(location, dtype=placement.torch_dtype, **kwargs)
        model = model.to(placement.device).eval()
        asr = pipeline(
            "automatic-speech-recognition",
            model=model,
            tokenizer=processor.tokenizer,
            feature_extractor=processor.feature_extractor,
            device=placement.device,
        )
        lang_to_id = getattr(model.generation_config, "lang_to_id", None) or {}
        languages = frozenset(token.strip("<|>") for token in lang_to_id)
        # The bundle holds the pipeline; the pipeline holds the model (measured by the registry).
        return WhisperBundle("transformers", asr, languages, placement)

    def predict(self, model: WhisperBundle, request: SpeechRequest) -> dict[str, Any]:
        if request.language and model.languages and request.language not in model.languages:
            raise InvalidInputError(
                f"Language '{request.language}' is not known to this model. Use a code such as "
                f"{', '.join(sorted(model.languages)[:8])}, or leave it empty to detect it."
            )
        if model.backend == "ctranslate2":
            return _transcribe_ctranslate2(model, request)
        return _transcribe_transformers(model, request)


def _transcribe_transformers(model: WhisperBundle, request: SpeechRequest) -> dict[str, Any]:
    import torch

    audio: Audio = request.audio
    generate_kwargs: dict[str, Any] = {"task": "translate" if request.translate else "transcribe"}
    if request.language:
        generate_kwargs["language"] = request.language
    call: dict[str, Any] = {"generate_kwargs": generate_kwargs, "return_timestamps": request.timestamps}
    if audio.duration > CHUNK_SECONDS:
        call["chunk_length_s"] = CHUNK_SECONDS
    with torch.inference_mode():
        output = model.model({"raw": audio.samples, "sampling_rate": audio.sampling_rate}, **call)
    result: dict[str, Any] = {"text": output["text"].strip(), "language": request.language}
    if request.timestamps:
        result["chunks"] = [
            {"start": _seconds(chunk["timestamp"][0]), "end": _seconds(chunk["timestamp"][1]),
             "text": chunk["text"].strip()}
            for chunk in output.get("chunks", [])
        ]
    return result


def _load_faster_whisper(spec: ModelSpec, location: str, placement: Placement) -> WhisperBundle:
    from faster_whisper import WhisperModel

    device = "cuda" if placement.device.startswith("cuda") else "cpu"  # CTranslate2 has no MPS backend
    compute_type = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}[placement.dtype]
    if device == "cpu" and compute_type != "float32":
        compute_type = "int8"  # CTranslate2's fast CPU path
    kwargs: dict[str, Any] = {"device": device, "compute_type": compute_type}
    if device == "cpu":
        kwargs["cpu_threads"] = os.cpu_count() or 1  # its default of 4 oversubscribes small machines
    if device == "cuda" and ":" in placement.device:
        kwargs["device_index"] = int(placement.device.split(":")[1])
    if spec.source_scheme == "hf-hub" and spec.revision:
        kwargs["revision"] = spec.revision
    model = WhisperModel(location, **kwargs)
    folder = Path(location)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else None
    if size is None:
        size = spec.estimate_bytes(placement.dtype)
    return WhisperBundle("ctranslate2", model, frozenset(model.supported_languages), placement, size)


def _transcribe_ctranslate2(model: WhisperBundle, request: SpeechRequest) -> dict[str, Any]:
    audio: Audio = request.audio
    segments, info = model.model.transcribe(
        audio.samples,
        language=request.language,
        task="translate" if request.translate else "transcribe",
        beam_size=5,
        without_timestamps=not request.timestamps,
        condition_on_previous_text=False,
    )
    segments = list(segments)  # the generator runs the model
    result: dict[str, Any] = {
        "text": " ".join(s.text.strip() for s in segments).strip(),
        "language": info.language if request.language is None else request.language,
    }
    if request.timestamps:
        result["chunks"] = [
            {"start": round(s.start, 2), "end": round(s.end, 2), "text": s.text.strip()} for s in segments
        ]
    return result


def _seconds(value: Any) -> float | None:
    return None if value is None else round(float(value), 2)
