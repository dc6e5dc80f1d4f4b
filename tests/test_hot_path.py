"""The cost of one request on the tiny app: an API ``/caption`` call reads its upload three times (checked
before the queue, prepared for the model, recorded for feedback) and decodes it once."""

from __future__ import annotations

import sys
from pathlib import Path

from gradio_client import Client, handle_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_media import counting_decodes, new_photo  # noqa: E402

from mmdemo.feedback import FeedbackStore  # noqa: E402


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
