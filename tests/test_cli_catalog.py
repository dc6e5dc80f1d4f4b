"""The catalog as data, user catalog files, settings from the environment, and the ``mmdemo`` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from mmdemo.catalog import Catalog, ModelSpec, read_catalog_file
from mmdemo.tasks import builtin_models, task_catalog, task_ids, task_kinds
from mmdemo.cli import main
from mmdemo.config import Settings, parse_memory_budget
from mmdemo.errors import CatalogError, InvalidInputError, UnknownModelError


DEFAULT_MODELS = builtin_models()["default"]


def test_default_catalog_covers_every_task_with_hub_sources():
    catalog = task_catalog("default")
    for task in task_ids():
        assert catalog.for_task(task), task
    assert all(spec.source_scheme == "hf-hub" for spec in DEFAULT_MODELS)
    kinds = {spec.kind for spec in DEFAULT_MODELS}
    assert {"blip", "vilt", "clip", "siglip", "whisper", "faster-whisper", "diffusers"} <= kinds


def test_tiny_catalog_mirrors_every_task_offline():
    catalog = task_catalog("tiny")
    assert {spec.task for spec in catalog} == set(task_ids())
    assert all(spec.source_scheme == "tiny" for spec in catalog)


def test_duplicate_ids_are_rejected():
    spec = DEFAULT_MODELS[0]
    with pytest.raises(CatalogError, match="registered twice"):
        Catalog([spec, spec], kinds=task_kinds())


@pytest.mark.parametrize("changes, message", [
    ({"task": "image-segmentation"}, "unknown task"),
    ({"kind": "llama"}, "unknown kind"),
    ({"kind": "clip"}, "cannot serve"),
    ({"source": "https://example.com/model"}, "must start with"),
    ({"id": "has space"}, "without spaces"),
])
def test_bad_specs_are_refused(changes, message):
    fields = {"id": "m", "task": "image-to-text", "kind": "blip", "source": "hf-hub:org/m", **changes}
    with pytest.raises(CatalogError, match=message):
        Catalog([ModelSpec(**fields)], kinds=task_kinds())


def test_user_catalog_toml_adds_and_overrides(tmp_path):
    (tmp_path / "ckpt").mkdir()
    path = tmp_path / "models.toml"
    path.write_text(
        '[models.my-captioner]\ntask = "image-to-text"\nkind = "blip"\nsource = "local-dir:ckpt"\n'
        'description = "fine-tuned"\n\n'
        '[models.vilt-vqa]\ntask = "visual-question-answering"\nkind = "vilt"\n'
        'source = "hf-hub:dandelin/vilt-b32-finetuned-vqa"\nrevision = "abc1234"\n'
    )
    catalog = task_catalog("default", path)
    mine = catalog.get("my-captioner")
    assert mine.source == f"local-dir:{(tmp_path / 'ckpt').resolve()}"  # relative to the catalog file
    assert catalog.get("vilt-vqa").revision == "abc1234"
    assert len(catalog) == len(DEFAULT_MODELS) + 1


def test_user_catalog_yaml_list(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  - id: whisper-local\n    task: automatic-speech-recognition\n"
                    "    kind: faster-whisper\n    source: local-dir:/srv/ct2-whisper\n")
    (spec,) = read_catalog_file(path)
    assert Catalog([spec], kinds=task_kinds()).get("whisper-local").backend == "ctranslate2"  # the kind's backend


@pytest.mark.parametrize("text, message", [
    ("models = 3", "expected a 'models'"),
    ("[models.x]\ntask = 'image-to-text'\nkind = 'blip'\nsource = 'hf-hub:a/b'\ntrust_remote_code = true", "unknown keys"),
    ("[models.x\n", "not valid"),
])
def test_bad_catalog_files_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(CatalogError, match=message):
        read_catalog_file(path)


def test_unknown_model_lists_the_choices():
    with pytest.raises(UnknownModelError, match="Available: tiny-blip-caption"):
        task_catalog("tiny").get("nope", "image-to-text")


def test_settings_from_environment_and_flags(tmp_path):
    env = {"MMDEMO_PROFILE": "tiny", "MMDEMO_DATA_DIR": str(tmp_path), "MMDEMO_PORT": "8080",
           "MMDEMO_PRELOAD": "a, b", "MMDEMO_MAX_AUDIO_SECONDS": "30"}
    settings = Settings.from_env(env, port=9000, device=None)
    assert settings.profile == "tiny" and settings.data_dir == tmp_path
    assert settings.port == 9000 and settings.preload == ("a", "b") and settings.max_audio_seconds == 30.0
    with pytest.raises(InvalidInputError, match="not a number"):
        Settings.from_env({"MMDEMO_PORT": "eighty"})
    with pytest.raises(InvalidInputError, match="Unknown profile"):
        Settings(profile="huge")
    with pytest.raises(InvalidInputError, match="Unknown device"):
        Settings(device="tpu")


@pytest.mark.parametrize("value, total, expected", [
    ("20GiB", 0, 20 * 1024**3), ("512MB", 0, 512 * 1000**2), ("0.5", 1000, 500), ("auto", 1000, 900),
    (1024, 0, 1024),
])
def test_memory_budget_parsing(value, total, expected):
    assert parse_memory_budget(value, total) == expected


def test_memory_budget_refuses_nonsense():
    with pytest.raises(InvalidInputError, match="not understood"):
        parse_memory_budget("lots", 100)


# --- the command line -----------------------------------------------------------------------------


def test_cli_models_json(capsys, tiny_data_dir):
    assert main(["models", "--profile", "tiny", "--data-dir", str(tiny_data_dir), "--json"]) == 0
    models = json.loads(capsys.readouterr().out)
    assert {m["id"] for m in models} >= {"tiny-blip-caption", "tiny-faster-whisper"}


def test_cli_predict_caption_json(capsys, tiny_data_dir, tmp_path):
    image = tmp_path / "photo.png"
    Image.new("RGB", (32, 32), "green").save(image)
    code = main(["predict", "caption", "--profile", "tiny", "--data-dir", str(tiny_data_dir), "--device", "cpu",
                 "--input", str(image), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"]["id"] == "tiny-blip-caption" and isinstance(result["text"], str)


def test_cli_predict_text_to_image_writes_png_with_settings(capsys, tiny_data_dir, tmp_path):
    out = tmp_path / "out" / "bike.png"
    code = main(["predict", "text-to-image", "--profile", "tiny", "--data-dir", str(tiny_data_dir),
                 "--prompt", "a red bike", "--seed", "7", "--num-images", "2", "--out", str(out), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["seed"] == 7 and len(result["images"]) == 2
    with Image.open(result["images"][0]) as png:
        assert isinstance(png, PngImagePlugin.PngImageFile)
        assert json.loads(png.text["parameters"])["seed"] == 7


def test_cli_bad_input_is_a_message_and_exit_code_2(capsys, tiny_data_dir, tmp_path):
    bad = tmp_path / "not-an-image.jpg"
    bad.write_text("hello")
    code = main(["predict", "caption", "--profile", "tiny", "--data-dir", str(tiny_data_dir), "--input", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: The file is not an image") and "Traceback" not in err
    assert main(["predict", "vqa", "--profile", "tiny", "--data-dir", str(tiny_data_dir)]) == 2
    assert "needs --input" in capsys.readouterr().err


def test_python_dash_m_and_tiny_profile_make_no_network_request(tiny_data_dir, tmp_path):
    """``python -m mmdemo`` runs; with the tiny profile any socket to a non-local address fails loudly."""
    guard = tmp_path / "sitecustomize.py"
    guard.write_text(
        "import socket\n"
        "_connect = socket.socket.connect\n"
        "def connect(self, address):\n"
        "    host = address[0] if isinstance(address, tuple) else address\n"
        "    if isinstance(host, str) and not (host.startswith('127.') or host in ('localhost', '::1')\n"
        "                                      or host.startswith('/')):\n"
        "        raise SystemExit(f'NETWORK REQUEST to {address}')\n"
        "    return _connect(self, address)\n"
        "socket.socket.connect = connect\n"
    )
    audio = tmp_path / "tone.wav"
    import numpy as np
    import soundfile as sf

    t = np.arange(16000) / 16000
    sf.write(audio, 0.3 * np.sin(2 * np.pi * 440 * t), 16000)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "MMDEMO_"))}
    env.update(PYTHONPATH=f"{tmp_path}{os.pathsep}{Path(__file__).parents[1]}", MMDEMO_DATA_DIR=str(tiny_data_dir))
    completed = subprocess.run(
        [sys.executable, "-m", "mmdemo", "predict", "asr", "--profile", "tiny", "--input", str(audio), "--json"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "NETWORK REQUEST" not in completed.stdout + completed.stderr
    assert json.loads(completed.stdout)["model"]["id"] == "tiny-whisper"


def test_user_catalog_serves_local_transformers_and_ctranslate2_folders(capsys, tiny_data_dir, tmp_path):
    """A user's own checkpoints (saved with save_pretrained, or a CTranslate2 Whisper folder) run through
    the same CLI path as built-in models."""
    tiny = Settings(profile="tiny", data_dir=tiny_data_dir).tiny_dir
    catalog = tmp_path / "mine.toml"
    catalog.write_text(
        f'[models.my-blip]\ntask = "image-to-text"\nkind = "blip"\nsource = "local-dir:{tiny / "blip-caption"}"\n\n'
        f'[models.my-ct2-whisper]\ntask = "automatic-speech-recognition"\nkind = "faster-whisper"\n'
        f'source = "local-dir:{tiny / "whisper-ct2"}"\n'
    )
    image = tmp_path / "photo.png"
    Image.new("RGB", (32, 32), "green").save(image)
    common = ["--profile", "tiny", "--data-dir", str(tiny_data_dir), "--catalog", str(catalog), "--json"]
    assert main(["predict", "caption", "--model", "my-blip", "--input", str(image), *common]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["source"].startswith("local-dir:")

    import numpy as np
    import soundfile as sf

    audio = tmp_path / "tone.flac"
    sf.write(audio, 0.3 * np.sin(2 * np.pi * 440 * np.arange(24000) / 24000), 24000)
    assert main(["predict", "asr", "--model", "my-ct2-whisper", "--input", str(audio), *common]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["backend"] == "ctranslate2"


def test_cli_delete_removes_a_record_and_its_unshared_media(capsys, tmp_path):
    from mmdemo.feedback import FeedbackStore, RecordNotFoundError

    settings = Settings(profile="tiny", data_dir=tmp_path)
    image = tmp_path / "photo.png"
    Image.new("RGB", (16, 16), "purple").save(image)
    with FeedbackStore.from_settings(settings) as store:
        output_id = store.record_result("image-to-text", {"image": str(image)},
                                        {"text": "a purple square", "model": {"id": "tiny-blip-caption"}})
        saved = store.add_feedback(output_id, annotator="alice", correction="a purple tile")
        media_files = [p for p in (tmp_path / "media").rglob("*.png")]
        assert len(media_files) == 1
    assert main(["delete", "--data-dir", str(tmp_path), "--record", str(saved.id)]) == 0
    assert f"deleted record #{saved.id}" in capsys.readouterr().out
    with FeedbackStore.from_settings(settings) as store:
        with pytest.raises(RecordNotFoundError):
            store.get(saved.id)
    assert not media_files[0].exists()
    assert main(["delete", "--data-dir", str(tmp_path), "--record", str(saved.id)]) == 1
    assert f"error: There is no feedback record #{saved.id}." in capsys.readouterr().err
