"""kill -9 of the daemon under mixed load on every protocol at once, on SQLite and PostgreSQL.

Senders on raw TCP, WebSocket, SSE (+ POST /im/send) and XMPP each send to every
receiver; receivers follow their inboxes on raw TCP, WebSocket, SSE, long-poll and
XMPP (XEP-0198 on, users with only that device), some dropping and re-opening their
connection every 2 s. So every sender protocol meets every receiver protocol. The
daemon is killed with SIGKILL twice under load and restarted on the same data; each
client reconnects to the new ports and resumes: ``since`` (tcp, ws, poll),
``Last-Event-ID`` (sse), unacknowledged offline messages (xmpp). Senders with imd
acks re-send what was unanswered with the same ids. At the end every receiver must
hold its whole inbox as the store has it, and every inbox is read back once more after
a third kill. The checker must report none lost (of the acked messages, and of the
XMPP sender's messages the store holds), none duplicated beyond in-order re-delivery
after a reconnect, none reordered (by seq, and per sender → recipient in send order).
"""

import threading
import time

import pytest

from tests.daemon import Imd, token
from tests.faults.checker import Checker
from tests.faults.load import Receiver, Sender, acked_from_store, audit, read_inbox
from tests.faults.transports import LISTENER

# (user, device, protocol, churn seconds)
RECEIVERS = [("r0", "phone", "tcp", 0), ("r1", "phone", "ws", 0), ("r2", "phone", "sse", 0),
             ("r3", "phone", "poll", 0), ("r0", "tablet", "ws", 2.0), ("r1", "tablet", "sse", 2.0),
             ("r2", "tablet", "tcp", 2.0), ("x1", "laptop", "xmpp", 0), ("x2", "laptop", "xmpp", 0)]
USERS = sorted({u for u, *_ in RECEIVERS})
SENDERS = [("s0", "tcp"), ("s1", "ws"), ("s2", "sse"), ("s3", "xmpp")]


def wait_until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def mixed_load(d, chk, stop_send, stop_recv):
    def addr(proto):
        return lambda: d.addr[LISTENER[proto]]
    receivers = [Receiver(u, dev, addr(p), token, chk, stop_recv, churn=churn, proto=p)
                 for u, dev, p, churn in RECEIVERS]
    senders = [Sender(name, USERS, addr(p), token, chk, stop_send, window=10,
                      rate=40.0 if p == "xmpp" else 0.0, proto=p) for name, p in SENDERS]
    return senders, receivers


def settle(d, chk, senders, receivers, stop_send, stop_recv, timeout=60.0):
    """Stop the senders; count the XMPP sender's stored messages as acked; wait until
    every receiver holds its user's whole inbox (read through the admin API)."""
    stop_send.set()
    for s in senders:
        s.join(30)
        assert not s.is_alive(), s.name
    acked_from_store(d.addr["admin"], [s for s in senders if s.proto == "xmpp"], chk)
    inbound = {u: [e["mid"] for e in read_inbox(d.addr["admin"], u) if e.get("to") == u] for u in USERS}
    assert all(inbound.values()), "every receiver got something"
    for r in receivers:
        wait_until(lambda: not chk.missing(r.user, r.device, inbound[r.user]), timeout,
                   f"{r.name} ({r.proto}) did not catch up: {len(chk.missing(r.user, r.device, inbound[r.user]))} missing")
    stop_recv.set()
    for r in receivers:
        r.join(10)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_kill9_under_mixed_load_on_every_protocol(tmp_path, request, backend):
    overrides = {"listen": {"comet": "127.0.0.1:0", "xmpp": "127.0.0.1:0", "admin": "127.0.0.1:0"},
                 "xmpp": {"domain": "localhost", "tls": "disabled"},
                 "limits": {"heartbeat": 2}}
    if backend == "postgresql":
        db = request.getfixturevalue("database")
        overrides["store"] = {"backend": "postgresql", "dsn": f"host=127.0.0.1 user=postgres dbname={db}"}
    d = Imd(tmp_path, overrides).start()
    chk = Checker()
    stop_send, stop_recv = threading.Event(), threading.Event()
    senders, receivers = mixed_load(d, chk, stop_send, stop_recv)
    try:
        for t in receivers + senders:
            t.start()
        for round_ in range(2):
            wait_until(lambda: chk.report().acked >= 300 * (round_ + 1), 60, f"no load before kill {round_ + 1}")
            d.kill()
            time.sleep(0.3)
            d.start()
            wait_until(lambda: all(t.reconnects >= round_ + 2 for t in senders + receivers), 60,
                       "every client back before the next kill")
        wait_until(lambda: chk.report().acked >= 900, 60, "no load after the restarts")
        settle(d, chk, senders, receivers, stop_send, stop_recv)
        d.kill()                                  # once more, idle, then read every inbox back
        d.start()
        audit(lambda: d.addr["tcp"], token, USERS, chk)
    finally:
        stop_send.set()
        stop_recv.set()
        d.stop()
    rep = chk.report()
    print(rep)
    by_proto = {p: sum(r.reconnects for r in receivers if r.proto == p) for p in LISTENER}
    print("receiver (re)connections by protocol:", by_proto)
    print("entries per receiver:", {f"{r.user}/{r.proto}": chk.received_by(r.user, r.device) for r in receivers})
    assert all(r.reconnects >= 3 for r in receivers), by_proto        # each resumed after both kills
    assert all(s.reconnects >= 3 for s in senders)
    assert rep.ok, rep          # none lost, duplicated or reordered; no conflicting or twice-stored id
