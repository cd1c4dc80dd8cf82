"""The fan-out of an inbox entry to many sessions of one user (Node.on_entry):
the raw-TCP loop (TcpSession.fanout, the frame made once) must leave every
session exactly as Session.deliver does — in order, held, gap, duplicate, the
session's own message — and the metrics count each written envelope once.

Sessions are real TcpSessions over socketpairs; what is compared is the state
and the bytes queued on each connection (no flush is needed)."""

import _socket
import socket
from types import SimpleNamespace

import orjson

from imd.engine.memory import MemoryEngine
from imd.envelope import Out
from imd.fastpath import encode_frame
from imd.metrics import Metrics
from imd.node import Node, entry_data
from imd.proto.tcp import TcpSession
from imd.session import AUTHING, LIVE, SYNC
from imd.store.base import Entry


class Router(SimpleNamespace):
    def __init__(self):
        super().__init__(metrics=Metrics(), limits=SimpleNamespace(send_buffer=1 << 20, max_frame=65536),
                         node=SimpleNamespace(id="n1"),
                         gaps=[])

    def fill_gap(self, s):
        self.gaps.append(s)


def session(router, state, last_seq, peers):
    a, b = socket.socketpair()
    peers.append(b)
    s = TcpSession(router, _socket.socket(a.family, a.type, 0, fileno=a.detach()), None)
    s.user, s.device, s.state, s.last_seq = "fan", f"d{s.serial}", state, last_seq
    if state is not LIVE:
        s.held = []
    return s


# (state, last_seq) of the sessions a fan-out of seq 5 meets
CASES = [(LIVE, 4), (LIVE, 4), (LIVE, 2), (LIVE, 5), (LIVE, 9), (SYNC, 4), (AUTHING, 0), (LIVE, 4)]


def observed(s):
    return (s.state, s.last_seq, [o.seq for o in s.held or ()], list(s.conn._out or ()))


def run(fan, origin_of=None):
    """Deliver seq 5 to sessions in CASES; ``fan(sessions, out)``; returns per-session
    state, the count returned and the gaps reported."""
    router, peers = Router(), []
    sessions = [session(router, st, last, peers) for st, last in CASES]
    origin = sessions[origin_of].id if origin_of is not None else ""
    out = Out({"type": "msg", "seq": 5, "body": "hi"}, 5, origin)
    n = fan(sessions, out)
    result = [observed(s) for s in sessions], n, [sessions.index(g) for g in router.gaps]
    for s in sessions:
        s.conn.close(flush=False)
    for p in peers:
        p.close()
    return result


def one_by_one(sessions, out):
    return sum(s.deliver(out) for s in sessions)


def test_the_tcp_fanout_loop_does_what_deliver_does():
    for origin_of in (None, 0, 1, 2):
        assert run(TcpSession.fanout, origin_of) == run(one_by_one, origin_of)
        assert run(super(TcpSession, TcpSession).fanout, origin_of) == run(one_by_one, origin_of)


def test_the_frame_is_made_once_and_shared():
    states, n, gaps = run(TcpSession.fanout)
    written = [q[3] for q in states if q[3]]
    assert n == len(written) == 3 and gaps == [2]
    frame = written[0][0]
    assert frame == encode_frame(b'{"type":"msg","seq":5,"body":"hi"}')
    assert all(w[0] is frame for w in written)


def test_node_counts_each_written_envelope_once():
    router, peers = Router(), []
    node = Node("n1", MemoryEngine(), None, 1.0)
    sessions = [session(router, LIVE, 0, peers) for _ in range(20)]
    sessions[3].last_seq = 1                     # already has it
    node.sessions["fan"] = list(sessions)
    e = Entry("fan", 1, "m1", "msg", "hi", 1_700_000_000_000, "bob", "fan", None, None, "c1", 0)
    node.on_entry("u:fan", entry_data(e))
    assert router.metrics.counters["imd_messages_out_total"][(("type", "msg"),)] == 19
    assert sum(1 for s in sessions if s.conn._out) == 19
    node.sessions["fan"] = sessions[0]           # one session: no fan-out loop
    node.on_entry("u:fan", entry_data(Entry("fan", 2, "m2", "msg", "hi", 1_700_000_000_000, "bob", "fan",
                                            None, None, "c2", 0)))
    assert router.metrics.counters["imd_messages_out_total"][(("type", "msg"),)] == 20
    for s in sessions:
        s.conn.close(flush=False)
    for p in peers:
        p.close()


def test_an_answer_to_one_session_is_framed_as_an_out_would_be():
    """TcpSession.write_env (acks, answers) writes the bytes Session.write_env's Out would."""
    router, peers = Router(), []
    s = session(router, LIVE, 0, peers)
    env = {"type": "ack", "id": "c1", "mid": "m1", "seq": 7, "ts": 1_700_000_000_000, "é": "✓"}
    s.send(env)
    s.write_out(Out(env))
    direct, via_out = s.conn._out
    assert direct == via_out == encode_frame(orjson.dumps(env))
    assert router.metrics.counters["imd_messages_out_total"][(("type", "ack"),)] == 1
    s.conn.close(flush=False)


def test_one_session_gets_from_on_entry_what_deliver_gives():
    """Node.on_entry's shortcut for a user's single session (its own message, next in
    order: only last_seq moves) leaves it as Session.deliver would, in every case."""
    def via(path, st, last, origin_of_own):
        router, peers = Router(), []
        s = session(router, st, last, peers)
        origin = s.id if origin_of_own == "own" else origin_of_own
        e = Entry("fan", 5, "m5", "msg", "hi", 1_700_000_000_000, "fan", "bob", None, None, "c5", 0)
        d = entry_data(e)
        if origin:
            d["origin"] = origin
        if path == "node":
            node = Node("n1", MemoryEngine(), None, 1.0)
            node.sessions["fan"] = s
            node.on_entry("u:fan", d)
        else:
            s.deliver(Out(e.envelope(), 5, origin))
        result = observed(s), len(router.gaps)
        s.conn.close(flush=False)
        for p in peers:
            p.close()
        return result

    for st, last in CASES:
        for origin in ("own", "", "n2.1"):
            assert via("node", st, last, origin) == via("deliver", st, last, origin), (st, last, origin)
