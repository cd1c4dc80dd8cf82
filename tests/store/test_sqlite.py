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
