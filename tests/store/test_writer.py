"""The backend-neutral Writer (imd/store/writer.py) on a fake backend: gathering small
batches (``batch_wait``), and coalesced fire-and-forget writes that alone commit at most
once per PENDING_INTERVAL (an op takes them along at once; flush() does not wait), and reads
that settle their users' cursor writes first."""

import gevent

from imd.store import writer as writer_mod
from imd.store.writer import Writer


class Op:
    def __init__(self, acks):
        self.callback = lambda result, error: acks.append((result, error))


def make(batch_wait=0):
    """A started Writer and the list of its commits: (ops in the batch, touched users)."""
    commits = []

    def apply_batch(lane, ops, pending):
        commits.append((len(ops), sorted(pending.touches) if pending else []))
        return ["ok"] * len(ops)
    writer = Writer(apply_batch, lambda exc: False, batch_wait=batch_wait)
    writer.start()
    return writer, commits


def sizes(commits):
    return [n for n, _ in commits]


# -- gathering -------------------------------------------------------------------------
def test_a_lone_op_is_not_held():
    """Writes arriving slower than one per batch_wait (three ops in a row count as at most
    30/s over the rate's 0.1 s span; 30/s × 0.01 s < 1): every op goes at once, no gathering."""
    writer, commits = make(batch_wait=0.01)
    acks = []
    try:
        for _ in range(3):
            writer.submit(Op(acks), "k")
            assert writer.flush(10)
        assert sizes(commits) == [1, 1, 1] and len(acks) == 3
        assert writer.stats()["gathers"] == 0
    finally:
        writer.stop()


def test_a_small_batch_waits_for_ops_that_keep_arriving():
    """20 ops at once: the lane waits (once) and the 10 submitted meanwhile join the batch."""
    writer, commits = make(batch_wait=0.05)
    acks = []
    try:
        for _ in range(20):
            writer.submit(Op(acks), "k")
        more = gevent.spawn(lambda: [writer.submit(Op(acks), "k") for _ in range(10)])
        assert writer.flush(10)
        more.join()
        assert writer.flush(10)
        assert sizes(commits) == [30] and len(acks) == 30
        assert writer.stats()["gathers"] == 1
    finally:
        writer.stop()


def test_no_gathering_when_off_and_stop_during_a_wait_delivers_everything():
    writer, commits = make(batch_wait=0)
    acks = []
    for _ in range(20):
        writer.submit(Op(acks), "k")
    assert writer.flush(10)
    assert sizes(commits) == [20] and writer.stats()["gathers"] == 0
    writer.stop()
    writer, commits = make(batch_wait=0.05)
    for _ in range(20):
        writer.submit(Op(acks), "k")
    assert writer.stop(10)              # flushes through the wait
    assert sizes(commits) == [20] and len(acks) == 40 and all(e is None for _, e in acks)


# -- coalesced writes and PENDING_INTERVAL ---------------------------------------------
def touch(writer, user):
    writer.pending().touches[user] = [None, None, 1]
    writer.noted()


def test_pending_alone_waits_for_the_interval_and_an_op_takes_it_along(monkeypatch):
    monkeypatch.setattr(writer_mod, "PENDING_INTERVAL", 60.0)     # longer than any test step
    writer, commits = make()
    acks = []
    try:
        touch(writer, "a")
        gevent.sleep(0.05)
        assert commits == [(0, ["a"])]             # idle: at once
        touch(writer, "b")
        gevent.sleep(0.05)
        touch(writer, "c")
        gevent.sleep(0.05)
        assert commits == [(0, ["a"])]             # within the interval: coalescing
        writer.submit(Op(acks), "k")
        gevent.sleep(0.05)
        assert commits == [(0, ["a"]), (1, ["b", "c"])] and acks == [("ok", None)]
    finally:
        writer.stop(1)


def test_flush_does_not_wait_for_the_interval(monkeypatch):
    monkeypatch.setattr(writer_mod, "PENDING_INTERVAL", 60.0)
    writer, commits = make()
    try:
        touch(writer, "a")
        gevent.sleep(0.05)
        touch(writer, "b")
        with gevent.Timeout(5):
            assert writer.flush(5)
        assert commits == [(0, ["a"]), (0, ["b"])]
    finally:
        writer.stop(1)


# -- read-your-writes for cursors --------------------------------------------------------
class Store(writer_mod.WriterStore):
    def __init__(self, writer):
        self._writer = writer


def test_settle_cursors_commits_a_waiting_cursor_write_and_gives_up_while_the_database_is_gone(monkeypatch):
    """A read for a user with a coalesced cursor write commits it first (not after the
    interval); a read for another user does not; with the database gone (every commit a
    transient error) the read does not wait beyond SETTLE_TIMEOUT."""
    monkeypatch.setattr(writer_mod, "PENDING_INTERVAL", 60.0)
    monkeypatch.setattr(writer_mod, "SETTLE_TIMEOUT", 0.2)
    monkeypatch.setattr(writer_mod, "BACKOFF_FIRST", 0.01)
    gone, cursors = [False], []

    def apply_batch(lane, ops, pending):
        if gone[0]:
            raise ConnectionError("database gone")
        if pending:
            cursors.extend(sorted(pending.cursors.items()))
        return ["ok"] * len(ops)
    writer = Writer(apply_batch, lambda exc: isinstance(exc, ConnectionError))
    writer.start()
    store = Store(writer)
    try:
        store.set_cursor("z", "d", 1)
        assert writer.flush(10)                     # the interval (60 s) starts now
        store.set_cursor("a", "phone", 3)
        store.settle_cursors({"b"})
        assert cursors == [(("z", "d"), 1)]         # b has nothing waiting: no commit
        store.settle_cursors({"a"})
        assert cursors == [(("z", "d"), 1), (("a", "phone"), 3)]
        gone[0] = True
        store.set_cursor("a", "phone", 4)
        store.settle_cursors({"a"})                 # returns (after SETTLE_TIMEOUT)
        assert writer.cursors_waiting({"a"})
        gone[0] = False
        assert writer.flush(10) and not writer.cursors_waiting({"a"})
        assert cursors[-1] == (("a", "phone"), 4)
    finally:
        writer.stop()
