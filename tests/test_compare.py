"""Compare mode: the Bradley-Terry leaderboard on known votes, the comparisons table on SQLite and PostgreSQL,
and ``/<task>_compare`` + ``/vote`` through the API (blind sides drawn by the server, typed refusals)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import ValidationError

from mmdemo.feedback import FeedbackStore, UnknownOutputError
from mmdemo.feedback.comparisons import ComparisonStore, InvalidVoteError, UnknownComparisonError
from mmdemo.feedback.leaderboard import bradley_terry, leaderboard

ROOT = Path(__file__).resolve().parents[1]
CAT = ROOT / "assets" / "cat.jpg"


# --- the rating ------------------------------------------------------------------------------------------


def synthetic_games(seed: int = 1, count: int = 600) -> list[tuple[str, str, float]]:
    """Votes between three models of known strength (odds of winning 4:2:1), a tenth of them ties."""
    strength = {"strong": 4.0, "middle": 2.0, "weak": 1.0}
    rng = random.Random(seed)
    games = []
    for _ in range(count):
        first, second = rng.sample(sorted(strength), 2)
        if rng.random() < 0.1:
            games.append((first, second, 0.5))
        else:
            wins = rng.random() < strength[first] / (strength[first] + strength[second])
            games.append((first, second, 1.0 if wins else 0.0))
    return games


def test_the_stronger_model_ranks_first_and_the_intervals_cover_the_true_gaps():
    games = synthetic_games()
    board = leaderboard(games, seed=3, rounds=100)
    assert [s.model for s in board] == ["strong", "middle", "weak"]
    assert sum(s.games for s in board) == 2 * len(games)
    for standing in board:
        assert standing.low <= standing.rating <= standing.high
        assert standing.wins + standing.ties + standing.losses == standing.games
    rating = {s.model: s for s in board}
    # the true gap between neighbours: log(2) in log-odds = 400*log10(2) ~ 120 Elo points
    true_gap = 400 * 0.30103
    gap = rating["strong"].rating - rating["weak"].rating
    assert abs(gap - 2 * true_gap) < 60
    assert rating["strong"].win_rate > rating["middle"].win_rate > rating["weak"].win_rate


def test_the_bootstrap_is_deterministic_under_its_seed_and_moves_with_it():
    games = synthetic_games(count=120)
    assert leaderboard(games, seed=7, rounds=50) == leaderboard(games, seed=7, rounds=50)
    assert leaderboard(games, seed=7, rounds=50) != leaderboard(games, seed=8, rounds=50)


def test_a_model_that_never_won_has_a_finite_rating_below_the_other():
    ratings = bradley_terry([("a", "b", 1.0)] * 5, ["a", "b"])
    assert ratings[0] > ratings[1] and all(abs(r) < 1e4 for r in ratings)
    assert leaderboard([]) == []


# --- the store (SQLite and PostgreSQL) ---------------------------------------------------------------------


def two_outputs(store: FeedbackStore, task: str = "visual-question-answering") -> tuple[str, str]:
    inputs = {"image": CAT, "question": "what is it?"}
    return tuple(store.record_output(task, inputs=inputs, output={"answer": answer, "model": {"id": model}})
                 for model, answer in (("tiny-vilt-vqa", "cat"), ("tiny-blip-vqa", "dog")))


def test_a_comparison_round_trip_one_vote_per_voter(store_on_each_database):
    store = store_on_each_database
    comparisons = ComparisonStore(store)
    first, second = two_outputs(store)
    shown = comparisons.create("visual-question-answering", first, second, created_by="alice", swapped=True)
    assert (shown.output_a, shown.output_b, shown.model_a, shown.model_b) == (second, first, "tiny-blip-vqa",
                                                                               "tiny-vilt-vqa")
    voted = comparisons.vote(shown.id, "alice", "A")
    assert (voted.choice, voted.winner) == ("a", "tiny-blip-vqa")
    assert comparisons.vote(shown.id, "alice", "both bad").choice == "both_bad"  # a second vote replaces it
    comparisons.vote(shown.id.upper(), "bob", "b")
    assert comparisons.get(shown.id, "alice").choice == "both_bad"
    votes = list(comparisons.votes("visual-question-answering"))
    assert [(v.voter, v.label, v.chosen, v.rejected) for v in votes] == [
        ("alice", "both_bad", None, None), ("bob", "b", first, second)]
    assert comparisons.games("visual-question-answering") == [("tiny-blip-vqa", "tiny-vilt-vqa", 0.5),
                                        ("tiny-blip-vqa", "tiny-vilt-vqa", 0.0)]
    assert list(comparisons.votes("image-to-text")) == []

    with pytest.raises(UnknownComparisonError):
        comparisons.vote("0" * 32, "alice", "a")
    with pytest.raises(UnknownComparisonError):
        comparisons.get("not an id")
    with pytest.raises(InvalidVoteError):
        comparisons.vote(shown.id, "alice", "c")
    with pytest.raises(UnknownOutputError):
        comparisons.create("visual-question-answering", first, "f" * 32)
    with pytest.raises(ValueError, match="two different models"):
        comparisons.create("visual-question-answering", first, first)

    # deleting an output (data-subject request) takes its comparisons and votes with it
    store.delete_output(first, actor_role="admin")
    with pytest.raises(UnknownComparisonError):
        comparisons.get(shown.id)
    assert list(comparisons.votes()) == []


def test_the_server_draws_the_sides(store_on_each_database):
    comparisons = ComparisonStore(store_on_each_database)
    first, second = two_outputs(store_on_each_database)
    sides = {comparisons.create("visual-question-answering", first, second).swapped for _ in range(40)}
    assert sides == {True, False}  # 2**-39 odds of a false failure


# --- the API ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(launch_app, tiny_settings, tmp_path_factory):
    """The tiny app with a second captioner and a second Stable Diffusion (the same tiny files) in its catalog."""
    folder = tmp_path_factory.mktemp("compare")
    catalog = folder / "catalog.toml"
    tiny = tiny_settings.tiny_dir
    catalog.write_text(
        f'[models.caption-twin]\ntask = "image-to-text"\nkind = "blip"\nsource = "local-dir:{tiny / "blip-caption"}"\n'
        f'[models.sd-twin]\ntask = "text-to-image"\nkind = "diffusers"\n'
        f'source = "local-dir:{tiny / "stable-diffusion"}"\n'
        'defaults = { steps = 2, guidance = 5.0, width = 64, height = 64 }\n')
    return launch_app(catalog=catalog, database_url=f"sqlite:///{folder / 'feedback.db'}")


@pytest.fixture(scope="module")
def client(app) -> Client:
    return Client(app.url, verbose=False)


def caption_compare(client: Client, model_a: str = "tiny-blip-caption", model_b: str = "caption-twin", **changes):
    arguments = dict(image=handle_file(CAT), prefix="", model_a=model_a, model_b=model_b, max_new_tokens=5)
    return client.predict(**{**arguments, **changes}, api_name="/caption_compare")


def test_caption_compare_then_vote_reveals_the_names(app, client):
    compare_id, caption_a, caption_b = caption_compare(client)
    assert len(compare_id) == 32 and isinstance(caption_a, str) and isinstance(caption_b, str)
    app.flush_records()
    with FeedbackStore.from_settings(app.settings) as store:
        stored = ComparisonStore(store).get(compare_id)
        answers = [store.get_output(output_id).output["text"] for output_id in stored.outputs]
    assert [caption_a, caption_b] == answers  # shown in the stored order
    revealed = client.predict(compare_id, "b", api_name="/vote")
    assert {revealed["A"], revealed["B"]} == {"tiny-blip-caption", "caption-twin"}
    assert revealed["winner"] == revealed["B"] == stored.model_b


def test_the_sides_are_blind_and_not_the_clients_to_choose(app, client):
    seen = {caption_compare(client)[0] for _ in range(8)}
    with FeedbackStore.from_settings(app.settings) as store:
        swapped = {ComparisonStore(store).get(compare_id).swapped for compare_id in seen}
    assert swapped == {True, False}  # the same pair, each model on both sides (2**-7 odds of a false failure)


def test_text_to_image_compare_uses_one_seed_and_settings_for_both(app, client):
    compare_id, gallery_a, seed_a, gallery_b, seed_b = client.predict(
        prompt="a red bicycle", negative_prompt="", model_a="tiny-stable-diffusion", model_b="sd-twin", steps=2,
        guidance=5.0, width=64, height=64, num_images=1, seed=0, randomize_seed=True, api_name="/text_to_image_compare")
    assert seed_a == seed_b and len(gallery_a) == len(gallery_b) == 1
    app.flush_records()
    with FeedbackStore.from_settings(app.settings) as store:
        outputs = [store.get_output(i) for i in ComparisonStore(store).get(compare_id).outputs]
    assert outputs[0].settings == outputs[1].settings and outputs[0].settings["seed"] == seed_a
    assert {o.model_id for o in outputs} == {"tiny-stable-diffusion", "sd-twin"}
    # the same weights, the same seed and settings: the same picture on both sides
    assert outputs[0].output_media == outputs[1].output_media


@pytest.mark.parametrize("changes, message", [
    (dict(model_b="tiny-blip-caption"), "two different models"),
    (dict(model_b="tiny-vilt-vqa"), "serves visual-question-answering"),
    (dict(model_a="no-such-model"), "Unknown model"),
    (dict(image=None), "add an image"),
    (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_bad_comparisons_are_refused_before_queueing(client, changes, message):
    with pytest.raises(ValidationError, match=message):
        caption_compare(client, **changes)


@pytest.mark.parametrize("compare_id, choice, message", [
    ("0" * 32, "a", "Unknown comparison"),
    ("nonsense", "a", "Unknown comparison"),
    (None, "tie", "Unknown comparison"),
])
def test_bad_votes_are_refused_before_queueing(client, compare_id, choice, message):
    with pytest.raises(ValidationError, match=message):
        client.predict(compare_id, choice, api_name="/vote")


def test_a_bad_choice_is_refused_before_queueing(client):
    compare_id = caption_compare(client)[0]
    with pytest.raises(ValidationError, match="A vote is one of"):
        client.predict(compare_id, "c", api_name="/vote")


def test_the_export_holds_the_preference_pair_and_keeps_ties_without_one(store_on_each_database, tmp_path):
    import json

    from mmdemo.feedback import export_dataset

    store = store_on_each_database
    comparisons = ComparisonStore(store)
    first, second = two_outputs(store)
    shown = comparisons.create("visual-question-answering", first, second, swapped=False)
    comparisons.vote(shown.id, "alice", "b")
    comparisons.vote(shown.id, "bob", "tie")
    summary = export_dataset(store, "visual-question-answering", tmp_path / "out", format="jsonl")
    assert (summary.records, summary.preferences) == (0, 2)  # votes alone make an export
    rows = [json.loads(line) for line in (tmp_path / "out" / "preferences" / "train.jsonl").read_text().splitlines()]
    pair, tie = rows
    assert (pair["label"], pair["voter"], pair["inputs"]["question"]) == ("b", "alice", "what is it?")
    assert (pair["chosen"]["output"]["answer"], pair["rejected"]["output"]["answer"]) == ("dog", "cat")
    assert (pair["chosen"]["model_id"], pair["rejected"]["model_id"]) == ("tiny-blip-vqa", "tiny-vilt-vqa")
    assert (tmp_path / "out" / "preferences" / pair["input_media"][0]).is_file()
    assert (tie["label"], tie["chosen"], tie["rejected"]) == ("tie", None, None)
    assert "Blind votes" in (tmp_path / "out" / "README.md").read_text()


def test_the_leaderboard_endpoint_and_the_cli_rank_the_voted_models(app, client, capsys):
    import json

    from mmdemo.cli import main

    compare_id = caption_compare(client)[0]
    revealed = client.predict(compare_id, "a", api_name="/vote")
    plot, table = client.predict("image-to-text", api_name="/leaderboard")
    assert "<svg" in plot and revealed["winner"] in plot
    assert {row[0] for row in table["data"]} == {"tiny-blip-caption", "caption-twin"}

    settings = app.settings
    assert main(["leaderboard", "--task", "caption", "--profile", "tiny", "--data-dir", str(settings.data_dir),
                 "--catalog", str(settings.catalog), "--database-url", settings.database_url, "--json"]) == 0
    board = json.loads(capsys.readouterr().out)
    assert board["task"] == "image-to-text" and board["votes"] >= 1
    assert {m["model"] for m in board["models"]} == {"tiny-blip-caption", "caption-twin"}
    assert all(m["low"] <= m["rating"] <= m["high"] for m in board["models"])


def test_the_compare_endpoint_takes_the_task_inputs_with_two_models(client):
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    names = [p["parameter_name"] for p in api["/vqa_compare"]["parameters"]]
    assert names[:4] == ["image", "question", "model_a", "model_b"]
    assert [p["parameter_name"] for p in api["/vote"]["parameters"]] == ["compare_id", "choice"]


SPEECH = ROOT / "assets" / "speech.wav"


@pytest.mark.parametrize("endpoint, arguments, models", [
    ("/vqa_compare", dict(image=handle_file(CAT), question="what is it?"), ("tiny-vilt-vqa", "tiny-blip-vqa")),
    ("/zero_shot_compare", dict(image=handle_file(CAT), labels="cat, dog"), ("tiny-clip", "tiny-siglip")),
    ("/transcribe_compare", dict(audio=handle_file(SPEECH)), ("tiny-whisper", "tiny-faster-whisper")),
    ("/detect_compare", dict(image=handle_file(CAT), queries="cat", threshold=0.1, max_boxes=5),
     ("tiny-owlv2", "tiny-owlvit")),
])
def test_every_task_compares_through_its_own_outputs(app, client, endpoint, arguments, models):
    result = client.predict(**arguments, model_a=models[0], model_b=models[1], api_name=endpoint)
    compare_id, sides = result[0], result[1:]
    assert len(sides) % 2 == 0 and len(sides) >= 2  # the tab's outputs, once for A and once for B
    assert set(client.predict(compare_id, "tie", api_name="/vote").values()) >= set(models)
