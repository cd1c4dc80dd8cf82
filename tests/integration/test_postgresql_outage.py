"""imd on PostgreSQL: the database goes away for 10 s under load, then comes back.

Senders must see 503s (never hangs), the daemon must recover by itself, and every
message whose ack reached its sender must be stored exactly once, seqs in order.
The outage is a TCP proxy between imd and the real PostgreSQL that cuts every
connection and refuses new ones (tests/store/tcp_proxy.py, run as a subprocess).
"""

import os
import signal
import threading
import time

import psycopg
import pytest

from tests.daemon import Imd
from tests.store import tcp_proxy

PG = "host=127.0.0.1 port=5432 user=postgres"
WINDOW = 60           # messages in flight per sender


@pytest.fixture
def database():
    name = "imd_it_%d" % os.getpid()
    with psycopg.connect(PG + " dbname=test", autocommit=True) as con:
        con.execute("DROP DATABASE IF EXISTS %s WITH (FORCE)" % name)
        con.execute("CREATE DATABASE %s" % name)
    yield name
    with psycopg.connect(PG + " dbname=test", autocommit=True) as con:
        con.execute("DROP DATABASE IF EXISTS %s WITH (FORCE)" % name)


@pytest.fixture
def proxy():
    proc = tcp_proxy.spawn(5432)
    yield proc
    proc.terminate()
    proc.wait(10)


def sender(d, n, stop, acked, refused):
    """Keep WINDOW messages in flight; record acks and 503s until ``stop``, then drain."""
    c = d.login("s%d" % n, "host")
    c.timeout = 60
    sent, outstanding = 0, 0
    while not stop.is_set() or outstanding:
        while not stop.is_set() and outstanding < WINDOW:
            c.msg("sink", "%d-%d" % (n, sent), id="%d-%d" % (n, sent), wait=False)
            sent += 1
            outstanding += 1
        reply = c.wait_for(lambda e: e.get("type") in ("ack", "error"))
        outstanding -= 1
        if reply["type"] == "ack":
            acked.append(reply)
        else:
            assert reply["code"] == 503, reply
            refused.append(reply)
            time.sleep(0.05)


def test_postgresql_outage_under_load(tmp_path, database, proxy):
    dsn = "host=127.0.0.1 port=%d user=postgres dbname=%s" % (proxy.port, database)
    d = Imd(tmp_path, {"store": {"backend": "postgresql", "dsn": dsn, "queue_size": 150,
                                 "writers": 2}}).start()
    stop = threading.Event()
    acked, refused = [], []
    threads = [threading.Thread(target=sender, args=(d, n, stop, acked, refused)) for n in range(4)]
    try:
        for t in threads:
            t.start()
        while len(acked) < 300:
            time.sleep(0.01)
        proxy.send_signal(signal.SIGUSR1)            # PostgreSQL gone
        time.sleep(10)
        assert refused, "senders should have been refused with 503 while the queue was full"
        during = len(acked)
        proxy.send_signal(signal.SIGUSR2)            # back
        deadline = time.monotonic() + 60
        while len(acked) < during + 300 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(acked) >= during + 300, "imd did not recover by itself"
        stop.set()
        for t in threads:
            t.join(60)
            assert not t.is_alive()
        sink = d.login("sink", device="fresh", since=0)
        top = sink.hello["seq"]
        entries = []
        while len(entries) < top:
            entries += [e for e in sink.drain(0.5) if e["type"] == "msg"]
        mids = [e["mid"] for e in entries]
        assert len(mids) == len(set(mids)) == top                   # exactly once
        assert [e["seq"] for e in entries] == list(range(1, top + 1))
        assert {a["mid"] for a in acked} <= set(mids)                # nothing acked lost
        assert {a["mid"] for a in acked} == set(mids)                # nothing refused was stored
    finally:
        stop.set()
        d.stop()
