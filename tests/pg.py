"""A throwaway PostgreSQL server for tests and benchmarks, or the one CI names.

>>> server = start_postgres()           # initdb + pg_ctl in a temporary folder, 127.0.0.1, a free port
>>> url = server.create_database()      # a fresh, empty database: postgresql+psycopg://...
>>> server.stop()                       # stops the server and removes its folder

``MMDEMO_TEST_POSTGRES_URL`` (a server CI already started; the user must be allowed to create
databases) is used instead when set. Otherwise the server binaries are looked up in ``PG_BIN``,
``pg_config --bindir``, ``/usr/lib/postgresql/<version>/bin`` and ``PATH``. ``initdb`` refuses to
run as root, so as root the server runs as the ``postgres`` user (or ``nobody``), through ``runuser``
or ``setpriv``. :class:`PostgresUnavailable` says why no server could be had; tests skip on it.

Also a command: ``python tests/pg.py`` starts a server, prints its URL and waits for Ctrl-C.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

URL_VARIABLE = "MMDEMO_TEST_POSTGRES_URL"
_SUPERUSER = "mmdemo"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server could be started or reached; the message says why."""


@dataclass
class PostgresServer:
    """A running server: ``url`` names its maintenance database; ``stop`` ends a server we started."""

    url: str
    data_dir: Path | None = None            # None: a server we did not start
    bin_dir: Path | None = None
    run_as: list[str] = field(default_factory=list)
    databases: list[str] = field(default_factory=list)

    def create_database(self, prefix: str = "mmdemo_test") -> str:
        """Create an empty database and return its SQLAlchemy URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        self._admin(f'CREATE DATABASE "{name}"')
        self.databases.append(name)
        return _with_database(self.url, name)

    def reset_database(self, url: str) -> None:
        """Empty a database created here (drop and recreate its ``public`` schema): faster than a new one."""
        import psycopg

        with psycopg.connect(_libpq_url(url), autocommit=True, connect_timeout=10) as conn:
            conn.execute("DROP SCHEMA public CASCADE")
            conn.execute("CREATE SCHEMA public")

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[-1].split("?")[0]
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if name in self.databases:
            self.databases.remove(name)

    def stop(self) -> None:
        if self.data_dir is None:
            for name in list(self.databases):
                try:
                    self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                except Exception:
                    pass
            return
        if self.data_dir.exists():
            subprocess.run([*self.run_as, str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir / "data"),
                            "-m", "immediate", "-w", "stop"], capture_output=True, timeout=60)
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(_libpq_url(self.url), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql)


def start_postgres(*, durable: bool = True, max_connections: int = 200) -> PostgresServer:
    """A server to test against: the one ``MMDEMO_TEST_POSTGRES_URL`` names, or a fresh local one.

    ``durable=False`` turns fsync off (faster, for tests that do not measure anything).
    Raises :class:`PostgresUnavailable` with the reason when neither works.
    """
    if os.environ.get(URL_VARIABLE):
        server = PostgresServer(url=_sqlalchemy_url(os.environ[URL_VARIABLE]))
        try:
            server._admin("SELECT 1")
        except Exception as exc:
            raise PostgresUnavailable(f"{URL_VARIABLE} is set but the server does not answer: {exc}") from exc
        return server
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise PostgresUnavailable("no PostgreSQL server binaries (initdb, pg_ctl) were found")
    run_as, owner = _unprivileged()
    last_error = ""
    for _ in range(3):  # a port taken between choosing and binding: try another
        base = Path(tempfile.mkdtemp(prefix="mmdemo-pg-"))
        try:
            if owner is not None:
                os.chown(base, owner.pw_uid, owner.pw_gid)
            _run([*run_as, str(bin_dir / "initdb"), "-D", str(base / "data"), "-U", _SUPERUSER,
                  "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"], "initdb")
            port = _free_port()
            options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c max_connections={max_connections}"
                       f" -c fsync={'on' if durable else 'off'}"
                       f" -c synchronous_commit={'on' if durable else 'off'}"
                       f" -c full_page_writes={'on' if durable else 'off'}")
            _run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(base / "data"), "-l", str(base / "server.log"),
                  "-o", options, "-w", "-t", "30", "start"], "pg_ctl start")
            server = PostgresServer(url=f"postgresql+psycopg://{_SUPERUSER}@127.0.0.1:{port}/postgres",
                                    data_dir=base, bin_dir=bin_dir, run_as=run_as)
            atexit.register(server.stop)
            server._admin("SELECT 1")
            return server
        except Exception as exc:
            log = base / "server.log"
            last_error = f"{exc}" + (f"\n{log.read_text(errors='replace')[-2000:]}" if log.exists() else "")
            subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(base / "data"), "-m", "immediate", "stop"],
                           capture_output=True, timeout=60)
            shutil.rmtree(base, ignore_errors=True)
    raise PostgresUnavailable(f"a local PostgreSQL server would not start: {last_error}")


def find_bin_dir() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``."""
    candidates: list[str] = []
    if os.environ.get("PG_BIN"):
        candidates.append(os.environ["PG_BIN"])
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            candidates.append(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                             timeout=10).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted(versions, key=lambda p: int(re.sub(r"\D", "", p) or 0), reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).parent))
    for candidate in candidates:
        path = Path(candidate)
        if (path / "initdb").is_file() and (path / "pg_ctl").is_file():
            return path
    return None


def _unprivileged() -> tuple[list[str], pwd.struct_passwd | None]:
    """The command prefix that runs the server as an ordinary user when we are root."""
    if os.geteuid() != 0:
        return [], None
    for name in ("postgres", "nobody"):
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            continue
        if shutil.which("runuser"):
            return ["runuser", "-u", name, "--"], user
        if shutil.which("setpriv"):
            return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"], user
    raise PostgresUnavailable("running as root without a 'postgres' user or runuser/setpriv to drop privileges")


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd="/")
    if done.returncode != 0:
        raise PostgresUnavailable(f"{what} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-1500:]}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sqlalchemy_url(url: str) -> str:
    return re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql+psycopg://", url)


def _libpq_url(url: str) -> str:
    return re.sub(r"^postgresql\+psycopg://", "postgresql://", url)


def _with_database(url: str, name: str) -> str:
    head, _, tail = url.partition("?")
    return head.rsplit("/", 1)[0] + "/" + name + (f"?{tail}" if tail else "")


if __name__ == "__main__":
    started = time.perf_counter()
    pg = start_postgres()
    print(f"PostgreSQL ready in {time.perf_counter() - started:.1f}s: {pg.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pg.stop()
