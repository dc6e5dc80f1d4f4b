"""Where evaluation labels come from: the accepted / corrected groups of a validation split, and the labels
people submitted in an annotation campaign (:func:`campaign_inputs`).

Below :mod:`.evaluate`, which reads them for every task's evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import InvalidDatasetError

ACCEPTED, CORRECTED = "accepted", "corrected"


@dataclass(frozen=True)
class CampaignInput:
    """One input of a campaign (an image, a question...) with every label people submitted for it."""

    output: Any                       # its first output record: the inputs and settings it was asked with
    media: bytes                      # its input media file
    answers: tuple[Any, ...]          # each person's label: the correction, else the accepted suggestion
    suggested_by: str | None          # the model whose suggestion someone accepted, if anyone did
    output_ids: tuple[str, ...]


def campaign_inputs(store: Any, campaign: str, evaluation: Any) -> list[CampaignInput]:
    """The labels people submitted in an annotation campaign of ``evaluation.task``, grouped by input. A label
    without a correction is the suggestion the person accepted (``evaluation.accepted_answer`` of its output);
    ``evaluation.media`` names the input in messages."""
    from ..feedback import AnnotationQueue

    task, media = evaluation.task, evaluation.media
    queue = AnnotationQueue(store)
    found = queue.campaign(campaign)
    if found.task != task:
        raise InvalidDatasetError(f"Campaign {found.name!r} is a {found.task} campaign, not {task}.")
    groups: dict[str, dict[str, Any]] = {}
    for record in queue.labels(found):
        out = record.output
        accepted = record.correction is None
        group = groups.setdefault(out.input_key, {"output": out, "answers": [], "suggested_by": None, "ids": set()})
        group["answers"].append(evaluation.accepted_answer(out.output) if accepted else record.correction)
        group["ids"].add(out.id)
        if accepted:
            group["suggested_by"] = out.model_id
    if not groups:
        raise InvalidDatasetError(f"Campaign {found.name!r} has no submitted labels to evaluate on.")
    inputs = []
    for group in groups.values():
        ref = group["output"].input_media[0]
        try:
            data = store.media.read_bytes(ref)
        except FileNotFoundError:
            raise InvalidDatasetError(f"The {media} of an item of campaign {found.name!r} is missing from the media "
                                      f"store ({ref}).") from None
        inputs.append(CampaignInput(group["output"], data, tuple(group["answers"]), group["suggested_by"],
                                    tuple(sorted(group["ids"]))))
    return inputs

