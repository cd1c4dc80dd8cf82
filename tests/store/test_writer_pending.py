"""Writer (imd/store/writer.py): coalesced fire-and-forget writes alone commit at most once
per PENDING_INTERVAL; an op does not wait for it and takes them along; flush() does not
wait for it either."""

import gevent

from imd.store import writer as writer_mod
from imd.store.writer import Writer


class Op:
    def __init__(self):
        self.results = []

    def callback(self, result, err):
        self.results.append((result, err))


def make(monkeypatch):
    monkeypatch.setattr(writer_mod, "PENDING_INTERVAL", 60.0)     # longer than any test step
    commits = []

    def apply_batch(lane, ops, pending):
        commits.append((len(ops), sorted(pending.touches) if pending else []))
        return ["ok"] * len(ops)
    w = Writer(apply_batch, lambda exc: False)
    w.start()
    return w, commits


def touch(w, user):
    w.pending().touches[user] = [None, None, 1]
    w.noted()


def test_pending_alone_waits_for_the_interval_and_an_op_takes_it_along(monkeypatch):
    w, commits = make(monkeypatch)
    try:
        touch(w, "a")
        gevent.sleep(0.05)
        assert commits == [(0, ["a"])]             # idle: at once
        touch(w, "b")
        gevent.sleep(0.05)
        touch(w, "c")
        gevent.sleep(0.05)
        assert commits == [(0, ["a"])]             # within the interval: coalescing
        op = Op()
        w.submit(op, "k")
        gevent.sleep(0.05)
        assert commits == [(0, ["a"]), (1, ["b", "c"])] and op.results == [("ok", None)]
    finally:
        w.stop(1)


def test_flush_does_not_wait_for_the_interval(monkeypatch):
    w, commits = make(monkeypatch)
    try:
        touch(w, "a")
        gevent.sleep(0.05)
        touch(w, "b")
        with gevent.Timeout(5):
            assert w.flush(5)
        assert commits == [(0, ["a"]), (0, ["b"])]
    finally:
        w.stop(1)
