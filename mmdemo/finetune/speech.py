"""Fine-tuning speech recognition: Whisper (transformers) on (audio, corrected transcript) rows, and
faster-whisper (CTranslate2) models through their transformers twin; WER and CER for the evaluation.

* Whisper learns the decoder prompt as the record ran it (``<|startoftranscript|><|lang|><|transcribe|>``
  or ``<|translate|>``, ``<|notimestamps|>``), then the transcript and ``<|endoftext|>``: the correction,
  or the accepted transcript of a thumbs-up row. Audio is decoded and resampled to 16 kHz by
  :func:`mmdemo.media.load_audio`, as the task does.
* A faster-whisper catalog model names its transformers twin (``twin`` in the catalog). The job trains
  the twin and converts the result with CTranslate2's own converter, so the new catalog entry is a
  faster-whisper model (the trained transformers checkpoint stays beside it in ``transformers/``).
* WER and CER are corpus rates (edits over reference words / characters) after a light normalisation
  (lower case, punctuation dropped, spaces collapsed).
"""

from __future__ import annotations

import io
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..catalog import Catalog, ModelSpec
from ..errors import MMDemoError
from ..placement import Placement
from ..tasks.base import load_kwargs
from .augment import augment_waveform, mask_features, wav_bytes
from .base import ATTENTION_MLP_TARGETS, FinetuneAdapter
from .config import FinetuneConfig
from .data import TrainingData
from .errors import InvalidDatasetError, UnsupportedBaseError
from .evaluate import TaskEvaluation, group_of
from .labels import CampaignInput

ASR = "automatic-speech-recognition"
SAMPLING_RATE = 16_000
TWIN_FOLDER = "transformers"  # the trained transformers checkpoint inside a converted faster-whisper model


# --- WER and CER ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledSpeech:
    """One recording with its reference transcript(s), one per person."""

    audio: Any                        # mmdemo.media.Audio at 16 kHz
    answers: tuple[str, ...]          # reference transcripts
    language: str | None = None
    translate: bool = False
    group: str | None = None          # accepted / corrected (validation split only), else None
    suggested_by: str | None = None   # the model whose transcript a person accepted, if one did
    output_ids: tuple[str, ...] = ()


_PUNCTUATION = re.compile(r"[^\w\s']|(?<!\w)'|'(?!\w)")


def normalize_transcript(text: str) -> str:
    """Lower case, punctuation dropped (apostrophes inside words kept), spaces collapsed."""
    return " ".join(_PUNCTUATION.sub(" ", str(text).lower()).split())


def edit_distance(reference: list[str], hypothesis: list[str]) -> int:
    """Levenshtein distance (substitutions, insertions, deletions) between two token lists."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, 1):
        current = [i]
        for j, hyp in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref != hyp)))
        previous = current
    return previous[-1]


def error_rates(pairs: Iterable[tuple[str, str]]) -> dict[str, float | None]:
    """Corpus WER and CER of (reference, hypothesis) pairs: all edits over all reference words
    (characters, spaces included); None when the references are empty."""
    word_edits = words = char_edits = chars = 0
    for reference, hypothesis in pairs:
        ref, hyp = normalize_transcript(reference), normalize_transcript(hypothesis)
        word_edits += edit_distance(ref.split(), hyp.split())
        words += len(ref.split())
        char_edits += edit_distance(list(ref), list(hyp))
        chars += len(ref)
    return {"wer": round(word_edits / words, 4) if words else None,
            "cer": round(char_edits / chars, 4) if chars else None}


class SpeechEvaluation(TaskEvaluation):
    """WER and CER of the transcripts, each reference transcript (one per person) counting."""

    task = ASR
    metrics = (("WER", "wer", "questions"), ("CER", "cer", "questions"))
    export_columns = ("audio", "text", "language", "translate", "merged_record_ids", "output_id")
    media = "recording"

    def examples_from_rows(self, rows: Iterable[dict[str, Any]], *, split_groups: bool) -> list[LabelledSpeech]:
        """One example per row (its audio decoded at 16 kHz)."""
        found = []
        for row in rows:
            people = 1 + len(row.get("merged_record_ids") or [])
            found.append(LabelledSpeech(decode(row["audio"], f"output {row.get('output_id')}"),
                                        (row["text"],) * people, row.get("language"), bool(row.get("translate")),
                                        group_of(bool(row.get("corrected")), split_groups),
                                        output_ids=(row["output_id"],) if row.get("output_id") else ()))
        return found

    def example_from_campaign(self, item: CampaignInput, campaign: str) -> LabelledSpeech:
        return LabelledSpeech(decode(io.BytesIO(item.media), f"campaign {campaign!r}"), item.answers,
                              item.output.inputs.get("language"), bool(item.output.settings.get("translate")),
                              suggested_by=item.suggested_by, output_ids=item.output_ids)

    def accepted_answer(self, output: dict[str, Any]) -> str:
        return output["text"]

    def task_inputs(self, example: LabelledSpeech) -> dict[str, Any]:
        return {"audio": example.audio, "language": example.language, "translate": example.translate}

    def prediction(self, result: dict[str, Any]) -> str:
        return result["text"]

    def summarise(self, scored: list[tuple[LabelledSpeech, str]]) -> dict[str, Any]:
        """Corpus WER and CER over every (reference, transcript) pair."""
        pairs = [(reference, hypothesis) for example, hypothesis in scored for reference in example.answers]
        return {**error_rates(pairs), "questions": len(scored)}


# --- fine-tuning -------------------------------------------------------------------------------------------


class SpeechAdapter(FinetuneAdapter):
    task = ASR
    kinds = frozenset({"whisper", "faster-whisper"})
    lora_targets = {"whisper": ATTENTION_MLP_TARGETS}  # a faster-whisper base trains its Whisper twin
    columns = ("audio", "text", "language", "translate", "corrected", "merged_record_ids", "output_id")
    evaluation = SpeechEvaluation()
    augmentations = ("speed", "noise", "specaugment")
    default_augmentations = augmentations

    def training_spec(self, spec: ModelSpec, catalog: Catalog) -> ModelSpec:
        """The model that trains: ``spec`` itself, or the transformers twin of a faster-whisper model."""
        if spec.kind != "faster-whisper":
            return spec
        if not spec.twin:
            raise UnsupportedBaseError(
                f"'{spec.id}' runs on CTranslate2 and names no transformers twin to train; add "
                "twin = \"<a whisper catalog model with the same weights>\" to its catalog entry.")
        twin = catalog.get(spec.twin)
        if twin.kind != "whisper" or twin.task != ASR:
            raise UnsupportedBaseError(f"The twin of '{spec.id}', '{twin.id}', is not a transformers Whisper model.")
        return twin

    def load(self, spec: ModelSpec, location: str, placement: Placement) -> tuple[Any, Any]:
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        kwargs = load_kwargs(spec, placement)
        processor = WhisperProcessor.from_pretrained(location, **kwargs)
        if processor.tokenizer.pad_token is None:  # tiny and some real checkpoints have none: Whisper pads with EOS
            processor.tokenizer.pad_token = processor.tokenizer.eos_token
        model = WhisperForConditionalGeneration.from_pretrained(location, dtype=torch.float32, **kwargs)
        return model.to(placement.device), processor

    def serving_bundle(self, model: Any, processor: Any, spec: ModelSpec, placement: Placement) -> Any:
        from ..tasks.speech import whisper_bundle

        return whisper_bundle(model.eval(), processor, placement)

    def prepare_data(self, data: TrainingData) -> TrainingData:
        """Every row's audio decodes (else the job fails before training, naming the output)."""
        for name, split in (("train", data.train), ("validation", data.validation)):
            for row in split.select_columns(["audio", "output_id"]):
                decode(row["audio"], f"{name} row of output {row['output_id']}")
        return data

    def prepare_model(self, model: Any, processor: Any, data: TrainingData, config: FinetuneConfig) -> dict[str, Any]:
        """Refuse languages the model has no token for, naming them."""
        known = set(getattr(model.generation_config, "lang_to_id", None) or {})
        languages = {lang for split in (data.train, data.validation) for lang in split["language"] if lang}
        unknown = sorted(lang for lang in languages if f"<|{lang}|>" not in known)
        if unknown:
            raise InvalidDatasetError(f"The labels use language(s) {', '.join(unknown)} that '{config.base}' has no "
                                      "token for; correct those records' language or choose another base model.")
        return {}

    def collate(self, model: Any, processor: Any, rows: dict[str, list[Any]], max_length: int) -> dict[str, Any]:
        import torch

        audio = [decode(a, "a training row").samples for a in rows["audio"]]
        features = processor.feature_extractor(audio, sampling_rate=SAMPLING_RATE, return_tensors="pt")
        limit = min(max_length, model.config.max_target_positions)
        labels = [decoder_labels(processor.tokenizer, text, language, translate, limit)
                  for text, language, translate in zip(rows["text"], rows["language"], rows["translate"])]
        width = max(len(ids) for ids in labels)
        padded = torch.full((len(labels), width), -100, dtype=torch.long)  # no loss on padding
        for row, ids in enumerate(labels):
            padded[row, :len(ids)] = torch.tensor(ids)
        return {"input_features": features["input_features"], "labels": padded}

    def augment(self, rows: dict[str, list[Any]], ops: tuple[str, ...], generator: Any) -> dict[str, list[Any]]:
        """Speed and noise change the decoded waveform, which goes back into the row as WAV bytes."""
        if not any(op in ("speed", "noise") for op in ops):
            return rows
        audio = [{"bytes": wav_bytes(augment_waveform(decode(a, "a training row").samples, ops, generator),
                                     SAMPLING_RATE), "path": None} for a in rows["audio"]]
        return {**rows, "audio": audio}

    def augment_batch(self, batch: dict[str, Any], ops: tuple[str, ...], generator: Any) -> dict[str, Any]:
        if "specaugment" not in ops:
            return batch
        return {**batch, "input_features": mask_features(batch["input_features"], generator)}

    def save(self, model: Any, processor: Any, folder: Path) -> None:
        super().save(model, processor, folder)
        # preprocessor_config.json too (transformers 5 folds it into processor_config.json): CTranslate2's
        # converter and faster-whisper read it.
        processor.feature_extractor.save_pretrained(folder)

    def convert_for_serving(self, base: ModelSpec, folder: Path) -> None:
        """A faster-whisper base: the trained checkpoint in ``folder`` becomes a CTranslate2 folder (the
        transformers files move to ``folder/transformers``)."""
        if base.kind != "faster-whisper":
            return
        from ctranslate2.converters import TransformersConverter

        twin = folder / TWIN_FOLDER
        twin.mkdir()
        for path in list(folder.iterdir()):
            if path != twin:
                shutil.move(str(path), twin / path.name)
        scratch = Path(tempfile.mkdtemp(prefix=".ct2-", dir=folder.parent))
        try:
            converter = TransformersConverter(str(twin), copy_files=["tokenizer.json", "preprocessor_config.json"],
                                              low_cpu_mem_usage=False)
            converter.convert(str(scratch / "model"), quantization="float32", force=True)
            for path in (scratch / "model").iterdir():
                shutil.move(str(path), folder / path.name)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def decode(audio: Any, where: str) -> Any:
    """An exported ``{bytes, path}`` audio as :class:`mmdemo.media.Audio` at 16 kHz, or a clear error."""
    from ..media import load_audio

    try:
        return load_audio(audio, SAMPLING_RATE)
    except MMDemoError as exc:
        raise InvalidDatasetError(f"The audio of {where} cannot be used: {exc}") from None


def decoder_labels(tokenizer: Any, text: str, language: str | None, translate: bool, limit: int) -> list[int]:
    """What Whisper's decoder learns after ``<|startoftranscript|>`` (its start token): the language and
    task tokens, ``<|notimestamps|>``, the transcript (cut to ``limit`` tokens in all) and ``<|endoftext|>``."""
    ids = tokenizer.convert_tokens_to_ids
    prompt = ([ids(f"<|{language}|>")] if language else []) + [ids("<|translate|>" if translate else "<|transcribe|>"),
                                                                ids("<|notimestamps|>")]
    words = tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
    return (prompt + words)[:limit - 1] + [tokenizer.eos_token_id]
