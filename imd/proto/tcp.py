"""The raw-TCP protocol of the native apps (DESIGN.md §4).

Frames: a 4-byte big-endian length N (1 ≤ N ≤ ``limits.max_frame``) followed
by N bytes of one JSON envelope. The connection is driven by io watchers
(:class:`imd.net.conn.Conn`); decoding runs in the hub through the fast path's
``FrameDecoder``. A bad frame (zero or oversized length) or a malformed
envelope is answered with ``error`` and ends this connection only.
"""

from __future__ import annotations

import logging

from .. import envelope
from ..fastpath import FrameDecoder, FrameError, encode_frame
from ..net.conn import Conn
from ..session import CLOSED, LIVE, Session

log = logging.getLogger("imd.tcp")

# session → its FrameDecoder, only while a partial frame is pending (rare for an idle
# connection: kept here rather than in a slot that every session would pay for)
_partial: dict = {}


class TcpSession(Session):
    __slots__ = ("conn",)

    protocol = "tcp"

    def __init__(self, router, sock, peer) -> None:
        super().__init__(router)
        self.conn = Conn(sock, self, router.limits.send_buffer)

    # Conn's handler protocol
    def on_data(self, data: bytes) -> None:
        self.touch()
        decoder = _partial.pop(self, None) or FrameDecoder(self.router.limits.max_frame)
        try:
            frames = decoder.feed(data)
        except FrameError as e:
            self.router.refuse(self, e.code, e.reason)
            return
        if decoder.pending:
            _partial[self] = decoder
        for frame in frames:
            if self.state is CLOSED or not self.receive_json(frame):
                return

    def on_close(self, reason: str) -> None:
        _partial.pop(self, None)
        self.closed(reason)

    # Session's protocol part
    def write_out(self, out) -> None:
        self.conn.write(out.frame(encode_frame))

    def write_env(self, env: dict) -> None:
        self.conn.write(encode_frame(envelope.dumps(env)))

    @classmethod
    def fanout(cls, sessions, out) -> int:
        """The raw-TCP fan-out loop (see :meth:`Session.fanout`): ``out`` is framed
        once, and a live session to which it is the next entry gets the frame with
        one ``Conn.write``; every other case (held, a gap, a duplicate, an entry
        the session itself caused) goes through :meth:`Session.deliver`."""
        plain = not out.origin        # else one of the user's own sessions caused it: deliver() decides
        frame = out.frame(encode_frame) if plain else None
        seq = out.seq
        prev = seq - 1
        n = 0
        for s in sessions:
            if plain and s.last_seq == prev and s.state is LIVE:
                s.last_seq = seq
                s.conn.write(frame)
                n += 1
            else:
                n += s.deliver(out)
        return n

    def end(self, reason: str) -> None:
        self.conn.close(reason)

    def drain(self) -> None:
        self.conn.wait_drained(self.conn.limit // 2)


class TcpProtocol:
    """The listener hook: one TcpSession per accepted socket."""

    name = "tcp"
    # What a plaintext client of the port gets when tls.tcp is on (imd.net.tls), before it is closed.
    plaintext_refusal = encode_frame(envelope.dumps(envelope.error(400, "this port speaks TLS only")))

    def __init__(self, router) -> None:
        self.router = router

    def handle(self, sock, addr) -> None:
        s = TcpSession(self.router, sock, addr)
        self.router.opened(s)

    @staticmethod
    def refuse(sock, code: int, reason: str) -> None:
        """A connection over a limit: one ``error`` frame, then the listener closes it."""
        sock.send(encode_frame(envelope.dumps(envelope.error(code, reason))))
