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
