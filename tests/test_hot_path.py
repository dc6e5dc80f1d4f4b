"""The cost of one request on the tiny app: an API ``/caption`` call reads its upload three times (checked
before the queue, prepared for the model, recorded for feedback) and decodes it once."""

from __future__ import annotations

import sys
from pathlib import Path

from gradio_client import Client, handle_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_media import counting_decodes, new_photo  # noqa: E402

from mmdemo.feedback import FeedbackStore  # noqa: E402

CAT = Path(__file__).resolve().parents[1] / "assets" / "cat.jpg"


def test_an_api_caption_call_decodes_its_upload_once_and_records_it(tiny_app, tmp_path, monkeypatch):
    decoded = counting_decodes(monkeypatch)
    photo = new_photo(tmp_path, 1001)
    client = Client(tiny_app.url, verbose=False)
    *_, details = client.predict(handle_file(photo), "", model="tiny-blip-caption", max_new_tokens=3,
                                 api_name="/caption")
    tiny_app.flush_records()
    with FeedbackStore.from_settings(tiny_app.settings) as store:
        output = store.get_output(details["output_id"])
        assert len(output.input_media) == 1 and store.media_path(output.input_media[0]).is_file()
    assert decoded == [photo.stat().st_size]


# --- one predict-and-record path ----------------------------------------------------------------------------


def test_the_store_keeps_what_the_task_checked(shared_registry, tmp_path, monkeypatch):
    """predict(..., record=...) hands the store the validated request: inputs and settings as the task read them
    (labels split, the model's template, every setting the model ran with), the upload decoded once."""
    from mmdemo.tasks import predict

    decoded = counting_decodes(monkeypatch)
    photo = new_photo(tmp_path, 1002)
    with FeedbackStore(None, tmp_path / "data") as store:
        prediction = predict(shared_registry, "zero-shot", "tiny-siglip", {"image": photo, "labels": " cat,dog\nbird "},
                             record=store.record_prediction)
        output = store.get_output(prediction.output_id)
    assert prediction.result["output_id"] == prediction.output_id
    assert output.inputs == {"labels": ["cat", "dog", "bird"], "template": "This is a photo of {}."}
    assert output.settings == {"multi_label": False}
    assert output.model_id == "tiny-siglip" and len(output.input_media) == 1
    assert decoded == [photo.stat().st_size]


def test_a_caption_prefix_is_held_to_the_tasks_limit_before_anything_is_recorded(shared_registry, tmp_path):
    """One limit per input: the task's (a 600-character prefix is refused; the store once took 4,000)."""
    from mmdemo.errors import InvalidInputError
    from mmdemo.tasks import predict

    with FeedbackStore(None, tmp_path / "data") as store:
        try:
            predict(shared_registry, "caption", None, {"image": CAT, "prefix": "a" * 600},
                    record=store.record_prediction)
        except InvalidInputError as exc:
            assert exc.field == "prefix"
        else:
            raise AssertionError("a 600-character prefix was accepted")
        assert store.count() == 0


def test_mmdemo_predict_records_its_result_unless_told_not_to(tiny_settings, capsys):
    import json

    from mmdemo.cli import main

    common = ["--profile", "tiny", "--data-dir", str(tiny_settings.data_dir), "--device", "cpu"]
    assert main(["predict", "caption", "--input", str(CAT), "--max-new-tokens", "3", "--json", *common]) == 0
    output_id = json.loads(capsys.readouterr().out)["output_id"]
    with FeedbackStore.from_settings(tiny_settings) as store:
        recorded = store.get_output(output_id)
    assert recorded.task == "image-to-text" and recorded.settings["max_new_tokens"] == 3
    assert main(["predict", "caption", "--input", str(CAT), "--max-new-tokens", "3", "--no-record", *common]) == 0
    text = capsys.readouterr().out
    assert "recorded as output" not in text and text.strip()
