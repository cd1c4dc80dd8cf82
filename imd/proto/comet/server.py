"""One HTTP/1.1 connection of the comet or admin port, driven by io watchers.

:class:`HttpConn` is the handler of an :class:`imd.net.conn.Conn`: bytes are
parsed in the hub (:class:`~imd.proto.comet.http.RequestParser`), requests are
answered one at a time in arrival order (pipelined ones wait in a short
queue), and writes go through the Conn's per-loop-iteration flush. An
application object (the front or the admin port) answers each request with
``app.dispatch(http, req)``: either at once (:meth:`HttpConn.reply`) or later —
a long-poll or a stream stays open with :meth:`HttpConn.start_stream`, and
whatever holds it (``http.stream``) gets ``gone()`` if the client leaves
first. A request whose answer needs to wait for the store runs in a greenlet
the application spawns; the connection stays ``busy`` until it replies.

Time limits come from one wheel (``router.wheel``), not a timer per
connection: a request head must complete within ``head_timeout`` (else 408)
and an idle keep-alive connection is closed after ``idle_timeout``. The
deadlines are filed under the :class:`~imd.net.conn.Conn`, which hands them to
its current handler: once a WebSocket takes the connection over, nothing
refers to the HttpConn any more and it is freed at once.

Every method runs in the hub and never blocks; greenlets may call ``reply``.
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional, Tuple

from imd.clock import mono_now
from imd.net.conn import Conn
from imd.proto.comet.http import (LAST_CHUNK, HTTPError, Request, RequestParser, chunk,
                                  error_response, response, stream_head)

log = logging.getLogger("imd.http")

MAX_PIPELINE = 16
SERVER = ("Server", "imd")
# What a plain-HTTP client of an HTTPS port gets (imd.net.tls) before it is closed.
PLAINTEXT_REFUSAL = error_response(400, "this port speaks HTTPS only: use https:// (or wss:// for WebSocket)")


def raw_socket(sock):
    """The plain ``_socket.socket`` inside a gevent socket. The connection is
    driven by io watchers, so gevent's wrapper (with two io watchers of its
    own, about 550 bytes per connection) is not needed; it holds no
    finalizer, so dropping it leaves the descriptor open."""
    return getattr(sock, "_sock", sock)


class HttpConn:
    """One HTTP connection: parser, queue of pipelined requests, current answer."""

    __slots__ = ("conn", "parser", "app", "queue", "busy", "stream", "chunked", "keep",
                 "began", "last_active", "_running", "_due", "fresh", "head")

    def __init__(self, sock, app, limit: int) -> None:
        self.app = app
        self.parser: Optional[RequestParser] = None   # only while bytes are being parsed
        self.queue: Optional[list] = None      # pipelined requests waiting their turn
        self.busy = False
        self.stream = None          # holder of an open answer: has gone()
        self.chunked = False
        self.keep = True
        self.head = False            # the current request is HEAD: answers carry no body
        self.began = self.last_active = mono_now()
        self.fresh = True            # no request received yet: the head timeout applies
        self._running = False
        self._due = 0.0              # earliest deadline this connection is filed under
        self.conn = Conn(sock, self, limit)
        self._arm(self.began + app.limits.auth_timeout)

    @property
    def ip(self) -> str:
        """The peer's IP address (asked from the socket: not kept per connection)."""
        try:
            return self.conn.sock.getpeername()[0]
        except OSError:
            return ""

    # -- Conn handler ------------------------------------------------------------
    def on_data(self, data: bytes) -> None:
        now = mono_now()
        parser = self.parser
        if parser is None:
            parser = self.parser = RequestParser(body_limit=self.app.body_limit)
        was_in = parser.in_request
        self.last_active = now
        try:
            reqs = parser.feed(data)
        except HTTPError as e:
            self.fail(e)
            return
        if parser.want_continue:
            parser.want_continue = False     # the head is fine: ask for the body
            self.conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if parser.in_request:
            if reqs or not was_in:
                self.began = now             # a new request began in this data
                self._arm(now + self.app.limits.auth_timeout)
        elif parser.upgraded is None:
            self.parser = None               # between requests: no parser kept while idle
            parser.close()
        if reqs:
            self.fresh = False
            if self.queue is None:
                self.queue = reqs
            else:
                self.queue.extend(reqs)
            if len(self.queue) > MAX_PIPELINE:
                self.fail(HTTPError(429, "too many pipelined requests"))
                return
        self._next()

    def on_close(self, reason: str) -> None:
        self.queue = None
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.gone()

    # -- request loop -----------------------------------------------------------------
    def _next(self) -> None:
        if self._running:
            return
        self._running = True
        try:
            while self.queue and not self.busy and not self.conn.closed:
                req = self.queue.pop(0)
                if not self.queue:
                    self.queue = None
                self.busy = True
                self.keep = req.keep_alive and not req.upgrade   # no HTTP after an upgrade
                self.head = req.method == "HEAD"
                if req.upgrade and self.queue:
                    self.fail(HTTPError(400, "requests after an upgrade"))
                    return
                try:
                    self.app.dispatch(self, req)
                except HTTPError as e:
                    self.fail(e)
                except Exception:
                    log.exception("request failed path=%s peer=%s", req.path, self.conn.peer)
                    self.fail(HTTPError(500, "internal error"))
        finally:
            self._running = False

    def _done(self) -> None:
        self.busy = False
        self.stream = None
        self.last_active = mono_now()
        if not self.keep:
            self.conn.close("done")
            return
        self._arm(self.last_active + self.app.limits.idle_timeout)
        self._next()

    # -- answers ----------------------------------------------------------------------
    def reply(self, status: int, body: bytes = b"", content_type: str = "text/plain; charset=utf-8",
              headers: Iterable[Tuple[str, str]] = ()) -> None:
        """A complete answer to the current request."""
        if self.conn.closed:
            return
        data = response(status, body, content_type, (SERVER, *headers), self.keep)
        self.conn.write(data[:len(data) - len(body)] if self.head else data)
        self._done()

    def fail(self, err: HTTPError) -> None:
        """Answer bad input and close the connection (nothing else is affected)."""
        self.queue = None
        self.keep = False
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.gone()
        if not self.conn.closed:
            if not self.chunked:
                self.conn.write(error_response(err.status, err.reason, err.headers))
            self.conn.close(f"http {err.status}")

    def start_stream(self, req: Request, holder, content_type: str,
                     headers: Iterable[Tuple[str, str]] = ()) -> None:
        """Begin an open-ended answer (chunked; raw until close for HTTP/1.0)."""
        self.stream = holder
        self.chunked = req.version == "1.1"
        if not self.chunked:
            self.keep = False
        self.conn.write(stream_head(content_type, (SERVER, *headers), self.chunked))

    def hold(self, holder) -> None:
        """Keep the request open without writing yet (long-poll)."""
        self.stream = holder

    def send(self, data: bytes) -> bool:
        """One piece of a streamed answer; False if the connection is gone."""
        return self.conn.write(chunk(data) if self.chunked else data)

    def end_stream(self) -> None:
        """Finish a streamed answer; the connection goes on with the next request."""
        if self.conn.closed:
            return
        if self.chunked:
            self.conn.write(LAST_CHUNK)
            self.chunked = False
        else:
            self.keep = False
        self._done()

    def hand_over_stream(self, req: Request, handler, content_type: str,
                         headers: Iterable[Tuple[str, str]] = ()) -> bool:
        """Begin an open-ended answer that ``handler`` writes from now on, straight
        to the Conn (it becomes the Conn's handler): no HTTP state is kept for a
        stream that lasts as long as the connection, and the connection ends with
        it (requests pipelined behind it are not answered). Returns whether the
        body is chunked (HTTP/1.1: each piece then goes through :func:`chunk` and
        :data:`LAST_CHUNK` ends it; :meth:`stream_chunked`)."""
        chunked = self.stream_chunked(req)
        self.keep = False
        self.conn.write(stream_head(content_type, (SERVER, *headers, ("Connection", "close")), chunked))
        self.take_over(handler)
        return chunked

    @staticmethod
    def stream_chunked(req: Request) -> bool:
        """Whether a stream answering ``req`` (:meth:`hand_over_stream`) has a chunked body."""
        return req.version == "1.1"

    def take_over(self, handler) -> Optional[bytes]:
        """Hand the socket to another protocol (WebSocket): returns the bytes
        received after the upgrade request."""
        self.conn.handler = handler
        self.busy = True
        parser, self.parser = self.parser, None
        if parser is None:
            return None
        parser.close()
        return parser.upgraded

    # -- deadlines (router.wheel) -------------------------------------------------------
    @property
    def in_request(self) -> bool:
        return self.parser is not None and self.parser.in_request

    def _arm(self, when: float) -> None:
        """Make sure the wheel looks at this connection by ``when``."""
        if not self._due or when < self._due - 1:
            self._due = when
            self.app.wheel.add(self.conn, when)

    def on_conn_deadline(self, now: float) -> Optional[float]:
        """The wheel's call (through the Conn): 408 a request that is late, close
        an idle connection; returns when to look again. An entry filed before an
        earlier one replaced it finds ``_due`` in the future and drops out; a
        busy connection is not looked at (``_done`` files it again)."""
        if now + 1 < self._due:
            return None
        self._due = 0.0
        if self.conn.closed:
            return None
        limits = self.app.limits
        if self.in_request or self.fresh:
            due = self.began + limits.auth_timeout
            if now >= due:
                self.fail(HTTPError(408, "request not received in time"))
                return None
        elif self.busy:
            return None
        else:
            due = self.last_active + limits.idle_timeout
            if now >= due:
                self.conn.close("idle")
                return None
        self._due = due
        return due
