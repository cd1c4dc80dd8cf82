"""imd.net.poller: every Conn's read side in one epoll set, in-process over socketpairs."""

import socket

import gevent
from gevent.monkey import get_original

from imd.net import poller as poller_mod
from imd.net.conn import Conn
from tests.test_conn import Handler

_socketpair = get_original("socket", "socketpair")    # plain sockets: Conn drives them itself


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
