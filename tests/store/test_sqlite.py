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
    assert [r[0] for r in con.execute("SELECT version FROM schema_version ORDER BY version")] == [1, 2]


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
