"""Export the feedback of one task as a fine-tuning dataset.

>>> summary = export_dataset(store, "image-to-text", Path("out"), format="datasets")
>>> datasets.load_from_disk("out")["train"][0]["text"]

What each task becomes (columns, besides the provenance columns every row has):

==============================  ================================================================
image-to-text                   image, text (the correction, else the accepted output)
visual-question-answering       image, question, answer
zero-shot-image-classification  image, labels, candidate_labels (the label set offered), template
automatic-speech-recognition    audio ({bytes, path}, ``Audio(decode=False)``), text, language, translate
text-to-image                   config ``ratings``: prompt, negative_prompt, image, rating (1-5),
                                preferred; config ``preferences``: prompt, negative_prompt,
                                chosen, rejected, reason
==============================  ================================================================

Every task also gets ``preferences/train.jsonl`` (whatever the format) from the blind comparisons people voted
on (:mod:`.comparisons`): one row per vote with the shared input (``inputs``, ``input_media``), the ``chosen``
and ``rejected`` output (model, output, media files under ``preferences/media/``) and the ``label`` (a, b, tie,
both_bad); a tie or "both bad" keeps its label, with ``chosen`` and ``rejected`` null.

Provenance: record_id, output_id, model_id, model_revision, backend, annotator, annotated_at,
thumbs, corrected, comment, merged_record_ids.

* The split is deterministic: a record goes to validation when the hash of (seed, its input) falls
  under ``val_fraction``, so every record about one input (one image, one audio, one prompt) lands
  on the same side.
* Exact duplicates (same input, same target) become one row; ``merged_record_ids`` lists the others.
* Memory stays flat: records are read from the store in batches and rows written in batches
  (Arrow IPC files turned into a ``datasets`` folder, Parquet shards or JSON Lines), with the media
  read from disk one row at a time. Images and audio are embedded as bytes in ``datasets`` and Parquet
  output; JSON Lines gets the media files next to it.
* The export is written to a temporary folder beside ``out_dir`` and moved into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from .. import __version__
from ..errors import InvalidInputError
from ..files import replace_folder
from .audit import record_after
from .comparisons import ComparisonStore, Preference
from .errors import NothingToExportError, UnknownOutputError
from .records import FeedbackRecord
from .schemas import TaskSchema, schema_for
from .store import ONLY_CHOICES, FeedbackStore, Only, parse_since

log = logging.getLogger(__name__)

Format = Literal["datasets", "parquet", "jsonl"]
FORMATS: tuple[str, ...] = ("datasets", "parquet", "jsonl")
SPLITS: tuple[str, ...] = ("train", "validation")
_BATCH_ROWS = 100                      # rows per Arrow batch / Parquet row group (images: a few MB)
_SHARD_BYTES = 256 * 1024 * 1024       # Parquet shard size before a new file is started
_MARKER = ".mmdemo-export"             # marks a folder as an export (only such folders are replaced)
HUB_TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")

COLUMN_DOCS = {
    "image": "the input image (PNG, metadata stripped)",
    "audio": "the input audio as uploaded: {bytes, path}; decode with soundfile",
    "text": "the target text: the person's correction, else the model output they accepted",
    "question": "the question asked about the image",
    "answer": "the target answer: the correction, else the accepted model answer",
    "labels": "the right label(s): the correction, else the model's top label",
    "candidate_labels": "the label set offered to the model",
    "template": "the template the labels were put in ({} is the label); null: the model's default",
    "language": "the language given for the audio, if any",
    "translate": "whether the model was asked to translate into English (the target is then English)",
    "prompt": "the text-to-image prompt",
    "negative_prompt": "the negative prompt ('' if none)",
    "rating": "the person's rating of this image, 1 (bad) to 5 (good); null if not rated",
    "preferred": "whether the person chose this image as the best of its batch",
    "chosen": "the image the person preferred",
    "rejected": "an image of the same batch they liked less",
    "reason": "'preferred' (chosen as best) or 'ratings' (rated higher)",
    "record_id": "the feedback record id in the mmdemo store",
    "output_id": "the model output the feedback is about",
    "model_id": "the mmdemo catalog id of the model",
    "model_revision": "the model's revision (commit) when known",
    "backend": "the library that ran the model",
    "annotator": "who gave the feedback (login name, or anon-<hash> for an anonymous session)",
    "annotated_at": "when the feedback was saved (last change), UTC",
    "thumbs": "the person's overall verdict: 1 thumbs up, -1 thumbs down, null none",
    "corrected": "whether the target comes from a person's correction",
    "comment": "the person's free comment",
    "merged_record_ids": "ids of other records that were exact duplicates of this row",
}


@dataclass
class ExportSummary:
    """What an export wrote."""

    task: str
    format: str
    out_dir: Path
    rows: dict[str, dict[str, int]]            # config -> split -> rows
    records: int                               # feedback records read
    duplicates: int                            # rows merged into an identical earlier row
    missing_media: int                         # rows skipped because a media file was missing
    seconds: float
    models: dict[str, int] = field(default_factory=dict)   # "model@revision" -> rows
    bytes: dict[str, dict[str, int]] = field(default_factory=dict)  # config -> split -> bytes (Arrow)
    pushed_to: str | None = None
    preferences: int = 0                       # votes written to preferences/train.jsonl (pairs and ties)

    @property
    def total_rows(self) -> int:
        return sum(sum(splits.values()) for splits in self.rows.values())

    @property
    def card(self) -> Path:
        return self.out_dir / "README.md"

    def describe(self) -> str:
        """A short text for the CLI and the admin panel."""
        parts = [f"{config}: " + ", ".join(f"{split} {n}" for split, n in splits.items())
                 for config, splits in self.rows.items()]
        text = (f"Exported {self.total_rows} rows of {self.task} ({'; '.join(parts)}) from {self.records} "
                f"records to {self.out_dir} as {self.format} in {self.seconds:.1f}s")
        if self.duplicates:
            text += f"; {self.duplicates} duplicates merged"
        if self.missing_media:
            text += f"; {self.missing_media} rows skipped (media file missing)"
        if self.preferences:
            text += f"; {self.preferences} votes in preferences/train.jsonl"
        if self.pushed_to:
            text += f"; pushed to {self.pushed_to}"
        return text + "."


def split_of(input_key: str, seed: int, val_fraction: float) -> str:
    """``train`` or ``validation``, from a hash of (seed, input): stable across runs and machines."""
    h = hashlib.sha256(f"mmdemo-split\0{seed}\0{input_key}".encode()).digest()
    return "validation" if int.from_bytes(h[:8], "big") / 2**64 < val_fraction else "train"


def export_dataset(
    store: FeedbackStore,
    task: str,
    out_dir: Path,
    *,
    format: Format = "datasets",
    only: Only = "approved",
    since: Any = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    push_to_hub: str | None = None,
    overwrite: bool = False,
    actor: str | None = None,
    audit: bool = True,
) -> ExportSummary:
    """Write the feedback of ``task`` to ``out_dir`` as a dataset with a train/validation split.

    ``format``: ``datasets`` (a folder for :func:`datasets.load_from_disk`; text-to-image writes one
    per config), ``parquet`` (shards under ``data/`` or ``<config>/``, media embedded) or ``jsonl``
    (``<split>.jsonl`` with media files beside). ``only``: ``approved`` (default: corrected or thumbs
    up), ``corrected`` or ``all``. ``since``: only feedback saved from this date on.
    ``push_to_hub``: a Hub dataset repo to upload to, with the token in ``HF_TOKEN``.
    A dataset card (README.md) with the counts per split and the schema is written in every case.
    ``out_dir`` must not exist or be empty, unless ``overwrite`` and it holds an earlier export.
    The audit log records the export (by ``actor``) once it is written, unless ``audit`` is False (a
    fine-tuning job's own export: its ``finetune_start`` entry covers it).

    Raises :class:`NothingToExportError` when no record matches, ``InvalidInputError`` for bad options.
    """
    started = time.perf_counter()
    schema = schema_for(task)
    if format not in FORMATS:
        raise InvalidInputError(f"Unknown export format {format!r}; use one of {', '.join(FORMATS)}.")
    if only not in ONLY_CHOICES:
        raise InvalidInputError(f"Unknown filter {only!r}; use one of {', '.join(ONLY_CHOICES)}.")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise InvalidInputError(f"The validation fraction must be at least 0 and below 1, not {val_fraction!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidInputError(f"The seed must be a whole number, not {seed!r}.")
    since_time = parse_since(since) if since is not None else None
    token = _hub_token() if push_to_hub else None
    out_dir = Path(out_dir)
    _check_destination(out_dir, overwrite)

    # 1. plan: which example comes first for each content key (later identical ones merge into it)
    max_id = store.last_record_id()
    query = {"only": only, "since": since_time, "max_id": max_id}
    first_of: dict[bytes, int] = {}
    merged: dict[bytes, list[int]] = {}
    records = 0
    for record in store.iter_records(schema.task, **query):
        records += 1
        for example in schema.examples(record):
            key = bytes.fromhex(example.key)
            if key in first_of:
                merged.setdefault(key, []).append(record.id)
            else:
                first_of[key] = record.id
    votes = [vote for vote in ComparisonStore(store).votes(schema.task)
             if since_time is None or vote.voted_at >= since_time]
    if not records and not votes:
        since_text = f" since {since_time:%Y-%m-%d}" if since_time else ""
        raise NothingToExportError(
            f"No {only} feedback on {schema.task}{since_text} to export."
            + ("" if only == "all" else " ('all' also takes records without a correction or thumbs up.)")
        )

    # 2. write: each first example, its media read from the store, routed to its split
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        sinks = _Sinks(schema, staging, format)
        missing = 0
        models: Counter[str] = Counter()
        for record in store.iter_records(schema.task, **query):
            for example in schema.examples(record):
                key = bytes.fromhex(example.key)
                owner = first_of.get(key, record.id)  # absent: the record changed since step 1
                if owner != record.id:
                    continue
                first_of[key] = 0  # written: a later identical example is a duplicate
                try:
                    media = {column: _media_value(store, ref) for column, ref in example.media.items()}
                except FileNotFoundError as exc:
                    log.warning("record #%d: media file missing (%s); row skipped", record.id, exc.filename)
                    missing += 1
                    continue
                row = {**example.row, **media, **_provenance(record, merged.get(key, []))}
                sinks.write(example.config, split_of(record.output.input_key, seed, val_fraction), row)
                models[_model_name(record)] += 1
        rows, sizes = sinks.close()
        preferences = write_preferences(store, votes, staging / "preferences")
        if not rows and not preferences:
            raise NothingToExportError(f"None of the {records} records could be exported: their media files are missing.")
        duplicates = sum(len(ids) for ids in merged.values())
        summary = ExportSummary(schema.task, format, out_dir, rows, records, duplicates, missing,
                                0.0, dict(models), sizes, preferences=preferences)
        options = {"only": only, "since": since_time.isoformat() if since_time else None,
                   "val_fraction": val_fraction, "seed": seed}
        (staging / "README.md").write_text(
            dataset_card(schema, summary, options, layout=format), encoding="utf-8")
        (staging / _MARKER).write_text(json.dumps({"task": schema.task, "format": format, **options}) + "\n")
        replace_folder(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if push_to_hub:
        _push(summary, schema, push_to_hub, token, options)
        summary.pushed_to = push_to_hub
    summary.seconds = time.perf_counter() - started
    if audit:
        record_after(store, actor, "export", schema.task,
                     {"format": format, "records": records, "rows": summary.total_rows, "out": str(out_dir),
                      "pushed_to": summary.pushed_to, **options})
    return summary


def export_archive(store: FeedbackStore, task: str, work_dir: Path, **options: Any) -> Path:
    """Export as :func:`export_dataset` does and pack it into one ``.zip`` (for a download button).

    The archive lands in ``work_dir`` (e.g. ``<data_dir>/exports``); the folder it was made from is
    removed. Returns the archive's path.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = f"mmdemo-{schema_for(task).task}-{options.get('format', 'datasets')}-{stamp}-{uuid.uuid4().hex[:6]}"
    folder = work_dir / name
    export_dataset(store, task, folder, **options)
    try:
        return Path(shutil.make_archive(str(folder), "zip", root_dir=folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- rows ------------------------------------------------------------------------------------------


def _media_value(store: FeedbackStore, ref: str) -> dict[str, Any]:
    return {"bytes": store.media.read_bytes(ref), "path": ref}


def _provenance(record: FeedbackRecord, merged_ids: list[int]) -> dict[str, Any]:
    out = record.output
    return {
        "record_id": record.id,
        "output_id": out.id,
        "model_id": out.model_id,
        "model_revision": out.model_revision,
        "backend": out.backend,
        "annotator": record.annotator,
        "annotated_at": record.updated_at,
        "thumbs": record.thumbs,
        "corrected": record.correction is not None,
        "comment": record.comment,
        "merged_record_ids": merged_ids,
    }


def _model_name(record: FeedbackRecord) -> str:
    out = record.output
    return f"{out.model_id}@{out.model_revision}" if out.model_revision else str(out.model_id)


def provenance_features() -> dict[str, Any]:
    from datasets import List, Value

    return {
        "record_id": Value("int64"),
        "output_id": Value("string"),
        "model_id": Value("string"),
        "model_revision": Value("string"),
        "backend": Value("string"),
        "annotator": Value("string"),
        "annotated_at": Value("timestamp[us, tz=UTC]"),
        "thumbs": Value("int8"),
        "corrected": Value("bool"),
        "comment": Value("string"),
        "merged_record_ids": List(Value("int64")),
    }


def features_of(schema: TaskSchema) -> dict[str, Any]:
    """config -> :class:`datasets.Features` of the rows it exports."""
    from datasets import Features

    return {config: Features({**columns, **provenance_features()}) for config, columns in schema.configs().items()}


# --- writing ---------------------------------------------------------------------------------------


def write_preferences(store: FeedbackStore, votes: list[Preference], folder: Path) -> int:
    """``folder/train.jsonl``: one row per vote (see the module's docstring), media files under ``folder/media``;
    returns the rows written (a vote whose outputs or media are gone is skipped)."""
    if not votes:
        return 0
    (folder / "media").mkdir(parents=True)

    def media_files(refs: tuple[str, ...]) -> list[str]:
        for ref in refs:
            path = folder / "media" / ref
            if not path.exists():
                path.write_bytes(store.media.read_bytes(ref))
        return [f"media/{ref}" for ref in refs]

    def side(output: Any) -> dict[str, Any]:
        return {"output_id": output.id, "model_id": output.model_id, "model_revision": output.model_revision,
                "output": output.output, "settings": output.settings, "media": media_files(output.output_media)}

    written = 0
    with open(folder / "train.jsonl", "w", encoding="utf-8") as file:
        for vote in votes:
            try:
                shown = {output_id: store.get_output(output_id) for output_id in (vote.output_a, vote.output_b)}
                sides = {output_id: side(output) for output_id, output in shown.items()}
                first = shown[vote.output_a]
                row = {"comparison_id": vote.comparison_id, "task": vote.task, "label": vote.label,
                       "voter": vote.voter, "voted_at": vote.voted_at.isoformat(), "inputs": first.inputs,
                       "input_media": media_files(first.input_media),
                       "chosen": sides.get(vote.chosen or ""), "rejected": sides.get(vote.rejected or ""),
                       "a": sides[vote.output_a], "b": sides[vote.output_b]}
            except (UnknownOutputError, FileNotFoundError) as exc:
                log.warning("vote on comparison %s skipped: %s", vote.comparison_id, exc)
                continue
            file.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            written += 1
    return written


def config_dir(root: Path, schema: TaskSchema, config: str, format: str) -> Path:
    """Where a config's files go: ``datasets`` puts a single config at the root, files go under ``data/``."""
    single = len(schema.configs()) == 1
    if format == "datasets":
        return root if single else root / config
    return root / ("data" if single else config)


class _Sinks:
    """The open writers of one export, one per (config, split), created on first use."""

    def __init__(self, schema: TaskSchema, root: Path, format: str):
        self.schema = schema
        self.root = root
        self.format = format
        self.features = features_of(schema)
        self.writers: dict[tuple[str, str], _Writer] = {}
        self.scratch = root / "_scratch"

    def write(self, config: str, split: str, row: dict[str, Any]) -> None:
        writer = self.writers.get((config, split))
        if writer is None:
            directory = config_dir(self.root, self.schema, config, self.format)
            writer_class = {"datasets": _ArrowWriter, "parquet": _ParquetWriter, "jsonl": _JsonlWriter}[self.format]
            writer = self.writers[(config, split)] = writer_class(
                self.features[config], directory, split, self.scratch / config)
        writer.add(row)

    def close(self) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
        """Finish every file; return (config -> split -> rows, config -> split -> bytes)."""
        counts: dict[str, dict[str, int]] = {}
        sizes: dict[str, dict[str, int]] = {}
        order = [(config, split) for config in self.schema.configs() for split in SPLITS]
        for config, split in order:
            writer = self.writers.get((config, split))
            if writer is not None:
                counts.setdefault(config, {})[split] = writer.close()
                sizes.setdefault(config, {})[split] = writer.nbytes
        if self.format == "datasets":
            self._save_datasets(counts)
        shutil.rmtree(self.scratch, ignore_errors=True)
        return counts, sizes

    def _save_datasets(self, counts: dict[str, dict[str, int]]) -> None:
        from datasets import Dataset, DatasetDict
        from datasets import utils as progress

        quiet = progress.are_progress_bars_disabled()
        progress.disable_progress_bars()  # no bars in a server's log
        try:
            for config, splits in counts.items():
                parts = {split: Dataset.from_file(str(self.writers[(config, split)].path)) for split in splits}
                DatasetDict(parts).save_to_disk(str(config_dir(self.root, self.schema, config, "datasets")))
                del parts
        finally:
            if not quiet:
                progress.enable_progress_bars()


class _Writer:
    """Buffers rows and writes them ``_BATCH_ROWS`` at a time."""

    def __init__(self, features: Any, directory: Path, split: str, scratch: Path):
        self.features = features
        self.schema = features.arrow_schema
        self.directory = directory
        self.split = split
        self.scratch = scratch
        self.buffer: list[dict[str, Any]] = []
        self.count = 0
        self.nbytes = 0

    def add(self, row: dict[str, Any]) -> None:
        self.buffer.append(row)
        self.count += 1
        if len(self.buffer) >= _BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            import pyarrow as pa

            batch = pa.RecordBatch.from_pylist(self.buffer, schema=self.schema)
            self.write_batch(batch)
            self.nbytes += batch.nbytes
            self.buffer = []

    def write_batch(self, batch: Any) -> None:
        raise NotImplementedError

    def close(self) -> int:
        self.flush()
        self.finish()
        return self.count

    def finish(self) -> None:
        pass


class _ArrowWriter(_Writer):
    """An Arrow IPC stream in the scratch folder; ``datasets`` turns it into its own layout at the end."""

    def __init__(self, *args: Any):
        import pyarrow as pa

        super().__init__(*args)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.path = self.scratch / f"{self.split}.arrow"
        self.sink = pa.OSFile(str(self.path), "wb")
        self.stream = pa.ipc.new_stream(self.sink, self.schema)

    def write_batch(self, batch: Any) -> None:
        self.stream.write_batch(batch)

    def finish(self) -> None:
        self.stream.close()
        self.sink.close()


class _ParquetWriter(_Writer):
    """Parquet shards ``<split>-NNNNN-of-MMMMM.parquet`` of about ``_SHARD_BYTES`` each."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shards: list[Path] = []
        self.writer: Any = None
        self.shard_bytes = 0

    def write_batch(self, batch: Any) -> None:
        import pyarrow.parquet as pq

        if self.writer is None or self.shard_bytes >= _SHARD_BYTES:
            self._close_shard()
            path = self.directory / f".{self.split}-{len(self.shards):05d}.parquet"
            self.writer = pq.ParquetWriter(str(path), self.schema)
            self.shards.append(path)
            self.shard_bytes = 0
        self.writer.write_batch(batch, row_group_size=_BATCH_ROWS)
        self.shard_bytes += batch.nbytes

    def _close_shard(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def finish(self) -> None:
        self._close_shard()
        for index, path in enumerate(self.shards):
            path.rename(path.with_name(f"{self.split}-{index:05d}-of-{len(self.shards):05d}.parquet"))


class _JsonlWriter(_Writer):
    """``<split>.jsonl`` with media as paths (relative to the file) to files under ``media/``."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.file = open(self.directory / f"{self.split}.jsonl", "w", encoding="utf-8")
        self.media_columns = [name for name, feature in self.features.items() if _is_media(feature)]

    def add(self, row: dict[str, Any]) -> None:
        row = dict(row)
        for column in self.media_columns:
            value = row[column]
            path = self.directory / "media" / value["path"]
            if not path.exists():
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(value["bytes"])
            row[column] = f"media/{value['path']}"
        row["annotated_at"] = row["annotated_at"].isoformat()
        line = json.dumps(row, ensure_ascii=False) + "\n"
        self.file.write(line)
        self.count += 1
        self.nbytes += len(line.encode("utf-8"))

    def finish(self) -> None:
        self.file.close()


def _is_media(feature: Any) -> bool:
    from datasets import Audio, Image

    return isinstance(feature, (Image, Audio))


def _check_destination(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInputError(f"{out_dir} exists and is not a folder.")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise InvalidInputError(f"{out_dir} is not empty; choose a new folder (or overwrite an earlier export).")
        if not (out_dir / _MARKER).is_file():
            raise InvalidInputError(f"{out_dir} is not empty and holds no mmdemo export; it will not be replaced.")


# --- the dataset card ------------------------------------------------------------------------------


def dataset_card(schema: TaskSchema, summary: ExportSummary, options: dict[str, Any], layout: str) -> str:
    """README.md: YAML metadata (configs, features, split sizes) and a human description.

    ``layout`` is the file layout the ``configs`` entries describe: ``parquet`` and ``jsonl`` as
    written here, ``hub`` as ``push_to_hub`` writes it; ``datasets`` folders get none (they load
    with ``load_from_disk``).
    """
    import yaml

    features = features_of(schema)
    single = len(features) == 1
    meta: dict[str, Any] = {"tags": ["mmdemo", "human-feedback", schema.task], "task_categories": [schema.task]}
    if layout in ("parquet", "jsonl", "hub"):
        configs = []
        for config, splits in summary.rows.items():
            folder = "data" if single else config
            pattern = "{split}.jsonl" if layout == "jsonl" else "{split}-*"
            configs.append({"config_name": config,
                            "data_files": [{"split": s, "path": f"{folder}/{pattern.format(split=s)}"} for s in splits]})
        meta["configs"] = configs
    meta["dataset_info"] = [
        {"config_name": config, "features": features[config]._to_yaml_list(),
         "splits": [{"name": split, "num_bytes": summary.bytes.get(config, {}).get(split, 0), "num_examples": n}
                    for split, n in splits.items()]}
        for config, splits in summary.rows.items()
    ]
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
        f"# mmdemo feedback: {schema.task}", "",
        f"People tried models in mmdemo {__version__}, rated their outputs and "
        "corrected them. Each row is one training example with the record it came from.", "",
        "## Rows", "", "| config | split | rows |", "|---|---|---|",
    ]
    for config, splits in summary.rows.items():
        lines += [f"| {config} | {split} | {n} |" for split, n in splits.items()]
    lines += ["", f"Feedback records read: {summary.records}. Exact duplicates merged: {summary.duplicates}."]
    if summary.missing_media:
        lines.append(f"Rows skipped because a media file was missing: {summary.missing_media}.")
    if summary.preferences:
        lines.append(f"Blind votes between two models: {summary.preferences} rows in `preferences/train.jsonl` "
                     "(inputs, chosen and rejected output, label a / b / tie / both_bad; ties pair nothing).")
    lines += ["", "## Columns", ""]
    for config, feats in features.items():
        if not single:
            lines += [f"### {config}", ""]
        lines += ["| column | type | meaning |", "|---|---|---|"]
        for name, feature in feats.items():
            doc = schema.column_docs.get(name, COLUMN_DOCS.get(name, ""))
            lines.append(f"| `{name}` | {_type_name(feature)} | {doc} |")
        lines.append("")
    lines += [
        "## How it was made", "",
        f"- records: `{options['only']}` (corrected: a person corrected the output; approved: corrected or "
        "thumbs up; all: every record, with `thumbs` telling which were rejected)",
        f"- since: {options['since'] or 'the beginning'}",
        f"- validation: about {options['val_fraction']:.0%} of inputs, by a hash of (seed {options['seed']}, input); "
        "all records of one input are on the same side",
        f"- exported {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "", "Models:", "",
    ]
    lines += [f"- `{name}`: {n} rows" for name, n in sorted(summary.models.items())] or ["- none"]
    lines += ["", "## Loading", "", "```python", *_loading_snippet(schema, summary, layout), "```", ""]
    lines += [note for note in schema.card_notes for note in (note, "")]
    return "\n".join(lines)


def _loading_snippet(schema: TaskSchema, summary: ExportSummary, layout: str) -> list[str]:
    configs = list(summary.rows)
    if layout == "datasets":
        if len(schema.configs()) == 1:
            return ["import datasets", 'ds = datasets.load_from_disk("PATH")  # DatasetDict: train, validation']
        return ["import datasets", *[f'{c} = datasets.load_from_disk("PATH/{c}")' for c in configs]]
    return ["import datasets", *[f'{c} = datasets.load_dataset("PATH_OR_REPO", "{c}")' for c in configs]]


def _type_name(feature: Any) -> str:
    name = type(feature).__name__
    if name == "Value":
        return feature.dtype
    if name == "List":
        return f"list of {_type_name(feature.feature)}"
    return name.lower()


# --- the Hub ---------------------------------------------------------------------------------------


def _hub_token() -> str:
    for name in HUB_TOKEN_VARIABLES:
        if os.environ.get(name):
            return os.environ[name]
    raise InvalidInputError("Pushing to the Hub needs a token: set HF_TOKEN to a token with write access.")


def _push(summary: ExportSummary, schema: TaskSchema, repo: str, token: str, options: dict[str, Any]) -> None:
    """Upload the export to a Hub dataset repo: Parquet/JSON Lines files as written, a ``datasets``
    folder through ``push_to_hub`` (which writes Parquet), then our card."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo, repo_type="dataset", exist_ok=True, private=True)
    if summary.format in ("parquet", "jsonl"):
        api.upload_folder(folder_path=str(summary.out_dir), repo_id=repo, repo_type="dataset",
                          ignore_patterns=[_MARKER], commit_message=f"mmdemo export of {schema.task}")
        return
    from datasets import load_from_disk

    for config in summary.rows:
        load_from_disk(str(config_dir(summary.out_dir, schema, config, "datasets"))).push_to_hub(
            repo, config_name=config, token=token, private=True)
    card = dataset_card(schema, summary, options, layout="hub")
    api.upload_file(path_or_fileobj=card.encode("utf-8"), path_in_repo="README.md", repo_id=repo,
                    repo_type="dataset", commit_message="mmdemo dataset card")

