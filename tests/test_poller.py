"""imd.net.poller: every Conn's read side in one epoll set, in-process over socketpairs
(with both recv_many implementations; the Cython one is skipped if it is not built)."""

import errno
import importlib
import socket

import gevent
import pytest
from gevent.monkey import get_original

from imd.net import poller as poller_mod
from imd.net.conn import Conn
from tests.test_conn import Handler

_socketpair = get_original("socket", "socketpair")    # plain sockets: Conn drives them itself


@pytest.fixture(autouse=True, params=["python", "cython"])
def impl(request, monkeypatch):
    try:
        mod = importlib.import_module("imd._fastpath" if request.param == "cython" else "imd._fastpath_py")
    except ImportError as e:
        pytest.skip(f"imd._fastpath is not built ({e})")
    monkeypatch.setattr(poller_mod, "recv_many", mod.recv_many)
    return mod


def pair():
    a, b = _socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    h = Handler()
    return Conn(a, h, 1 << 20), h, b


def wait(pred, timeout=5.0):
    with gevent.Timeout(timeout, False):
        while not pred():
            gevent.sleep(0.01)
    return pred()


def test_reads_reach_the_handler_and_eof_closes():
    conn, h, peer = pair()
    peer.send(b"hello")
    assert wait(lambda: h.data == [b"hello"])
    peer.close()
    assert wait(lambda: h.closed == "eof")
    assert conn.closed


def test_pause_and_resume_reading():
    conn, h, peer = pair()
    conn.pause_reading()
    conn.pause_reading()                    # twice is harmless
    peer.send(b"x")
    gevent.sleep(0.1)
    assert h.data == []
    conn.resume_reading()
    conn.resume_reading()
    assert wait(lambda: h.data == [b"x"])
    conn.close("done")
    peer.close()


def test_more_ready_sockets_than_one_wakeup_takes(monkeypatch):
    monkeypatch.setattr(poller_mod, "MAX_EVENTS", 3)
    conns = [pair() for _ in range(20)]
    for i, (_, _, peer) in enumerate(conns):
        peer.send(b"%d" % i)
    assert wait(lambda: all(h.data for _, h, _ in conns))
    assert [h.data for _, h, _ in conns] == [[b"%d" % i] for i in range(20)]
    for conn, _, peer in conns:
        conn.close("done")
        peer.close()


def test_closed_conn_is_forgotten_and_its_fd_reused():
    conn, h, peer = pair()
    fd = conn.sock.fileno()
    conn.close("done", flush=False)
    assert h.closed == "done"
    p = poller_mod.poller()
    assert fd >= len(p._conns) or p._conns[fd] is None
    peer.close()
    conn2, h2, peer2 = pair()              # may get the same descriptor number
    peer2.send(b"again")
    assert wait(lambda: h2.data == [b"again"])
    conn2.close("done")
    peer2.close()


def test_a_handler_closing_another_conn_in_the_same_wakeup():
    (c1, h1, p1), (c2, h2, p2) = pair(), pair()

    def close_other(data, other=c2):
        h1.data.append(data)
        other.close("closed by a neighbour", flush=False)
    h1.on_data = close_other
    p1.send(b"a")
    p2.send(b"b")
    assert wait(lambda: h1.data and h2.closed)
    gevent.sleep(0.05)
    assert h2.closed == "closed by a neighbour" and h2.data in ([], [b"b"])
    c1.close("done")
    p1.close()
    p2.close()


def test_plain_sockets_ready_together_are_read_in_one_recv_many(monkeypatch, impl):
    calls = []

    def spy(fds, size):
        calls.append(list(fds))
        return impl.recv_many(fds, size)
    monkeypatch.setattr(poller_mod, "recv_many", spy)
    conns = [pair() for _ in range(5)]
    gevent.sleep(0.05)
    calls.clear()
    for i, (_, _, peer) in enumerate(conns):
        peer.send(b"m%d" % i)
    assert wait(lambda: all(h.data for _, h, _ in conns))
    assert [h.data for _, h, _ in conns] == [[b"m%d" % i] for i in range(5)]
    assert len(calls) == 1 and sorted(calls[0]) == sorted(c.sock.fileno() for c, _, _ in conns)
    for conn, _, peer in conns:
        conn.close("done")
        peer.close()


class Layer:
    """A socket-like layer over a plain socket (as TLS is): the poller must let it read."""

    def __init__(self, sock):
        self.sock = sock
        self.reads = 0

    def recv(self, n):
        self.reads += 1
        return self.sock.recv(n)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def test_a_socket_like_layer_reads_itself(monkeypatch):
    fds_read = []
    real = poller_mod.recv_many
    monkeypatch.setattr(poller_mod, "recv_many", lambda fds, size: fds_read.extend(fds) or real(fds, size))
    a, b = _socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    layer = Layer(a)
    h = Handler()
    conn = Conn(layer, h, 1 << 20)
    plain, h2, peer2 = pair()
    b.send(b"through the layer")
    peer2.send(b"plain")
    assert wait(lambda: h.data and h2.data)
    assert h.data == [b"through the layer"] and layer.reads == 1 and a.fileno() not in fds_read
    assert h2.data == [b"plain"] and plain.sock.fileno() in fds_read
    b.close()
    assert wait(lambda: h.closed == "eof")
    plain.close("done")
    peer2.close()


def test_what_a_read_gave_to_the_conn():
    conn, h, peer = pair()
    conn._on_received(-errno.EAGAIN)          # nothing there after all: nothing happens
    assert h.data == [] and not conn.closed
    conn._on_received(b"x")
    assert h.data == [b"x"]
    conn._on_received(-errno.ECONNRESET)
    assert conn.closed and h.closed == "recv error: " + __import__("os").strerror(errno.ECONNRESET)
    peer.close()
