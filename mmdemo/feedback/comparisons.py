"""Blind comparisons of two models on one input, and people's votes on them (rows of the feedback store).

>>> comparisons = ComparisonStore(store)
>>> shown = comparisons.create("image-to-text", first, second, created_by="alice")  # two recorded outputs
>>> shown.outputs          # (output shown as A, output shown as B): the sides were drawn at random
>>> comparisons.vote(shown.id, "alice", "a").winner   # the model the person preferred, revealed

The order is drawn here, on the server, and stored; a client only ever names a side (A or B), never a model.
A vote is one per (comparison, voter): voting again changes it. :meth:`ComparisonStore.games` gives the votes
as (first model, second model, score) for the leaderboard, :meth:`ComparisonStore.preferences` the
(chosen, rejected) pairs for preference training (ties and "both bad" keep their label and pair nothing).
"""

from __future__ import annotations

import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator

from sqlalchemy import Connection, select
from sqlalchemy.dialects import postgresql, sqlite

from ..errors import InvalidInputError
from .errors import UnknownOutputError
from .schemas import clean_annotator, schema_for
from .store import FeedbackStore
from .tables import comparison_votes, comparisons, outputs

CHOICES: tuple[str, ...] = ("a", "b", "tie", "both_bad")
CHOICE_LABELS = {"a": "A is better", "b": "B is better", "tie": "Tie", "both_bad": "Both bad"}
_COMPARISON_ID = re.compile(r"[0-9a-f]{32}")


class UnknownComparisonError(InvalidInputError):
    """No comparison has this id (mistyped, or its outputs were deleted)."""

    def __init__(self, message: str):
        super().__init__(message, field="compare_id")


class InvalidVoteError(InvalidInputError):
    """A vote that is not one of :data:`CHOICES`."""

    def __init__(self, message: str):
        super().__init__(message, field="choice")


@dataclass(frozen=True)
class Comparison:
    """One comparison as stored: the outputs and models in the order shown (A, B), and the caller's vote."""

    id: str
    task: str
    output_a: str
    output_b: str
    model_a: str
    model_b: str
    swapped: bool  # A is the model the caller named second
    created_by: str | None
    created_at: datetime
    choice: str | None = None  # the vote of the voter it was read for

    @property
    def outputs(self) -> tuple[str, str]:
        return self.output_a, self.output_b

    @property
    def winner(self) -> str | None:
        """The model preferred by ``choice`` (None for a tie, both bad or no vote)."""
        return {"a": self.model_a, "b": self.model_b}.get(self.choice or "")

    def revealed(self) -> dict[str, Any]:
        """What the voter learns after voting: which model was A and which B, and their choice."""
        return {"compare_id": self.id, "choice": self.choice, "A": self.model_a, "B": self.model_b,
                "winner": self.winner}


@dataclass(frozen=True)
class Preference:
    """One vote as training data: the shared input of both outputs, the chosen and the rejected output (None
    for a tie or both bad) and the label."""

    comparison_id: str
    task: str
    label: str  # a, b, tie, both_bad
    voter: str
    voted_at: datetime
    output_a: str  # as shown
    output_b: str
    chosen: str | None
    rejected: str | None


def check_choice(choice: Any) -> str:
    """``a``, ``b``, ``tie`` or ``both_bad`` (case and spaces ignored: "A", "both bad"); else InvalidVoteError."""
    value = choice.strip().lower().replace(" ", "_").replace("-", "_") if isinstance(choice, str) else None
    if value not in CHOICES:
        raise InvalidVoteError(f"A vote is one of {', '.join(CHOICES)} (A better, B better, tie, both bad), "
                               f"not {str(choice)[:40]!r}.")
    return value


def check_comparison_id(compare_id: Any) -> str:
    """The id in canonical form, or UnknownComparisonError when it cannot be one (32 hex digits)."""
    value = compare_id.strip().lower() if isinstance(compare_id, str) else ""
    if not _COMPARISON_ID.fullmatch(value):
        raise UnknownComparisonError(_unknown(compare_id))
    return value


class ComparisonStore:
    """The ``comparisons`` and ``comparison_votes`` tables of a :class:`FeedbackStore` (same database)."""

    def __init__(self, store: FeedbackStore):
        self.db = store.db
        insert = sqlite.insert if self.db.is_sqlite else postgresql.insert
        self._upsert_vote = insert(comparison_votes)
        self._upsert_vote = self._upsert_vote.on_conflict_do_update(
            index_elements=["comparison_id", "voter"],
            set_={"choice": self._upsert_vote.excluded.choice, "updated_at": self._upsert_vote.excluded.updated_at})

    def create(self, task: str, first_output: str, second_output: str, *, created_by: str | None = None,
               swapped: bool | None = None) -> Comparison:
        """A new comparison of two recorded outputs of ``task`` (the caller's first and second model), shown in
        an order drawn at random (``swapped``: given by tests only). Raises UnknownOutputError for an output
        that is not recorded, InvalidInputError for outputs of another task or of one model."""
        task = schema_for(task).task
        if swapped is None:
            swapped = secrets.randbelow(2) == 1
        created_by = clean_annotator(created_by) if created_by is not None else None
        shown = (second_output, first_output) if swapped else (first_output, second_output)

        def work(conn: Connection) -> Comparison:
            rows = {row.id: row for row in conn.execute(
                select(outputs.c.id, outputs.c.task, outputs.c.model_id).where(outputs.c.id.in_(shown)))}
            for output_id in shown:
                if output_id not in rows:
                    raise UnknownOutputError(f"Output {output_id!r} is not recorded; a comparison needs both outputs.")
                if rows[output_id].task != task:
                    raise InvalidInputError(f"Output {output_id} is of {rows[output_id].task}, not {task}.")
            models = [rows[output_id].model_id or "" for output_id in shown]
            if models[0] == models[1]:
                raise InvalidInputError("A comparison needs two different models.", field="model_b")
            values = dict(id=uuid.uuid4().hex, task=task, output_a=shown[0], output_b=shown[1], model_a=models[0],
                          model_b=models[1], swapped=swapped, created_by=created_by, created_at=_now())
            conn.execute(comparisons.insert().values(**values))
            return Comparison(**values)

        return self.db.run_write(work)

    def get(self, compare_id: Any, voter: str | None = None) -> Comparison:
        """A comparison, with ``voter``'s vote when given; UnknownComparisonError if there is none."""
        compare_id = check_comparison_id(compare_id)
        with self.db.read() as conn:
            row = conn.execute(select(comparisons).where(comparisons.c.id == compare_id)).mappings().first()
            if row is None:
                raise UnknownComparisonError(_unknown(compare_id))
            choice = None
            if voter is not None:
                choice = conn.execute(select(comparison_votes.c.choice).where(
                    comparison_votes.c.comparison_id == compare_id, comparison_votes.c.voter == voter)).scalar()
        return _comparison(row, choice)

    def vote(self, compare_id: Any, voter: str, choice: Any) -> Comparison:
        """Save ``voter``'s vote (one per comparison and voter: a second vote replaces the first) and return the
        comparison, its models revealed. Raises UnknownComparisonError, InvalidVoteError."""
        compare_id = check_comparison_id(compare_id)
        choice = check_choice(choice)
        voter = clean_annotator(voter)

        def work(conn: Connection) -> Comparison:
            row = conn.execute(select(comparisons).where(comparisons.c.id == compare_id)
                               .with_for_update(read=True)).mappings().first()
            if row is None:
                raise UnknownComparisonError(_unknown(compare_id))
            now = _now()
            conn.execute(self._upsert_vote.values(comparison_id=compare_id, voter=voter, choice=choice,
                                                  created_at=now, updated_at=now))
            return _comparison(row, choice)

        return self.db.run_write(work)

    def votes(self, task: str | None = None) -> Iterator[Preference]:
        """Every vote (of ``task``), oldest first, with the chosen and rejected output."""
        query = (select(comparisons, comparison_votes.c.voter, comparison_votes.c.choice,
                        comparison_votes.c.updated_at)
                 .select_from(comparison_votes.join(comparisons))
                 .order_by(comparison_votes.c.created_at, comparisons.c.id, comparison_votes.c.voter))
        if task is not None:
            query = query.where(comparisons.c.task == schema_for(task).task)
        with self.db.read() as conn:
            rows = conn.execute(query).mappings().all()
        for row in rows:
            pair = {"a": (row["output_a"], row["output_b"]), "b": (row["output_b"], row["output_a"])}
            chosen, rejected = pair.get(row["choice"], (None, None))
            yield Preference(row["id"], row["task"], row["choice"], row["voter"], _utc(row["updated_at"]),
                             row["output_a"], row["output_b"], chosen, rejected)

    def games(self, task: str) -> list[tuple[str, str, float]]:
        """The votes on ``task`` as games for a rating: (model shown as A, model shown as B, A's score), the
        score 1 (A won), 0 (B won) or 0.5 (tie, both bad)."""
        query = (select(comparisons.c.model_a, comparisons.c.model_b, comparison_votes.c.choice)
                 .select_from(comparison_votes.join(comparisons))
                 .where(comparisons.c.task == schema_for(task).task)
                 .order_by(comparison_votes.c.created_at, comparisons.c.id, comparison_votes.c.voter))
        with self.db.read() as conn:
            rows = conn.execute(query).all()
        score = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}
        return [(model_a, model_b, score[choice]) for model_a, model_b, choice in rows]


def _comparison(row: Any, choice: str | None) -> Comparison:
    values = dict(row)
    values["created_at"] = _utc(values["created_at"])
    return Comparison(**values, choice=choice)


def _unknown(compare_id: Any) -> str:
    return (f"Unknown comparison {str(compare_id)[:40]!r}: use the compare_id that /compare returned "
            "(its outputs may have been deleted since).")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


__all__ = ["CHOICES", "CHOICE_LABELS", "Comparison", "ComparisonStore", "InvalidVoteError", "Preference",
           "UnknownComparisonError", "check_choice", "check_comparison_id"]
