"""PostgreSQL unavailable under sustained load: 503s, recovery, nothing acked lost.

Two outages: the network to PostgreSQL cut for 5 s (imd reaches it through a
cuttable TCP proxy, tests/store/tcp_proxy.py, run as a subprocess: SIGUSR1 cuts
every connection and refuses new ones, SIGUSR2 restores), and a PostgreSQL server
of the test's own stopped for 10 s (fast shutdown) and started again
(tests/faults/private_pg.py). Four senders keep 20 messages each in flight against a
write queue of 40, so while the database is gone the queue fills and senders
must get error 503 (never an ack for something not stored); receivers keep
following their inboxes, and a churning device reconnects (and is refused
with 503 while the store is down). After the restore the daemon must recover
by itself; the checker, with every inbox read back from the store, must
report none lost, none duplicated, none reordered.
"""

import signal
import threading
import time

import pytest

from tests.daemon import Imd, token
from tests.faults.checker import Checker
from tests.faults.load import Receiver, Sender, audit, wind_down
from tests.faults.private_pg import PrivatePostgres
from tests.store import tcp_proxy

PG = "host=127.0.0.1 port=5432 user=postgres"
USERS = [f"r{i}" for i in range(4)]


@pytest.fixture
def proxy():
    proc = tcp_proxy.spawn(5432)
    yield proc
    proc.terminate()
    proc.wait(10)


def wait_for(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_postgresql_cut_for_5s_under_load(tmp_path, database, proxy):
    dsn = "host=127.0.0.1 port=%d user=postgres dbname=%s connect_timeout=2" % (proxy.port, database)
    outage_under_load(tmp_path, dsn, lambda: proxy.send_signal(signal.SIGUSR1),
                      lambda: proxy.send_signal(signal.SIGUSR2), 5)


def test_postgresql_stopped_for_10s_and_started_under_load(tmp_path):
    pg = PrivatePostgres().start()
    try:
        outage_under_load(tmp_path, pg.dsn, pg.stop, pg.start, 10)
    finally:
        pg.destroy()


def outage_under_load(tmp_path, dsn, cut, restore, seconds):
    """Load, ``cut()``, ``seconds`` of outage, ``restore()``; then the checker's verdict."""
    d = Imd(tmp_path, {"store": {"backend": "postgresql", "dsn": dsn, "queue_size": 40, "writers": 2}}).start()
    addr = lambda: d.addr["tcp"]  # noqa: E731
    chk = Checker()
    stop_send, stop_recv = threading.Event(), threading.Event()
    receivers = [Receiver(u, "phone", addr, token, chk, stop_recv) for u in USERS]
    receivers.append(Receiver(USERS[0], "tablet", addr, token, chk, stop_recv, churn=1.0))
    senders = [Sender(f"s{i}", USERS, addr, token, chk, stop_send, window=20) for i in range(4)]
    try:
        for t in receivers + senders:
            t.start()
        wait_for(lambda: chk.report().acked >= 300, 30, "no load before the cut")
        cut()                                                  # PostgreSQL gone
        time.sleep(seconds)
        during = chk.report()
        assert during.refused > 0, "senders should get 503 while the write queue is full"
        restore()                                              # back
        wait_for(lambda: chk.report().acked >= during.acked + 300, 45, "imd did not recover by itself")
        wind_down(d, token, USERS, senders, receivers, stop_send, stop_recv)
        audit(addr, token, USERS, chk)
    finally:
        stop_send.set()
        stop_recv.set()
        d.stop()
    rep = chk.report()
    print(rep)
    assert rep.ok, rep          # none lost, duplicated or reordered; no conflicting or twice-stored id
    assert rep.unacked_delivered == 0, "a message refused with 503 was stored anyway"
