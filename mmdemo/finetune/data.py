"""Training data: an exported feedback dataset, or the store's feedback exported on the fly."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import InvalidDatasetError

EXPORT_MARKER = ".mmdemo-export"  # written by mmdemo.feedback.export into every export folder


@dataclass
class TrainingData:
    """The train and validation splits (validation may be empty) and where they came from."""

    train: Any                        # datasets.Dataset with the adapter's columns
    validation: Any                   # datasets.Dataset, possibly with no rows
    source: dict[str, Any]            # {"dataset": path} or {"store": ..., "only": ..., ...}
    fingerprint: str                  # sha256 of the Arrow files of both splits
    rows: dict[str, int] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """What metrics.json records about the data."""
        return {"source": self.source, "fingerprint": self.fingerprint, "rows": self.rows}


def load_export(path: Path, task: str, columns: tuple[str, ...], source: dict[str, Any] | None = None, *,
                text_column: str | None = None) -> TrainingData:
    """Open a folder written by ``mmdemo export --format datasets`` for ``task`` (of an export with several
    configs, the one that has ``columns``: text-to-image's ``ratings``), or, when ``text_column`` names where a
    caption goes, an image folder (:func:`load_image_folder`).

    Raises :class:`InvalidDatasetError` when it is not such a folder, holds another task, lacks one of
    ``columns`` or has no training rows.
    """
    import datasets

    path = Path(path).expanduser()
    if not path.is_dir():
        raise InvalidDatasetError(f"The dataset folder {path} does not exist.")
    if text_column is not None and image_folder_splits(path):
        return load_image_folder(path, columns, text_column)
    marker = path / EXPORT_MARKER
    if marker.is_file():
        info = json.loads(marker.read_text(encoding="utf-8"))
        if info.get("task") != task:
            raise InvalidDatasetError(f"{path} holds {info.get('task')} feedback, not {task}.")
        if info.get("format") != "datasets":
            raise InvalidDatasetError(
                f"{path} is a {info.get('format')} export; fine-tuning reads `mmdemo export --format datasets` folders.")
    folder = _config_with(path, columns) or path
    if not (folder / "dataset_dict.json").is_file():
        folders = " or an image folder with metadata.jsonl / metadata.csv (file_name, text)" if text_column else ""
        raise InvalidDatasetError(
            f"{path} is not a `datasets` folder with splits{folders}; write one with "
            "`mmdemo export --format datasets`.")
    with quiet_progress():
        splits = datasets.load_from_disk(str(folder))
    train = splits.get("train")
    if train is None or train.num_rows == 0:
        raise InvalidDatasetError(f"The dataset {path} has no training rows.")
    missing = [c for c in columns if c not in train.column_names]
    if missing:
        raise InvalidDatasetError(f"The dataset {path} lacks the column(s) {', '.join(missing)} that {task} needs.")
    validation = splits.get("validation")
    if validation is None:
        validation = train.select([])
    parts = {"train": train, "validation": validation}
    return TrainingData(
        train=train.select_columns(list(columns)),
        validation=validation.select_columns(list(columns)),
        source=source or {"dataset": str(path.resolve())},
        fingerprint=fingerprint(parts),
        rows={name: split.num_rows for name, split in parts.items()},
    )


def _config_with(path: Path, columns: tuple[str, ...]) -> Path | None:
    """The config folder of a several-config export whose rows have ``columns``, if ``path`` is one."""
    if (path / "dataset_dict.json").is_file():
        return None
    for folder in sorted(p for p in path.iterdir() if (p / "dataset_dict.json").is_file()):
        info = folder / "train" / "dataset_info.json"
        features = json.loads(info.read_text(encoding="utf-8")).get("features", {}) if info.is_file() else {}
        if all(column in features for column in columns):
            return folder
    return None


IMAGE_FOLDER_METADATA = ("metadata.jsonl", "metadata.csv")


def image_folder_splits(path: Path) -> dict[str, Path]:
    """The splits of an image folder, as ``datasets``' imagefolder lays them out: ``metadata.jsonl`` (or
    ``.csv``) at the top (all training rows), or in ``train/`` and ``validation/``. Empty if it is not one."""
    for name in IMAGE_FOLDER_METADATA:
        if (path / name).is_file():
            return {"train": path / name}
    splits = {}
    for split in ("train", "validation"):
        found = [path / split / name for name in IMAGE_FOLDER_METADATA if (path / split / name).is_file()]
        if found:
            splits[split] = found[0]
    return splits if "train" in splits else {}


def load_image_folder(path: Path, columns: tuple[str, ...], text_column: str) -> TrainingData:
    """A folder of images with their captions (``file_name``, ``text`` in ``metadata.jsonl`` or
    ``metadata.csv``, see :func:`image_folder_splits`): each pair a row, its image under ``image``, its caption
    under ``text_column``; the other ``columns`` are taken from the metadata where it has them, else null.

    The images are read into memory. Raises :class:`InvalidDatasetError` for a missing image or column."""
    import datasets

    digest = hashlib.sha256()
    parts = {}
    for split, metadata in image_folder_splits(path).items():
        rows = _metadata_rows(metadata)
        table: dict[str, list[Any]] = {column: [] for column in columns}
        for n, row in enumerate(rows, start=1):
            where = f"Row {n} of {metadata}"
            if not str(row.get("file_name") or "").strip() or not str(row.get("text") or "").strip():
                raise InvalidDatasetError(f"{where} needs a file_name and a text (the image's caption).")
            image_path = (metadata.parent / str(row["file_name"])).resolve()
            if not image_path.is_relative_to(path.resolve()) or not image_path.is_file():
                raise InvalidDatasetError(f"{where} names the image {row['file_name']}, which is not a file in {path}.")
            data = image_path.read_bytes()
            digest.update(f"{split}\0{row['text']}\0".encode() + hashlib.sha256(data).digest())
            values = {**row, text_column: str(row["text"]), "image": {"bytes": data, "path": str(row["file_name"])}}
            for column in columns:
                table[column].append(values.get(column))
        dataset = datasets.Dataset.from_dict(table)
        parts[split] = dataset.cast_column("image", datasets.Image()) if "image" in columns else dataset
    train = parts["train"]
    if train.num_rows == 0:
        raise InvalidDatasetError(f"The image folder {path} has no (image, caption) pairs.")
    validation = parts.get("validation", train.select([]))
    return TrainingData(train=train, validation=validation, source={"image_folder": str(path.resolve())},
                        fingerprint="sha256:" + digest.hexdigest(),
                        rows={"train": train.num_rows, "validation": validation.num_rows})


def _metadata_rows(metadata: Path) -> list[dict[str, Any]]:
    import csv

    text = metadata.read_text(encoding="utf-8")
    if metadata.suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise InvalidDatasetError(f"Line {n} of {metadata} is not JSON.") from None
            if not isinstance(rows[-1], dict):
                raise InvalidDatasetError(f"Line {n} of {metadata} is not a JSON object.")
    return rows


@contextlib.contextmanager
def export_from_store(store: Any, task: str, columns: tuple[str, ...], work_dir: Path, *, only: str,
                      since: str | None, val_fraction: float, seed: int) -> Iterator[TrainingData]:
    """Export the store's feedback on ``task`` to a temporary folder under ``work_dir`` and open it.

    The folder is removed when the ``with`` block ends.
    """
    from ..feedback import export_dataset

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".finetune-data-", dir=work_dir))
    try:
        out = scratch / "dataset"
        summary = export_dataset(store, task, out, format="datasets", only=only, since=since,
                                 val_fraction=val_fraction, seed=seed, audit=False)  # the job is audited
        if summary.missing_media:
            raise InvalidDatasetError(
                f"{summary.missing_media} of the {summary.records} {task} feedback records have lost their media file; "
                "nothing was trained. Delete those records (mmdemo delete --record ID, the export's log names "
                "them) or restore the files.")
        source = {"store": repr(store), "only": only, "since": since, "val_fraction": val_fraction, "seed": seed}
        yield load_export(out, task, columns, source=source)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def fingerprint(splits: dict[str, Any]) -> str:
    """``sha256:...`` of the Arrow files behind each split (the rows exactly as exported)."""
    digest = hashlib.sha256()
    for name, split in sorted(splits.items()):
        digest.update(f"{name}\0{split.num_rows}\0".encode())
        if split.num_rows == 0:  # an empty selection still points at its parent's files
            continue
        for cache in split.cache_files:
            with open(cache["filename"], "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return "sha256:" + digest.hexdigest()


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    from datasets import utils as progress

    quiet = progress.are_progress_bars_disabled()
    progress.disable_progress_bars()
    try:
        yield
    finally:
        if not quiet:
            progress.enable_progress_bars()
