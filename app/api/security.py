"""Who may talk to the service: Host and Origin checks, the bearer token, security headers.

One pure ASGI middleware (`Guard`) in front of every route, so REST, WebSocket and the dashboard
follow the same rules:
- `Host` must name the bind address, a loopback name, an IP literal when bound to a wildcard
  address, or a configured name: a DNS-rebinding page (its own name resolving to us) gets 421.
- A WebSocket `Origin`, when sent (browsers always send it), must be the page's own origin or a
  configured one: another site's page is accepted and at once closed with 1008.
- With a token configured, every request but /healthz and the public code and schema (the dashboard's
  files, the API docs pages and /openapi.json) carries it as
  `Authorization: Bearer T` or `?token=T` (compared in constant time); else 401. The `token`
  query parameter is removed before the routes see it, so it never shows up in /stats.
- Every HTTP answer carries CSP (no inline script but the dashboard's own, by hash), frame and
  sniffing protections, and no referrer (a `?token=` URL must not leak through Referer).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import stat
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.frames import cut_reason
from app.config import Settings

log = logging.getLogger(__name__)

POLICY_VIOLATION = 1008
MIN_TOKEN_CHARS = 16
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
WILDCARDS = frozenset({"0.0.0.0", "::", ""})
DOCS_PATHS = ("/docs", "/redoc", "/docs/oauth2-redirect")
# No host data behind these: liveness, and code and schema that are public anyway (the docs pages
# must load their own files and /openapi.json without a token to be usable at all).
PUBLIC_PATHS = ("/healthz", "/openapi.json", *DOCS_PATHS)
PUBLIC_PREFIXES = ("/static/", "/static-offline-docs")   # also /static-offline-docs-redoc.js
INLINE_SCRIPT = re.compile(rb"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", re.S | re.I)


class AccessError(ValueError):
    """A start-up problem with the access settings; the message names the fix."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and the localhost names; a wildcard or other name is not."""
    h = host.strip("[]").lower().rstrip(".")
    if h in LOOPBACK_NAMES or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def load_token(settings: Settings) -> str | None:
    """The bearer token from token_file or CONN_TRACER_TOKEN; None if neither. Raises AccessError."""
    if settings.token_file is not None:
        path = settings.token_file
        try:
            st = path.stat()
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise AccessError(f"cannot read token file {path}: {exc}; "
                              "write one with: openssl rand -hex 32 > FILE && chmod 600 FILE") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("token file %s is readable by other users; chmod 600 %s", path, path)
    elif settings.token is not None:
        token = settings.token.get_secret_value().strip()
    else:
        return None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() or not c.isprintable() for c in token):
        raise AccessError(f"the token must be at least {MIN_TOKEN_CHARS} printable characters without "
                          "spaces; make one with: openssl rand -hex 32")
    return token


def startup_problem(settings: Settings) -> str | None:
    """One line naming what stops `serve` from starting safely, and its fix; None if nothing."""
    try:
        token = load_token(settings)
    except AccessError as exc:
        return str(exc)
    if token is None and not is_loopback(settings.host) and not settings.insecure_no_token:
        return (f"refusing to serve {settings.host} without a token: pass --token-file PATH "
                "(or set CONN_TRACER_TOKEN), or --insecure-no-token to serve everyone on the network")
    if (settings.tls_cert is None) != (settings.tls_key is None):
        return "TLS needs both --tls-cert and --tls-key"
    for p in (settings.tls_cert, settings.tls_key):
        if p is not None and not p.is_file():
            return f"TLS file {p} not found"
    return None


def split_host(value: str) -> tuple[str, int | None]:
    """`name:port`, `[v6]:port`, `name` -> (lower-case name without brackets or final dot, port)."""
    value = value.strip().lower()
    port: int | None = None
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif value.count(":") == 1:
        name, _, p = value.partition(":")
        port = int(p) if p.isdigit() else None
    else:
        name = value
    return name.rstrip("."), port


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostPolicy:
    """Which Host names this service answers to."""

    def __init__(self, bind: str, allowed: list[str]) -> None:
        self.any = "*" in allowed
        self.wildcard = bind.strip("[]") in WILDCARDS
        self.names = {split_host(h)[0] for h in allowed} | {bind.strip("[]").lower()}

    def allows(self, host: str | None) -> bool:
        if host is None or self.any:
            return True   # no Host at all: not a browser (HTTP/1.0 or a raw client)
        name, _ = split_host(host)
        if name in self.names or is_loopback(name):
            return True
        # An IP literal cannot be rebound by DNS; on a wildcard bind any of ours may be used.
        return self.wildcard and _is_ip(name)


def origin_allowed(origin: str, host: str | None, scheme: str, allowed: list[str]) -> bool:
    """The page's own origin (same host and port as Host, matching scheme) or a configured one."""
    if "*" in allowed or origin.rstrip("/") in {a.rstrip("/") for a in allowed}:
        return True
    if host is None or origin == "null":
        return False
    try:
        o = urlsplit(origin)
        o_port = o.port
    except ValueError:
        return False
    want = "https" if scheme in ("wss", "https") else "http"
    default = 443 if want == "https" else 80
    h_name, h_port = split_host(host)
    return (o.scheme == want and (o.hostname or "").rstrip(".") == h_name
            and (o_port or default) == (h_port or default))


def bearer_ok(token: str, headers: dict[bytes, bytes], query: list[tuple[str, str]]) -> bool:
    """True if the Authorization header or the `token` query parameter carries `token`."""
    want = token.encode()
    auth = headers.get(b"authorization", b"")
    scheme, _, given = auth.partition(b" ")
    if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), want):
        return True
    return any(k == "token" and hmac.compare_digest(v.encode("utf-8", "surrogateescape"), want) for k, v in query)


def inline_script_hashes(index_html: Path) -> list[str]:
    """CSP sources ('sha256-...') for the inline scripts of the dashboard page, as served now."""
    try:
        page = index_html.read_bytes()
    except OSError:
        return []
    return [f"'sha256-{base64.b64encode(hashlib.sha256(m).digest()).decode()}'" for m in INLINE_SCRIPT.findall(page)]


def security_headers(script_hashes: list[str]) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
    """(headers for everything, headers for the /docs and /redoc pages)."""
    csp = ("default-src 'none'; script-src 'self' " + " ".join(script_hashes) + "; style-src 'self'; "
           "img-src 'self' data:; connect-src 'self'; base-uri 'self'; form-action 'none'; frame-ancestors 'none'")
    # Swagger UI and ReDoc (served locally, app/api/docs.py) start from an inline script, ReDoc styles
    # itself inline and renders in a blob: worker; nothing of ours is reflected into those pages.
    docs_csp = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
                "img-src 'self' data:; worker-src 'self' blob:; frame-ancestors 'none'")
    common = [(b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"),
              (b"referrer-policy", b"no-referrer"), (b"cross-origin-resource-policy", b"same-origin"),
              (b"cross-origin-opener-policy", b"same-origin")]
    return ([(b"content-security-policy", csp.encode()), *common],
            [(b"content-security-policy", docs_csp.encode()), *common])


class Guard:
    """The ASGI middleware described in the module docstring."""

    def __init__(self, app: ASGIApp, settings: Settings, token: str | None, index_html: Path) -> None:
        self.app = app
        self.token = token
        self.hosts = HostPolicy(settings.host, settings.allowed_hosts)
        self.allowed_origins = list(settings.allowed_origins)
        self.headers, self.docs_headers = security_headers(inline_script_hashes(index_html))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        raw_host = headers.get(b"host")
        host = raw_host.decode("latin-1") if raw_host is not None else None
        if not self.hosts.allows(host):
            await self._deny(scope, receive, send, 421, f"Host {host!r} is not served here; add it with "
                             "--allow-host (CONN_TRACER_ALLOWED_HOSTS) if it is yours")
            return
        if kind == "websocket":
            origin = headers.get(b"origin")
            if origin is not None and not origin_allowed(origin.decode("latin-1"), host, scope.get("scheme", "ws"),
                                                        self.allowed_origins):
                await self._close_ws(receive, send, POLICY_VIOLATION, "origin not allowed; see --allow-origin")
                return
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        if any(k == "token" for k, _ in query):
            # The routes never see the token (it would show in /stats' subscriber filters).
            scope = {**scope, "query_string": urlencode([(k, v) for k, v in query if k != "token"]).encode("latin-1")}
        path = scope.get("path", "")
        if self.token is not None and path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES) \
                and not bearer_ok(self.token, headers, query):
            await self._deny(scope, receive, send, 401, "missing or wrong token: send 'Authorization: Bearer "
                             "TOKEN' or add ?token=TOKEN", [(b"www-authenticate", b'Bearer realm="conn-tracer"')])
            return
        if kind == "websocket":
            await self.app(scope, receive, send)   # its own `send`: app/api/frames.py looks behind it
            return
        extra = self.docs_headers if path in DOCS_PATHS else self.headers

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _deny(self, scope: Scope, receive: Receive, send: Send, status: int, message: str,
                    extra: list[tuple[bytes, bytes]] | None = None) -> None:
        body = json.dumps({"detail": message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   *(extra or []), *self.headers]
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        if "websocket.http.response" in scope.get("extensions", {}):
            await receive()   # websocket.connect
            await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
            return
        await self._close_ws(receive, send, POLICY_VIOLATION, message)

    @staticmethod
    async def _close_ws(receive: Receive, send: Send, code: int, reason: str) -> None:
        # Accept first: a close before accept is an HTTP 403 and the client never sees the reason.
        with contextlib.suppress(OSError):   # the client may be gone already: nothing to tell it
            await receive()   # websocket.connect
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": code, "reason": cut_reason(reason)})
