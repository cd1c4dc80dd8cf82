"""SQLite-only behaviour: file location, pragmas, migrations recorded once."""

import sqlite3

import pytest

from imd.store.sqlite import FILENAME, SqliteStore

from .test_contract import Acks, send


def test_data_dir_or_file_path(tmp_path):
    for path, expected in [(tmp_path / "d", tmp_path / "d" / FILENAME),
                           (tmp_path / "e" / "custom.sqlite3", tmp_path / "e" / "custom.sqlite3")]:
        store = SqliteStore(str(path))
        store.open()
        acks = Acks()
        send(store, acks, "a", "b", "1")
        assert store.flush(10)
        store.close()
        assert expected.is_file()


def test_wal_and_migrations_recorded_once(tmp_path):
    for _ in range(2):
        store = SqliteStore(str(tmp_path), synchronous="normal")
        store.open()
        store.close()
    con = sqlite3.connect(str(tmp_path / FILENAME))
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert [r[0] for r in con.execute("SELECT version FROM schema_version ORDER BY version")] == [1, 2, 3]


# a process opening the store at a given time (processes started together open it together)
OPEN_AT = """
import sys, time
from imd.store.sqlite import SqliteStore
path, at = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, at - time.time()))
store = SqliteStore(path)
store.open()
store.close()
"""


def test_processes_opening_a_new_file_at_once_all_open_it(tmp_path):
    """node.workers over one SQLite file: every worker opens the store at boot. Setting up
    a new file (WAL mode, migrations) is done by one process at a time: none fails with
    "database is locked", no migration runs twice."""
    import os
    import subprocess
    import sys
    import time
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for attempt in range(3):
        path = tmp_path / f"d{attempt}"
        at = time.time() + 2.0                      # after every process's imports
        procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT, str(path), repr(at)], cwd=root,
                                  env={**os.environ, "PYTHONPATH": root}, stderr=subprocess.PIPE)
                 for _ in range(4)]
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err.decode()[-2000:]
        con = sqlite3.connect(str(path / FILENAME))
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert [r[0] for r in con.execute("SELECT version FROM schema_version ORDER BY version")] == [1, 2, 3]
        con.close()


def test_bad_synchronous_is_refused(tmp_path):
    with pytest.raises(ValueError):
        SqliteStore(str(tmp_path), synchronous="off")


def test_read_connections_do_not_pile_up_as_pool_threads_come_and_go(tmp_path):
    """gevent retires idle pool threads and starts new ones; reads must reuse the
    read connections they opened, not open one per thread and keep them all."""
    import gevent
    from gevent.threadpool import ThreadPool

    store = SqliteStore(str(tmp_path))
    store.open()
    hub_pool, store._pool = store._pool, ThreadPool(3, idle_task_timeout=0.01)
    try:
        for _ in range(20):
            gevent.joinall([gevent.spawn(store.last_seq, "u%d" % i) for i in range(3)])
            gevent.sleep(0.05)             # every pool thread retires
        assert 1 <= len(store._read_cons) <= 3
        assert sorted(map(id, store._idle_reads)) == sorted(map(id, store._read_cons))
    finally:
        store.close()
        store._pool.kill()
        store._pool = hub_pool


@pytest.mark.parametrize("n", [1, 3, 255, 256, 257, 700])
def test_batches_of_any_size_store_every_row_once(tmp_path, n):
    """A batch is written in multi-row statements of a power of two rows (VALUES_MAX at most):
    sizes across the piece boundaries store every message, both inbox entries and the users'
    tops exactly once, for users new to the store and known ones alike."""
    from .test_contract import mid_maker

    store = SqliteStore(str(tmp_path))
    store.open()
    try:
        acks = Acks()
        send(store, acks, "s0", "r0", "warm")           # s0 and r0 have rows before the batch
        assert store.flush(10)
        store._writer.batch_max = 10000
        for i in range(n):                               # queued before the writer runs: one batch
            send(store, acks, "s%d" % (i % 7), "r%d" % (i % 5), "c%d" % i)
        store.add_notices(["n%d" % i for i in range(n)] + ["r0"], None, "k", "b", mid_maker(), 1,
                          acks.cb("notices"))
        assert store.flush(30)
        results = acks.results()
        assert len(results) == n + 2
        seqs = {}
        for r in results[1:-1]:
            for e in r.entries:
                seqs.setdefault(e.user, []).append(e.seq)
        for e in results[-1]:
            seqs.setdefault(e.user, []).append(e.seq)
        for user, got in seqs.items():
            first = 2 if user in ("s0", "r0") else 1
            assert sorted(got) == list(range(first, first + len(got))), user
            assert store.last_seq(user) == first + len(got) - 1
            assert [e.seq for e in store.inbox(user, 0, 10000)] == list(range(1, first + len(got)))
    finally:
        store.close()


def _wal_size(tmp_path):
    wal = tmp_path / (FILENAME + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def test_checkpoints_keep_the_wal_bounded_and_lose_nothing(tmp_path, monkeypatch):
    """The checkpointer copies the WAL back (step 1, its own connection), the writer checkpoints
    the tail after the next commit (step 2), and the WAL restarts: five rounds of the same
    writes reuse the WAL file (without checkpoints it would hold all five); the writer's own
    checkpoint is only the cap; every message is there after a reopen."""
    from imd.store import sqlite_writer as sq

    from .test_contract import wait_until

    monkeypatch.setattr(sq, "CHECKPOINT_DELAY", 0.01)
    store = SqliteStore(str(tmp_path), writer="thread")
    store.open()
    acks = Acks()
    sizes = []
    try:
        assert store._core._wcon.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == sq.WAL_CAP_PAGES
        for round_ in range(5):
            for i in range(300):
                send(store, acks, "s%d" % (i % 50), "r%d" % (i % 40), "c%d-%d" % (round_, i))
            assert store.flush(30)
            done = store.stats()["checkpoints"]
            assert wait_until(lambda: store.stats()["checkpoints"] > done)   # step 1
            for extra in ("a", "b"):             # step 2 after the first, the restart in the second
                send(store, acks, "x", "y", "%s%d" % (extra, round_))
                assert store.flush(30)
            assert store.stats()["checkpoints"] >= done + 2                 # and step 2
            sizes.append(_wal_size(tmp_path))
        assert len(acks.results()) == 5 * 302
    finally:
        store.close()
    assert sizes[-1] < 2 * sizes[0], sizes
    store = SqliteStore(str(tmp_path), writer="thread")
    store.open()
    try:
        assert sum(store.last_seq("s%d" % i) for i in range(50)) == 5 * 300
        assert sum(store.last_seq("r%d" % i) for i in range(40)) == 5 * 300
        assert len(store.inbox("y", 0, 100)) == 10
    finally:
        store.close()


def test_close_waits_for_a_running_checkpoint(tmp_path, monkeypatch):
    """close() right after commits, with the checkpointer due at once: no connection is
    closed under a checkpoint in a pool thread, and the store opens again."""
    from imd.store import sqlite_writer as sq

    import gevent

    monkeypatch.setattr(sq, "CHECKPOINT_DELAY", 0)
    for round_ in range(5):
        store = SqliteStore(str(tmp_path), writer="thread")
        store.open()
        acks = Acks()
        for i in range(100):
            send(store, acks, "s", "r%d" % i, "c%d-%d" % (round_, i))
        assert store.flush(30)
        gevent.sleep(0)                  # the checkpointer starts its checkpoint
        store.close()
    con = sqlite3.connect(str(tmp_path / FILENAME))
    assert con.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 500


def test_step_one_syncs_the_database_file_through_the_writers_descriptor(tmp_path, monkeypatch):
    """Step 1 syncs the database file itself (SQLite syncs it only at a checkpoint that
    reaches the WAL's end: step 2, on the commit path), through the writer connection's own
    descriptor of it — the store opens and closes none (closing one would drop SQLite's POSIX
    locks) —, in rounds while a round copied more than TAIL_FRAMES new frames; step 2 and the
    WAL's restart still follow."""
    import os

    from imd.store import sqlite_writer as sq

    from .test_contract import wait_until

    synced = []
    real = os.fdatasync
    monkeypatch.setattr(sq.os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])
    monkeypatch.setattr(sq, "CHECKPOINT_DELAY", 0.01)
    monkeypatch.setattr(sq, "TAIL_FRAMES", 0)        # a round copying anything new is repeated
    store = SqliteStore(str(tmp_path), writer="thread")
    store.open()
    acks = Acks()
    try:
        fd = store._core._dbfd
        assert fd is not None
        assert os.readlink("/proc/self/fd/%d" % fd) == os.path.realpath(str(tmp_path / FILENAME))
        for i in range(300):
            send(store, acks, "s%d" % (i % 50), "r%d" % (i % 40), "c%d" % i)
        assert store.flush(30)
        assert wait_until(lambda: store.stats()["checkpoints"] >= 2)     # round 1 copied: round 2
        assert synced and set(synced) == {fd}
        done = store.stats()["checkpoints"]
        for extra in ("a", "b"):                  # step 2 after the first, the restart in the second
            send(store, acks, "x", "y", extra)
            assert store.flush(30)
        assert store.stats()["checkpoints"] > done
        assert len(acks.results()) == 302
    finally:
        store.close()
    assert store._core._dbfd is None


def test_the_writer_connection_has_its_own_page_cache_and_memory_temp_store(tmp_path):
    """The writer keeps WRITER_CACHE_KIB of pages (a batch of hundreds of messages touches
    thousands of pages: SQLite's default 2,000 KiB cost 10-28 % more CPU there) and its
    statement journals in memory (temp_store 2: each multi-row INSERT's journal went to a
    temp file, one pwrite per page it changed); read connections keep SQLite's defaults."""
    from imd.store import sqlite_writer as sq

    store = SqliteStore(str(tmp_path), writer="thread")
    store.open()
    try:
        assert store._core._wcon.execute("PRAGMA cache_size").fetchone()[0] == -sq.WRITER_CACHE_KIB
        assert store._core._wcon.execute("PRAGMA temp_store").fetchone()[0] == 2
        assert store._read(lambda con: con.execute("PRAGMA cache_size").fetchone()[0]) == -2000
        assert store._read(lambda con: con.execute("PRAGMA temp_store").fetchone()[0]) == 0
    finally:
        store.close()


def _record_ranges(monkeypatch, result=0):
    from imd.store import sqlite_writer as sq

    calls = []
    real = sq._SYNC_FILE_RANGE

    def fake(fd, offset, nbytes, flags):
        calls.append((fd, offset, nbytes, flags))
        return real(fd, offset, nbytes, flags) if result == 0 and real is not None else result
    monkeypatch.setattr(sq, "_SYNC_FILE_RANGE", fake)
    return calls


def test_write_back_goes_through_the_file_a_piece_at_a_time(tmp_path, monkeypatch):
    """_write_back: one sync_file_range (wait before, write, wait after) per WRITEBACK_CHUNK
    bytes of the file, in order; on a failure it stops (fdatasync does the rest); nothing
    without sync_file_range, and an empty file needs no call."""
    import os

    from imd.store import sqlite_writer as sq

    monkeypatch.setattr(sq, "WRITEBACK_CHUNK", 4096)
    path = tmp_path / "f"
    path.write_bytes(b"x" * (3 * 4096 + 1))
    fd = os.open(str(path), os.O_RDWR)
    try:
        calls = _record_ranges(monkeypatch)
        sq._write_back(fd)
        assert calls == [(fd, off, 4096, sq.SYNC_RANGE_FLAGS) for off in (0, 4096, 8192, 12288)]
        failing = _record_ranges(monkeypatch, result=-1)
        sq._write_back(fd)
        assert len(failing) == 1
        monkeypatch.setattr(sq, "_SYNC_FILE_RANGE", None)
        sq._write_back(fd)                        # no sync_file_range: nothing, no error
    finally:
        os.close(fd)
    empty = os.open(str(tmp_path / "e"), os.O_RDWR | os.O_CREAT)
    try:
        calls = _record_ranges(monkeypatch)
        sq._write_back(empty)
        assert calls == []
    finally:
        os.close(empty)


def test_step_one_writes_back_through_the_writers_descriptor_then_syncs(tmp_path, monkeypatch):
    """Step 1 writes the database file back in pieces through the writer connection's own
    descriptor, then fdatasyncs it; a failing sync_file_range leaves the work to fdatasync and
    the checkpoints and messages go on as before."""
    import os

    from imd.store import sqlite_writer as sq

    from .test_contract import wait_until

    monkeypatch.setattr(sq, "CHECKPOINT_DELAY", 0.01)
    real, real_range = os.fdatasync, sq._SYNC_FILE_RANGE
    for result in (0, -1):
        monkeypatch.setattr(sq, "_SYNC_FILE_RANGE", real_range)
        calls = _record_ranges(monkeypatch, result)
        synced = []
        monkeypatch.setattr(sq.os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])
        store = SqliteStore(str(tmp_path / str(result)), writer="thread")
        store.open()
        acks = Acks()
        try:
            fd = store._core._dbfd
            for i in range(300):
                send(store, acks, "s%d" % (i % 50), "r%d" % (i % 40), "c%d" % i)
            assert store.flush(30)
            assert wait_until(lambda: store.stats()["checkpoints"] >= 1)
            assert calls and {c[0] for c in calls} == {fd} and calls[0][1] == 0
            assert synced and set(synced) == {fd}
            assert len(acks.results()) == 300
        finally:
            store.close()


def test_migration_3_drops_messages_pair_and_receipts_still_find_the_sender(tmp_path, monkeypatch):
    """A database at schema version 2 has the messages_pair index; opening it drops the
    index, and last_sent_to finds what it found before, from the recipient's inbox."""
    from imd.store import sqlite_writer as module
    every = module.migrations
    monkeypatch.setattr(module, "migrations", lambda name: every(name)[:2])
    old = SqliteStore(str(tmp_path), writer="thread")
    old.open()
    acks = Acks()
    send(old, acks, "a", "b", "1")
    send(old, acks, "b", "a", "2")
    assert old.flush(10)
    old.close()
    con = sqlite3.connect(str(tmp_path / FILENAME))
    assert con.execute("SELECT count(*) FROM sqlite_master WHERE name = 'messages_pair'").fetchone()[0] == 1
    con.close()
    monkeypatch.setattr(module, "migrations", every)
    new = SqliteStore(str(tmp_path), writer="thread")
    new.open()
    try:
        assert new.last_sent_to("a", "b", 1) == (1, "m-a-1", "1")
        assert new.last_sent_to("b", "a", 2) == (2, "m-b-2", "2")
    finally:
        new.close()
    con = sqlite3.connect(str(tmp_path / FILENAME))
    assert con.execute("SELECT count(*) FROM sqlite_master WHERE name = 'messages_pair'").fetchone()[0] == 0
    assert [r[0] for r in con.execute("SELECT version FROM schema_version ORDER BY version")] == [1, 2, 3]



def test_last_sent_to_reads_the_inbox_window_whatever_the_statistics(tmp_path):
    """The receipt's read walks the recipient's inbox range and looks messages up by mid,
    also after ANALYZE (statistics could otherwise favour the sender's index and read
    every message the sender ever sent)."""
    from imd.store.sqlite import _LAST_SENT_TO
    store = SqliteStore(str(tmp_path))
    store.open()
    acks = Acks()
    for i in range(300):
        send(store, acks, "a", "b" if i % 3 else "c", "c%d" % i)
    assert store.flush(10)
    store.close()
    con = sqlite3.connect(str(tmp_path / FILENAME))
    for analyzed in (False, True):
        if analyzed:
            con.execute("ANALYZE")
        plan = [r[3] for r in con.execute("EXPLAIN QUERY PLAN " + _LAST_SENT_TO, ("b", 100, 0, "a"))]
        assert plan[0].startswith("SEARCH i USING PRIMARY KEY (user=? AND seq>? AND seq<?)"), plan
        assert plan[1].startswith("SEARCH m USING INDEX sqlite_autoindex_messages_1 (mid=?)"), plan
        assert len(plan) == 2, plan
    con.close()


# reads still running (a slow statement each) when the store is closed
CLOSE_DURING_READS = """
from gevent import monkey; monkey.patch_all()
import sys, gevent
from imd.store.sqlite import SqliteStore
store = SqliteStore(sys.argv[1])
store.open()
SLOW = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 2000000) "
        "SELECT count(*) FROM c")
reads = [gevent.spawn(store._read, lambda con: con.execute(SLOW).fetchone()[0]) for _ in range(3)]
gevent.sleep(0.1)
store.close()
gevent.joinall(reads)
print([r.value for r in reads], len(store._read_cons), len(store._idle_reads))
"""


def test_close_during_reads_lets_them_end_and_closes_their_connections_after(tmp_path):
    """close() used to close every read connection, also one a pool thread was running a
    statement on: the process died of a segfault in SQLite (seen in CI, a node stopping
    during a login's reads). Now a busy connection is closed by its read when it ends;
    in a subprocess, since the old failure kills the interpreter."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for attempt in range(3):
        p = subprocess.run([sys.executable, "-c", CLOSE_DURING_READS, str(tmp_path / f"d{attempt}")],
                           cwd=root, env={**os.environ, "PYTHONPATH": root}, capture_output=True,
                           timeout=120)
        assert p.returncode == 0, p.stderr.decode()[-2000:]
        assert p.stdout.decode().split("\n")[0] == "[2000000, 2000000, 2000000] 0 0"


def test_no_read_starts_after_close(tmp_path):
    from imd.store.base import StoreUnavailable
    store = SqliteStore(str(tmp_path))
    store.open()
    assert store.last_seq("a") == 0
    store.close()
    with pytest.raises(StoreUnavailable):
        store.last_seq("a")
    with pytest.raises(StoreUnavailable):        # a read already on its way to a pool thread
        store._pool.apply(store._read_sync, (lambda con: 1, ()))
