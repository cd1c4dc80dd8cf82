"""The message envelope (DESIGN.md §3): parsing and validation of what clients
send, and the encode-once wrapper for what the server sends.

Pure functions and small value objects: no I/O, safe anywhere (including
io-watcher callbacks).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

import orjson

USER_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
CLIENT_ID_RE = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
DEVICE_RE = CLIENT_ID_RE
CTX_KEY_RE = re.compile(r"[A-Za-z0-9_.\-]{1,32}")

PLATFORMS = ("web", "h5", "ios", "android")
ROLES = ("host", "guest")
STATUSES = ("online", "away")
MAX_SEQ = 2 ** 53
MAX_TOKEN = 4096
MAX_CTX_KEYS = 16
MAX_CTX_VALUE = 256
SYNC_LIMIT = 500

# Bits of a message's ``flags`` (Entry.flags, Out.flags): what the sender's client asked of
# the recipient's that the envelope has no field for. Only protocols that can express it set
# or render it; the JSON envelope of raw-TCP and comet clients never carries it.
RECEIPT_REQUESTED = 1          # an XEP-0184 <request/>: the recipient's client may answer <received/>


class EnvelopeError(Exception):
    """A client envelope that violates the contract; answered with ``error``.

    ``fatal`` errors (bad JSON, unknown type, wrong field types) end the
    connection after the error is sent; the others leave it open.
    """

    def __init__(self, code: int, reason: str, id: Optional[str] = None, fatal: bool = True):
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.id = id
        self.fatal = fatal

    def envelope(self) -> dict:
        return error(self.code, self.reason, self.id)


def error(code: int, reason: str, id: Optional[str] = None) -> dict:
    env = {"type": "error", "code": code, "reason": reason}
    if id is not None:
        env["id"] = id
    return env


def close(code: int, reason: str, reconnect: bool) -> dict:
    return {"type": "close", "code": code, "reason": reason, "reconnect": reconnect}


# -- validation helpers --------------------------------------------------------

def _str(env: dict, key: str, regex=None, max_len: int = 256, required: bool = True,
         what: str = "") -> Optional[str]:
    v = env.get(key)
    if v is None:
        if required:
            raise EnvelopeError(400, f"{env['type']}: missing field '{key}'", _cid(env))
        return None
    if not isinstance(v, str):
        raise EnvelopeError(400, f"{env['type']}: field '{key}' must be a string", _cid(env))
    if regex is not None:
        if not regex.fullmatch(v):
            raise EnvelopeError(400, f"{env['type']}: field '{key}' is not a valid {what or key}", _cid(env))
    elif not v or len(v) > max_len:
        raise EnvelopeError(400, f"{env['type']}: field '{key}' must be 1-{max_len} characters", _cid(env))
    return v


def _int(env: dict, key: str, required: bool = True, lo: int = 0, hi: int = MAX_SEQ) -> Optional[int]:
    v = env.get(key)
    if v is None:
        if required:
            raise EnvelopeError(400, f"{env['type']}: missing field '{key}'", _cid(env))
        return None
    if type(v) is not int or not lo <= v <= hi:
        raise EnvelopeError(400, f"{env['type']}: field '{key}' must be an integer in {lo}..{hi}", _cid(env))
    return v


def _choice(env: dict, key: str, choices: tuple) -> str:
    v = env.get(key)
    if v not in choices or not isinstance(v, str):
        raise EnvelopeError(400, f"{env['type']}: field '{key}' must be one of {', '.join(choices)}", _cid(env))
    return v


def _cid(env: dict) -> Optional[str]:
    """The client id to echo in an error, if it is a sane string."""
    v = env.get("id")
    return v if isinstance(v, str) and CLIENT_ID_RE.fullmatch(v) else None


def _ctx(env: dict) -> Optional[dict]:
    ctx = env.get("ctx")
    if ctx is None:
        return None
    if not isinstance(ctx, dict) or len(ctx) > MAX_CTX_KEYS:
        raise EnvelopeError(400, f"msg: 'ctx' must be an object of at most {MAX_CTX_KEYS} keys", _cid(env))
    for k, v in ctx.items():
        if not CTX_KEY_RE.fullmatch(k):
            raise EnvelopeError(400, "msg: 'ctx' keys must be 1-32 characters of [A-Za-z0-9_.-]", _cid(env))
        if isinstance(v, str):
            if len(v) > MAX_CTX_VALUE:
                raise EnvelopeError(400, f"msg: 'ctx' values must be at most {MAX_CTX_VALUE} characters", _cid(env))
        elif v is not None and not isinstance(v, (int, float, bool)):
            raise EnvelopeError(400, "msg: 'ctx' values must be strings, numbers, booleans or null", _cid(env))
    return ctx


def body_size(body: Any) -> int:
    """Encoded size of a message body in bytes (str: UTF-8; object: compact JSON)."""
    if isinstance(body, str):
        return len(body.encode("utf-8", "surrogatepass"))
    return len(orjson.dumps(body))


def check_body(body: Any, max_body: int, kind: str = "msg", id: Optional[str] = None) -> Any:
    if isinstance(body, str):
        if not body:
            raise EnvelopeError(400, f"{kind}: 'body' must not be empty", id)
        if len(body) * 4 <= max_body:       # a code point is at most 4 bytes: no need to encode
            return body
    elif not isinstance(body, dict):
        raise EnvelopeError(400, f"{kind}: 'body' must be a string or an object", id)
    if body_size(body) > max_body:
        raise EnvelopeError(413, f"{kind}: 'body' exceeds {max_body} bytes", id, fatal=False)
    return body


# -- per-type validators (client → server) -------------------------------------

_MISSING = object()


def _v_auth(env, lim):
    _str(env, "token", max_len=MAX_TOKEN)
    _choice(env, "platform", PLATFORMS)
    _str(env, "device", DEVICE_RE, what="device id (1-64 characters of [A-Za-z0-9_.:-])")
    _int(env, "since", required=False)


def _v_msg(env, lim):
    cid, to = env.get("id"), env.get("to")
    # the common case checked inline; _str makes the error of whatever fails
    if type(cid) is not str or not CLIENT_ID_RE.fullmatch(cid):
        cid = _str(env, "id", CLIENT_ID_RE, what="client id (1-64 characters of [A-Za-z0-9_.:-])")
    if type(to) is not str or not USER_RE.fullmatch(to):
        _str(env, "to", USER_RE, what="user id")
    body = env.get("body", _MISSING)
    if body is _MISSING:
        raise EnvelopeError(400, "msg: missing field 'body'", cid)
    check_body(body, lim, "msg", cid)      # cid is valid here: what _cid(env) would give
    if "ctx" in env:
        _ctx(env)


def _v_ack(env, lim):
    _int(env, "seq")


def _v_read(env, lim):
    _str(env, "peer", USER_RE, what="user id")
    _int(env, "seq")


def _v_sync(env, lim):
    _int(env, "since")
    _int(env, "limit", required=False, lo=1, hi=SYNC_LIMIT)


def _v_presence(env, lim):
    _choice(env, "status", STATUSES)


def _v_none(env, lim):
    pass


VALIDATORS: dict[str, Callable[[dict, int], None]] = {
    "auth": _v_auth, "msg": _v_msg, "ack": _v_ack, "read": _v_read, "sync": _v_sync,
    "ping": _v_none, "pong": _v_none, "presence": _v_presence, "close": _v_none,
}


def validate(env: Any, max_body: int) -> dict:
    """Check a decoded client envelope; return it, or raise EnvelopeError."""
    if not isinstance(env, dict):
        raise EnvelopeError(400, "an envelope must be a JSON object")
    t = env.get("type")
    if not isinstance(t, str):
        raise EnvelopeError(400, "missing field 'type'", _cid(env))
    v = VALIDATORS.get(t)
    if v is None:
        raise EnvelopeError(400, f"unknown type '{t[:32]}'", _cid(env))
    v(env, max_body)
    return env


def parse(data: bytes, max_body: int) -> dict:
    """Decode and validate one client envelope from its JSON bytes."""
    try:
        env = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise EnvelopeError(400, f"invalid JSON: {str(e)[:80]}") from None
    return validate(env, max_body)


def dumps(env: dict) -> bytes:
    return orjson.dumps(env)


def dumps_kept(obj) -> bytes:
    """``orjson.dumps(obj)`` copied to its own size, for bytes that outlive the call
    (cached on an object that a history, queue or table keeps). The bytes orjson 3.13
    returns keep its whole output buffer: 4 KiB at least (measured: 4,098 B held for a
    90-byte result), more for longer output."""
    return bytes(memoryview(orjson.dumps(obj)))


class Out:
    """A server→client envelope, encoded once and framed once per wire format.

    ``seq`` is the inbox seq for inbox entries (0 otherwise), ``origin`` the
    id of the session that caused it (its own copy is not echoed back to it) and
    ``flags`` an inbox entry's flags (RECEIPT_REQUESTED…), outside the envelope.
    ``frame(codec)`` caches ``codec(json_bytes)`` per codec, so a message
    delivered to many sessions of one protocol is framed once; a codec returns
    new bytes (it copies the JSON), so the first one is fed orjson's output
    as it is and only :meth:`json` (and a second codec) keeps a right-sized copy.

    ``Out(None, seq, origin, flags, make=f)`` defers the envelope: ``env`` is
    ``f()``, made on first use, so an inbox entry that only advances its
    sender's ``last_seq`` (the sender's own copy) never builds one.
    """

    __slots__ = ("_env", "_make", "seq", "origin", "flags", "_json", "_frames")

    def __init__(self, env: Optional[dict], seq: int = 0, origin: str = "", flags: int = 0,
                 make: Optional[Callable[[], dict]] = None) -> None:
        self._env = env
        self._make = make
        self.seq = seq
        self.origin = origin
        self.flags = flags
        self._json = None
        self._frames = None

    @property
    def env(self) -> dict:
        env = self._env
        if env is None:
            env = self._env = self._make()
            self._make = None
        return env

    @property
    def type(self) -> str:
        return self.env["type"]

    def json(self) -> bytes:
        j = self._json
        if j is None:
            j = self._json = dumps_kept(self.env)      # an Out may wait in queues and histories
        return j

    def frame(self, codec: Callable[[bytes], bytes]) -> bytes:
        frames = self._frames
        if frames is None:
            j = self._json
            f = codec(orjson.dumps(self.env) if j is None else j)
            self._frames = {codec: f}
            return f
        f = frames.get(codec)
        if f is None:
            f = frames[codec] = codec(self.json())
        return f
