"""iComet's response encodings, byte for byte where it matters, always valid JSON.

The message object is ``{"type":..,"cname":..,"seq":..,"content":..}`` in that
key order, as ``Subscriber::send_msg`` prints it. Our fixes (docs/icomet.md):
``content`` and ``cname`` are JSON-escaped with orjson (iComet escapes only
``" \\ \\r \\n`` of content and never the cname); output placed in JavaScript
(JSONP, the forever-iframe) additionally escapes ``< > &`` and U+2028/U+2029 as
``\\uXXXX`` so no content can close the ``<script>`` or break the JS parser;
JSONP callback names are checked by :func:`valid_callback`.

Each message is encoded once per format and the bytes are kept on the message
(:meth:`Message.encoded`), so a fan-out to N subscribers encodes once.
Pure functions, no I/O.
"""

from __future__ import annotations

import re
from typing import List, Optional

import orjson

from imd.envelope import dumps_kept
from imd.proto.comet.channels import Channel, Message

ICOMET_VERSION = "0.2.5"
DEFAULT_CALLBACK = "icomet_cb"
_CALLBACK = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*(?:\.[A-Za-z_$][A-Za-z0-9_$]*)*\Z")
MAX_CALLBACK = 128

IFRAME_HEADER = (
    b"<html><head><meta http-equiv='Content-Type' content='text/html; charset=utf-8'>"
    b"<meta http-equiv='Cache-Control' content='no-store'>"
    b"<meta http-equiv='Cache-Control' content='no-cache'>"
    b"<meta http-equiv='Pragma' content='no-cache'>"
    b"<meta http-equiv=' Expires' content='Thu, 1 Jan 1970 00:00:00 GMT'>"
    b"<script type='text/javascript'>window.onError = null;try{document.domain = "
    b"window.location.hostname.split('.').slice(-2).join('.');}catch(e){};</script>"
    b"</head><body>\n")

_JS_UNSAFE = ((b"<", b"\\u003c"), (b">", b"\\u003e"), (b"&", b"\\u0026"),
              ("\u2028".encode(), b"\\u2028"), ("\u2029".encode(), b"\\u2029"))


def valid_callback(cb: str) -> bool:
    """A JSONP callback: dot-separated JavaScript identifiers (``[A-Za-z0-9_$]``), ≤128 chars."""
    return 0 < len(cb) <= MAX_CALLBACK and _CALLBACK.match(cb) is not None


def js_safe(data: bytes) -> bytes:
    """JSON bytes made safe inside ``<script>`` and pre-ES2019 JS parsers.

    ``< > &`` and U+2028/9 occur in orjson output only inside strings, where
    the ``\\uXXXX`` form means the same character."""
    for raw, esc in _JS_UNSAFE:
        if raw in data:
            data = data.replace(raw, esc)
    return data


def _json(msg: Message) -> bytes:
    """Cached on the message, which a channel's history keeps: a right-sized copy."""
    return dumps_kept({"type": msg.type, "cname": msg.cname, "seq": msg.seq,
                       "content": msg.content})


def _js(msg: Message) -> bytes:
    return js_safe(msg.encoded("json", _json))


def message_json(msg: Message) -> bytes:
    """The message object, cached on the message."""
    return msg.encoded("json", _json)


def message_js(msg: Message) -> bytes:
    """The message object, safe for JavaScript contexts, cached on the message."""
    return msg.encoded("js", _js)


def poll_body(msgs: List[Message], array: bool, cb: str = "") -> bytes:
    """``/sub`` ``/poll`` answer: ``cb(obj);\\n`` / ``cb([a,b]);\\n``, or the bare
    ``obj\\n`` / ``[a,b]\\n`` without a callback."""
    if cb:
        items = [message_js(m) for m in msgs]
    else:
        items = [message_json(m) for m in msgs]
    body = b"[" + b",".join(items) + b"]" if array else items[0]
    if cb:
        return cb.encode() + b"(" + body + b");\n"
    return body + b"\n"


def iframe_chunk(msg: Message) -> bytes:
    """``/iframe``: ``<script>parent.icomet_cb({...});</script>\\n``."""
    return b"<script>parent.icomet_cb(" + message_js(msg) + b");</script>\n"


def stream_chunk(msg: Message) -> bytes:
    """``/stream``: ``{...}\\n``."""
    return message_json(msg) + b"\n"


def sse_event(msg: Message) -> bytes:
    """``/sse``: ``data: {...}\\n\\n`` (no ``id:``, as iComet)."""
    return b"data: " + message_json(msg) + b"\n\n"


def error_message(cname: str, kind: str, reason: str) -> Message:
    """The in-band refusal (``401``/``429``) with seq 0."""
    return Message(kind, cname, 0, reason)


def _jsonp(obj: bytes, cb: Optional[str]) -> bytes:
    if cb:
        return cb.encode() + b"(" + js_safe(obj) + b");\n"
    return obj + b"\n"


def ping(sub_timeout: int, cb: str = DEFAULT_CALLBACK) -> bytes:
    """``/ping``: always JSONP, ``icomet_cb`` by default."""
    return _jsonp(b'{"type":"ping","sub_timeout":%d}' % sub_timeout, cb or DEFAULT_CALLBACK)


def pub_ok(cb: Optional[str] = None) -> bytes:
    """``/pub`` ``/push``: ``{"type":"ok"}\\n`` or ``cb({"type":"ok"});\\n``."""
    return _jsonp(b'{"type":"ok"}', cb)


def sign(ch: Channel, token: str, expires: int, sub_timeout: int,
         cb: Optional[str] = None) -> bytes:
    """``/sign``: the sign object, JSONP if ``cb``."""
    obj = orjson.dumps({"type": "sign", "cname": ch.name, "seq": ch.seq_min(),
                        "token": token, "expires": expires, "sub_timeout": sub_timeout})
    return _jsonp(obj, cb)


def ok_seq(seq: int) -> bytes:
    """``/close`` ``/clear``: ``ok <seq_next>\\n``."""
    return b"ok %d\n" % seq


def not_connected(cname: str) -> bytes:
    """``/close`` ``/clear`` 404 body (served as text/plain)."""
    return b"channel[" + cname.encode() + b"] not connected\n"


BROADCAST_OK = b"ok\n"


def info(stats: dict) -> bytes:
    """``/info``: iComet's spacing; cname JSON-escaped."""
    if "cname" in stats:
        return b'{"cname": %s, "subscribers": %d}\n' % (orjson.dumps(stats["cname"]),
                                                         stats["subscribers"])
    return b'{"version": "%s", "channels": %d, "subscribers": %d}\n' % (
        ICOMET_VERSION.encode(), stats["channels"], stats["subscribers"])


def check(cname: str, exists: bool) -> bytes:
    """``/check``: ``{"a": 1}\\n`` or ``{}\\n``."""
    if exists:
        return b"{" + orjson.dumps(cname) + b": 1}\n"
    return b"{}\n"


def presence_line(online: bool, cname: str) -> bytes:
    """``/psub``: ``1 cname\\n`` / ``0 cname\\n`` (cnames never hold whitespace)."""
    return (b"1 " if online else b"0 ") + cname.encode() + b"\n"


def admin_json(obj) -> bytes:
    """An ``/api/v1`` body."""
    return orjson.dumps(obj)


def admin_error(reason: str) -> bytes:
    """An ``/api/v1`` error body: ``{"error": reason}``."""
    return orjson.dumps({"error": reason})


def pub_content(raw: str) -> str:
    """``/pub`` takes content already JSON-escaped without quotes. We decode it
    so the output stays valid JSON; content that is not a valid escaped string
    is taken as plain text (iComet would emit broken JSON)."""
    try:
        value = orjson.loads(b'"' + raw.encode("utf-8", "surrogatepass") + b'"')
    except (orjson.JSONDecodeError, UnicodeEncodeError):
        return raw
    return value if isinstance(value, str) else raw
