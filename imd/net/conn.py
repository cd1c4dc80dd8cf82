"""A connection driven by the event loop, with writes coalesced per loop iteration.

No greenlet and no libev watcher exist per idle connection (DESIGN.md §1): the
process's :class:`imd.net.poller.Poller` (one epoll set for every connection's
read side) calls ``handler.on_data(bytes)`` in the hub; writes append to a per-connection
buffer and mark the connection dirty; one :class:`Flusher` callback per loop
iteration writes every dirty buffer with as few ``send()`` calls as possible
and arms a write watcher only for the connections the kernel did not take
whole. A connection whose unsent bytes pass ``limit`` is cut off as a slow
consumer.

Everything here runs in the hub and never blocks. ``Conn`` is not
thread-safe; it is greenlet-safe in the sense that greenlets may call
``write``/``close`` at any time (they only touch memory).

Handler protocol (the object given as ``handler``):
  ``on_data(data: bytes)``   bytes received (never empty)
  ``on_close(reason: str)``  called exactly once, after the socket is closed
"""

from __future__ import annotations

import errno
import logging
import socket

import gevent
from gevent.event import Event

from .poller import poller

log = logging.getLogger("imd.net")

RECV_SIZE = 65536
CLOSE_LINGER = 5.0      # seconds a closing connection may take to drain its output
on_release = None          # set by imd.net.admission: called with the fd of every closed Conn
_DEAD = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN, errno.ETIMEDOUT, errno.EBADF)


def _cid(handler) -> str:
    """The connection id for log lines (the session's id when the handler is one)."""
    return getattr(handler, "id", None) or "-"


class Flusher:
    """Writes every dirty connection's buffer once per event-loop iteration."""

    __slots__ = ("loop", "_dirty", "_scheduled")

    def __init__(self, loop=None):
        self.loop = loop or gevent.get_hub().loop
        self._dirty = []
        self._scheduled = False

    def mark(self, conn: "Conn") -> None:
        self._dirty.append(conn)
        if not self._scheduled:
            self._scheduled = True
            self.loop.run_callback(self._flush)

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        self._scheduled = False
        for conn in dirty:
            conn._flush()


_flusher = None


def flusher() -> Flusher:
    """The flusher of the current hub (one per process)."""
    global _flusher
    if _flusher is None:
        _flusher = Flusher()
    return _flusher


class Conn:
    """A non-blocking socket read through the poller, with an output buffer and a limit."""

    open_count = 0            # Conns of this process not yet shut down

    __slots__ = ("sock", "handler", "limit", "_ww", "_out", "_outlen", "_dirty",
                 "_closing", "_drained", "_timer", "closed")

    def __init__(self, sock: socket.socket, handler, limit: int) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.handler = handler
        self.limit = limit
        self._out = None          # list of pending chunks; None while nothing is pending
        self._outlen = 0
        self._dirty = False
        self._closing = False
        self._drained = None
        self._timer = None
        self._ww = None
        self.closed = False
        Conn.open_count += 1
        poller().add(sock.fileno(), self)

    @property
    def peer(self) -> str:
        """The peer's address, for log lines (not kept: it would cost memory per connection)."""
        try:
            host, port = self.sock.getpeername()[:2]
            return f"{host}:{port}"
        except OSError:
            return "-"

    # -- reading -------------------------------------------------------------
    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._shutdown(f"recv error: {e.strerror or e}")
            return
        if not data:
            self._shutdown("eof")
            return
        try:
            self.handler.on_data(data)
        except Exception:
            log.exception("conn handler failed conn=%s peer=%s", _cid(self.handler), self.peer)
            self._shutdown("internal error")

    def pause_reading(self) -> None:
        poller().pause(self.sock.fileno())

    def resume_reading(self) -> None:
        if not self.closed and not self._closing:
            poller().resume(self.sock.fileno())

    # -- writing -------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Bytes accepted by ``write`` and not yet taken by the kernel."""
        return self._outlen

    def write(self, data: bytes) -> bool:
        """Queue ``data``; returns False (and cuts the connection) past the limit."""
        if self.closed or self._closing:
            return False
        if self._out is None:
            self._out = [data]
        else:
            self._out.append(data)
        self._outlen += len(data)
        if self._outlen > self.limit:
            log.info("slow consumer cut off conn=%s peer=%s pending=%d", _cid(self.handler), self.peer, self._outlen)
            self._shutdown("slow consumer")
            return False
        if not self._dirty and self._ww is None:
            self._dirty = True
            flusher().mark(self)
        return True

    def _flush(self) -> None:
        self._dirty = False
        if self.closed or not self._out:
            return
        self._send()

    def _send(self) -> None:
        out = self._out
        data = out[0] if len(out) == 1 else b"".join(out)
        try:
            n = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            self._shutdown(f"send error: {e.strerror or e}")
            return
        if n == len(data):
            self._out = None
            self._outlen = 0
            if self._ww is not None:
                self._ww.stop()
                self._ww = None
            if self._drained is not None:
                self._drained.set()
            if self._closing:
                self._shutdown(self._closing)
            return
        rest = data[n:]
        self._out = [rest]
        self._outlen = len(rest)
        if self._ww is None:
            self._ww = gevent.get_hub().loop.io(self.sock.fileno(), 2)
            self._ww.start(self._send)

    def wait_drained(self, below: int, timeout: float | None = None) -> bool:
        """Block the calling greenlet until fewer than ``below`` bytes are pending."""
        while self._outlen >= below and not self.closed:
            if self._drained is None:
                self._drained = Event()
            self._drained.clear()
            if not self._drained.wait(timeout):
                return False
        return not self.closed

    # -- deadlines -----------------------------------------------------------
    def on_deadline(self, now: float):
        """A deadline filed under the connection (imd.net.wheel) is the current
        handler's ``on_conn_deadline(now)``; it drops out once the connection is
        closed or handed to a handler without one (a protocol that took it over)."""
        fn = getattr(self.handler, "on_conn_deadline", None)
        if fn is None or self.closed:
            return None
        return fn(now)

    # -- closing -------------------------------------------------------------
    def close(self, reason: str = "closed", flush: bool = True) -> None:
        """Close; with ``flush``, after what is buffered reaches the kernel.

        A peer that does not read at all still gets cut off: the pending bytes
        are bounded by ``limit`` and the caller's timeouts.
        """
        if self.closed:
            return
        if flush and self._out:
            self._closing = reason
            poller().pause(self.sock.fileno())
            self._timer = gevent.get_hub().loop.timer(CLOSE_LINGER)
            self._timer.start(self._shutdown, reason)
            if not self._dirty and self._ww is None:
                self._dirty = True
                flusher().mark(self)
            return
        self._shutdown(reason)

    def _shutdown(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        Conn.open_count -= 1
        fd = self.sock.fileno()
        if on_release is not None:
            on_release(fd)
        poller().remove(fd)
        if self._ww is not None:
            self._ww.stop()
            self._ww.close()
            self._ww = None
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        self._out = None
        self._outlen = 0
        try:
            self.sock.close()
        except OSError:
            pass
        if self._drained is not None:
            self._drained.set()
        try:
            self.handler.on_close(reason)
        except Exception:
            log.exception("conn on_close failed conn=%s peer=%s", _cid(self.handler), self.peer)
