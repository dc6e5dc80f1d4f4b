"""LoRA adapters served on their base model's loaded copy, without peft.

A fine-tuned LoRA model is a folder with the adapter's low-rank matrices: peft's format
(``adapter_config.json`` + ``adapter_model.safetensors``, keys ``base_model.model.<module>.lora_A.weight``)
or diffusers' (``pytorch_lora_weights.safetensors``, keys ``unet.<module>.lora_A.weight``, its LoRA config
in the file's ``lora_adapter_metadata``; without it alpha equals the rank, as diffusers assumes).

:func:`read_adapter` reads either. :func:`serve_on` puts an adapter on a loaded bundle: forward hooks on
the targeted ``Linear`` / ``Conv2d`` modules add ``scale * B(A(x))`` to their output, but only inside
:func:`active` for that adapter (a context variable, so concurrent calls on one copy with different
adapters, or none, stay independent). An adapter that also replaces whole modules (peft's
``modules_to_save``, e.g. ViLT's extended answer classifier and its labels) cannot share the base's copy:
it is merged into a copy of its own.
"""

from __future__ import annotations

import contextlib
import json
import weakref
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
LABELS_CONFIG_FILE = "config.json"  # saved beside an adapter that replaces a labelled head (id2label)

_ACTIVE: ContextVar[str | None] = ContextVar("mmdemo_active_lora_adapter", default=None)


class AdapterFormatError(ValueError):
    """An adapter folder this server cannot serve (missing files, an unsupported LoRA variant)."""


@dataclass
class LoraPair:
    """One adapted module: ``delta(x) = scale * B(A(x))``."""

    down: Any    # lora_A weight: (r, in) for Linear, (r, in, k, k) for Conv2d
    up: Any      # lora_B weight: (out, r) or (out, r, 1, 1)
    scale: float


@dataclass
class AdapterWeights:
    """A LoRA adapter read from its folder; module paths are relative to the model the keys address."""

    pairs: dict[str, LoraPair]
    saved_modules: dict[str, Any] = field(default_factory=dict)  # parameter path -> tensor (modules_to_save)
    id2label: dict[int, str] | None = None

    @property
    def needs_own_copy(self) -> bool:
        """True when the adapter replaces whole modules: it is merged into a copy of its own."""
        return bool(self.saved_modules)

    @property
    def nbytes(self) -> int:
        tensors = [t for p in self.pairs.values() for t in (p.down, p.up)] + list(self.saved_modules.values())
        return sum(t.numel() * t.element_size() for t in tensors)


def is_adapter_folder(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / PEFT_WEIGHTS_FILE).is_file() or (folder / DIFFUSERS_WEIGHTS_FILE).is_file()


def read_adapter(folder: Path) -> AdapterWeights:
    """The LoRA adapter saved in ``folder`` (peft's or diffusers' format); ``AdapterFormatError`` if none."""
    from safetensors import safe_open

    folder = Path(folder)
    if (folder / PEFT_WEIGHTS_FILE).is_file():
        path, prefix = folder / PEFT_WEIGHTS_FILE, "base_model.model."
        config = _json(folder / PEFT_CONFIG_FILE)
    elif (folder / DIFFUSERS_WEIGHTS_FILE).is_file():
        path, prefix = folder / DIFFUSERS_WEIGHTS_FILE, "unet."
        config = None
    else:
        raise AdapterFormatError(f"{folder} holds no LoRA adapter ({PEFT_WEIGHTS_FILE} or {DIFFUSERS_WEIGHTS_FILE}).")
    try:
        with safe_open(str(path), framework="pt") as weights:
            tensors = {key: weights.get_tensor(key) for key in weights.keys()}
            metadata = (weights.metadata() or {}).get(DIFFUSERS_METADATA_KEY)
        if config is None:
            config = _diffusers_config(json.loads(metadata) if metadata else {})
    except Exception as exc:  # noqa: BLE001 - safetensors' own error type: a damaged or foreign file
        raise AdapterFormatError(f"{path.name} is not a readable safetensors file ({exc}).") from None
    for unsupported in ("use_dora", "fan_in_fan_out"):
        if config.get(unsupported):
            raise AdapterFormatError(f"{unsupported} adapters are not supported; merge it (--merge) to serve it.")
    if config.get("bias", "none") != "none":
        raise AdapterFormatError("LoRA adapters with trained biases are not supported; merge it (--merge).")
    pairs: dict[str, LoraPair] = {}
    saved: dict[str, Any] = {}
    for key, tensor in tensors.items():
        if not key.startswith(prefix):
            raise AdapterFormatError(f"unexpected key {key!r} in {path.name}.")
        name = key[len(prefix):]
        if ".lora_A." in name:
            module = name.split(".lora_A.")[0]
            up = tensors.get(f"{prefix}{module}.lora_B.weight")
            if up is None:
                raise AdapterFormatError(f"{path.name} has {key} but no matching lora_B.")
            pairs[module] = LoraPair(tensor, up, _scale(config, module, tensor.shape[0]))
        elif ".lora_B." in name:
            continue
        elif "lora_" in name:
            raise AdapterFormatError(f"{key!r}: only LoRA on Linear and Conv2d layers is supported; merge it.")
        else:
            saved[name] = tensor
    if not pairs and not saved:
        raise AdapterFormatError(f"{path.name} holds no LoRA weights.")
    has_labels = saved and (folder / LABELS_CONFIG_FILE).is_file()
    labels = _json(folder / LABELS_CONFIG_FILE).get("id2label") if has_labels else None
    return AdapterWeights(pairs, saved, {int(k): v for k, v in labels.items()} if labels else None)


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterFormatError(f"cannot read {Path(path).name}: {exc}") from None


def _diffusers_config(metadata: dict[str, Any]) -> dict[str, Any]:
    """diffusers' metadata (a LoraConfig's fields, maybe prefixed ``unet.``); none: alpha = rank (scale 1)."""
    return {key.removeprefix("unet."): value for key, value in metadata.items()}


def _scale(config: dict[str, Any], module: str, rank: int) -> float:
    """peft's scaling: alpha / r (alpha / sqrt(r) with rsLoRA); per-module alphas from ``alpha_pattern``."""
    alpha = config.get("lora_alpha")
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith(f".{pattern}"):
            alpha = value
    if alpha is None:
        alpha = rank
    return alpha / (rank ** 0.5 if config.get("use_rslora") else rank)


# --- serving -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def active(adapter_id: str | None) -> Iterator[None]:
    """Inside this block (this thread or task only), forward passes add the adapter ``adapter_id``; None: none."""
    token = _ACTIVE.set(adapter_id)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def torch_modules(bundle: Any, depth: int = 3) -> list[Any]:
    """The outermost torch modules held by a loaded bundle (its model, a pipeline's components...)."""
    import torch

    found: list[Any] = []
    seen: set[int] = set()

    def visit(obj: Any, level: int) -> None:
        if id(obj) in seen or level > depth:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            found.append(obj)
            return
        if isinstance(obj, dict):
            children: Iterable[Any] = obj.values()
        elif isinstance(obj, (list, tuple)):
            children = obj
        elif hasattr(obj, "components") and isinstance(getattr(obj, "components"), dict):  # diffusers
            children = obj.components.values()
        elif hasattr(obj, "__dict__"):
            children = vars(obj).values()
        else:
            return
        for child in children:
            visit(child, level + 1)

    visit(bundle, 0)
    return found


def serve_on(bundle: Any, adapter_id: str, weights: AdapterWeights) -> None:
    """Put the adapter on ``bundle``: hooked (active per call) or, if it needs its own copy, merged into it."""
    if weights.needs_own_copy:
        merge_into(bundle, weights)
    else:
        _hooks_for(_target_model(bundle, weights)).add(adapter_id, weights)


def remove_from(bundle: Any, adapter_id: str, weights: AdapterWeights) -> None:
    """Take a hooked adapter off ``bundle`` (no-op if another load of that id replaced it)."""
    for module in torch_modules(bundle):
        hooks = _HOOKS.get(module)
        if hooks is not None:
            hooks.remove(adapter_id, weights)


def merge_into(bundle: Any, weights: AdapterWeights) -> None:
    """Add the adapter's deltas to the weights of ``bundle`` (its own copy), replace its saved modules
    and take its labels."""
    import torch

    model = _target_model(bundle, weights)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for path, pair in weights.pairs.items():
            module = modules[path]
            module.weight += _delta_weight(pair, module).to(module.weight.dtype)
        for path, tensor in weights.saved_modules.items():
            owner_path, _, name = path.rpartition(".")
            owner = modules[owner_path]
            old = getattr(owner, name)
            setattr(owner, name, torch.nn.Parameter(tensor.to(old.device, old.dtype), requires_grad=False))
            if isinstance(owner, torch.nn.Linear) and name == "weight":
                owner.out_features, owner.in_features = tensor.shape
    if weights.id2label is not None:
        model.config.id2label = dict(weights.id2label)
        model.config.label2id = {label: i for i, label in weights.id2label.items()}


def _target_model(bundle: Any, weights: AdapterWeights) -> Any:
    """The module of ``bundle`` that holds every module the adapter names."""
    wanted = set(weights.pairs) | {path.rpartition(".")[0] for path in weights.saved_modules}
    for model in torch_modules(bundle):
        names = {name for name, _ in model.named_modules()}
        if wanted <= names:
            return model
    raise AdapterFormatError(f"the base model has no module {sorted(wanted)[0]!r} that the adapter adapts.")


def _delta_weight(pair: LoraPair, module: Any) -> Any:
    import torch.nn.functional as F

    down, up = pair.down.float(), pair.up.float()
    if down.dim() == 2:
        return (up @ down) * pair.scale
    if down.shape[-2:] == (1, 1):
        return (up.flatten(1) @ down.flatten(1))[:, :, None, None] * pair.scale
    return F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * pair.scale


class _Hooks:
    """The adapters hooked on one base model: per module, adapter id -> its pair (on the module's device)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.tables: dict[str, dict[str, LoraPair]] = {}
        self.handles: dict[str, Any] = {}
        self.owners: dict[str, AdapterWeights] = {}  # adapter id -> the weights that hooked it

    def add(self, adapter_id: str, weights: AdapterWeights) -> None:
        import torch

        modules = dict(self.model.named_modules())
        placed = {}
        for path, pair in weights.pairs.items():
            module = modules.get(path)
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                raise AdapterFormatError(f"the adapter targets {path!r}, which is not a Linear or Conv2d layer here.")
            w = module.weight
            if pair.down.shape[1] != w.shape[1] or pair.up.shape[0] != w.shape[0]:
                raise AdapterFormatError(f"the adapter's matrices for {path!r} do not fit the base model's layer.")
            placed[path] = LoraPair(pair.down.to(w.device, w.dtype), pair.up.to(w.device, w.dtype), pair.scale)
        self.remove(adapter_id, self.owners.get(adapter_id))
        for path, pair in placed.items():
            table = self.tables.setdefault(path, {})
            table[adapter_id] = pair
            if path not in self.handles:
                self.handles[path] = modules[path].register_forward_hook(_adding(table), with_kwargs=True)
        self.owners[adapter_id] = weights

    def remove(self, adapter_id: str, weights: AdapterWeights | None) -> None:
        if weights is None or self.owners.get(adapter_id) is not weights:
            return
        del self.owners[adapter_id]
        for path in list(self.tables):
            self.tables[path].pop(adapter_id, None)
            if not self.tables[path]:
                del self.tables[path]
                self.handles.pop(path).remove()


_HOOKS: "weakref.WeakKeyDictionary[Any, _Hooks]" = weakref.WeakKeyDictionary()


def _hooks_for(model: Any) -> _Hooks:
    hooks = _HOOKS.get(model)
    if hooks is None:
        hooks = _HOOKS[model] = _Hooks(model)
    return hooks


def _adding(table: dict[str, LoraPair]) -> Any:
    """A forward hook adding the active adapter's ``scale * B(A(x))`` to a Linear or Conv2d output."""
    import torch.nn.functional as F

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        adapter_id = _ACTIVE.get()
        pair = table.get(adapter_id) if adapter_id is not None else None
        if pair is None:
            return None
        x = args[0] if args else kwargs["input"]
        if pair.down.dim() == 2:
            return output + F.linear(F.linear(x, pair.down), pair.up) * pair.scale
        hidden = F.conv2d(x, pair.down, stride=module.stride, padding=module.padding, dilation=module.dilation)
        return output + F.conv2d(hidden, pair.up) * pair.scale

    return hook
