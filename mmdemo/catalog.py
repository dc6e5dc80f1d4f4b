"""The model catalog, as data: which models exist, for which task, from where, and how big.

Only models in the catalog can be loaded. Built-in entries are registered exactly as a user's own
catalog file would register them; a user file (TOML or YAML, ``--catalog`` / ``MMDEMO_CATALOG``)
adds entries or overrides built-in ones by id::

    [models.my-captioner]
    task = "image-to-text"
    kind = "blip"
    source = "local-dir:./checkpoints/blip-finetuned"   # relative to the catalog file
    description = "BLIP fine-tuned on our product photos"

Sources: ``hf-hub:ORG/NAME`` (with ``revision``), ``local-dir:PATH`` (a folder saved with
``save_pretrained``, or a CTranslate2 Whisper folder for ``kind = "faster-whisper"``) and
``tiny:NAME`` (a tiny offline checkpoint built under the data directory).

Fine-tuned models (``mmdemo finetune``) join the catalog by themselves: every folder
``<data_dir>/models/<id>/`` holding a ``mmdemo-model.json`` entry becomes a ``local-dir:`` model
(see :func:`read_model_folders`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from .errors import CatalogError, UnknownModelError

log = logging.getLogger(__name__)

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ModelSpec:
    """One catalog entry. ``params_m`` (millions of parameters) gives the memory estimate."""

    id: str
    task: str
    kind: str
    source: str
    revision: str | None = None
    dtype: str = "auto"                  # auto, float32, float16, bfloat16
    params_m: float = 0.0
    description: str = ""
    variant: str | None = None           # e.g. "fp16" weights files on the Hub
    defaults: Mapping[str, Any] = field(default_factory=dict)  # task settings this model wants
    twin: str | None = None              # faster-whisper: the transformers Whisper that fine-tuning trains
    adapter_of: str | None = None        # a LoRA adapter: the catalog id of the base model it applies to
    backend: str = ""                    # set by the catalog from the task's kinds

    def __post_init__(self) -> None:
        if not self.id or any(c.isspace() for c in self.id):
            raise CatalogError(f"Model id {self.id!r} must be a non-empty word without spaces.")
        if self.dtype not in ("auto", *DTYPE_BYTES):
            raise CatalogError(f"Model '{self.id}': unknown dtype '{self.dtype}'.")
        scheme, _, rest = self.source.partition(":")
        if scheme not in ("hf-hub", "local-dir", "tiny") or not rest:
            raise CatalogError(
                f"Model '{self.id}': source {self.source!r} must start with hf-hub:, local-dir: or tiny:."
            )

    @property
    def source_scheme(self) -> str:
        return self.source.partition(":")[0]

    @property
    def source_location(self) -> str:
        return self.source.partition(":")[2]

    def estimate_bytes(self, dtype: str) -> int:
        """Rough memory need: weights at ``dtype`` plus a 20% working reserve (activations, caches)."""
        return int(self.params_m * 1e6 * DTYPE_BYTES.get(dtype, 4) * 1.2)

    def with_source(self, source: str, revision: str | None = None) -> "ModelSpec":
        return dataclasses.replace(self, source=source, revision=revision)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["defaults"] = dict(self.defaults)
        return data


TaskKinds = Mapping[str, Mapping[str, str]]  # task id -> model kind -> backend (from the task descriptors)


class Catalog:
    """Model specs keyed by id, in registration order; the first of a task is its default, unless a model
    was promoted to be the task's default (:meth:`set_default`: the app applies the store's promotions).

    ``kinds`` says which tasks exist and which model kinds (with their backend) each serves; an entry
    for another task or kind is refused with a :class:`CatalogError` naming the choices.
    """

    def __init__(self, specs: Iterable[ModelSpec] = (), *, kinds: TaskKinds) -> None:
        self.kinds = kinds
        self._specs: dict[str, ModelSpec] = {}
        self._promoted: dict[str, str] = {}  # task -> its promoted default model
        for spec in specs:
            self.register(spec)

    def register(self, spec: ModelSpec, *, override: bool = False) -> ModelSpec:
        """Add ``spec`` (its ``backend`` filled in); returns it as registered."""
        if spec.id in self._specs and not override:
            raise CatalogError(f"Model id '{spec.id}' is registered twice.")
        spec = self.checked(spec)
        self._specs[spec.id] = spec
        return spec

    def checked(self, spec: ModelSpec) -> ModelSpec:
        """``spec`` with its backend, if its task exists and serves its kind."""
        task_kinds = self.kinds.get(spec.task)
        if task_kinds is None:
            raise CatalogError(f"Model '{spec.id}': unknown task '{spec.task}' (tasks: {', '.join(self.kinds)}).")
        if spec.kind not in task_kinds:
            known = sorted({kind for kinds in self.kinds.values() for kind in kinds})
            if spec.kind not in known:
                raise CatalogError(f"Model '{spec.id}': unknown kind '{spec.kind}' (kinds: {', '.join(known)}).")
            raise CatalogError(f"Model '{spec.id}': kind '{spec.kind}' cannot serve task '{spec.task}' "
                               f"(its kinds: {', '.join(task_kinds)}).")
        backend = task_kinds[spec.kind]
        if spec.backend and spec.backend != backend:
            raise CatalogError(f"Model '{spec.id}': kind '{spec.kind}' runs on {backend}, not {spec.backend}.")
        return dataclasses.replace(spec, backend=backend)

    def get(self, model_id: str, task: str | None = None) -> ModelSpec:
        spec = self._specs.get(model_id)
        if spec is None:
            choices = ", ".join(s.id for s in self.for_task(task)) if task else ", ".join(self._specs)
            raise UnknownModelError(f"Unknown model '{model_id}'. Available: {choices or 'none'}.")
        if task is not None and spec.task != task:
            from .errors import TaskMismatchError

            raise TaskMismatchError(f"Model '{model_id}' serves {spec.task}, not {task}.")
        return spec

    def for_task(self, task: str) -> list[ModelSpec]:
        return [s for s in self._specs.values() if s.task == task]

    def default_for(self, task: str) -> ModelSpec:
        """The task's promoted model (while it is in the catalog), else its first."""
        promoted = self._specs.get(self._promoted.get(task, ""))
        if promoted is not None and promoted.task == task:
            return promoted
        return self.catalog_default(task)

    def catalog_default(self, task: str) -> ModelSpec:
        """The task's own default, ignoring promotions: its first model."""
        specs = self.for_task(task)
        if not specs:
            raise UnknownModelError(f"No model in the catalog serves {task}.")
        return specs[0]

    def promoted(self, task: str) -> str | None:
        """The model promoted to be the task's default, None when it has its catalog default."""
        return self._promoted.get(task)

    def set_default(self, task: str, model_id: str | None) -> None:
        """Make ``model_id`` (a model of ``task``) the task's default; None: back to its first model."""
        if model_id is None:
            self._promoted.pop(task, None)
            return
        self.get(model_id, task)
        self._promoted[task] = model_id

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._specs

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(list(self._specs.values()))

    def __len__(self) -> int:
        return len(self._specs)


def read_catalog_file(path: Path) -> list[ModelSpec]:
    """Read a user catalog (TOML or YAML): ``models`` as a table keyed by id, or a list with ``id``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"Cannot read catalog file {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = tomllib.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parser error becomes one readable message
        raise CatalogError(f"Catalog file {path} is not valid {path.suffix.lstrip('.').upper() or 'TOML'}: {exc}") from None
    models = data.get("models", data) if isinstance(data, dict) else data
    if isinstance(models, dict):
        models = [{"id": key, **(value or {})} for key, value in models.items()]
    if not isinstance(models, list):
        raise CatalogError(f"Catalog file {path}: expected a 'models' table or list.")
    specs = []
    allowed = {f.name for f in dataclasses.fields(ModelSpec)}
    for entry in models:
        if not isinstance(entry, dict):
            raise CatalogError(f"Catalog file {path}: each model must be a table, got {entry!r}.")
        unknown = set(entry) - allowed
        if unknown:
            raise CatalogError(f"Catalog file {path}, model {entry.get('id')!r}: unknown keys {sorted(unknown)}.")
        entry = dict(entry)
        source = str(entry.get("source", ""))
        if source.startswith("local-dir:"):
            local = Path(source.partition(":")[2]).expanduser()
            if not local.is_absolute():
                local = (path.parent / local).resolve()
            entry["source"] = f"local-dir:{local}"
        try:
            specs.append(ModelSpec(**entry))
        except TypeError as exc:
            raise CatalogError(f"Catalog file {path}, model {entry.get('id')!r}: {exc}") from None
    return specs


MODEL_ENTRY_FILE = "mmdemo-model.json"  # a model folder's catalog entry (all ModelSpec fields but id and source)


def read_model_folders(models_dir: Path) -> list[ModelSpec]:
    """Catalog entries for the model folders under ``models_dir`` (fine-tuned checkpoints).

    Each folder ``models_dir/<id>/`` with a ``mmdemo-model.json`` becomes the model ``<id>`` with
    source ``local-dir:`` that folder. Hidden folders (checkpoints being written), links and folders
    whose entry cannot be read are skipped (the last with a warning), so that one damaged folder
    never keeps the app from starting.
    """
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return []
    root = models_dir.resolve()
    allowed = {f.name for f in dataclasses.fields(ModelSpec)} - {"id", "source", "revision"}
    specs = []
    for folder in sorted(models_dir.iterdir()):
        entry_file = folder / MODEL_ENTRY_FILE
        if folder.name.startswith(".") or folder.is_symlink() or not entry_file.is_file():
            continue
        try:
            entry = json.loads(entry_file.read_text(encoding="utf-8"))
            if not isinstance(entry, dict) or set(entry) - allowed:
                raise CatalogError(f"expected a JSON object with keys among {sorted(allowed)}")
            specs.append(ModelSpec(id=folder.name, source=f"local-dir:{root / folder.name}", **entry))
        except (OSError, ValueError, TypeError, CatalogError) as exc:
            log.warning("model folder %s skipped: %s", folder, exc)
    return specs



def load_catalog(builtin: Mapping[str, Iterable[ModelSpec]], kinds: TaskKinds, profile: str = "default",
                 catalog_file: Path | None = None, models_dir: Path | None = None) -> Catalog:
    """The built-in entries of ``profile`` (``builtin``: profile -> entries, from the task descriptors:
    :func:`mmdemo.tasks.open_catalog` passes them), then the model folders of ``models_dir`` (fine-tuned
    checkpoints; they never shadow a built-in id), then a user catalog file's entries added or
    overriding."""
    if profile not in builtin:
        raise CatalogError(f"Unknown profile {profile!r}; profiles: {', '.join(builtin)}.")
    catalog = Catalog(builtin[profile], kinds=kinds)
    if models_dir is not None:
        for spec in read_model_folders(models_dir):
            if spec.id in catalog:
                log.warning("model folder %s skipped: '%s' is a built-in model id", spec.source_location, spec.id)
                continue
            try:
                catalog.register(spec)
            except CatalogError as exc:  # one damaged folder never keeps the app from starting
                log.warning("model folder %s skipped: %s", spec.source_location, exc)
    if catalog_file is not None:
        for spec in read_catalog_file(catalog_file):
            catalog.register(spec, override=True)
    return catalog
