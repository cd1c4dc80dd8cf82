"""The sessions of the comet port's users: WebSocket, SSE and long-poll.

Each is a :class:`imd.session.Session` (identity, ``send``, ``close``, inbox
ordering) whose protocol part turns envelopes into its framing: a text frame
(:class:`WsSession`), an SSE event with ``id: <seq>`` for inbox entries
(:class:`SseSession`), or an item of the next long-poll answer
(:class:`PollSession`). The endpoints that create them are in users.py.
Everything runs in the hub and never blocks (``drain`` blocks its caller,
a replay greenlet).
"""

from __future__ import annotations

import logging
import time

import gevent

from imd.fastpath import WSDecoder, WSError, ws_close_payload, ws_encode
from imd.proto.comet import formats as fmt
from imd.proto.comet.http import LAST_CHUNK, chunk
from imd.session import CLOSED, Session

log = logging.getLogger("imd.comet")

# WebSocket session → its WSDecoder, only while a frame or message is incomplete (rare
# for an idle connection: kept here rather than in a slot that every session would pay for)
_partial: dict = {}

JSON = "application/json; charset=utf-8"
JS = "text/javascript; charset=utf-8"


def ws_text(data: bytes) -> bytes:
    return ws_encode(1, data)


def sse_data(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


class WsSession(Session):
    """A user session over a WebSocket (the Conn's handler after the upgrade)."""

    __slots__ = ("conn",)
    protocol = "ws"

    def __init__(self, router, conn) -> None:
        super().__init__(router)
        self.conn = conn

    def on_data(self, data: bytes) -> None:
        self.touch()
        decoder = _partial.pop(self, None) or WSDecoder(self.router.limits.max_frame)
        try:
            frames = decoder.feed(data)
        except WSError as e:
            self._close_frame(e.code, e.reason)
            return
        if not decoder.idle:
            _partial[self] = decoder
        for op, payload in frames:
            if self.state is CLOSED or self.conn.closed:
                return
            if op == 1:
                if not self.receive_json(payload):
                    return
            elif op == 9:
                self.conn.write(ws_encode(10, payload))
            elif op == 8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1000
                self._close_frame(code if code in (1000, 1001) else 1000, "bye")
                return
            elif op == 2:
                self._close_frame(1003, "binary frames are not accepted")
                return

    def on_close(self, reason: str) -> None:
        _partial.pop(self, None)
        self.closed(reason)

    def write_out(self, out) -> None:
        self.conn.write(out.frame(ws_text))

    def end(self, reason: str) -> None:
        self._close_frame(1000, reason)

    def _close_frame(self, code: int, reason: str) -> None:
        self.conn.write(ws_encode(8, ws_close_payload(code, reason)))
        self.conn.close(reason)

    def drain(self) -> None:
        self.conn.wait_drained(self.conn.limit // 2)


class SseSession(Session):
    """A user session over one SSE response (``/im/events``). Once the response
    head is out the session is the Conn's handler (no HTTP state is kept) and the
    connection ends with the stream; input from the client is ignored.

    The body is chunked (HTTP/1.1); a session whose response is not (HTTP/1.0,
    see ``HttpConn.stream_chunked``) is a :class:`RawSseSession` (the
    same slots: a class attribute says it, not a slot every session pays for)."""

    __slots__ = ("conn",)
    protocol = "sse"
    chunked = True

    def __init__(self, router, conn) -> None:
        super().__init__(router)
        self.conn = conn

    def write(self, data: bytes) -> None:
        """One piece of the event stream."""
        self.conn.write(chunk(data) if self.chunked else data)

    def write_out(self, out) -> None:
        data = out.frame(sse_data)
        if out.seq:
            data = b"id: %d\n" % out.seq + data
        self.write(data)

    def end(self, reason: str) -> None:
        if not self.conn.closed:
            if self.chunked:
                self.conn.write(LAST_CHUNK)
            self.conn.close(reason)
        self.closed(reason)

    # Conn's handler protocol
    def on_data(self, data: bytes) -> None:
        """The stream is one-way: whatever the client sends is dropped."""

    def on_close(self, reason: str) -> None:
        self.closed(reason)

    def drain(self) -> None:
        self.conn.wait_drained(self.conn.limit // 2)

    def on_deadline(self, now: float):
        """The stream itself shows liveness (a dead client fails the write):
        only ping every ``heartbeat`` seconds, never time out on silence."""
        if self.state is CLOSED:
            return None
        self.send_ping()
        return now + self.router.limits.heartbeat


class RawSseSession(SseSession):
    """An SSE session whose response body is not chunked (an HTTP/1.0 request):
    it ends when the connection does."""

    __slots__ = ()
    chunked = False


class PollSession(Session):
    """A user session spread over long-poll requests (``/im/poll``)."""

    __slots__ = ("users", "queue", "queued", "waiter", "cb", "since_poll", "_scheduled")
    protocol = "poll"

    def __init__(self, router, users) -> None:
        super().__init__(router)
        self.users = users
        self.queue: list = []
        self.queued = 0
        self.waiter = None          # HttpConn of the poll being held
        self.cb = ""
        self.since_poll = time.monotonic()
        self._scheduled = False

    def write_out(self, out) -> None:
        data = out.json()
        self.queue.append(data)
        self.queued += len(data)
        if self.queued > self.router.limits.send_buffer:
            log.info("slow consumer cut off session=%s user=%s", self.id, self.user)
            self.queue.clear()
            self.closed("slow consumer")
            return
        if self.waiter is not None and not self._scheduled:
            self._scheduled = True
            gevent.get_hub().loop.run_callback(self._flush)

    def _flush(self) -> None:
        """Loop callback: answer the held poll with what was queued this iteration."""
        self._scheduled = False
        if self.queue and self.waiter is not None:
            self._answer()

    def attach(self, http, cb: str) -> None:
        """A poll request arrived for this session: answer now or hold it."""
        if self.waiter is not None:
            self._answer()                  # a newer poll replaces the held one
        self.waiter = http
        self.cb = cb
        self.since_poll = time.monotonic()
        http.hold(self)
        if self.queue and not self._scheduled:
            self._scheduled = True
            gevent.get_hub().loop.run_callback(self._flush)

    def _answer(self) -> None:
        """Answer the held poll now with everything queued (maybe ``[]``)."""
        http, self.waiter = self.waiter, None
        if http is None:
            return
        body = b"[" + b",".join(self.queue) + b"]"
        self.queue = []
        self.queued = 0
        self.since_poll = time.monotonic()
        if self.cb:
            http.reply(200, self.cb.encode() + b"(" + fmt.js_safe(body) + b");\n", JS,
                       self.users.no_cache)
        else:
            http.reply(200, body, JSON, self.users.no_cache)

    def gone(self) -> None:
        self.waiter = None

    def end(self, reason: str) -> None:
        if self.waiter is not None:
            self._answer()
        self.closed(reason)

    def closed(self, reason: str) -> None:
        if self.waiter is not None:
            self._answer()
        super().closed(reason)

    def on_deadline(self, now: float):
        if self.state is CLOSED:
            return None
        limits = self.router.limits
        if self.waiter is not None:
            if now - self.since_poll >= limits.heartbeat:
                self._answer()
                return now + limits.idle_timeout
            return self.since_poll + limits.heartbeat
        if now - self.since_poll >= limits.idle_timeout:
            self.closed("not polled")
            return None
        return self.since_poll + limits.idle_timeout
