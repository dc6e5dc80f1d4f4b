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


def load_export(path: Path, task: str, columns: tuple[str, ...], source: dict[str, Any] | None = None) -> TrainingData:
    """Open a folder written by ``mmdemo export --format datasets`` for ``task``.

    Raises :class:`InvalidDatasetError` when it is not such a folder, holds another task, lacks one of
    ``columns`` or has no training rows.
    """
    import datasets

    path = Path(path).expanduser()
    if not path.is_dir():
        raise InvalidDatasetError(f"The dataset folder {path} does not exist.")
    marker = path / EXPORT_MARKER
    if marker.is_file():
        info = json.loads(marker.read_text(encoding="utf-8"))
        if info.get("task") != task:
            raise InvalidDatasetError(f"{path} holds {info.get('task')} feedback, not {task}.")
        if info.get("format") != "datasets":
            raise InvalidDatasetError(
                f"{path} is a {info.get('format')} export; fine-tuning reads `mmdemo export --format datasets` folders.")
    if not (path / "dataset_dict.json").is_file():
        raise InvalidDatasetError(
            f"{path} is not a `datasets` folder with splits; write one with `mmdemo export --format datasets`.")
    with quiet_progress():
        splits = datasets.load_from_disk(str(path))
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
                                 val_fraction=val_fraction, seed=seed)
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
