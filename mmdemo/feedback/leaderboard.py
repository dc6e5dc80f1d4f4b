"""The leaderboard of a task: win rates and Bradley-Terry ratings from people's blind votes.

>>> board = leaderboard(ComparisonStore(store).games("image-to-text"), catalog=catalog)
>>> board[0].model, board[0].rating, (board[0].low, board[0].high)

Ratings come from a Bradley-Terry fit (Hunter's MM algorithm; a tie or "both bad" counts half a win for each
side), on the Elo scale (1000 is the average model, +400 means ten times the odds of winning). The 95%
intervals come from refitting on votes resampled with replacement (seeded, so the same votes give the same
intervals). Pure numpy.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..catalog import Catalog

Game = tuple[str, str, float]  # (first model, second model, the first's score: 1 won, 0 lost, 0.5 tie)
BASE_RATING = 1000.0
SCALE = 400.0 / math.log(10)  # Elo points per unit of log-strength
PRIOR_TIE = 0.5  # a virtual tie per pair that met: keeps a model that never won (or lost) finite
BOOTSTRAP_ROUNDS = 200


@dataclass(frozen=True)
class Standing:
    """One model's line on the leaderboard."""

    model: str
    games: int
    wins: int
    ties: int
    losses: int
    win_rate: float  # (wins + ties / 2) / games
    rating: float
    low: float  # the 95% bootstrap interval of the rating
    high: float
    metric: str | None = None  # its evaluation on labelled data (its metrics.json), when it has one

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bradley_terry(games: Sequence[Game], models: Sequence[str], *, iterations: int = 200,
                  tolerance: float = 1e-9) -> np.ndarray:
    """Ratings (Elo scale, mean ``BASE_RATING``) of ``models`` fitted to ``games`` by the MM algorithm."""
    index = {model: i for i, model in enumerate(models)}
    n = len(models)
    wins = np.zeros((n, n))  # wins[i, j]: i's score against j, summed
    for first, second, score in games:
        i, j = index[first], index[second]
        wins[i, j] += score
        wins[j, i] += 1.0 - score
    met = (wins + wins.T) > 0
    wins = wins + PRIOR_TIE * met
    played = wins + wins.T  # games (with the prior) between each pair
    total_wins = wins.sum(axis=1)
    strength = np.ones(n)
    for _ in range(iterations):
        denominator = (played / (strength[:, None] + strength[None, :])).sum(axis=1)
        updated = np.where(denominator > 0, total_wins / np.where(denominator > 0, denominator, 1), 1.0)
        updated /= np.exp(np.mean(np.log(updated)))  # geometric mean 1: ratings average BASE_RATING
        done = np.max(np.abs(updated - strength)) < tolerance
        strength = updated
        if done:
            break
    return BASE_RATING + SCALE * np.log(strength)


def leaderboard(games: Sequence[Game], *, catalog: Catalog | None = None, seed: int = 0,
                rounds: int = BOOTSTRAP_ROUNDS) -> list[Standing]:
    """Every model that played, best rating first: games, wins, ties, losses, win rate, rating and its 95%
    bootstrap interval (``rounds`` resamplings of the votes, drawn with ``seed``), and its evaluation metric
    when ``catalog`` says where its folder is."""
    games = list(games)
    models = sorted({model for first, second, _ in games for model in (first, second)})
    if not models:
        return []
    ratings = bradley_terry(games, models)
    rng = np.random.default_rng(seed)
    samples = np.array([bradley_terry([games[k] for k in rng.integers(0, len(games), len(games))], models)
                        for _ in range(rounds)])
    low, high = np.percentile(samples, [2.5, 97.5], axis=0)
    record = {model: [0, 0, 0] for model in models}  # wins, ties, losses
    for first, second, score in games:
        outcome = 0 if score == 1 else 2 if score == 0 else 1
        record[first][outcome] += 1
        record[second][2 - outcome] += 1
    standings = []
    for i, model in enumerate(models):
        wins, ties, losses = record[model]
        played = wins + ties + losses
        standings.append(Standing(model, played, wins, ties, losses, round((wins + ties / 2) / played, 4),
                                  round(float(ratings[i]), 1), round(float(min(low[i], ratings[i])), 1),
                                  round(float(max(high[i], ratings[i])), 1),
                                  evaluation_metric(catalog, model) if catalog is not None else None))
    return sorted(standings, key=lambda s: (-s.rating, s.model))


def evaluation_metric(catalog: Catalog, model_id: str) -> str | None:
    """The model's scores on labelled data, as its folder's ``metrics.json`` holds them (a fine-tuned model's
    evaluation), e.g. ``"accuracy 0.750"``; None when it has none."""
    if model_id not in catalog:
        return None
    spec = catalog.get(model_id)
    if spec.source_scheme != "local-dir":
        return None
    path = Path(spec.source_location) / "metrics.json"
    try:
        scores = (json.loads(path.read_text(encoding="utf-8")).get("evaluation") or {}).get("new") or {}
    except (OSError, ValueError, AttributeError):
        return None
    shown = [f"{name} {value:.3f}" for name, value in scores.items()
             if isinstance(value, float) and not isinstance(value, bool)]
    return ", ".join(shown) or None


def table(standings: Iterable[Standing]) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows for a table (the Models panel, the CLI)."""
    headers = ["model", "rating", "95% CI", "win rate", "games", "W-T-L", "evaluation"]
    rows = [[s.model, s.rating, f"{s.low:.0f} to {s.high:.0f}", f"{s.win_rate:.0%}", s.games,
             f"{s.wins}-{s.ties}-{s.losses}", s.metric or "-"] for s in standings]
    return headers, rows


def format_table(standings: Sequence[Standing]) -> str:
    """A plain-text table for the CLI."""
    headers, rows = table(standings)
    cells = [headers, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[k]) for row in cells) for k in range(len(headers))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells)


__all__ = ["BASE_RATING", "Game", "Standing", "bradley_terry", "evaluation_metric", "format_table", "leaderboard",
           "table"]
