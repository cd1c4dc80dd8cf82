"""The WebSocket opening handshake (RFC 6455 §4.2) for ``GET /ws``.

Only the handshake lives here; frames are decoded and encoded by
``imd.fastpath`` (``WSDecoder``, ``ws_encode``, ``ws_close_payload``).
:func:`accept` checks a parsed request and returns the ``101`` response bytes,
or raises :class:`~imd.proto.comet.http.HTTPError` (400 bad handshake, 403
origin not allowed, 426 wrong version — with ``Sec-WebSocket-Version: 13``
in ``HTTPError.headers``). Pure functions, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Iterable

from imd.proto.comet.http import HTTPError, Request

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
VERSION = "13"
_VERSION_HEADER = (("Sec-WebSocket-Version", VERSION),)


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest()).decode()


def _tokens(value: str) -> set:
    return {t.strip().lower() for t in value.split(",")}


def origin_allowed(origin: str, origins: Iterable[str], host: str = "") -> bool:
    """``comet.origins``: exact ``scheme://host[:port]`` entries or ``"*"``.
    A request without ``Origin`` (not a browser: it carries a user token, not
    cookies) and a same-origin request (the origin's host:port is the
    ``Host`` header: the page imd serves itself) are always allowed."""
    if not origin:
        return True
    origin = origin.lower().rstrip("/")
    if host and origin.partition("://")[2] == host.lower():
        return True
    allowed = list(origins)
    return "*" in allowed or origin in (o.lower().rstrip("/") for o in allowed)


def accept(req: Request, origins: Iterable[str] = ("*",)) -> bytes:
    """Validate an upgrade request; the ``101 Switching Protocols`` bytes."""
    if req.method != "GET":
        raise HTTPError(405, "WebSocket needs GET")
    if req.version != "1.1":
        raise HTTPError(400, "WebSocket needs HTTP/1.1")
    if "websocket" not in _tokens(req.header("upgrade")):
        raise HTTPError(426, "Upgrade: websocket required")
    if "upgrade" not in _tokens(req.header("connection")):
        raise HTTPError(400, "Connection: Upgrade required")
    if req.header("sec-websocket-version").strip() != VERSION:
        raise HTTPError(426, "WebSocket version 13 is required", _VERSION_HEADER)
    key = req.header("sec-websocket-key").strip()
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except (ValueError, binascii.Error):
        raise HTTPError(400, "bad Sec-WebSocket-Key") from None
    if not origin_allowed(req.header("origin"), origins, req.header("host")):
        raise HTTPError(403, "origin not allowed")
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n"
            % accept_key(key).encode())
