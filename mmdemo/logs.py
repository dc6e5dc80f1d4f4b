"""Log lines: plain text, or one JSON object per line (``MMDEMO_LOG_FORMAT=json``), with the request id.

The request guard (:mod:`mmdemo.security`) gives every HTTP request an id (the ``X-Request-ID`` it
answers with) and sets :data:`REQUEST_ID` while the request is handled; a model call run later by
gradio's queue sets it again from the request that queued it (:func:`request_id_set`). Log lines name
what happened, never what people sent (prompts, questions, labels, media).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import secrets
from datetime import datetime, timezone
from typing import Iterator

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("mmdemo_request_id", default=None)
_REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_id_text)s: %(message)s"


def new_request_id(given: str | None = None) -> str:
    """``given`` (a proxy's ``X-Request-ID``) when it is a short token, else a new random id."""
    if given and _REQUEST_ID_PATTERN.fullmatch(given):
        return given
    return secrets.token_hex(8)


@contextlib.contextmanager
def request_id_set(request_id: str | None) -> Iterator[None]:
    """Log lines written inside the block carry ``request_id``."""
    token = REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        REQUEST_ID.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (and ``request_id_text``, `` [id]`` or empty) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        record.request_id = request_id
        record.request_id_text = f" [{request_id}]" if request_id else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id when in a
    request, and the exception's traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            line["request_id"] = request_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(level: int = logging.WARNING, log_format: str = "text") -> None:
    """Log to stderr at ``level``, as text or JSON lines (``log_format``), each line with its request id."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
