"""kill -9 of the daemon under sustained raw-TCP load, twice; nothing acked is lost.

Four senders keep 20 messages each in flight to six receivers (one phone each,
plus two tablets that drop and re-open their connection every 2 s). The
daemon is killed with SIGKILL mid-stream and restarted on the same data
directory; senders re-send what was unanswered with the same client ids,
receivers reconnect with ``since``. At the end every inbox is also read back
from the store by a fresh device. The checker must report none lost, none
duplicated (beyond allowed re-delivery after a reconnect), none reordered, no
seq reused and no client id stored twice.
"""

import threading
import time

from tests.daemon import Imd, token
from tests.faults.checker import Checker
from tests.faults.load import Receiver, Sender, audit, wind_down

USERS = [f"r{i}" for i in range(6)]


def wait_acked(chk, n, timeout=30.0):
    deadline = time.monotonic() + timeout
    while chk.report().acked < n:
        assert time.monotonic() < deadline, f"fewer than {n} acks in {timeout}s: {chk.report().summary()}"
        time.sleep(0.05)


def test_kill9_twice_under_load_nothing_lost(tmp_path):
    d = Imd(tmp_path).start()
    addr = lambda: d.addr["tcp"]  # noqa: E731
    chk = Checker()
    stop_send, stop_recv = threading.Event(), threading.Event()
    receivers = [Receiver(u, "phone", addr, token, chk, stop_recv) for u in USERS]
    receivers += [Receiver(u, "tablet", addr, token, chk, stop_recv, churn=2.0) for u in USERS[:2]]
    senders = [Sender(f"s{i}", USERS, addr, token, chk, stop_send, window=20) for i in range(4)]
    try:
        for t in receivers + senders:
            t.start()
        for round_ in range(2):
            wait_acked(chk, 400 * (round_ + 1))
            d.kill()
            time.sleep(0.3)
            d.start()
            deadline = time.monotonic() + 30           # every sender is back before the next kill
            while any(s.reconnects < round_ + 2 for s in senders):
                assert time.monotonic() < deadline, [s.reconnects for s in senders]
                time.sleep(0.05)
        wait_acked(chk, chk.report().acked + 400)
        wind_down(d, token, USERS, senders, receivers, stop_send, stop_recv)
        d.kill()                          # and once more, idle, before reading everything back
        d.start()
        audit(addr, token, USERS, chk)
    finally:
        stop_send.set()
        stop_recv.set()
        d.stop()
    rep = chk.report()
    print(rep)
    # two kills under load, each sender back after each (waited for above): connected 3 times at least
    assert rep.acked >= 1200 and all(s.reconnects >= 3 for s in senders)
    assert rep.ok, rep          # none lost, duplicated or reordered; no conflicting or twice-stored id
