"""Login: scrypt hashes, the auth file, the helper command, roles in the app, and who may manage
models when there is no login."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from mmdemo.auth import AuthFile, AuthFileError, add_user, hash_password, verify_password
from mmdemo.config import Settings
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


# --- without a login: the admin link, never the peer address ------------------------------------------------


@pytest.mark.parametrize("host, root_path", [("127.0.0.1", ""), ("localhost", ""), ("::1", ""), ("0.0.0.0", ""),
                                             ("127.0.0.1", "/mmdemo")])
def test_without_login_the_listen_address_never_makes_an_admin(tiny_settings, host, root_path):
    from mmdemo.ui.common import AppContext

    ctx = AppContext.create(tiny_settings.replace(host=host, root_path=root_path))
    assert ctx.role_of(None) is None
    with pytest.raises(Exception, match="open the admin link"):
        ctx.require_admin(None)


def test_on_a_space_without_login_nobody_manages_models(tiny_settings, monkeypatch):
    from mmdemo.ui.common import AppContext

    monkeypatch.delenv("MMDEMO_HOST", raising=False)
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")  # what a Hugging Face Space sets
    assert AppContext.create(tiny_settings).role_of(None) is None


def test_a_visitor_through_a_tunnel_or_proxy_on_loopback_is_not_an_admin(tiny_app):
    """The app listens on 127.0.0.1; a reverse proxy, an ssh tunnel or another local user reaches it from
    loopback too. Only the admin link makes an admin."""
    tiny_app.registry.unload("tiny-clip")  # the app is shared: an earlier test may have loaded it
    for headers in ({}, {"X-Forwarded-For": "203.0.113.7"}):
        visitor = Client(tiny_app.url, verbose=False, headers=headers)
        assert "Read-only" in visitor.predict(api_name="/models_status")[0]
        with pytest.raises(AppError, match="Only admins can load or unload models"):
            visitor.predict("tiny-clip", api_name="/preload_model")
        with pytest.raises(AppError, match="Only admins can export feedback"):
            visitor.predict("image-to-text", "jsonl", "all", api_name="/export_feedback")
    assert not tiny_app.registry.is_loaded("tiny-clip")
    assert httpx.get(tiny_app.url + "admin-login?token=guess").status_code == 403
    forged = {"mmdemo-admin": "admin.9999999999." + "0" * 32}
    assert "Read-only" in Client(tiny_app.url, verbose=False, httpx_kwargs={"cookies": forged}).predict(
        api_name="/models_status")[0]


def test_the_admin_link_makes_an_admin(tiny_app):
    admin = tiny_app.admin_client()
    assert "You are an admin here" in admin.predict(api_name="/models_status")[0]
    message, *_ = admin.predict("tiny-clip", api_name="/unload_model")
    assert message in ("tiny-clip was not loaded.", "tiny-clip is unloaded.")


def test_signed_values_and_the_admin_token():
    from mmdemo.security import Signer

    signer = Signer()
    token = signer.sign("visitor", "abc", 60)
    assert signer.unsign("visitor", token) == "abc"
    assert signer.unsign("admin", token) is None  # signed for another purpose
    assert signer.unsign("visitor", token.replace("abc", "abd")) is None
    assert signer.unsign("visitor", signer.sign("visitor", "abc", -1)) is None  # expired
    assert Signer().admin_token != signer.admin_token  # a new secret at each start...
    assert Signer("shared").admin_token == Signer("shared").admin_token  # ...unless MMDEMO_SECRET is set


# --- the client address and login back-off ------------------------------------------------------------------


def test_x_forwarded_for_counts_only_from_a_trusted_proxy():
    from mmdemo.security import client_address, trusted_networks

    assert client_address("127.0.0.1", "203.0.113.7", ()) == "127.0.0.1"  # anyone can write the header
    proxies = trusted_networks(["127.0.0.1", "10.0.0.0/8"])
    assert client_address("127.0.0.1", "203.0.113.7", proxies) == "203.0.113.7"
    assert client_address("127.0.0.1", "198.51.100.1, 203.0.113.7, 10.1.2.3", proxies) == "203.0.113.7"
    assert client_address("192.0.2.1", "203.0.113.7", proxies) == "192.0.2.1"  # not a proxy of ours
    with pytest.raises(InvalidInputError, match="not an IP address or network"):
        Settings(trusted_proxies="proxy.example")


def test_the_throttle_backs_off_per_user_and_address():
    from mmdemo.security import LoginThrottle

    now = [0.0]
    throttle = LoginThrottle(free_failures=3, max_wait_s=60, clock=lambda: now[0])
    for _ in range(3):
        assert throttle.wait_s("alice", "1.2.3.4") == 0
        throttle.failed("alice", "1.2.3.4")
    assert throttle.wait_s("alice", "1.2.3.4") == 1.0
    throttle.failed("alice", "1.2.3.4")
    assert throttle.wait_s("alice", "1.2.3.4") == 2.0  # doubles
    assert throttle.wait_s("alice", "5.6.7.8") == 0 and throttle.wait_s("bob", "1.2.3.4") == 0
    now[0] = 2.0
    assert throttle.wait_s("alice", "1.2.3.4") == 0
    throttle.succeeded("alice", "1.2.3.4")
    throttle.failed("alice", "1.2.3.4")
    assert throttle.wait_s("alice", "1.2.3.4") == 0  # a success cleared the count
    for _ in range(40):
        throttle.failed("eve", "1.2.3.4")
    assert throttle.wait_s("eve", "1.2.3.4") == 60  # capped


@pytest.fixture(scope="module")
def proxied_app(launch_app, tmp_path_factory):
    """An app with a login behind a trusted proxy on 127.0.0.1 (the tests set X-Forwarded-For); dave's hash
    has the default scrypt cost (~50 ms a check)."""
    path = write_users(tmp_path_factory.mktemp("proxied") / "auth.toml", alice=("admin", "pw-a"))
    add_user(path, "dave", "annotator", hash_password("pw-d"))
    return launch_app(auth_file=path, trusted_proxies=("127.0.0.1",))


def login(app, user: str, password: str, address: str) -> httpx.Response:
    return httpx.post(app.url + "login", data={"username": user, "password": password},
                      headers={"X-Forwarded-For": address}, timeout=60)


def test_failed_logins_are_slowed_per_user_and_address_and_logged(proxied_app, caplog):
    caplog.set_level("WARNING", logger="mmdemo.security")
    answers = [login(proxied_app, "alice", f"guess-{i}", "203.0.113.7") for i in range(30)]
    assert [a.status_code for a in answers[:5]] == [400] * 5  # wrong, and a few tries are free
    refused = [a for a in answers[5:] if a.status_code == 429]
    assert len(refused) >= 20 and all(int(a.headers["Retry-After"]) >= 1 for a in refused)
    assert "Too many failed logins" in refused[0].json()["detail"]
    # the right password from the same address must wait too; from elsewhere it works: no lockout by others
    assert login(proxied_app, "alice", "pw-a", "203.0.113.7").status_code == 429
    assert login(proxied_app, "alice", "pw-a", "198.51.100.9").status_code == 200
    assert any("failed login for user 'alice' from 203.0.113.7" in r.getMessage() for r in caplog.records)
    assert any("login refused: user 'alice' from 203.0.113.7" in r.getMessage() for r in caplog.records)


def test_x_forwarded_for_from_an_untrusted_peer_does_not_escape_the_back_off(auth_app):
    """auth_app trusts no proxy: a new X-Forwarded-For per attempt is still the same client (the peer)."""
    codes = [login(auth_app, "bob", "wrong", f"192.0.2.{i}").status_code for i in range(10)]
    assert codes[:5] == [400] * 5 and 429 in codes[5:]
    assert login(auth_app, "alice", "pw-a", "192.0.2.99").status_code == 200  # another user is not affected


def test_password_checks_run_off_the_event_loop(proxied_app):
    """A flood of wrong passwords (each a 50 ms scrypt check, from many addresses so none is throttled yet)
    leaves the app answering other requests quickly."""
    from concurrent.futures import ThreadPoolExecutor

    def slowest_of(pings: int) -> float:
        times = []
        with httpx.Client(base_url=proxied_app.url, timeout=60) as client:
            for _ in range(pings):
                start = time.perf_counter()
                assert client.get("gradio_api/user").status_code == 200  # answered on the event loop
                times.append(time.perf_counter() - start)
        return sorted(times)[int(0.9 * pings)]

    quiet = slowest_of(30)
    with ThreadPoolExecutor(8) as pool:
        flood = [pool.submit(login, proxied_app, "dave", f"guess-{i}", f"10.9.{i // 4}.{i % 4}") for i in range(64)]
        busy = slowest_of(30)
        assert all(f.result().status_code == 400 for f in flood)
    assert busy < 0.1 + 3 * quiet, f"requests took {busy * 1000:.0f} ms during the flood, {quiet * 1000:.0f} ms before"
