"""What a person reads when something is refused or fails: mmdemo's errors as readable ``gr.Error`` toasts
(:func:`readable_errors`), as a line beside the button (:func:`answered_in`) or on the input concerned
(:func:`blamed_input`, :func:`validated_api`), never a stack trace."""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Sequence

import gradio as gr

from ..errors import (
    AudioTooLongError,
    ImageTooLargeError,
    InvalidAudioError,
    InvalidImageError,
    InvalidInputError,
    MMDemoError,
    ModelLoadError,
    NotAllowedError,
    RequestInterrupted,
    TaskMismatchError,
    UnknownModelError,
)

log = logging.getLogger(__name__)

UNEXPECTED = ("Something went wrong on the server while handling this request (it has been logged). "
              "Please try again, or try another model.")


def error_title(exc: MMDemoError) -> str:
    if isinstance(exc, InvalidInputError):
        return "Please check the input"
    if isinstance(exc, ModelLoadError):
        return "The model could not be loaded"
    if isinstance(exc, UnknownModelError):
        return "Unknown model"
    if isinstance(exc, RequestInterrupted):
        return "Interrupted"
    if isinstance(exc, NotAllowedError):
        return "Not allowed"
    return "The model could not answer"


def readable_errors(fn: Callable) -> Callable:
    """Turn mmdemo's errors into ``gr.Error`` with their message; anything else into a generic
    message (the traceback goes to the log, not to the person)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except MMDemoError as exc:
            raise gr.Error(str(exc), title=error_title(exc), print_exception=False) from None
        except Exception:
            log.exception("unexpected error in %s", getattr(fn, "__qualname__", fn))
            raise gr.Error(UNEXPECTED, title="Something went wrong", print_exception=False) from None

    return wrapper


def validated_api(fn: Callable, validator: Callable[..., list[dict[str, Any]]], *, api_name: str,
                  **options: Any) -> None:
    """``gr.api(fn, api_name=..., **options)`` with ``validator`` (one ``gr.validate`` per parameter) run
    before each call joins the queue; gradio_client raises its refusals as ValidationError. gradio 6.31's
    ``gr.api`` takes no validator, so it is set on the function gr.api registers."""
    from gradio.context import get_blocks_context

    gr.api(fn, api_name=api_name, **options)
    blocks = get_blocks_context()
    registered = next(block_fn for block_fn in blocks.fns.values() if block_fn.api_name == api_name)
    registered.validator = validator


def validation_results(checks: Sequence[Callable[[], Any]]) -> list[dict[str, Any]]:
    """One ``gr.validate`` per check, in order: a refusal (an ``MMDemoError``) said for its input, else passed.
    What an endpoint's validator returns, one entry per parameter."""
    results = []
    for check in checks:
        try:
            check()
        except MMDemoError as exc:
            results.append(gr.validate(False, str(exc)))
        else:
            results.append(gr.validate(True, ""))
    return results


def blamed_input(exc: MMDemoError, media: str | None, text: str, names: Sequence[str] = ()) -> str:
    """The input a validation message is shown on: the endpoint parameter among ``names`` that the error
    names (its ``field``), else the media, the model, or the tab's main text."""
    if isinstance(exc, InvalidInputError) and exc.field in names:
        return exc.field
    if media and isinstance(exc, (InvalidImageError, ImageTooLargeError, InvalidAudioError, AudioTooLongError)):
        return media
    if isinstance(exc, (UnknownModelError, TaskMismatchError)):
        return "model"
    return text


def answered_in(status: gr.Markdown, refused: str = "Not done") -> Callable[[Callable], Callable]:
    """For a button's handler whose outputs include ``status``, the Markdown beside the button: a refusal
    or a failure is said there ("**Not allowed:** ..."; ``refused`` titles mmdemo's errors) and the other
    outputs stay as they were, instead of a toast or an error pill far from the button."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except gr.Error as exc:
                title, message = (exc.title if exc.title != "Error" else refused), exc.message
            except MMDemoError as exc:
                title, message = error_title(exc) if isinstance(exc, NotAllowedError) else refused, str(exc)
            except Exception:
                log.exception("unexpected error in %s", getattr(fn, "__qualname__", fn))
                title, message = "Something went wrong", UNEXPECTED
            return {status: f"**{title}:** {message}"}

        return wrapper

    return decorate
