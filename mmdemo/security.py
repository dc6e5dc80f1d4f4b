"""Who is asking and how much they may send: the gate in front of the web app.

* **Client address**: the peer, or the ``X-Forwarded-For`` hop before it when the peer is a trusted
  proxy (``MMDEMO_TRUSTED_PROXIES``); :func:`client_address` is the one rule every per-client limit uses.
* **Signed cookies** (HMAC with a per-process secret, or ``MMDEMO_SECRET`` shared by replicas): the admin
  cookie, set by the admin link printed at start-up when there is no login file
  (``/admin-login?token=...``), and the anonymous visitor id that keys anonymous feedback.
* **Login back-off** per (user, client address): :class:`LoginThrottle`; the password check runs in a
  worker thread (scrypt would stall the event loop).
* **Body limits**: uploads and model inputs up to ``MMDEMO_MAX_UPLOAD_MB``, other requests up to
  ``MMDEMO_MAX_REQUEST_KB``; refused with 413 before the body is read, or as soon as a body without a
  Content-Length passes the limit.

:class:`RequestGuard` is the ASGI middleware that applies them in front of gradio (see
``mmdemo.server.launch_options``); handlers read its verdict with :func:`visitor_of`.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Sequence
from urllib.parse import parse_qs

from starlette.exceptions import HTTPException

from .config import Settings
from .logs import new_request_id, request_id_set

if TYPE_CHECKING:
    from .auth import AuthFile

log = logging.getLogger(__name__)

ADMIN_COOKIE = "mmdemo-admin"
VISITOR_COOKIE = "mmdemo-visitor"
ADMIN_LOGIN_PATH = "/admin-login"
ADMIN_COOKIE_SECONDS = 30 * 24 * 3600
VISITOR_COOKIE_SECONDS = 365 * 24 * 3600
# Routes whose bodies carry uploads or model inputs (images may come as base64 data URLs in JSON).
INPUT_ROUTES = ("/gradio_api/upload", "/gradio_api/process_recording", "/gradio_api/queue/join",
                "/gradio_api/run/", "/gradio_api/api/", "/gradio_api/call/")
FILE_ROUTES = ("/gradio_api/file=", "/gradio_api/file/")
LOGIN_CHECKS_AT_ONCE = 2  # scrypt takes 16 MiB and ~50 ms a check: a login flood never takes every thread


@dataclass(frozen=True)
class Visitor:
    """What the gate learnt about a request: the client address, the anonymous visitor id (from the
    signed cookie, or a new one) and whether it carries a valid admin cookie."""

    address: str | None
    anonymous_id: str
    admin_link: bool
    request_id: str | None = None  # the X-Request-ID of the request (see mmdemo.logs)


CURRENT_VISITOR: contextvars.ContextVar[Visitor | None] = contextvars.ContextVar("mmdemo_visitor", default=None)


def visitor_of(request: Any) -> Visitor | None:
    """The :class:`Visitor` the gate attached to a request (a ``gr.Request`` or a Starlette request);
    None when the request did not pass through :class:`RequestGuard`."""
    state = getattr(request, "state", None) if request is not None else None
    visitor = getattr(state, "mmdemo_visitor", None) if state is not None else None
    return visitor if isinstance(visitor, Visitor) else None


# --- client address --------------------------------------------------------------------------------


Networks = Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]


def trusted_networks(proxies: Iterable[str]) -> Networks:
    return tuple(ipaddress.ip_network(proxy, strict=False) for proxy in proxies)


def client_address(peer: str | None, forwarded_for: str | None, trusted: Networks) -> str | None:
    """The client's address: the peer, unless the peer is a trusted proxy; then the ``X-Forwarded-For``
    hops are walked from the right (the nearest) past every trusted proxy. Without trusted proxies the
    header is ignored: anyone can write it."""
    address = peer
    hops = [hop.strip() for hop in (forwarded_for or "").split(",") if hop.strip()]
    while hops and _is_trusted(address, trusted):
        address = hops.pop()
    return address


def _is_trusted(address: str | None, trusted: Networks) -> bool:
    if not address or not trusted:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


# --- signed cookies --------------------------------------------------------------------------------


class Signer:
    """Signs short values with HMAC-SHA256 and an expiry: ``value.expires.mac``."""

    def __init__(self, secret: str | None = None) -> None:
        material = secret.encode("utf-8") if secret else os.urandom(32)
        self._key = hashlib.sha256(b"mmdemo-signer\0" + material).digest()

    def sign(self, kind: str, value: str, max_age_s: int) -> str:
        body = f"{value}.{int(time.time()) + max_age_s}"
        return f"{body}.{self._mac(kind, body)}"

    def unsign(self, kind: str, token: str | None) -> str | None:
        """The value of a token this signer made for ``kind``; None if forged, damaged or expired."""
        parts = (token or "").rsplit(".", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        value, expires, mac = parts
        if not hmac.compare_digest(mac, self._mac(kind, f"{value}.{expires}")) or int(expires) < time.time():
            return None
        return value

    @property
    def admin_token(self) -> str:
        """The admin link's token: derived from the secret, so replicas sharing MMDEMO_SECRET share it."""
        return self._mac("admin-link", "token")

    def _mac(self, kind: str, body: str) -> str:
        return hmac.new(self._key, f"{kind}\0{body}".encode(), hashlib.sha256).hexdigest()[:32]


# --- login back-off ----------------------------------------------------------------------------------


class LoginThrottle:
    """Backs off failed logins per (user name, client address): after ``free_failures`` failures each
    further attempt must wait 1 s, 2 s, 4 s... (at most ``max_wait_s``) after the last failure; a
    success clears the count. Keyed by user *and* address, so that nobody can lock a person out from
    elsewhere."""

    def __init__(self, free_failures: int = 5, max_wait_s: float = 300.0, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.free_failures, self.max_wait_s = free_failures, max_wait_s
        self.max_entries, self.clock = max_entries, clock
        self._failures: OrderedDict[tuple[str, str], tuple[int, float]] = OrderedDict()
        self._lock = threading.Lock()

    def wait_s(self, user: str, address: str | None) -> float:
        """Seconds before ``user`` may try again from ``address`` (0: now)."""
        with self._lock:
            count, last = self._failures.get((user, address or ""), (0, 0.0))
        return max(0.0, last + self._delay(count) - self.clock())

    def failed(self, user: str, address: str | None) -> int:
        """Count a failure; returns the number of failures in a row."""
        key = (user, address or "")
        with self._lock:
            count = self._failures.pop(key, (0, 0.0))[0] + 1
            self._failures[key] = (count, self.clock())
            while len(self._failures) > self.max_entries:  # forget the oldest: memory stays bounded
                self._failures.popitem(last=False)
        return count

    def succeeded(self, user: str, address: str | None) -> None:
        with self._lock:
            self._failures.pop((user, address or ""), None)

    def _delay(self, failures: int) -> float:
        extra = failures - self.free_failures
        return 0.0 if extra < 0 else min(self.max_wait_s, 2.0 ** min(extra, 30))


class LoginRefused(Exception):
    """Too many failed logins from one address for one user: answered 429 with Retry-After."""

    def __init__(self, wait_s: float) -> None:
        self.retry_after = max(1, math.ceil(wait_s))
        super().__init__(f"Too many failed logins. Try again in {self.retry_after} s.")


# --- the gate ------------------------------------------------------------------------------------------


class Gatekeeper:
    """The app's secret, trusted proxies, body limits, login back-off and who counts as an admin."""

    def __init__(self, settings: Settings, auth: "AuthFile | None" = None) -> None:
        self.settings, self.auth = settings, auth
        self.signer = Signer(settings.secret)
        self.trusted = trusted_networks(settings.trusted_proxies)
        self.throttle = LoginThrottle()
        # Model inputs may arrive as base64 data URLs in JSON (4/3 of the bytes), plus room for the rest.
        self.input_limit = settings.max_upload_bytes * 4 // 3 + settings.max_request_bytes
        self.request_limit = settings.max_request_bytes
        self._login_threads: Any = None

    @property
    def admin_link(self) -> bool:
        """Without a login file, admins are whoever opened the admin link (:meth:`admin_path`)."""
        return self.auth is None

    def admin_path(self) -> str:
        """The admin link's path and token, to append to the app's address (``mmdemo serve`` prints it)."""
        return f"{ADMIN_LOGIN_PATH}?token={self.signer.admin_token}"

    def is_admin(self, username: str | None, visitor: Visitor | None) -> bool:
        if self.auth is None:
            return bool(visitor and visitor.admin_link)
        return self.auth.role_of(username) == "admin"

    def body_limit(self, route: str) -> int:
        return self.input_limit if route.startswith(INPUT_ROUTES) else self.request_limit

    async def check_login(self, username: str, password: str) -> bool:
        """gradio's ``auth=`` callable: the password check in a worker thread, backed off per (user,
        client address); raises :class:`LoginRefused` while the caller must wait."""
        import anyio.to_thread

        visitor = CURRENT_VISITOR.get()
        address = visitor.address if visitor else None
        wait = self.throttle.wait_s(username, address)
        if wait > 0:
            log.warning("login refused: user %r from %s must wait %.0f s after repeated failures",
                        username, address, wait)
            raise LoginRefused(wait)
        if self._login_threads is None:
            self._login_threads = anyio.CapacityLimiter(LOGIN_CHECKS_AT_ONCE)
        assert self.auth is not None  # noqa: S101 - gradio calls this only with a login file
        ok = await anyio.to_thread.run_sync(self.auth.check, username, password, limiter=self._login_threads)
        if ok:
            self.throttle.succeeded(username, address)
        else:
            failures = self.throttle.failed(username, address)
            log.warning("failed login for user %r from %s (%d in a row)", username, address, failures)
        return ok


# --- the ASGI middleware ---------------------------------------------------------------------------------


class BodyTooLarge(HTTPException):
    """Raised while a body without a Content-Length is read past the limit (FastAPI passes HTTP errors on)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, _too_large_text(limit))


ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]


class RequestGuard:
    """ASGI middleware in front of gradio: body limits, the admin link, the anonymous visitor cookie,
    exports for admins only, a request id (answered as ``X-Request-ID``, set in log lines) and a
    :class:`Visitor` in ``scope["state"]["mmdemo_visitor"]``.

    ``admin_only(route)`` says which file downloads need an admin; ``username_of(scope)`` reads the
    login of a request (gradio's session cookie).
    """

    def __init__(self, app: ASGIApp, *, gate: Gatekeeper, admin_only: Callable[[str], bool] = lambda route: False,
                 username_of: Callable[[dict], str | None] = lambda scope: None) -> None:
        self.app, self.gate, self.admin_only, self.username_of = app, gate, admin_only, username_of

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        request_id = new_request_id(headers.get("x-request-id"))
        with request_id_set(request_id):
            await self._guard(scope, receive, _with_header(send, b"x-request-id", request_id.encode()),
                              headers, request_id)

    async def _guard(self, scope: dict, receive: Callable, send: Callable, headers: dict[str, str],
                     request_id: str) -> None:
        cookies = parse_cookies(headers.get("cookie", ""))
        signer = self.gate.signer
        anonymous_id = signer.unsign(VISITOR_COOKIE, cookies.get(VISITOR_COOKIE))
        new_visitor = anonymous_id is None
        if new_visitor:
            anonymous_id = secrets.token_hex(16)
        peer = (scope.get("client") or (None,))[0]
        admin_link = self.gate.admin_link and signer.unsign(ADMIN_COOKIE, cookies.get(ADMIN_COOKIE)) == "admin"
        visitor = Visitor(address=client_address(peer, headers.get("x-forwarded-for"), self.gate.trusted),
                          anonymous_id=anonymous_id, admin_link=admin_link, request_id=request_id)
        scope.setdefault("state", {})["mmdemo_visitor"] = visitor
        route = _route_path(scope)
        set_cookies = [_cookie(VISITOR_COOKIE, signer.sign(VISITOR_COOKIE, anonymous_id, VISITOR_COOKIE_SECONDS),
                               VISITOR_COOKIE_SECONDS)] if new_visitor else []

        limit = self.gate.body_limit(route)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _too_large(send, limit)
            return
        if route.rstrip("/") == ADMIN_LOGIN_PATH and self.gate.admin_link:
            await self._admin_login(scope, send, visitor, set_cookies)
            return
        if route.startswith(FILE_ROUTES) and self.admin_only(route) and \
                not self.gate.is_admin(self.username_of(scope), visitor):
            await _plain(send, 403, "Only admins can download feedback exports.")
            return

        received = 0
        started = False

        async def counted_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def send_with_cookie(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if set_cookies:
                    message = {**message, "headers": [*message.get("headers", []), *set_cookies]}
            await send(message)

        token = CURRENT_VISITOR.set(visitor)
        try:
            await self.app(scope, counted_receive, send_with_cookie)
        except BodyTooLarge:
            if not started:
                await _too_large(send, limit)
        except LoginRefused as exc:
            if not started:
                await _plain(send, 429, str(exc), [(b"retry-after", str(exc.retry_after).encode())])
        finally:
            CURRENT_VISITOR.reset(token)

    async def _admin_login(self, scope: dict, send: Callable, visitor: Visitor, set_cookies: list) -> None:
        token = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
        if not hmac.compare_digest(token, self.gate.signer.admin_token):
            log.warning("admin link with a wrong token from %s", visitor.address)
            await _plain(send, 403, "This admin link is not valid. Use the one mmdemo printed at start-up "
                                    "(it changes at each start unless MMDEMO_SECRET is set).")
            return
        cookie = _cookie(ADMIN_COOKIE, self.gate.signer.sign(ADMIN_COOKIE, "admin", ADMIN_COOKIE_SECONDS),
                         ADMIN_COOKIE_SECONDS)
        await send({"type": "http.response.start", "status": 303,
                    "headers": [(b"location", b"./"), (b"content-length", b"0"), cookie, *set_cookies]})
        await send({"type": "http.response.body", "body": b""})


def _with_header(send: Callable, name: bytes, value: bytes) -> Callable:
    """``send`` adding one header to the response."""

    async def send_with_header(message: dict) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (name, value)]}
        await send(message)

    return send_with_header


def _route_path(scope: dict) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def parse_cookies(header: str) -> dict[str, str]:
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except CookieError:
        return {}
    return {name: morsel.value for name, morsel in jar.items()}


def _cookie(name: str, value: str, max_age: int) -> tuple[bytes, bytes]:
    return b"set-cookie", f"{name}={value}; Max-Age={max_age}; Path=/; HttpOnly; SameSite=Lax".encode()


async def _plain(send: Callable, status: int, text: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": text}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


def _too_large_text(limit: int) -> str:
    return f"The request is larger than this server accepts ({limit / 1024 / 1024:.1f} MiB)."


async def _too_large(send: Callable, limit: int) -> None:
    await _plain(send, 413, _too_large_text(limit))
