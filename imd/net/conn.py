"""A connection driven by the event loop, with writes coalesced per loop iteration.

No greenlet and no libev watcher exist per idle connection (DESIGN.md §1): the
process's :class:`imd.net.poller.Poller` (one epoll set for every connection's
read side) calls ``handler.on_data(bytes)`` in the hub; writes append to a
per-connection buffer and mark the connection dirty; the :class:`Flusher` writes
every dirty buffer with one ``send()`` per connection, all of them in one call of
``fastpath.send_many`` (the kernel work runs in a C loop without the GIL), and
arms a write watcher only for the connections the kernel did not take whole.
A connection whose unsent bytes pass ``limit`` is cut off as a slow consumer.

Two kinds of writes (see :class:`Flusher`): ordinary writes (answers, acks,
1:1 deliveries) go out at the end of the loop iteration that made them;
writes made inside ``with bulk_writes(n):`` (one event delivered to n >= 16
connections) may wait a little so that the deliveries of several publications
share one ``send()`` per connection.

Everything here runs in the hub and never blocks. ``Conn`` is not
thread-safe; it is greenlet-safe in the sense that greenlets may call
``write``/``close`` at any time (they only touch memory).

Handler protocol (the object given as ``handler``):
  ``on_data(data: bytes)``   bytes received (never empty)
  ``on_close(reason: str)``  called exactly once, after the socket is closed
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import logging
import os
import socket
import time

import gevent
from gevent.event import Event

from .poller import poller
from ..fastpath import send_many

log = logging.getLogger("imd.net")

RECV_SIZE = 65536
CLOSE_LINGER = 5.0      # seconds a closing connection may take to drain its output
BULK_DELAY_MAX = 0.05   # seconds bulk writes may wait for the next bulk flush, at most
BULK_FANOUT = 16        # one event delivered to at least this many connections is a fan-out
on_release = None          # set by imd.net.admission: called with the fd of every closed Conn
_RETRY = (-errno.EAGAIN, -errno.EINTR)
_PLAIN = (_socket.socket, socket.socket)   # sockets send_many may write to by descriptor

# Conn._dirty: which flush the connection waits for
CLEAN, NOW, BULK = 0, 1, 2


def _cid(handler) -> str:
    """The connection id for log lines (the session's id when the handler is one)."""
    return getattr(handler, "id", None) or "-"


class Flusher:
    """Writes dirty connections' buffers; one per process (:func:`flusher`).

    Ordinary writes are flushed by a loop callback, at the end of the loop
    iteration that made them. Bulk writes (made while ``bulk`` > 0, i.e. inside
    ``with bulk_writes(n):``) are flushed by their own flush, which runs at most
    once per "duty cycle": after a bulk flush that took T seconds, the next one
    waits until min(T, BULK_DELAY_MAX) seconds after it ended. An isolated
    fan-out therefore goes out in the iteration that made it; under a stream of
    large fan-outs the publications that arrive while the previous one is being
    written share one ``send()`` per connection, and the hub spends at most
    about half its time in bulk flushes. An ordinary write to a connection that
    holds bulk bytes sends them along, in order, in the same iteration.
    """

    __slots__ = ("loop", "bulk", "_dirty", "_scheduled", "_bulk", "_bulk_armed", "_bulk_ready",
                 "_bulk_timer", "sends", "bulk_flushes")

    def __init__(self, loop=None):
        self.loop = loop or gevent.get_hub().loop
        self.bulk = 0                 # > 0 inside bulk_writes()
        self._dirty = []
        self._scheduled = False
        self._bulk = []
        self._bulk_armed = False
        self._bulk_ready = 0.0        # time.monotonic() from which the next bulk flush may run
        self._bulk_timer = None
        self.sends = 0                # send() calls made by flushes (for tests and metrics)
        self.bulk_flushes = 0

    def __enter__(self) -> "Flusher":
        self.bulk += 1
        return self

    def __exit__(self, *exc) -> None:
        self.bulk -= 1

    def mark(self, conn: "Conn") -> None:
        """Flush ``conn`` at the end of this loop iteration."""
        self._dirty.append(conn)
        if not self._scheduled:
            self._scheduled = True
            self.loop.run_callback(self._flush)

    def mark_bulk(self, conn: "Conn") -> None:
        """Flush ``conn`` with the next bulk flush."""
        self._bulk.append(conn)
        if self._bulk_armed:
            return
        self._bulk_armed = True
        delay = self._bulk_ready - time.monotonic()
        if delay <= 0:
            self.loop.run_callback(self._flush_bulk)
            return
        self._bulk_timer = self.loop.timer(delay)
        self._bulk_timer.start(self._flush_bulk)

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        self._scheduled = False
        self.write_all(dirty)

    def _flush_bulk(self) -> None:
        self._bulk_timer = None
        t0 = time.monotonic()
        conns, self._bulk = self._bulk, []
        self._bulk_armed = False
        self.bulk_flushes += 1
        self.write_all(conns)
        t1 = time.monotonic()
        self._bulk_ready = t1 + min(t1 - t0, BULK_DELAY_MAX)

    def write_all(self, conns) -> None:
        """One ``send()`` for each dirty connection of ``conns`` (duplicates and
        connections flushed meanwhile are skipped): for plain sockets all in one
        ``send_many``, for socket-like layers (TLS) through their ``send``.
        Consecutive connections that hold the same chunks (a fan-out writes the
        same frames to each) share one joined buffer."""
        batch, items = [], []
        last_out = last_data = None
        for conn in conns:
            if not conn._dirty:
                continue
            conn._dirty = CLEAN
            out = conn._out
            if not out or conn.closed or conn._ww is not None:
                continue
            if type(conn.sock) not in _PLAIN:
                conn._send()
                continue
            if len(out) == 1:
                data = out[0]
            elif out == last_out:          # equal chunks (the same objects: a pointer compare each)
                data = last_data
            else:
                data = last_data = b"".join(out)
                last_out = out
            batch.append((conn, len(out)))
            items.append((conn.sock.fileno(), data))
        if not items:
            return
        self.sends += len(items)
        results = send_many(items)
        for (conn, chunks), (_, data), n in zip(batch, items, results):
            conn._sent(data, chunks, n)


_flusher = None


def flusher() -> Flusher:
    """The flusher of the current hub (one per process)."""
    global _flusher
    if _flusher is None:
        _flusher = Flusher()
    return _flusher


_NOT_BULK = contextlib.nullcontext()


def bulk_writes(fanout: int):
    """``with bulk_writes(n):`` around the delivery of one event to ``n``
    connections: when ``n`` >= BULK_FANOUT the writes made inside may wait for
    the next bulk flush (see :class:`Flusher`). Not for code that blocks inside."""
    return (_flusher or flusher()) if fanout >= BULK_FANOUT else _NOT_BULK


class Conn:
    """A non-blocking socket read through the poller, with an output buffer and a limit."""

    open_count = 0            # Conns of this process not yet shut down

    __slots__ = ("sock", "handler", "limit", "_ww", "_out", "_outlen", "_dirty",
                 "_closing", "_drained", "closed")

    def __init__(self, sock: socket.socket, handler, limit: int) -> None:
        if type(sock) not in _PLAIN or sock.gettimeout() != 0.0:    # the listener's are already
            sock.setblocking(False)
        self.sock = sock
        self.handler = handler
        self.limit = limit
        self._out = None          # list of pending chunks; None while nothing is pending
        self._outlen = 0
        self._dirty = CLEAN
        self._closing = False     # while closing: (reason, linger timer); one slot less per Conn
        self._drained = None
        self._ww = None
        self.closed = False
        Conn.open_count += 1
        poller().add(sock.fileno(), self)

    @property
    def peer(self) -> str:
        """The peer's address, for log lines (not kept: it would cost memory per connection)."""
        try:
            addr = self.sock.getpeername()
        except OSError:
            return "-"
        if isinstance(addr, tuple):
            return f"{addr[0]}:{addr[1]}"
        return str(addr) or "-"         # a unix socket: a path, or '' when unnamed

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
        """Queue ``data``; returns False (and cuts the connection) when unsent bytes
        were already waiting and now pass the limit (a slow consumer)."""
        if self.closed or self._closing:
            return False
        if self._out is None:
            self._out = [data]
        else:
            self._out.append(data)
        self._outlen += len(data)
        if self._outlen > self.limit and self._outlen > len(data):
            # a backlog the peer did not read; one write into an empty buffer (an
            # admin API answer naming a mid per user of a broadcast) is not one
            log.info("slow consumer cut off conn=%s peer=%s pending=%d", _cid(self.handler), self.peer, self._outlen)
            self._shutdown("slow consumer")
            return False
        dirty = self._dirty
        if dirty == NOW or self._ww is not None:
            return True
        f = _flusher or flusher()
        if f.bulk:
            if not dirty:
                self._dirty = BULK
                f.mark_bulk(self)
        else:
            self._dirty = NOW          # also when BULK: the bulk bytes go along now
            f.mark(self)
        return True

    def _send(self) -> None:
        """Write what is pending (the write watcher's callback)."""
        out = self._out
        if self.closed or not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        try:
            n = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            self._shutdown(f"send error: {e.strerror or e}")
            return
        self._sent(data, len(out), n)

    def _sent(self, data: bytes, chunks: int, n: int) -> None:
        """``send()`` took ``n`` bytes (or failed with ``-errno``) of ``data``, the
        join of the first ``chunks`` pending chunks (more may have been written
        since the data was taken)."""
        if self.closed:
            return
        if n < 0:
            if n not in _RETRY:
                self._shutdown(f"send error: {os.strerror(-n)}")
                return
            n = 0
        out = self._out
        self._outlen -= n
        if n == len(data):
            if chunks == len(out):
                self._out = None
                if self._ww is not None:
                    self._ww.stop()
                    self._ww = None
                if self._drained is not None:
                    self._drained.set()
                if self._closing:
                    self._shutdown(self._closing[0])
                return
            del out[:chunks]           # written meanwhile: the connection is marked again
            return
        out[:chunks] = [data[n:]]
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
            timer = gevent.get_hub().loop.timer(CLOSE_LINGER)
            self._closing = (reason, timer)
            poller().pause(self.sock.fileno())
            timer.start(self._shutdown, reason)
            if self._dirty != NOW and self._ww is None:
                self._dirty = NOW
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
        closing = self._closing
        if closing:
            closing[1].stop()
            self._closing = (closing[0], None)
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
