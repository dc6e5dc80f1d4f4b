"""What feedback looks like for each task: its inputs, its correction, and the examples it exports.

One class per task, one interface (as the task runners in :mod:`mmdemo.tasks`):

* ``clean_inputs`` splits a request's inputs into the media to store and the text fields to keep;
* ``clean_output`` checks the model's output holds what an export needs, and takes its media out;
* ``clean_correction`` checks a person's correction has the shape the task needs;
* ``configs`` and ``examples`` say which dataset(s) a feedback record becomes, and the rows.

Task ids are the Hub's tags, the same as :data:`mmdemo.tasks.TASK_RUNNERS`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Mapping

from ..errors import InvalidInputError
from ..inputs import check_characters, require_text
from .errors import InvalidFeedbackError, UnknownTaskError
from .records import FeedbackRecord

# --- limits ---------------------------------------------------------------------------------------

MAX_CORRECTION_BYTES = 64 * 1024     # a corrected ten-minute transcript is about 10 KB
MAX_COMMENT_CHARS = 4000
MAX_TEXT_INPUT_CHARS = 4000          # prompts, questions, prefixes
MAX_JSON_BYTES = 1024 * 1024         # settings and model output, as JSON
MAX_ANNOTATOR_CHARS = 200
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


# --- feedback values common to every task ----------------------------------------------------------


def clean_thumbs(thumbs: Any) -> int | None:
    """+1 (thumbs up), -1 (thumbs down) or None."""
    if thumbs is None:
        return None
    if isinstance(thumbs, bool) or not isinstance(thumbs, int) or thumbs not in (1, -1):
        raise InvalidFeedbackError(f"The rating must be +1 (thumbs up) or -1 (thumbs down), not {thumbs!r}.")
    return thumbs


def clean_comment(comment: Any) -> str | None:
    """An optional free comment; an empty box means no comment."""
    if comment is None:
        return None
    if not isinstance(comment, str):
        raise InvalidFeedbackError("The comment must be text.")
    comment = check_characters(comment.strip(), "comment", InvalidFeedbackError)
    if len(comment) > MAX_COMMENT_CHARS:
        raise InvalidFeedbackError(
            f"The comment is {len(comment):,} characters long; the limit is {MAX_COMMENT_CHARS:,}."
        )
    return comment or None


def clean_annotator(annotator: Any) -> str:
    """A login name or a stable anonymous session id (see :func:`anonymous_annotator`)."""
    if not isinstance(annotator, str) or not annotator.strip():
        raise InvalidFeedbackError("Feedback needs an annotator: a login name or an anonymous session id.")
    annotator = annotator.strip()
    if len(annotator) > MAX_ANNOTATOR_CHARS or not annotator.isprintable():
        raise InvalidFeedbackError(
            f"The annotator id must be printable and at most {MAX_ANNOTATOR_CHARS} characters long."
        )
    return annotator


def anonymous_annotator(session_id: str) -> str:
    """A stable id for a person who is not logged in: ``anon-`` and a hash of their session id.

    The raw session id (a secret that identifies a browser) is never stored.
    """
    if not session_id:
        raise InvalidFeedbackError("An anonymous annotator needs a session id.")
    return "anon-" + hashlib.sha256(f"mmdemo-session\0{session_id}".encode()).hexdigest()[:16]


# --- export rows -----------------------------------------------------------------------------------


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


def _text_correction(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidFeedbackError(f"The corrected {what} must be text, not {type(value).__name__}.")
    text = check_characters(value.strip(), f"corrected {what}", InvalidFeedbackError)
    if not text:
        raise InvalidFeedbackError(
            f"The corrected {what} is empty: type the right {what}, or leave the correction out."
        )
    check_correction_size(len(text.encode("utf-8")), what)
    return text


# --- the tasks -------------------------------------------------------------------------------------


class TaskSchema:
    """The interface each task implements. Media inputs are named ``image`` or ``audio``."""

    task: ClassVar[str]
    media_input: ClassVar[str | None] = "image"       # the input field holding the media, also its kind
    text_inputs: ClassVar[dict[str, bool]] = {}       # text input field -> required
    output_media: ClassVar[str | None] = None         # the output field holding generated images
    what: ClassVar[str] = "output"                    # what a correction corrects, for messages

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
        return _text_correction(correction, self.what)

    # 3. export

    def configs(self) -> dict[str, dict[str, Any]]:
        """Dataset configs this task exports to: name -> {column: datasets feature}."""
        raise NotImplementedError

    def examples(self, record: FeedbackRecord) -> Iterator[Example]:
        raise NotImplementedError

    def _example(self, record: FeedbackRecord, config: str, row: dict[str, Any], media: dict[str, str]) -> Example:
        key = digest(self.task, config, record.output.input_key, to_json(row, "example"), *sorted(media.values()))
        return Example(config, key, row, media)


class CaptionSchema(TaskSchema):
    task = "image-to-text"
    text_inputs = {"prefix": False}
    what = "caption"

    def check_output(self, output: dict[str, Any]) -> None:
        _require_output_text(self.task, output, "text")

    def configs(self) -> dict[str, dict[str, Any]]:
        from datasets import Image, Value

        return {"default": dict(image=Image(), text=Value("string"))}

    def examples(self, record: FeedbackRecord) -> Iterator[Example]:
        text = record.correction if record.correction is not None else record.output.output["text"]
        yield self._example(record, "default", {"text": text}, {"image": record.output.input_media[0]})


class VqaSchema(TaskSchema):
    task = "visual-question-answering"
    text_inputs = {"question": True}
    what = "answer"

    def check_output(self, output: dict[str, Any]) -> None:
        _require_output_text(self.task, output, "answer")

    def configs(self) -> dict[str, dict[str, Any]]:
        from datasets import Image, Value

        return {"default": dict(image=Image(), question=Value("string"), answer=Value("string"))}

    def examples(self, record: FeedbackRecord) -> Iterator[Example]:
        out = record.output
        answer = record.correction if record.correction is not None else out.output["answer"]
        row = {"question": out.inputs["question"], "answer": answer}
        yield self._example(record, "default", row, {"image": out.input_media[0]})


class ZeroShotSchema(TaskSchema):
    task = "zero-shot-image-classification"
    text_inputs = {"labels": True, "template": False}
    what = "labels"

    def clean_text_input(self, name: str, value: Any) -> Any:
        if name == "labels":
            from ..tasks.zero_shot import parse_labels  # the task's own reading; the task modules load on use

            return list(parse_labels(value))
        return super().clean_text_input(name, value)

    def check_output(self, output: dict[str, Any]) -> None:
        labels = output.get("labels")
        if not isinstance(labels, list) or not labels or not all(
            isinstance(item, Mapping) and isinstance(item.get("label"), str) for item in labels
        ):
            raise InvalidInputError(f"The {self.task} output needs 'labels': a list of {{label, score}}.")

    def clean_correction(self, correction: Any, images: int) -> Any:
        items = [correction] if isinstance(correction, str) else correction
        if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
            raise InvalidFeedbackError("The corrected labels must be a label or a list of labels (text).")
        if not "".join(items).strip():
            raise InvalidFeedbackError(
                "The corrected labels are empty: choose or type the right label(s), or leave the correction out."
            )
        for item in items:
            check_characters(item, f"corrected {self.what}", InvalidFeedbackError)
        check_correction_size(sum(len(item.encode("utf-8")) for item in items), self.what)
        from ..tasks.zero_shot import parse_labels

        try:
            return list(parse_labels(correction))  # as the task reads labels: commas separate them
        except InvalidInputError as exc:
            raise InvalidFeedbackError(str(exc)) from None

    def configs(self) -> dict[str, dict[str, Any]]:
        from datasets import Image, List, Value

        return {"default": dict(image=Image(), labels=List(Value("string")),
                                     candidate_labels=List(Value("string")), template=Value("string"))}

    def examples(self, record: FeedbackRecord) -> Iterator[Example]:
        out = record.output
        # Without a correction the accepted answer is the model's top label.
        labels = record.correction if record.correction is not None else [out.output["labels"][0]["label"]]
        row = {"labels": list(labels), "candidate_labels": list(out.inputs["labels"]),
               "template": out.inputs.get("template")}  # None: the model's default template
        yield self._example(record, "default", row, {"image": out.input_media[0]})


class SpeechSchema(TaskSchema):
    task = "automatic-speech-recognition"
    media_input = "audio"
    text_inputs = {"language": False}
    what = "transcript"

    def check_output(self, output: dict[str, Any]) -> None:
        _require_output_text(self.task, output, "text", allow_empty=True)

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


class TextToImageSchema(TaskSchema):
    task = "text-to-image"
    media_input = None
    text_inputs = {"prompt": True, "negative_prompt": False}
    output_media = "images"
    what = "image ratings"

    def input_key(self, media_refs: list[str], text: dict[str, Any]) -> str:
        return digest(self.task, text.get("prompt", ""), text.get("negative_prompt", ""))

    def clean_correction(self, correction: Any, images: int) -> Any:
        count = images
        if not isinstance(correction, Mapping):
            raise InvalidFeedbackError(
                'A text-to-image correction is {"image_ratings": [1-5 per image], "preferred": image index}.'
            )
        unknown = sorted(set(correction) - {"image_ratings", "preferred"})
        if unknown:
            raise InvalidFeedbackError(
                f"Unexpected key(s) in the text-to-image correction: {', '.join(map(str, unknown))}; "
                "use image_ratings and preferred."
            )
        ratings = correction.get("image_ratings")
        if ratings is not None:
            if not isinstance(ratings, (list, tuple)) or len(ratings) != count:
                raise InvalidFeedbackError(
                    f"image_ratings must list one rating (1-{MAX_IMAGE_RATING}, or none) for each of the "
                    f"{count} image(s)."
                )
            for rating in ratings:
                if rating is not None and (isinstance(rating, bool) or not isinstance(rating, int)
                                           or not 1 <= rating <= MAX_IMAGE_RATING):
                    raise InvalidFeedbackError(
                        f"An image rating must be a whole number from 1 to {MAX_IMAGE_RATING}, not {rating!r}."
                    )
            ratings = list(ratings) if any(r is not None for r in ratings) else None
        preferred = correction.get("preferred")
        if preferred is not None:
            if count < 2:
                raise InvalidFeedbackError("A preferred image can only be chosen when several images were made.")
            if isinstance(preferred, bool) or not isinstance(preferred, int) or not 0 <= preferred < count:
                raise InvalidFeedbackError(
                    f"The preferred image must be an index from 0 to {count - 1}, not {preferred!r}."
                )
        if ratings is None and preferred is None:
            raise InvalidFeedbackError(
                "The text-to-image correction is empty: rate at least one image or choose the preferred one."
            )
        return {"image_ratings": ratings, "preferred": preferred}

    def configs(self) -> dict[str, dict[str, Any]]:
        from datasets import Image, Value

        prompt = {"prompt": Value("string"), "negative_prompt": Value("string")}
        return {
            "ratings": dict(**prompt, image=Image(), rating=Value("int8"), preferred=Value("bool")),
            "preferences": dict(**prompt, chosen=Image(), rejected=Image(), reason=Value("string")),
        }

    def examples(self, record: FeedbackRecord) -> Iterator[Example]:
        out = record.output
        prompt = {"prompt": out.inputs["prompt"], "negative_prompt": out.inputs.get("negative_prompt", "")}
        correction = record.correction or {}
        ratings = correction.get("image_ratings") or [None] * len(out.output_media)
        preferred = correction.get("preferred")
        for index, ref in enumerate(out.output_media):
            row = {**prompt, "rating": ratings[index], "preferred": preferred == index}
            yield self._example(record, "ratings", row, {"image": ref})
        # Preference pairs: the preferred image over each other one; without a choice, any image
        # rated higher than another.
        images = out.output_media
        if preferred is not None:
            pairs = [(preferred, other, "preferred") for other in range(len(images)) if other != preferred]
        else:
            pairs = [(a, b, "ratings") for a in range(len(images)) for b in range(len(images))
                     if ratings[a] is not None and ratings[b] is not None and ratings[a] > ratings[b]]
        for chosen, rejected, reason in pairs:
            if images[chosen] == images[rejected]:
                continue  # two identical images: no preference to learn
            yield self._example(record, "preferences", {**prompt, "reason": reason},
                                {"chosen": images[chosen], "rejected": images[rejected]})


def _require_output_text(task: str, output: dict[str, Any], name: str, allow_empty: bool = False) -> None:
    value = output.get(name)
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise InvalidInputError(f"The {task} output needs '{name}' (text).")


def check_correction_size(size: int, what: str) -> None:
    if size > MAX_CORRECTION_BYTES:
        raise InvalidFeedbackError(
            f"The corrected {what} is {format_bytes(size)}; the limit is {format_bytes(MAX_CORRECTION_BYTES)}."
        )


SCHEMAS: dict[str, TaskSchema] = {
    schema.task: schema
    for schema in (CaptionSchema(), VqaSchema(), ZeroShotSchema(), SpeechSchema(), TextToImageSchema())
}
TASKS: tuple[str, ...] = tuple(SCHEMAS)


def split_request(task: str, request: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split the keyword inputs a task ran with into ``(inputs, settings)`` for ``record_output``.

    Inputs are the task's media field and text inputs; settings every other value that was given
    (not None), except callables (a progress callback is no setting).
    """
    schema = schema_for(task)
    names = set(schema.text_inputs) | ({schema.media_input} if schema.media_input else set())
    inputs = {k: v for k, v in request.items() if k in names}
    settings = {k: v for k, v in request.items() if k not in names and v is not None and not callable(v)}
    return inputs, settings


def schema_for(task: Any) -> TaskSchema:
    """The schema of ``task``, or :class:`UnknownTaskError` listing the tasks."""
    try:
        return SCHEMAS[task]
    except (KeyError, TypeError):
        raise UnknownTaskError(f"Unknown task {task!r}. Feedback is kept for: {', '.join(TASKS)}.") from None

