"""Optional login: users, roles and scrypt password hashes in a TOML file (``MMDEMO_AUTH_FILE``).

::

    # auth.toml: no plaintext passwords, only hashes made with `python -m mmdemo.auth hash`
    [users.alice]
    role = "admin"            # may preload and unload models in the Models panel
    password_hash = "scrypt$16384$8$1$...$..."

    [users.bob]
    role = "annotator"        # may use every tab

Make a hash (asks for the password twice, prints the hash)::

    python -m mmdemo.auth hash

or add/replace a user in a file directly::

    python -m mmdemo.auth add auth.toml alice --role admin

Without an auth file there is no login: an admin is then whoever opened the admin link that ``mmdemo
serve`` prints (see :mod:`mmdemo.security`). Failed logins are backed off per user and client address.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import hmac
import os
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from .errors import InvalidInputError

ROLES: tuple[str, ...] = ("admin", "annotator")
SCHEME = "scrypt"
# scrypt cost: N=2**14, r=8, p=1 takes 16 MiB and about 50 ms per check (OWASP's minimum is N=2**17
# with r=8 and p=1 for new systems; raise N with --cost if logins are rare and the machine is fast).
DEFAULT_COST = 2**14
SALT_BYTES = 16
KEY_BYTES = 32
_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


class AuthFileError(InvalidInputError):
    """The auth file is missing, unreadable or malformed."""


@dataclass(frozen=True)
class User:
    name: str
    role: str
    password_hash: str


def hash_password(password: str, *, cost: int = DEFAULT_COST, salt: bytes | None = None) -> str:
    """``scrypt$N$r$p$salt$key`` (salt and key in unpadded base64) for ``password``."""
    if not password:
        raise InvalidInputError("The password is empty.")
    if cost < 2 or cost & (cost - 1):
        raise InvalidInputError(f"The scrypt cost must be a power of two, not {cost}.")
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    key = _scrypt(password, salt, cost, 8, 1)
    return f"{SCHEME}${cost}$8$1${_b64(salt)}${_b64(key)}"


def verify_password(password: str, encoded: str) -> bool:
    """True if ``password`` matches the ``encoded`` hash; compares in constant time."""
    n, r, p, salt, key = _parse_hash(encoded)
    return hmac.compare_digest(_scrypt(password, salt, n, r, p), key)


class AuthFile:
    """The users of an auth file; ``check`` is gradio's ``auth=`` callable."""

    def __init__(self, users: Mapping[str, User], path: Path | None = None) -> None:
        self.users = dict(users)
        self.path = path
        # Checked against unknown names so that a login takes as long whether or not the user exists.
        self._decoy = hash_password("decoy", salt=b"\0" * SALT_BYTES)

    @classmethod
    def load(cls, path: Path) -> "AuthFile":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise AuthFileError(f"Cannot read the auth file {path}: {exc.strerror or exc}.") from None
        except tomllib.TOMLDecodeError as exc:
            raise AuthFileError(f"The auth file {path} is not valid TOML: {exc}.") from None
        table = data.get("users")
        if not isinstance(table, dict) or not table:
            raise AuthFileError(f"The auth file {path} has no [users.NAME] tables.")
        users = {}
        for name, entry in table.items():
            where = f"The auth file {path}, user '{name}'"
            if not _NAME.fullmatch(name):
                raise AuthFileError(f"{where}: names may use letters, digits and _ . @ - (up to 64).")
            if not isinstance(entry, dict):
                raise AuthFileError(f"{where}: expected a table with role and password_hash.")
            unknown = sorted(set(entry) - {"role", "password_hash"})
            if unknown:
                hint = " (store a hash, never the password)" if "password" in unknown else ""
                raise AuthFileError(f"{where}: unknown keys {unknown}{hint}.")
            role = entry.get("role")
            if role not in ROLES:
                raise AuthFileError(f"{where}: role must be one of {', '.join(ROLES)}, not {role!r}.")
            encoded = str(entry.get("password_hash", ""))
            try:
                _parse_hash(encoded)
            except InvalidInputError as exc:
                raise AuthFileError(f"{where}: {exc}") from None
            users[name] = User(name, role, encoded)
        return cls(users, path)

    def check(self, username: str, password: str) -> bool:
        user = self.users.get(username)
        if user is None:
            verify_password(password, self._decoy)
            return False
        return verify_password(password, user.password_hash)

    def role_of(self, username: str | None) -> str | None:
        user = self.users.get(username or "")
        return user.role if user else None


# --- helpers ---------------------------------------------------------------------------------------


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    # maxmem: scrypt needs 128 * n * r bytes; allow twice that.
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r + 2**20,
                          dklen=KEY_BYTES)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _parse_hash(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        raise InvalidInputError(
            "password_hash is not an mmdemo scrypt hash (scrypt$N$r$p$salt$key); make one with "
            "`python -m mmdemo.auth hash`."
        )
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt, key = _unb64(parts[4]), _unb64(parts[5])
    except ValueError:
        raise InvalidInputError("password_hash is damaged (bad numbers or base64).") from None
    if n < 2 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16 or not salt or len(key) != KEY_BYTES:
        raise InvalidInputError("password_hash has out-of-range scrypt parameters.")
    return n, r, p, salt, key


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Again: "):
        raise InvalidInputError("The two passwords differ.")
    return first


def add_user(path: Path, name: str, role: str, password_hash: str) -> None:
    """Add or replace ``name`` in the auth file at ``path`` (created if missing)."""
    if not _NAME.fullmatch(name):
        raise InvalidInputError("User names may use letters, digits and _ . @ - (up to 64).")
    if role not in ROLES:
        raise InvalidInputError(f"Role must be one of {', '.join(ROLES)}.")
    path = Path(path)
    users = AuthFile.load(path).users if path.exists() else {}
    users[name] = User(name, role, password_hash)
    lines = ["# mmdemo users: roles and scrypt password hashes (python -m mmdemo.auth add FILE NAME)", ""]
    for user in users.values():
        lines += [f'[users."{user.name}"]', f'role = "{user.role}"', f'password_hash = "{user.password_hash}"', ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
    path.chmod(0o600)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmdemo.auth", description="Manage mmdemo's login file.")
    commands = parser.add_subparsers(dest="command", required=True)
    hash_cmd = commands.add_parser("hash", help="print the hash of a password (asked twice)")
    add_cmd = commands.add_parser("add", help="add or replace a user in an auth file")
    add_cmd.add_argument("file", type=Path)
    add_cmd.add_argument("name")
    add_cmd.add_argument("--role", choices=ROLES, default="annotator")
    for command in (hash_cmd, add_cmd):
        command.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
        command.add_argument("--cost", type=int, default=DEFAULT_COST, help="scrypt N (a power of two)")
    args = parser.parse_args(argv)
    try:
        encoded = hash_password(_read_password(args.password_stdin), cost=args.cost)
        if args.command == "hash":
            print(encoded)
        else:
            add_user(args.file, args.name, args.role, encoded)
            print(f"{args.name} ({args.role}) saved in {args.file}")
    except InvalidInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
