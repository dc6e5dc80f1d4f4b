"""What feedback looks like for a task: the base of every task's feedback schema.

A task's schema (``TaskSpec.schema``, defined in its task module) has one interface:

* ``clean_inputs`` splits a request's inputs into the media to store and the text fields to keep;
* ``clean_output`` checks the model's output holds what an export needs, and takes its media out;
* ``clean_correction`` checks a person's correction has the shape the task needs, ``check_correction`` that it
  fits the output it corrects;
* ``configs`` and ``examples`` say which dataset(s) a feedback record becomes, and the rows;
* ``suggestion`` is the output a correction starts from (Annotate pre-fills it).

Nothing here touches the store: :mod:`mmdemo.feedback` calls these.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Mapping

from ..errors import InvalidFeedbackError, InvalidInputError
from ..inputs import check_characters, require_text

if TYPE_CHECKING:
    from ..feedback.records import FeedbackRecord

# --- limits ---------------------------------------------------------------------------------------

MAX_CORRECTION_BYTES = 64 * 1024     # a corrected ten-minute transcript is about 10 KB
MAX_TEXT_INPUT_CHARS = 4000          # prompts, questions, prefixes
MAX_JSON_BYTES = 1024 * 1024         # settings and model output, as JSON
MAX_IMAGE_RATING = 5


def format_bytes(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.1f} MB"
    if n >= 1024:
        return f"{n / 1024:.0f} KB"
    return f"{n} bytes"


def to_json(value: Any, what: str, max_bytes: int = MAX_JSON_BYTES) -> str:
    """``value`` as compact JSON, refusing what JSON cannot hold (NaN, objects) or what is too big."""
    try:
        text = json.dumps(value, ensure_ascii=False, sort_keys=True, allow_nan=False, separators=(",", ":"))
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInputError(f"The {what} cannot be stored: it holds an unpaired surrogate, which is not "
                                "valid Unicode text.") from None
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"The {what} cannot be stored: {exc}.") from None
    if size > max_bytes:
        raise InvalidInputError(f"The {what} is {format_bytes(size)}; the limit is {format_bytes(max_bytes)}.")
    return text


def digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


# --- export rows ---------------------------------------------------------------------------------


@dataclass
class Example:
    """One row of one exported dataset, before its media are read from the store.

    ``key`` identifies the example's content (input and target): two records with the same key are
    exact duplicates and export as one row. ``media`` maps a column to a stored media ref.
    """

    config: str
    key: str
    row: dict[str, Any]
    media: dict[str, str] = field(default_factory=dict)


def text_correction(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidFeedbackError(f"The corrected {what} must be text, not {type(value).__name__}.")
    text = check_characters(value.strip(), f"corrected {what}", InvalidFeedbackError)
    if not text:
        raise InvalidFeedbackError(
            f"The corrected {what} is empty: type the right {what}, or leave the correction out."
        )
    check_correction_size(len(text.encode("utf-8")), what)
    return text


class TaskSchema:
    """The interface each task implements. Media inputs are named ``image`` or ``audio``."""

    task: ClassVar[str]
    media_input: ClassVar[str | None] = "image"       # the input field holding the media, also its kind
    text_inputs: ClassVar[dict[str, bool]] = {}       # text input field -> required
    output_media: ClassVar[str | None] = None         # the output field holding generated images
    what: ClassVar[str] = "output"                    # what a correction corrects, for messages
    suggested: ClassVar[str | None] = None            # the output field a text correction starts from
    correction_is_text: ClassVar[bool] = True         # False: the API sends it as JSON (parse_correction)
    column_docs: ClassVar[dict[str, str]] = {}        # exported column -> meaning, for the dataset card
    card_notes: ClassVar[tuple[str, ...]] = ()        # paragraphs the dataset card adds (how to read a column)

    # 1. recording an output

    def clean_inputs(self, inputs: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
        """Return (the media source or None, the text inputs to store)."""
        known = set(self.text_inputs) | ({self.media_input} if self.media_input else set())
        unknown = sorted(set(inputs) - known)
        if unknown:
            raise InvalidInputError(
                f"{self.task} inputs are {', '.join(sorted(known))}; unexpected: {', '.join(unknown)}. "
                "Model settings go in `settings`."
            )
        media = None
        if self.media_input:
            media = inputs.get(self.media_input)
            if media is None:
                raise InvalidInputError(f"{self.task} needs its input {self.media_input}.")
        text: dict[str, Any] = {}
        for name, required in self.text_inputs.items():
            value = inputs.get(name)
            if value is None or (not required and value == ""):
                if required:
                    raise InvalidInputError(f"{self.task} needs the input '{name}'.")
                continue
            text[name] = self.clean_text_input(name, value)
        return media, text

    def recorded_fields(self, request: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """(text inputs, settings) of a validated request (the task's request dataclass), as the store keeps
        them: the task already checked every value, with its own limits, so nothing is parsed again.
        Settings are the other fields the model ran with; callbacks and unset (None) fields are left out."""
        text: dict[str, Any] = {}
        settings: dict[str, Any] = {}
        for request_field in dataclasses.fields(request):
            name = request_field.name
            value = getattr(request, name)
            if name == self.media_input or value is None or callable(value):
                continue
            value = list(value) if isinstance(value, tuple) else value
            if name in self.text_inputs:
                if value != "" or self.text_inputs[name]:
                    text[name] = value
            else:
                settings[name] = value
        return text, settings

    def clean_text_input(self, name: str, value: Any) -> Any:
        return require_text(value, name, max_chars=MAX_TEXT_INPUT_CHARS)

    def clean_output(self, output: Mapping[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        """Return (the output as JSON-ready dict without media or model info, the output media)."""
        if not isinstance(output, Mapping):
            raise InvalidInputError(f"The {self.task} output must be a dict, as the task returned it.")
        data = {k: v for k, v in output.items() if k not in ("model", self.output_media)}
        self.check_output(data)
        media: list[Any] = []
        if self.output_media:
            media = list(output.get(self.output_media) or [])
            if not media:
                raise InvalidInputError(f"The {self.task} output has no {self.output_media}.")
        return data, media

    def check_output(self, output: dict[str, Any]) -> None:
        """Refuse an output that lacks what the export takes from it."""

    def input_key(self, media_refs: list[str], text: dict[str, Any]) -> str:
        """What identifies the input: all records of one input fall on the same side of the split.

        For media tasks, the media alone (not the task): an image is on the same side in the
        captioning, VQA and zero-shot exports, so a model trained on several of them never
        validates on a picture it trained on.
        """
        return digest("media", *media_refs)

    # 2. feedback

    def clean_correction(self, correction: Any, images: int) -> Any:
        """The correction in the form this task stores; ``images``: how many images the output has."""
        return text_correction(correction, self.what)

    def check_correction(self, correction: Any, output: Mapping[str, Any]) -> None:
        """Refuse a cleaned correction that does not fit the output it corrects (the recorded ``output``, as
        :meth:`clean_output` kept it); nothing to check by default."""

    def parse_correction(self, text: str) -> Any:
        """A correction the API sent as text (already size-checked), in the form :meth:`clean_correction` takes."""
        return text

    def suggestion(self, output: Mapping[str, Any]) -> str | None:
        """The model's answer in a few words, shown to annotators (None: nothing to say in words)."""
        if self.suggested is None:
            return None
        return str(output.get(self.suggested) or "") or "(nothing)"

    # 3. export

    def configs(self) -> dict[str, dict[str, Any]]:
        """Dataset configs this task exports to: name -> {column: datasets feature}."""
        raise NotImplementedError

    def examples(self, record: FeedbackRecord) -> Iterator[Example]:
        raise NotImplementedError

    def _example(self, record: FeedbackRecord, config: str, row: dict[str, Any], media: dict[str, str]) -> Example:
        key = digest(self.task, config, record.output.input_key, to_json(row, "example"), *sorted(media.values()))
        return Example(config, key, row, media)


def require_output_text(task: str, output: dict[str, Any], name: str, allow_empty: bool = False) -> None:
    value = output.get(name)
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise InvalidInputError(f"The {task} output needs '{name}' (text).")


def check_correction_size(size: int, what: str) -> None:
    if size > MAX_CORRECTION_BYTES:
        raise InvalidFeedbackError(
            f"The corrected {what} is {format_bytes(size)}; the limit is {format_bytes(MAX_CORRECTION_BYTES)}."
        )
