"""Checks on the values people send (text, numbers), shared by the tasks and the feedback store: each refuses
a bad value with an :class:`~mmdemo.errors.InvalidInputError` (or the error given) that names the field.

A leaf module: the feedback store checks text as the tasks do without importing the task modules.
"""

from __future__ import annotations

import re
import reprlib
from typing import Any

from .errors import InvalidInputError


def require_text(value: Any, field: str, max_chars: int, *, what: str | None = None, required: bool = True) -> str:
    """A stripped piece of text of at most ``max_chars`` characters, or an ``InvalidInputError`` about
    ``field``; ``""`` when empty and not ``required``. Call it before any other work on the text.

    ``what`` names it in messages (default: the field's name in words, "negative_prompt" -> "negative prompt").
    """
    what = what or _words(field)
    text = "" if value is None else str(value).strip()
    if len(text) > max_chars:
        raise InvalidInputError(f"The {what} is {len(text):,} characters long; the limit is {max_chars:,}.", field)
    check_characters(text, what, field=field)
    if not text and required:
        raise InvalidInputError(f"Please enter {_article(what)} {what}; it is empty.", field)
    return text


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")  # NUL; surrogates, which in a str are always unpaired


def check_characters(text: str, what: str, error: type[InvalidInputError] = InvalidInputError,
                     field: str | None = None) -> str:
    """``text`` unless it holds a character no database keeps alike: NUL (PostgreSQL refuses it, SQLite
    keeps it) or an unpaired UTF-16 surrogate (not Unicode text: it cannot be encoded). Refused with an
    ``error`` naming ``what`` (the field) and where the character is."""
    found = _UNSTORABLE.search(text)
    if found is None:
        return text
    char, where = found.group(), found.start() + 1
    name = what.removeprefix("a ").removeprefix("the ")
    if char == "\x00":
        found_what, why = "a NUL character (\\x00)", "it cannot be stored"
    else:
        found_what, why = f"an unpaired surrogate (\\u{ord(char):04x})", "it is not valid Unicode text"
    message = f"There is {found_what} in the {name} (character {where}); {why}: remove it and try again."
    raise error(message) if field is None else error(message, field)


def require_int(value: Any, field: str, low: int, high: int, *, what: str | None = None) -> int:
    """A whole number in ``[low, high]`` (``3`` and ``3.0`` pass, ``3.5`` does not); errors are about ``field``."""
    number = require_float(value, field, low, high, what=what)
    if not number.is_integer():
        raise InvalidInputError(f"The {what or _words(field)} must be a whole number, not {_shown(value)}.", field)
    return int(number)


def require_float(value: Any, field: str, low: float, high: float, *, what: str | None = None) -> float:
    """A number in ``[low, high]``; NaN, infinity and text that is not a number are refused (about ``field``)."""
    what = what or _words(field)
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidInputError(f"The {what} must be a number, not {_shown(value)}.", field) from None
    if not low <= number <= high:  # also refuses NaN and infinity
        raise InvalidInputError(f"The {what} must be between {low} and {high}; got {_shown(value)}.", field)
    return number


def _words(field: str) -> str:
    return field.replace("_", " ")


def _article(noun: str) -> str:
    return "an" if noun[:1].lower() in "aeiou" else "a"


def _shown(value: Any) -> str:
    return reprlib.repr(value)  # short, however large the value
