"""Login: scrypt hashes, the auth file, the helper command, roles in the app, and who may manage
models when there is no login."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from mmdemo.auth import AuthFile, AuthFileError, add_user, hash_password, verify_password
from mmdemo.errors import InvalidInputError

FAST = 2**8  # scrypt cost for tests (the default, 2**14, takes ~50 ms per hash)


def test_hash_round_trip_and_salt():
    first, second = hash_password("s3cret!", cost=FAST), hash_password("s3cret!", cost=FAST)
    assert first != second and first.startswith("scrypt$256$8$1$")  # a fresh salt each time
    assert verify_password("s3cret!", first) and verify_password("s3cret!", second)
    assert not verify_password("s3cret", first) and not verify_password("", first)
    assert "s3cret" not in first


@pytest.mark.parametrize("bad", ["plain-password", "scrypt$1000$8$1$AAAA$BBBB", "scrypt$256$8$1$@@@$BBBB",
                                 "pbkdf2$1$2$3$4$5"])
def test_damaged_hashes_are_refused_with_a_hint(bad):
    with pytest.raises(InvalidInputError, match="password_hash"):
        verify_password("x", bad)


def write_users(path: Path, **users: tuple[str, str]) -> Path:
    for name, (role, password) in users.items():
        add_user(path, name, role, hash_password(password, cost=FAST))
    return path


def test_auth_file_check_and_roles(tmp_path):
    auth = AuthFile.load(write_users(tmp_path / "auth.toml", alice=("admin", "pw-a"), bob=("annotator", "pw-b")))
    assert auth.check("alice", "pw-a") and auth.check("bob", "pw-b")
    assert not auth.check("alice", "pw-b") and not auth.check("carol", "pw-a")
    assert auth.role_of("alice") == "admin" and auth.role_of("bob") == "annotator" and auth.role_of(None) is None
    assert (tmp_path / "auth.toml").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("text, message", [
    ("[users.eve]\nrole = 'admin'\npassword = 'hunter2'\n", "never the password"),
    ("[users.eve]\nrole = 'boss'\npassword_hash = 'x'\n", "role must be one of admin, annotator"),
    ("[users.eve]\nrole = 'admin'\npassword_hash = 'x'\n", "python -m mmdemo.auth hash"),
    ("title = 'no users'\n", "no [users.NAME] tables"),
    ("[users\n", "not valid TOML"),
])
def test_malformed_auth_files_are_explained(tmp_path, text, message):
    path = tmp_path / "auth.toml"
    path.write_text(text)
    with pytest.raises(AuthFileError, match=message.replace("[", r"\[").replace(".", r"\.")):
        AuthFile.load(path)


def test_missing_auth_file(tmp_path):
    with pytest.raises(AuthFileError, match="Cannot read the auth file"):
        AuthFile.load(tmp_path / "nope.toml")


def test_the_helper_command_hashes_and_adds_users(tmp_path):
    run = [sys.executable, "-m", "mmdemo.auth"]
    out = subprocess.run([*run, "hash", "--password-stdin", "--cost", str(FAST)], input="pw\n", capture_output=True,
                         text=True, check=True)
    assert verify_password("pw", out.stdout.strip())
    path = tmp_path / "users.toml"
    subprocess.run([*run, "add", str(path), "dana", "--role", "admin", "--password-stdin", "--cost", str(FAST)],
                   input="pw2\n", capture_output=True, text=True, check=True)
    assert AuthFile.load(path).check("dana", "pw2")


# --- in the app ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_app(launch_app, tmp_path_factory):
    path = write_users(tmp_path_factory.mktemp("auth") / "auth.toml", alice=("admin", "pw-a"),
                       bob=("annotator", "pw-b"))
    return launch_app(auth_file=path)


def test_the_app_asks_for_a_login(auth_app):
    assert httpx.get(auth_app.url + "config").status_code in (401, 403)
    with pytest.raises(Exception):
        Client(auth_app.url, auth=("bob", "wrong"), verbose=False)


def test_an_annotator_uses_the_tabs_but_cannot_manage_models(auth_app):
    client = Client(auth_app.url, auth=("bob", "pw-b"), verbose=False)
    assert client.predict(api_name="/models_status")[0].count("admin role")
    with pytest.raises(AppError, match="Only admins can load or unload models"):
        client.predict("tiny-clip", api_name="/preload_model")
    with pytest.raises(AppError, match="Only admins"):
        client.predict("tiny-clip", api_name="/unload_model")
    assert not auth_app.registry.is_loaded("tiny-clip")


def test_an_admin_preloads_and_unloads(auth_app):
    client = Client(auth_app.url, auth=("alice", "pw-a"), verbose=False)
    message, _, table = client.predict("tiny-clip", api_name="/preload_model")
    assert message == "tiny-clip is loaded." and auth_app.registry.is_loaded("tiny-clip")
    assert ["tiny-clip", "loaded", "zero-shot-image-classification"] in [row[:3] for row in table["data"]]
    message, *_ = client.predict("tiny-clip", api_name="/unload_model")
    assert message == "tiny-clip is unloaded." and not auth_app.registry.is_loaded("tiny-clip")


# --- without a login ------------------------------------------------------------------------------------


@pytest.mark.parametrize("host, root_path, allowed", [
    ("127.0.0.1", "", True), ("localhost", "", True), ("::1", "", True),
    ("0.0.0.0", "", False), ("192.168.1.20", "", False), ("127.0.0.1", "/mmdemo", False),
])
def test_without_login_only_a_local_only_app_lets_people_manage_models(tiny_settings, host, root_path, allowed):
    from mmdemo.ui.common import AppContext

    ctx = AppContext.create(tiny_settings.replace(host=host, root_path=root_path))
    assert ctx.open_admin is allowed and (ctx.role_of(None) == "admin") is allowed
    if not allowed:
        with pytest.raises(Exception, match="MMDEMO_AUTH_FILE"):
            ctx.require_admin(None)


def test_on_a_space_without_login_nobody_manages_models(tiny_settings, monkeypatch):
    from mmdemo.ui.common import AppContext

    monkeypatch.delenv("MMDEMO_HOST", raising=False)
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")  # what a Hugging Face Space sets
    assert not AppContext.create(tiny_settings).open_admin
