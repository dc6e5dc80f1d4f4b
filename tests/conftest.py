"""Shared fixtures: one set of tiny checkpoints per test session, settings and registries on tmp dirs.

Tiers: the default run uses the tiny random checkpoints of the real architectures (no network, no
GPU). ``--run-slow`` adds full-size model tests, ``--run-gpu`` CUDA tests.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from mmdemo.tasks import task_catalog  # noqa: E402
from mmdemo.config import Settings  # noqa: E402
from mmdemo.registry import ModelRegistry  # noqa: E402
from mmdemo.tasks import open_registry  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow (full-size models)")
    parser.addoption("--run-gpu", action="store_true", help="run tests marked gpu (needs CUDA)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Browser tests need Debian's chromium. On a developer's machine without it they are skipped with a
    # hint; under CI (CI=true) they run and fail, so a missing install step cannot pass unnoticed.
    if not Path("/usr/bin/chromium").exists() and not os.environ.get("CI"):
        skip = pytest.mark.skip(reason="needs Debian's chromium (apt-get install chromium)")
        for item in items:
            if "browser" in item.keywords:
                item.add_marker(skip)
    for marker, option in (("slow", "--run-slow"), ("gpu", "--run-gpu")):
        if config.getoption(option):
            continue
        skip = pytest.mark.skip(reason=f"needs {option}")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory whose tiny checkpoints are built once for the whole session."""
    from mmdemo.tasks import build_tiny_models

    data_dir = tmp_path_factory.mktemp("mmdemo-data")
    build_tiny_models(Settings(profile="tiny", data_dir=data_dir).tiny_dir)
    return data_dir


@pytest.fixture(scope="session")
def tiny_settings(tiny_data_dir: Path) -> Settings:
    return Settings(profile="tiny", data_dir=tiny_data_dir, device="cpu")


@pytest.fixture(scope="session")
def shared_registry(tiny_settings: Settings) -> ModelRegistry:
    """One registry for read-only task tests (models stay loaded across tests, as in the app)."""
    return open_registry(tiny_settings)


@pytest.fixture
def fresh_registry(tiny_settings: Settings):
    """A registry of its own, for tests that load, evict or swap models."""
    def make(**changes) -> ModelRegistry:
        settings = tiny_settings.replace(**changes)
        return open_registry(settings, task_catalog("tiny", settings.catalog))

    return make


@pytest.fixture(scope="session")
def samples(tmp_path_factory: pytest.TempPathFactory):
    """Folder of synthesised media files (see tests/media_samples.py)."""
    return tmp_path_factory.mktemp("samples")


# --- the web app: tests/test_app_api.py, tests/test_browser.py, tests/test_auth.py ---------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def launch_app(tiny_settings: Settings):
    """Launch the tiny-profile app on a free port: ``launch_app(**settings_changes)`` returns a namespace
    with ``url``, ``settings``, ``registry``, ``demo``, ``flush_records``, ``admin_link`` (what ``mmdemo serve``
    prints when there is no login file) and ``admin_client()`` (a new API client holding the admin cookie);
    every app closes at the end of the session."""
    from types import SimpleNamespace

    from mmdemo.server import build_app, launch

    apps = []

    def start(**changes) -> SimpleNamespace:
        settings = tiny_settings.replace(port=_free_port(), **changes)
        registry = open_registry(settings)
        demo = build_app(settings, registry)
        _, url, _ = launch(demo, settings, prevent_thread_lock=True, quiet=True)
        apps.append(demo)
        admin_link = url.rstrip("/") + demo.mmdemo_context.gate.admin_path()
        # Results are recorded in the background: flush_records() waits until every one so far is stored.
        return SimpleNamespace(url=url, settings=settings, registry=registry, demo=demo,
                               flush_records=demo.mmdemo_context.recorder.flush, admin_link=admin_link,
                               admin_client=lambda: admin_client(url, admin_link))

    yield start
    for demo in apps:
        demo.close()


def admin_client(url: str, admin_link: str):
    """An API client that opened the admin link (an app without a login file): it holds the admin cookie
    and a visitor cookie of its own."""
    import httpx
    from gradio_client import Client

    response = httpx.get(admin_link)
    assert response.status_code == 303, response.text
    return Client(url, verbose=False, httpx_kwargs={"cookies": dict(response.cookies)})


@pytest.fixture(scope="session")
def broken_catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user catalog adding ``broken-caption``: a captioner whose folder holds no model."""
    folder = tmp_path_factory.mktemp("broken-model")
    (folder / "config.json").write_text("{ this is not json")
    catalog = folder.parent / "broken-catalog.toml"
    catalog.write_text(
        '[models.broken-caption]\ntask = "image-to-text"\nkind = "blip"\n'
        f'source = "local-dir:{folder}"\ndescription = "A captioner whose files are damaged."\n'
    )
    return catalog


@pytest.fixture(scope="session")
def tiny_app(launch_app, broken_catalog: Path):
    """One tiny-profile app for the API and browser tests (with the broken model in its catalog)."""
    return launch_app(catalog=broken_catalog, max_batch=4)


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    """pytest-playwright: Debian's chromium, no network of its own (never `playwright install`)."""
    return {
        **browser_type_launch_args,
        "executable_path": "/usr/bin/chromium",
        "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"],
    }


@pytest.fixture(autouse=True)
def browser_contexts_closed(request):
    """A test leaves no browser context open in the session's Chromium (pytest-playwright's ``new_context``
    and ``page`` close theirs): an open page keeps polling its app (the fine-tuning panel's timer) and
    keeps a renderer busy for the rest of the session, which slowed CI from 12 to 22 minutes. Checked
    after the test's own fixtures are torn down; leftovers are closed, then reported."""
    yield
    if "browser" not in request.fixturenames:
        return
    left_open = request.getfixturevalue("browser").contexts
    for context in left_open:
        context.close()
    assert not left_open, (f"{len(left_open)} browser context(s) left open: open them with pytest-playwright's "
                           "new_context fixture (browser_util.sign_in takes it), which closes them")


LOGIN_USERS = {"alice": "admin", "bob": "annotator", "carol": "annotator"}  # password: pw-NAME


@pytest.fixture(scope="module")
def login_app(launch_app, tmp_path_factory):
    """The tiny app with a login (``LOGIN_USERS``: alice is an admin, bob and carol annotators; password
    ``pw-NAME``) and a feedback database of its own, one per test module."""
    from mmdemo.auth import add_user, hash_password

    folder = tmp_path_factory.mktemp("login-app")
    for name, role in LOGIN_USERS.items():
        add_user(folder / "auth.toml", name, role, hash_password(f"pw-{name}", cost=2**8))
    return launch_app(auth_file=folder / "auth.toml", database_url=f"sqlite:///{folder / 'feedback.db'}")


@pytest.fixture(scope="module")
def login_store(login_app):
    """``login_app``'s store as another process (``mmdemo export``) sees it."""
    from mmdemo.feedback import FeedbackStore

    with FeedbackStore.from_settings(login_app.settings) as store:
        yield store


try:  # Browser assertions wait up to 15 s, not Playwright's 5 s: a busy 2-core CI machine needs it at times.
    from playwright.sync_api import expect as _expect

    _expect.set_options(timeout=15_000)
except ImportError:  # no playwright: the browser tests are not collected
    pass


# --- a real PostgreSQL server (tests/pg.py), shared by the store tests -------------------------------------


@pytest.fixture(scope="session")
def pg_server():
    """A throwaway PostgreSQL server for the session; the tests that need it are skipped only where none
    can start (.ci/run installs PostgreSQL)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import pg

    try:
        server = pg.start_postgres(durable=False)
    except pg.PostgresUnavailable as exc:
        pytest.skip(f"no PostgreSQL server: {exc}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_database(pg_server):
    """One database on it; a test empties it first (``pg_server.reset_database(url)``)."""
    return pg_server.create_database()


@pytest.fixture(params=["sqlite", "postgres"])
def store_on_each_database(request, tmp_path):
    """A new feedback store on SQLite, then on PostgreSQL (emptied first), with its data dir in ``tmp_path``."""
    from mmdemo.feedback import FeedbackStore

    url = None
    if request.param == "postgres":
        url = request.getfixturevalue("pg_database")
        request.getfixturevalue("pg_server").reset_database(url)
    with FeedbackStore(url, tmp_path / "data") as store:
        yield store


@pytest.fixture(scope="module")
def torch_one_thread():
    """torch on one thread for a module (tiny models train faster so on two shared cores), then as before."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
