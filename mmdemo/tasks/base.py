"""The interface every task module implements.

A task turns loose keyword inputs into a validated request (``prepare``: decode media, check
settings, raise ``InvalidInputError`` for bad input), loads the models of the kinds it serves
(``load``), and runs a loaded model on one request or a batch (``predict`` / ``predict_batch``),
returning plain JSON-serialisable dicts (generated images aside).

``prepare`` runs before the model is touched, so bad input never waits for (or holds) a model.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Mapping

from ..catalog import ModelSpec
from ..errors import InvalidInputError
from ..inputs import check_characters, require_float, require_int, require_text  # noqa: F401 - the tasks' checks
from ..media import MediaLimits
from ..placement import Placement


class Task(ABC):
    task: ClassVar[str]
    Request: ClassVar[type]
    batchable: ClassVar[bool] = False

    def prepare(self, inputs: Mapping[str, Any], limits: MediaLimits, spec: ModelSpec) -> Any:
        """Validate and decode ``inputs`` for the model of ``spec`` into this task's request dataclass."""
        return self.Request(**self._known_fields(inputs))

    @abstractmethod
    def load(self, spec: ModelSpec, location: str, placement: Placement) -> Any:
        """Load the model of ``spec`` from a local folder or Hub id, placed on ``placement``."""

    @abstractmethod
    def predict(self, model: Any, request: Any) -> dict[str, Any]:
        """Run one request on a loaded model."""

    def predict_batch(self, model: Any, requests: list[Any]) -> list[dict[str, Any]]:
        """Run several requests; tasks whose models batch well override this."""
        return [self.predict(model, request) for request in requests]

    def describe(self, result: dict[str, Any]) -> str:
        """A result as text for a terminal (``mmdemo predict``); JSON unless the task says better."""
        import json

        return json.dumps({k: v for k, v in result.items() if k not in ("model", "seconds")}, ensure_ascii=False)

    def _known_fields(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """``inputs`` checked against the request's fields; a missing required one (the media) is None,
        so that its loader says what is missing."""
        fields = dataclasses.fields(self.Request)
        unknown = sorted(set(inputs) - {f.name for f in fields})
        if unknown:
            raise InvalidInputError(f"{self.task} does not take: {', '.join(unknown)}.")
        required = {f.name: None for f in fields
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        return {**required, **inputs}


def load_kwargs(spec: ModelSpec, placement: Placement) -> dict[str, Any]:
    """Keyword arguments every ``from_pretrained`` call shares. Remote code is never trusted."""
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if spec.source_scheme == "hf-hub" and spec.revision:
        kwargs["revision"] = spec.revision
    return kwargs
