"""imd.net.conn: the per-iteration flush, bulk (fan-out) writes coalesced across
iterations, partial sends and send errors — run with both send_many
implementations (the Cython one is skipped if tests/conftest.py could not build it).

Everything runs in this test's gevent hub over socketpairs; no timing assertions:
what is checked is which bytes arrive, in which order, and how many send() calls
the flusher made.
"""

import _socket
import importlib
import socket
import time

import gevent
import pytest

from imd.net import conn as conn_mod
from imd.net.conn import BULK_FANOUT, Conn, bulk_writes, flusher


@pytest.fixture(params=["python", "cython"])
def impl(request, monkeypatch):
    try:
        mod = importlib.import_module("imd._fastpath" if request.param == "cython" else "imd._fastpath_py")
    except ImportError as e:
        pytest.skip(f"imd._fastpath is not built ({e})")
    monkeypatch.setattr(conn_mod, "send_many", mod.send_many)
    f = flusher()
    monkeypatch.setattr(f, "_bulk_ready", 0.0)
    return mod


class Handler:
    def __init__(self):
        self.data = []
        self.closed = None

    def on_data(self, data):
        self.data.append(data)

    def on_close(self, reason):
        self.closed = reason


def pair(limit=1 << 20):
    """(Conn on one end, the plain peer socket, the handler)."""
    a, b = socket.socketpair()
    h = Handler()
    c = Conn(_socket.socket(a.family, a.type, 0, fileno=a.detach()), h, limit)
    b.setblocking(False)
    return c, b, h


def read_all(sock):
    out = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def settle(seconds=0.0):
    """Let the hub run its callbacks (and timers due within ``seconds``)."""
    gevent.sleep(seconds)
    gevent.sleep(0)


def close_all(*conns):
    for c in conns:
        c.close(flush=False)


def test_an_ordinary_write_goes_out_in_the_same_iteration(impl):
    c, peer, _ = pair()
    f = flusher()
    sends = f.sends
    c.write(b"one ")
    c.write(b"two")
    gevent.sleep(0)
    assert read_all(peer) == b"one two"
    assert f.sends - sends == 1                  # both chunks in one send()
    close_all(c)


def test_bulk_writes_of_separate_iterations_share_one_send(impl):
    conns = [pair() for _ in range(BULK_FANOUT)]
    f = flusher()
    # the previous bulk flush "just ended": the next may only run a moment later
    f._bulk_ready = time.monotonic() + 0.2
    sends, flushes = f.sends, f.bulk_flushes
    for k in range(3):                          # three publications, three loop iterations
        with bulk_writes(len(conns)):
            for c, _, _ in conns:
                c.write(b"m%d;" % k)
        gevent.sleep(0)
    assert all(read_all(peer) == b"" for _, peer, _ in conns)   # still waiting
    settle(0.3)
    assert all(read_all(peer) == b"m0;m1;m2;" for _, peer, _ in conns)
    assert f.bulk_flushes - flushes == 1
    assert f.sends - sends == len(conns)        # one send() per connection for three messages
    close_all(*(c for c, _, _ in conns))


def test_an_isolated_fanout_is_not_delayed(impl):
    conns = [pair() for _ in range(BULK_FANOUT)]
    with bulk_writes(len(conns)):
        for c, _, _ in conns:
            c.write(b"now")
    gevent.sleep(0)
    assert all(read_all(peer) == b"now" for _, peer, _ in conns)
    close_all(*(c for c, _, _ in conns))


def test_small_fanouts_and_ordinary_writes_do_not_wait(impl):
    conns = [pair() for _ in range(BULK_FANOUT - 1)]
    flusher()._bulk_ready = time.monotonic() + 10
    with bulk_writes(len(conns)):               # below BULK_FANOUT: ordinary writes
        for c, _, _ in conns:
            c.write(b"x")
    gevent.sleep(0)
    assert all(read_all(peer) == b"x" for _, peer, _ in conns)
    close_all(*(c for c, _, _ in conns))


def test_an_ordinary_write_takes_pending_bulk_bytes_along_in_order(impl):
    c, peer, _ = pair()
    f = flusher()
    f._bulk_ready = time.monotonic() + 10       # no bulk flush for a long while
    with f:
        c.write(b"bulk1;")
    gevent.sleep(0)
    assert read_all(peer) == b""
    with f:
        c.write(b"bulk2;")
    c.write(b"reply;")                          # e.g. an ack: goes out now, after the bulk bytes
    gevent.sleep(0)
    assert read_all(peer) == b"bulk1;bulk2;reply;"
    f._bulk_ready = 0.0
    close_all(c)


def test_a_partial_send_is_finished_by_the_write_watcher_in_order(impl):
    c, peer, h = pair(limit=64 << 20)
    big = bytes(range(256)) * (16 << 12)         # 16 MiB: more than the socket buffer takes
    c.write(big)
    c.write(b"tail")
    gevent.sleep(0)
    assert c.pending > 0 and c._ww is not None
    c.write(b"+more")                           # while the watcher owns the buffer
    got = b""
    deadline = time.monotonic() + 30
    while len(got) < len(big) + 9 and time.monotonic() < deadline:
        got += read_all(peer)
        gevent.sleep(0.001)
    assert got == big + b"tail+more"
    gevent.sleep(0.01)
    assert c.pending == 0 and c._ww is None and h.closed is None
    close_all(c)


def test_a_send_to_a_gone_peer_closes_only_that_connection(impl):
    (c1, p1, h1), (c2, p2, h2) = pair(), pair()
    p1.close()
    c1.write(b"x" * 100)
    c2.write(b"y")
    gevent.sleep(0)
    settle(0.01)
    if h1.closed is None:                       # the first send may still be accepted
        c1.write(b"x")
        settle(0.01)
    assert h1.closed is not None and h1.closed.startswith(("send error", "eof", "recv error"))
    assert read_all(p2) == b"y" and h2.closed is None
    close_all(c2)


def test_writes_made_while_the_flush_runs_are_kept(impl):
    """A handler's on_close (run inside the flush) writes to another connection of
    the same batch: those bytes must not be lost when that connection's result
    is processed."""
    (c1, p1, h1), (c2, p2, h2) = pair(), pair()

    def on_close(reason, h1=h1):
        h1.closed = reason
        c2.write(b"late")
    h1.on_close = on_close
    p1.close()
    with bulk_writes(BULK_FANOUT):
        c1.write(b"x" * 100)
        c2.write(b"early;")
    settle(0.01)
    if h1.closed is None:
        c1.write(b"x")
        c2.write(b"")
        settle(0.01)
    settle(0.01)
    assert h1.closed is not None
    assert read_all(p2) == b"early;late"
    close_all(c2)


class Wrapped:
    """A socket-like layer (as XMPP's TLS is): the flusher must call its send()."""

    def __init__(self, sock):
        self.sock = sock
        self.sent = []

    def send(self, data):
        self.sent.append(bytes(data))
        return self.sock.send(data)

    def recv(self, n):
        return self.sock.recv(n)

    def fileno(self):
        return self.sock.fileno()

    def setblocking(self, flag):
        self.sock.setblocking(flag)

    def getpeername(self):
        return self.sock.getpeername()

    def close(self):
        self.sock.close()


def test_socket_like_layers_are_written_through_their_send(impl):
    a, b = socket.socketpair()
    w = Wrapped(a)
    c = Conn(w, Handler(), 1 << 20)
    b.setblocking(False)
    with bulk_writes(BULK_FANOUT):
        c.write(b"abc")
    c.write(b"def")
    gevent.sleep(0)
    assert w.sent == [b"abcdef"] and read_all(b) == b"abcdef"
    close_all(c)


def test_one_write_into_an_empty_buffer_is_never_a_slow_consumer(impl):
    """A single answer larger than the limit (an admin API reply naming a mid per
    user of a broadcast) goes out whole; a backlog that grows past it is cut."""
    c, peer, h = pair(limit=4096)
    answer = b"a" * 100_000
    assert c.write(answer)
    got = b""
    deadline = time.monotonic() + 30
    while len(got) < len(answer) and time.monotonic() < deadline:
        got += read_all(peer)
        gevent.sleep(0.001)
    assert got == answer and h.closed is None
    slow, _peer, hs = pair(limit=4096)           # a peer that reads nothing
    slow.write(b"b" * 100_000)
    gevent.sleep(0)
    results = [slow.write(b"c" * 1024) for _ in range(200)]
    assert results[-1] is False and hs.closed == "slow consumer"
    close_all(c)


def test_connections_holding_the_same_chunks_share_one_join_and_each_gets_its_own_bytes(impl):
    """A fan-out writes the same frames to each connection: the flush joins them once.
    Connections in between with other chunks (equal in value, other objects, or
    different) still get exactly their own bytes."""
    conns = [pair() for _ in range(BULK_FANOUT + 4)]
    frames = [b"frame-%d;" % k for k in range(3)]
    f = flusher()
    f._bulk_ready = time.monotonic() + 10        # hold the bulk flush: write_all is called below
    sent = []
    with bulk_writes(len(conns)):
        for i, (c, _, _) in enumerate(conns):
            own = [bytes(bytearray(fr)) for fr in frames] if i % 5 == 1 else list(frames)
            if i % 7 == 3:
                own[1] = b"other;"
            for fr in own:
                c.write(fr)
            sent.append(b"".join(own))
    joined = {}
    real = conn_mod.send_many

    def spy(items):
        for _, data in items:
            joined[id(data)] = data
        return real(items)

    conn_mod.send_many = spy
    try:
        pending, f._bulk = f._bulk, []
        f._bulk_armed = False
        f.write_all(pending)
    finally:
        conn_mod.send_many = real
    assert [read_all(peer) for _, peer, _ in conns] == sent
    assert len(joined) < len(conns)              # shared buffers: fewer joins than connections
    close_all(*(c for c, _, _ in conns))


def test_a_closing_connection_drains_its_output_then_closes(impl):
    c, b, h = pair()
    c.write(b"x" * (4 << 20))           # more than the socket buffers take at once
    c.close("bye")
    assert not c.closed and h.closed is None
    assert c.write(b"more") is False     # nothing is accepted while closing
    got = b""
    for _ in range(2000):
        got += read_all(b)
        if c.closed:
            break
        settle(0.001)
    got += read_all(b)
    assert got == b"x" * (4 << 20) and h.closed == "bye"
    b.close()


def test_a_peer_that_does_not_read_is_cut_off_after_the_linger(impl, monkeypatch):
    monkeypatch.setattr(conn_mod, "CLOSE_LINGER", 0.05)
    c, b, h = pair()
    c.write(b"x" * (4 << 20))
    c.close("bye")
    settle(0.01)
    assert not c.closed
    settle(0.2)
    assert c.closed and h.closed == "bye" and c.pending == 0
    b.close()


def test_a_conn_is_112_bytes():
    import sys
    c, b, h = pair()
    assert sys.getsizeof(c) <= 112        # 10 slots (with the GC header): pymalloc's 112-byte class
    close_all(c)
    b.close()
