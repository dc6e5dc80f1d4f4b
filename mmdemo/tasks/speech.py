"""Speech recognition with Whisper, through transformers or faster-whisper (CTranslate2).

Audio of any common format and rate is decoded, mixed to mono and resampled to 16 kHz before the
model sees it; audio longer than 30 s is transcribed in 30 s chunks.

Batching: the transformers backend runs requests with the same settings (language, translate,
timestamps, chunked or not) through one pipeline call, whose ``generate`` sees several inputs (or
chunks) at once. faster-whisper batches only the pieces of one file, never separate requests, so its
batches run one request at a time. Each batched result says in ``batch`` how many requests shared its
model calls.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, TYPE_CHECKING

from ..catalog import ModelSpec
from ..errors import InvalidInputError
from ..media import Audio, MediaLimits, load_audio
from ..placement import Placement
from .base import Task, load_kwargs, require_text
from .schema import Example, TaskSchema, require_output_text
from .spec import TaskSpec, register_task
from ..tiny import TinyBuilder
from ..tiny.whisper import build_whisper, build_whisper_ct2_beside_whisper

if TYPE_CHECKING:
    from ..feedback.records import FeedbackRecord

SAMPLING_RATE = 16_000
CHUNK_SECONDS = 30
MAX_LANGUAGE_CHARS = 20  # a code ("en", "haw") or "auto"


@dataclass(frozen=True)
class SpeechRequest:
    audio: Any
    language: str | None = None  # None or "auto": detect
    translate: bool = False  # translate into English instead of transcribing
    timestamps: bool = False

    def settings_key(self) -> tuple:
        return (self.language, self.translate, self.timestamps)


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
    batchable = True  # by the transformers backend; faster-whisper runs a batch one request at a time

    def describe(self, result: dict[str, Any]) -> str:
        return result["text"] + "".join(f"\n  [{c['start']}-{c['end']}] {c['text']}" for c in result.get("chunks", []))

    def prepare(self, inputs: Mapping[str, Any], limits: MediaLimits, spec: ModelSpec) -> SpeechRequest:
        request = SpeechRequest(**self._known_fields(inputs))
        language = require_text(request.language, "language", MAX_LANGUAGE_CHARS, required=False).lower()
        if language not in ("", "auto"):
            _require_whisper_language(language)
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
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        kwargs = load_kwargs(spec, placement)
        processor = WhisperProcessor.from_pretrained(location, **kwargs)
        model = WhisperForConditionalGeneration.from_pretrained(location, dtype=placement.torch_dtype, **kwargs)
        return whisper_bundle(model.to(placement.device).eval(), processor, placement)

    def predict(self, model: WhisperBundle, request: SpeechRequest) -> dict[str, Any]:
        result = self.predict_batch(model, [request])[0]
        del result["batch"]
        return result

    def predict_batch(self, model: WhisperBundle, requests: list[SpeechRequest]) -> list[dict[str, Any]]:
        """Each request's result as :meth:`predict` gives it, in the input order, with ``batch``: the
        number of requests that shared its model calls (always 1 on faster-whisper)."""
        for request in requests:
            if request.language and model.languages and request.language not in model.languages:
                raise InvalidInputError(
                    f"Language '{request.language}' is not known to this model. Use a code such as "
                    f"{', '.join(sorted(model.languages)[:8])}, or leave it empty to detect it.", "language"
                )
        if model.backend == "ctranslate2":
            return [{**_transcribe_ctranslate2(model, request), "batch": 1} for request in requests]
        return _transcribe_transformers(model, requests)


def whisper_bundle(model: Any, processor: Any, placement: Placement) -> WhisperBundle:
    """A loaded transformers Whisper (in eval mode, on ``placement.device``) as the task serves it."""
    from transformers import pipeline

    if processor.tokenizer.pad_token is None:  # the pipeline batches only with one; Whisper's is <|endoftext|>
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
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


def _require_whisper_language(language: str) -> None:
    """Refuse a language code no Whisper knows, before queueing (so it never fails a batch it joins).
    Whether the chosen model knows it (English-only checkpoints) is checked once it is loaded."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    if language not in LANGUAGES:
        raise InvalidInputError(
            f"Language '{language}' is not a Whisper language code. Use a code such as en, de, es or fr, "
            "or leave it empty to detect it.", "language"
        )


def _transcribe_transformers(model: WhisperBundle, requests: list[SpeechRequest]) -> list[dict[str, Any]]:
    """One pipeline call per group of requests that the pipeline would run with the same arguments (the
    settings, and chunked or not): ``generate`` then sees the group's inputs, or their 30 s chunks,
    together."""
    import torch

    groups: dict[tuple, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault((request.settings_key(), request.audio.duration > CHUNK_SECONDS), []).append(index)
    results: list[dict[str, Any]] = [{} for _ in requests]
    for (_, chunked), indices in groups.items():
        first = requests[indices[0]]
        generate_kwargs: dict[str, Any] = {"task": "translate" if first.translate else "transcribe"}
        if first.language:
            generate_kwargs["language"] = first.language
        call: dict[str, Any] = {"generate_kwargs": generate_kwargs, "return_timestamps": first.timestamps,
                                "batch_size": len(indices)}
        if chunked:
            call["chunk_length_s"] = CHUNK_SECONDS
        audios = [{"raw": requests[i].audio.samples, "sampling_rate": requests[i].audio.sampling_rate}
                  for i in indices]
        with torch.inference_mode():
            outputs = model.model(audios, **call)  # a list in, a list of outputs in the same order out
        for index, output in zip(indices, outputs):
            result: dict[str, Any] = {"text": output["text"].strip(), "language": first.language}
            if first.timestamps:
                # The pipeline leaves the end of a last segment that runs to the end of the audio as None.
                end_of_audio = round(requests[index].audio.duration, 2)
                result["chunks"] = [
                    {"start": _seconds(chunk["timestamp"][0]),
                     "end": _seconds(chunk["timestamp"][1], default=end_of_audio), "text": chunk["text"].strip()}
                    for chunk in output.get("chunks", [])
                ]
            results[index] = {**result, "batch": len(indices)}
    return results


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


def _seconds(value: Any, default: float | None = None) -> float | None:
    return default if value is None else round(float(value), 2)


# --- feedback: inputs, correction, exported rows --------------------------------------------------


class SpeechSchema(TaskSchema):
    task = "automatic-speech-recognition"
    media_input = "audio"
    text_inputs = {"language": False}
    what = "transcript"
    suggested = "text"
    card_notes = ("Audio is stored as `{bytes, path}` with `Audio(decode=False)`: read it with "
                  "`soundfile.read(io.BytesIO(row['audio']['bytes']))` (no torchcodec needed).",)

    def check_output(self, output: dict[str, Any]) -> None:
        require_output_text(self.task, output, "text", allow_empty=True)

    def configs(self) -> dict[str, dict[str, Any]]:
        from datasets import Audio, Value

        return {"default": dict(audio=Audio(decode=False), text=Value("string"), language=Value("string"),
                                translate=Value("bool"))}

    def examples(self, record: FeedbackRecord) -> Iterator[Example]:
        out = record.output
        text = record.correction if record.correction is not None else out.output["text"]
        language = out.inputs.get("language") or out.output.get("language")
        row = {"text": text, "language": language if isinstance(language, str) else None,
               "translate": bool(out.settings.get("translate"))}
        yield self._example(record, "default", row, {"audio": out.input_media[0]})


# --- the descriptor ------------------------------------------------------------------------------

# Revisions: where a commit is given it is the one transformers itself pins for its pipeline default;
# other entries follow "main" until pinned (pin your own with a catalog file).
SPEC = register_task(TaskSpec(
    id="automatic-speech-recognition",
    title="Transcribe",
    description="Transcribe or translate speech (Whisper, faster-whisper).",
    aliases=("asr", "transcribe"),
    api_name="transcribe",
    input_kind="audio",
    runner=SpeechTask(),
    schema=SpeechSchema(),
    kinds={"whisper": "transformers", "faster-whisper": "ctranslate2"},
    models=(
    ModelSpec("whisper-small", "automatic-speech-recognition", "whisper", "hf-hub:openai/whisper-small",
              params_m=244, description="Whisper small via transformers: 99 languages, translation."),
    ModelSpec("faster-whisper-small", "automatic-speech-recognition", "faster-whisper",
              "hf-hub:Systran/faster-whisper-small", params_m=244, twin="whisper-small",
              description="Whisper small on CTranslate2 (faster-whisper): same model, several times faster."),
    ),
    tiny_models=(
    ModelSpec("tiny-whisper", "automatic-speech-recognition", "whisper", "tiny:whisper", params_m=0.5,
              description="Tiny random Whisper via transformers (offline testing)."),
    ModelSpec("tiny-faster-whisper", "automatic-speech-recognition", "faster-whisper", "tiny:whisper-ct2",
              params_m=0.5, twin="tiny-whisper", description="Tiny random Whisper on CTranslate2 (offline testing)."),
    ),
    tiny_builders={"whisper": TinyBuilder(build_whisper),
                   "whisper-ct2": TinyBuilder(build_whisper_ct2_beside_whisper, needs=("whisper",))},
    tab="mmdemo.ui.speech",
    finetune="mmdemo.finetune.speech:SpeechAdapter",
    order=50,
))
