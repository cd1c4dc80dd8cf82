"""The SQLite writer process (imd/store/sqlite_proc.py): its wire, its start, its death
and restart, the signals it ignores, and its end with imd's. The store's behaviour over
it is the contract suite's (backend "sqlite")."""

import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import gevent
import pytest

from imd.store import sqlite_proc as sp
from imd.store.sqlite import FILENAME, SqliteStore
from imd.store.sqlite_writer import WriterGone, is_transient
from imd.store.writer import MessageOp, NoticeOp, Pending

from tests.daemon import alive

from .test_contract import ROOT, Acks, send, wait_until


@pytest.fixture
def store(tmp_path):
    s = SqliteStore(str(tmp_path))
    s.open()
    yield s
    s.close()


def test_ops_and_pending_cross_as_what_the_plan_reads():
    """Messages cross as what the plan reads; a list notice with one mid per user made by
    its own ``mids``, a role notice with as many as the writer process asked for."""
    msg = MessageOp("a", "b", "c1", {"t": "x"}, {"k": 1}, "M1", 5, lambda r, e: None, flags=1)
    notice = NoticeOp(["u", "v", "u"], None, "kind", [1], iter(["N1", "N2"]).__next__, 7, lambda r, e: None)
    role = NoticeOp(None, "host", "kind", "b", iter(["R1", "R2", "R3"]).__next__, 8, lambda r, e: None)
    assert sp.pack_ops([role], {})[0][5] == []
    packed = sp.pack_ops([msg, notice, role], {2: 3})
    assert packed[0] == ("a", "b", "c1", '{"t":"x"}', '{"k":1}', "M1", 5, 1)
    assert packed[1][5] == ["N1", "N2"] and packed[2][5] == ["R1", "R2", "R3"]
    back = sp.unpack_ops(packed)
    assert isinstance(back[0], MessageOp) and isinstance(back[1], NoticeOp)
    assert [getattr(back[0], k) for k in ("sender", "recipient", "client_id", "body_json", "ctx_json",
                                          "mid", "ts", "flags")] == list(packed[0])
    assert back[0].callback is None and back[0].body is None
    assert (back[1].users, back[1].role, back[1].kind, back[1].body_json, back[1].ts) == (["u", "v"], None, "kind", "[1]", 7)
    assert (back[2].users, back[2].role) == (None, "host")
    assert back[1].take_mids(2) == ["N1", "N2"] and back[2].take_mids(2) == ["R1", "R2"]
    with pytest.raises(sp.MidsShort) as short:
        back[2].take_mids(4)
    assert (short.value.index, short.value.needed) == (2, 4)
    again = sp.pickle.loads(sp.pickle.dumps(short.value))
    assert (type(again), again.index, again.needed) == (sp.MidsShort, 2, 4)
    pending = Pending()
    assert sp.pack_pending(pending) is None and sp.unpack_pending(None) is None
    pending.cursors[("u", "d")] = 3
    pending.touches["u"] = ["host", None, 9]
    pending.contacts.append((True, "u", "v"))
    pending.passwords["u"] = None
    again = sp.unpack_pending(sp.pack_pending(pending))
    assert (again.cursors, again.touches, again.contacts, again.passwords) == (
        {("u", "d"): 3}, {"u": ["host", None, 9]}, [(True, "u", "v")], {"u": None})


def test_frames_round_trip_and_a_torn_or_oversized_frame_ends_the_stream():
    a, b = socket.socketpair()
    try:
        big = ["x" * 1000] * 3000                          # several recv() calls
        sp.send_frame(a, ("ok", big))
        sp.send_frame(a, ("close",))
        assert sp.recv_frame(b) == ("ok", big)
        assert sp.recv_frame(b) == ("close",)
        a.sendall(sp._HEADER.pack(10) + b"abc")            # torn: the peer stops mid-frame
        a.shutdown(socket.SHUT_WR)
        assert sp.recv_frame(b) is None
    finally:
        a.close()
        b.close()
    a, b = socket.socketpair()
    try:
        a.sendall(sp._HEADER.pack(sp.FRAME_MAX + 1))
        assert sp.recv_frame(b) is None
        a.close()
        assert sp.recv_frame(b) is None                   # end of stream before a header
    finally:
        b.close()


def test_the_writer_is_a_process_of_its_own_and_exits_on_close(tmp_path):
    store = SqliteStore(str(tmp_path))
    store.open()
    pid = store._core.pid
    assert pid and pid != os.getpid() and alive(pid)
    acks = Acks()
    send(store, acks, "a", "b", "1")
    assert store.flush(10)
    assert [e.seq for e in store.inbox("b", 0, 10)] == [1]
    store.close()
    assert not alive(pid)
    assert store._core.pid is None


def test_open_raises_what_failed_in_the_writer_process(tmp_path):
    """A file that is not a database: the child's error, raised by open(), and no child left."""
    (tmp_path / FILENAME).write_bytes(b"not a database, " * 1000)
    store = SqliteStore(str(tmp_path))
    with pytest.raises(sqlite3.DatabaseError, match="not a database"):
        store.open()
    assert store._core.pid is None


def test_a_killed_writer_process_is_replaced_and_nothing_is_lost_or_doubled(store):
    acks = Acks()
    for i in range(50):
        send(store, acks, "a", "b", "c%d" % i)
    assert store.flush(10)
    first = store._core.pid
    os.kill(first, signal.SIGKILL)
    assert wait_until(lambda: not alive(first))
    for i in range(50, 100):
        send(store, acks, "a", "b", "c%d" % i)
    assert store.flush(30)
    assert store._core.pid not in (None, first) and store._core.starts == 2
    assert store.stats()["retries"] >= 1
    assert len(acks.results()) == 100
    assert [e.seq for e in store.inbox("b", 0, 1000)] == list(range(1, 101))


def test_a_batch_whose_answer_was_lost_is_retried_and_acked_once(store, monkeypatch):
    """The child dies after it committed a batch, before imd read the answer: the retry,
    in a new child, finds the messages stored with their own mids and acks them as
    stored (the (sender, client_id) dedupe), with the seqs they got the first time."""
    acks = Acks()
    real = sp.WriterProcess._answer
    state = {"killed": False}

    def answer_lost(self):
        if not state["killed"] and self.starts == 1:
            state["killed"] = True
            time.sleep(0.5)                       # the child commits and answers meanwhile
            os.kill(self.pid, signal.SIGKILL)
            gevent.sleep(0.2)
            raise WriterGone("answer lost (test)")
        return real(self)
    send(store, acks, "a", "b", "warm")
    assert store.flush(10)
    monkeypatch.setattr(sp.WriterProcess, "_answer", answer_lost)
    for i in range(10):
        send(store, acks, "a", "b", "c%d" % i)
    assert store.flush(30)
    results = acks.results()
    assert [r.recipient_seq for r in results] == list(range(1, 12))
    assert not any(r.duplicate for r in results)
    assert [e.seq for e in store.inbox("b", 0, 100)] == list(range(1, 12))
    assert store._core.starts == 2


def test_errors_raised_in_the_writer_process_are_raised_in_imd_and_retried(store, tmp_path):
    """Another connection holds the write lock: SQLite's "database is locked" crosses the
    socket whole (result code included), the store retries it, and writes go on after."""
    acks = Acks()
    con = sqlite3.connect(str(tmp_path / FILENAME), isolation_level=None, check_same_thread=False)
    con.execute("BEGIN EXCLUSIVE")
    try:
        send(store, acks, "a", "b", "1")
        assert wait_until(lambda: store.stats()["retries"] >= 1, 15)
    finally:
        con.execute("ROLLBACK")
        con.close()
    assert store.flush(30)
    assert len(acks.results()) == 1


def test_the_pickled_sqlite_error_is_still_transient():
    try:
        sqlite3.connect(":memory:").execute("SELECT * FROM nowhere")
    except sqlite3.OperationalError as exc:
        again = sp.pickle.loads(sp.pickle.dumps(sp._answerable(exc)))
        assert again.sqlite_errorcode == exc.sqlite_errorcode and not is_transient(again)
    busy = sqlite3.OperationalError("database is locked")
    busy.sqlite_errorcode = 5
    assert is_transient(sp.pickle.loads(sp.pickle.dumps(busy)))
    assert is_transient(WriterGone("x"))

    class Odd(Exception):
        def __reduce__(self):
            raise TypeError("not picklable")
    assert isinstance(sp._answerable(Odd("x")), RuntimeError)


def test_the_writer_process_ignores_the_signals_imd_handles(store):
    """A Ctrl-C in a terminal reaches every process of the group: the child stays, so
    that imd can flush its last batch through it."""
    pid = store._core.pid
    for sig in sp.IGNORED_SIGNALS:
        os.kill(pid, sig)
    acks = Acks()
    send(store, acks, "a", "b", "1")
    assert store.flush(10)
    assert store._core.pid == pid and store._core.starts == 1


def test_the_writer_processs_log_lines_are_logged_in_imd(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="imd.store.sqlite")
    store = SqliteStore(str(tmp_path))
    store.open()
    store.close()
    assert any("applying migration" in r.getMessage() for r in caplog.records
               if r.name == "imd.store.sqlite"), [r.getMessage() for r in caplog.records]


OPEN_AND_DIE = """
import os, sys
from imd.store.sqlite import SqliteStore
store = SqliteStore(sys.argv[1])
store.open()
print(store._core.pid, flush=True)
os.kill(os.getpid(), 9)
"""


def test_the_writer_process_dies_with_imd(tmp_path):
    """imd killed with SIGKILL (no close): its writer process goes too."""
    p = subprocess.run([sys.executable, "-c", OPEN_AND_DIE, str(tmp_path)], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, timeout=60)
    assert p.returncode == -9, p.stderr.decode()[-2000:]
    child = int(p.stdout.decode().split()[0])
    assert wait_until(lambda: not alive(child), 10)


def test_role_notices_take_their_mids_from_the_callers_generator(store):
    """A role notice's users are counted in the writer process's transaction: the first
    try is rolled back and sent again with as many mids, all made by the caller's
    ``mids``; the next one to the same role goes through with what it asked for."""
    from .test_contract import mid_maker

    for i in range(3):
        store.touch_user("h%d" % i, "host", "ios", 1)
    acks = Acks()
    store.add_notices(None, "host", "payout", "paid", mid_maker("a"), 9, acks.cb("first"))
    assert store.flush(10)
    store.touch_user("h3", "host", "web", 2)
    store.add_notices(None, "host", "payout", "again", mid_maker("b"), 9, acks.cb("second"))
    assert store.flush(10)
    first, second = acks.results()
    assert sorted(e.mid for e in first) == ["a1", "a2", "a3"]
    assert sorted(e.user for e in second) == ["h0", "h1", "h2", "h3"]
    assert sorted(e.mid for e in second) == ["b1", "b2", "b3", "b4"]
    assert [e.mid for e in store.inbox("h3", 0, 10)] == [second[3].mid]
