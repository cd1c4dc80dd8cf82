"""What an idle session costs: its object sizes (pymalloc rounds to 16 bytes) and
state kept outside them only while used (a partial frame's decoder)."""

import _socket
import socket
import sys
from types import SimpleNamespace

import gevent
import pytest

from imd.fastpath import encode_frame
from imd.metrics import Metrics
from imd.net.conn import Conn
from imd.proto import tcp
from imd.proto.comet import sessions
from imd.proto.comet.sessions import PollSession, RawSseSession, SseSession, WsSession
from imd.proto.tcp import TcpSession


def router():
    r = SimpleNamespace(metrics=Metrics(), node=SimpleNamespace(id="n1"), received=[], gone=[],
                        limits=SimpleNamespace(send_buffer=1 << 20, max_frame=65536, max_body=65536))
    r.receive = lambda s, env: r.received.append(env)
    r.unopened = lambda s: r.gone.append(s)
    r.detach = lambda s, reason: r.gone.append(s)
    return r


def plain_pair():
    a, b = socket.socketpair()
    return _socket.socket(a.family, a.type, 0, fileno=a.detach()), b


def comet_session(cls):
    """(router, a ``cls`` session handling a Conn over a socket pair, the Conn, the peer socket)."""
    r = router()
    sock, peer = plain_pair()
    conn = Conn(sock, None, 1 << 20)
    s = conn.handler = cls(r, conn)
    return r, s, conn, peer


def test_idle_sessions_are_160_bytes():
    r = router()
    sock, peer = plain_pair()
    s = TcpSession(r, sock, None)
    sizes = {"tcp": sys.getsizeof(s)}
    for cls in (WsSession, SseSession, RawSseSession):
        sizes[cls.__name__] = sys.getsizeof(cls(r, s.conn))
    assert max(sizes.values()) <= 160, sizes        # 16 slots with the GC header
    assert s.id == f"n1.{s.serial:x}" and s.node_id == "n1"
    s.conn.close(flush=False)
    peer.close()


def test_a_tcp_partial_frame_waits_outside_the_session_and_is_dropped_with_it():
    r = router()
    sock, peer = plain_pair()
    s = TcpSession(r, sock, None)
    whole = encode_frame(b'{"type":"ping"}')
    s.on_data(whole[:3])
    assert s in tcp._partial
    s.on_data(whole[3:] + whole[:5])
    assert r.received == [{"type": "ping"}] and s in tcp._partial
    s.on_data(whole[5:])
    assert r.received == [{"type": "ping"}] * 2 and s not in tcp._partial
    s.on_data(whole[:7])
    s.conn.close(flush=False)                        # closed with a frame half read
    assert s not in tcp._partial and r.gone == [s]
    peer.close()


def test_a_ws_partial_message_waits_outside_the_session_and_is_dropped_with_it():
    r, s, conn, peer = comet_session(WsSession)
    key = b"\x01\x02\x03\x04"

    def frame(op, payload, fin=True):
        return bytes(((0x80 if fin else 0) | op, 0x80 | len(payload))) + key + \
            bytes(c ^ key[i % 4] for i, c in enumerate(payload))
    s.on_data(frame(1, b'{"type":', fin=False))
    assert s in sessions._partial and r.received == []
    s.on_data(frame(0, b'"ping"}'))
    assert r.received == [{"type": "ping"}] and s not in sessions._partial
    s.on_data(frame(1, b'{"ty')[:4])
    assert s in sessions._partial
    conn.close(flush=False)
    assert s not in sessions._partial and r.gone == [s]
    peer.close()


def test_an_sse_session_over_http_1_0_writes_unchunked():
    r, s, conn, peer = comet_session(SseSession)
    s.write(b"data: x\n\n")
    s.__class__ = RawSseSession
    s.write(b"data: y\n\n")
    gevent.sleep(0)
    gevent.sleep(0)
    assert peer.recv(100) == b"9\r\ndata: x\n\n\r\ndata: y\n\n"
    assert isinstance(s, SseSession) and not isinstance(s, PollSession)
    conn.close(flush=False)
    peer.close()


@pytest.mark.parametrize("n", [15000, 20000])
def test_the_memory_engines_user_subscriptions_stay_small(n):
    import sys
    from imd.engine.memory import MemoryEngine
    e = MemoryEngine()
    users = [f"user{i}" for i in range(n)]
    for u in users:
        e.subscribe_user(u)
    assert sys.getsizeof(e._users) <= 28 * n      # a set: 35 B a user at 15,000, 105 at 20,000
    assert e.subscribed("u:user0") and e.subscribed(f"u:user{n - 1}") and not e.subscribed("u:nobody")
    e.unsubscribe_user("user0")
    e.unsubscribe("u:user1")
    assert not e.subscribed("u:user0") and not e.subscribed("u:user1") and e.subscribed("u:user2")
