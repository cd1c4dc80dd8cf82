"""kill -9 right after an ack: the recipient still gets the message; no seq reused."""

import threading

from tests.daemon import Imd


def test_kill9_after_ack_then_restart(tmp_path):
    d = Imd(tmp_path).start()
    a = d.login("sender", "host")
    acks = [a.msg("receiver", f"m{i}") for i in range(20)]
    d.kill()                                     # right after the last ack
    d.start()
    r = d.login("receiver", device="phone")
    got = [r.wait_for(lambda e: e["type"] == "msg") for _ in range(20)]
    assert [m["body"] for m in got] == [f"m{i}" for i in range(20)]
    assert [m["seq"] for m in got] == list(range(1, 21))
    assert [m["mid"] for m in got] == [x["mid"] for x in acks]
    # seqs continue after the restart without reuse, for both users
    a = d.login("sender", "host", since=20)
    ack = a.msg("receiver", "after restart")
    assert ack["seq"] == 21
    assert r.wait_for(lambda e: e["type"] == "msg")["seq"] == 21
    d.stop()


def test_kill9_during_sustained_sends_loses_nothing_acked(tmp_path):
    d = Imd(tmp_path).start()
    acked = []
    stop = threading.Event()

    def sender(n):
        c = d.login(f"s{n}", "host")
        i = 0
        try:
            while not stop.is_set():
                acked.append(c.msg("sink", f"{n}-{i}", id=f"{n}-{i}"))
                i += 1
        except Exception:
            pass                                 # the daemon died under us

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    while len(acked) < 200:
        threading.Event().wait(0.01)
    d.kill()
    stop.set()
    for t in threads:
        t.join(10)
    d.start()
    sink = d.login("sink", device="fresh", since=0)
    top = sink.hello["seq"]
    assert top >= len(acked)
    entries = [sink.wait_for(lambda e: e["type"] == "msg") for _ in range(top)]   # the replay
    assert [e for e in sink.drain(0.3) if e["type"] == "msg"] == []
    mids = [e["mid"] for e in entries]
    assert len(mids) == len(set(mids)) == top                  # exactly once
    assert [e["seq"] for e in entries] == list(range(1, top + 1))
    assert {x["mid"] for x in acked} <= set(mids)               # nothing acked lost
    d.stop()
