"""HTTP/1.1 for the comet and admin ports: a bounded request parser and response bytes.

:class:`RequestParser` wraps ``httptools.HttpRequestParser``: bytes go in with
:meth:`RequestParser.feed`, complete :class:`Request` objects come out. Every
size is bounded — request target (414), header bytes and header count (431),
body per route (413) — and malformed input raises :class:`HTTPError` with the
status to answer before closing the connection. A request that asks for a
protocol upgrade ends parsing: :attr:`RequestParser.upgraded` holds the bytes
after its head (the first WebSocket frames).

The time limits (a head that never finishes, an idle keep-alive) belong to
the connection, which owns the clock. Nothing here does I/O or blocks; a
parser is per connection and not shared between greenlets.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Tuple
from urllib.parse import parse_qsl

import httptools

STATUS = {
    101: "Switching Protocols", 200: "OK", 204: "No Content", 400: "Bad Request",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 409: "Conflict", 413: "Payload Too Large", 414: "URI Too Long",
    426: "Upgrade Required", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
}

MAX_HEAD = 8192
MAX_HEADERS = 64
MAX_TARGET = 4096
MAX_BODY = 65536
MAX_FIELDS = 64


class HTTPError(Exception):
    """Bad input: answer ``status`` with ``reason`` and close the connection."""

    def __init__(self, status: int, reason: str = "",
                 headers: Tuple[Tuple[str, str], ...] = ()) -> None:
        super().__init__(reason or STATUS.get(status, ""))
        self.status = status
        self.reason = reason or STATUS.get(status, "")
        self.headers = headers


class Request:
    """One parsed request. ``headers`` maps lower-case names to values (repeated
    headers joined with ``", "``; a repeated Host is refused with 400)."""

    __slots__ = ("method", "target", "path", "query", "headers", "body", "version",
                 "keep_alive", "upgrade")

    def __init__(self) -> None:
        self.method = ""
        self.target = b""
        self.path = ""
        self.query = ""
        self.headers: Dict[str, str] = {}
        self.body = b""
        self.version = "1.1"
        self.keep_alive = True
        self.upgrade = False

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name, default)

    def params(self, max_fields: int = MAX_FIELDS) -> Dict[str, str]:
        """Query parameters, overridden by an urlencoded POST body (iComet's
        ``HttpQuery``). The first occurrence of a name wins. Raises 400."""
        out: Dict[str, str] = {}
        _merge(out, self.query, max_fields)
        if self.method == "POST" and self.body and not self.header(
                "content-type").startswith(("application/json", "multipart/")):
            form: Dict[str, str] = {}
            _merge(form, self.body.decode("utf-8", "replace"), max_fields)
            out.update(form)
        return out


def _merge(out: Dict[str, str], qs: str, max_fields: int) -> None:
    if not qs:
        return
    try:
        pairs = parse_qsl(qs, keep_blank_values=True, max_num_fields=max_fields,
                          errors="replace")
    except ValueError:
        raise HTTPError(400, "too many parameters") from None
    for name, value in pairs:
        out.setdefault(name, value)


class RequestParser:
    """Incremental, bounded request parser for one connection.

    ``body_limit(request)`` is asked once the head is complete and returns how
    many body bytes that route accepts (default ``MAX_BODY``).
    """

    __slots__ = ("_parser", "_req", "_target", "_head", "_raw_head", "_nheaders",
                 "_body", "_body_len", "_body_max", "_done", "_in_head", "_began_now",
                 "max_head", "max_headers", "max_target", "body_limit", "upgraded",
                 "want_continue")

    def __init__(self, *, max_head: int = MAX_HEAD, max_headers: int = MAX_HEADERS,
                 max_target: int = MAX_TARGET,
                 body_limit: Optional[Callable[[Request], int]] = None) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self.max_head = max_head
        self.max_headers = max_headers
        self.max_target = max_target
        self.body_limit = body_limit
        self.upgraded: Optional[bytes] = None   # bytes after an upgrade request's head
        self.want_continue = False  # a head with "Expect: 100-continue" waits for its body
        self._done: List[Request] = []
        self._in_head = False
        self._began_now = False
        self._reset()

    def _reset(self) -> None:
        self._req: Optional[Request] = None
        self._target: List[bytes] = []
        self._head = 0
        self._raw_head = 0
        self._nheaders = 0
        self._body: List[bytes] = []
        self._body_len = 0
        self._body_max = 0

    def feed(self, data: bytes) -> List[Request]:
        """Parse ``data``; returns the requests completed by it (pipelining
        gives several). Raises HTTPError on bad or oversized input; after
        that, or after an upgrade, the parser must not be fed again."""
        if self.upgraded is not None:
            raise HTTPError(400, "data after upgrade")
        self._began_now = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.upgraded = data[exc.args[0]:] if exc.args else b""
            if self._done:
                self._done[-1].upgrade = True
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, HTTPError):
                raise cause from None
            raise HTTPError(400, "bad request") from None
        except httptools.HttpParserInvalidMethodError:
            raise HTTPError(400, "invalid method") from None
        except httptools.HttpParserInvalidURLError:
            raise HTTPError(400, "invalid request target") from None
        except httptools.HttpParserError as exc:
            raise HTTPError(400, str(exc) or "bad request") from None
        if self._in_head and not self._began_now:
            self._raw_head += len(data)
            if self._raw_head > self.max_head:
                raise HTTPError(431, "request head too large")
        done, self._done = self._done, []
        return done

    def close(self) -> None:
        """Drop the httptools parser (it refers back to this object)."""
        self._parser = None

    @property
    def in_request(self) -> bool:
        """True while a request has begun and is not complete (for timeouts)."""
        return self._req is not None

    # -- httptools callbacks (run inside feed) --------------------------------

    def on_message_begin(self) -> None:
        self._reset()
        self._req = Request()
        self._in_head = True
        self._began_now = True

    def on_url(self, piece: bytes) -> None:
        self._target.append(piece)
        self._head += len(piece)
        if self._head > self.max_target:
            raise HTTPError(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._nheaders += 1
        self._head += len(name) + len(value) + 4
        if self._nheaders > self.max_headers:
            raise HTTPError(431, "too many headers")
        if self._head > self.max_head:
            raise HTTPError(431, "request head too large")
        key = name.decode("latin-1").lower()
        val = value.decode("latin-1")
        headers = self._req.headers
        if key in headers:
            if key == "host":                 # RFC 9112 §3.2: more than one Host is a 400
                raise HTTPError(400, "duplicate host header")
            val = headers[key] + ", " + val
        headers[key] = val

    def on_headers_complete(self) -> None:
        self._in_head = False
        req = self._req
        req.method = self._parser.get_method().decode("ascii", "replace")
        req.version = self._parser.get_http_version()
        req.keep_alive = self._parser.should_keep_alive()
        target = req.target = b"".join(self._target)
        try:
            url = httptools.parse_url(target)
        except httptools.HttpParserInvalidURLError:
            raise HTTPError(400, "invalid request target") from None
        req.path = (url.path or b"/").decode("utf-8", "replace")
        req.query = (url.query or b"").decode("utf-8", "replace")
        self._body_max = self.body_limit(req) if self.body_limit else MAX_BODY
        length = req.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._body_max:
            raise HTTPError(413, "body too large")
        if req.headers.get("expect", "").lower() == "100-continue":
            self.want_continue = True

    def on_body(self, piece: bytes) -> None:
        self._body_len += len(piece)
        if self._body_len > self._body_max:
            raise HTTPError(413, "body too large")
        self._body.append(piece)

    def on_message_complete(self) -> None:
        req = self._req
        req.body = b"".join(self._body)
        self._done.append(req)
        self._reset()


# -- responses ---------------------------------------------------------------

def _head(status: int, headers: Iterable[Tuple[str, str]], keep_alive: bool,
          version: str = "1.1") -> List[bytes]:
    lines = [b"HTTP/%s %d %s\r\n" % (version.encode(), status,
                                     STATUS.get(status, "Unknown").encode())]
    for name, value in headers:
        lines.append(b"%s: %s\r\n" % (name.encode(), value.encode("latin-1", "replace")))
    if not keep_alive:
        lines.append(b"Connection: close\r\n")
    return lines


def response(status: int, body: bytes = b"", content_type: str = "text/plain; charset=utf-8",
             headers: Iterable[Tuple[str, str]] = (), keep_alive: bool = True,
             version: str = "1.1") -> bytes:
    """A complete response with ``Content-Length``."""
    lines = _head(status, [("Content-Type", content_type), *headers], keep_alive, version)
    lines.append(b"Content-Length: %d\r\n\r\n" % len(body))
    lines.append(body)
    return b"".join(lines)


def error_response(status: int, reason: str = "",
                   headers: Iterable[Tuple[str, str]] = ()) -> bytes:
    """The answer to bad input; the connection closes after it."""
    text = (reason or STATUS.get(status, "error")).encode("utf-8", "replace") + b"\n"
    return response(status, text, headers=headers, keep_alive=False)


def stream_head(content_type: str, headers: Iterable[Tuple[str, str]] = (),
                chunked: bool = True, status: int = 200) -> bytes:
    """The head of an open-ended response. ``chunked`` for HTTP/1.1; for 1.0
    clients the body is raw and ends when the connection closes."""
    extra = [("Content-Type", content_type), *headers]
    if chunked:
        extra.append(("Transfer-Encoding", "chunked"))
        lines = _head(status, extra, True)
    else:
        lines = _head(status, extra, False, "1.0")
    lines.append(b"\r\n")
    return b"".join(lines)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (never empty: that would end the body)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"

