"""Registry of store backends for the contract suite: adding one is one line in BACKENDS.

A backend factory is built per test with a scratch directory; it makes fresh
(unopened) stores on the same data (``make``), blocks all writes for a while
(``writes_blocked``), and names its data with a ``spec`` string that a
subprocess can reopen through :func:`store_from_spec`.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
from contextlib import contextmanager

import psycopg

from imd.store.postgresql import PostgresStore
from imd.store.sqlite import FILENAME, SqliteStore

PG_SERVER = "host=127.0.0.1 port=5432 user=postgres"
PG_ADMIN_DB = "test"


class SqliteBackend:
    """The embedded store, its writer connection in the writer process (the default)."""

    name = "sqlite"
    writer = "process"
    schema_names = "sqlite"             # the dialect of the migrations (column ``user``)
    migrations_module = "imd.store.sqlite_writer"

    def __init__(self, tmp_path) -> None:
        self.dir = str(tmp_path / "data")

    def make(self, **kw) -> SqliteStore:
        return SqliteStore(self.dir, writer=self.writer, **kw)

    def make_here(self, **kw) -> SqliteStore:
        """A store whose schema work runs in this process (a monkeypatch reaches it)."""
        return SqliteStore(self.dir, writer="thread", **kw)

    @contextmanager
    def writes_blocked(self):
        """Hold the database's write lock from another connection."""
        con = sqlite3.connect("%s/%s" % (self.dir, FILENAME), isolation_level=None,
                              check_same_thread=False)
        con.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            con.execute("ROLLBACK")
            con.close()

    def execute(self, sql: str) -> None:
        """Run ``sql`` (no parameters) in its own transaction on the backend's database."""
        con = sqlite3.connect("%s/%s" % (self.dir, FILENAME))
        with con:
            con.execute(sql)
        con.close()

    def spec(self) -> str:
        return "%s:%s" % (self.name, self.dir)

    def cleanup(self) -> None:
        pass


class SqliteThreadBackend(SqliteBackend):
    """The embedded store, its writer connection in a thread of this process."""

    name = "sqlite-thread"
    writer = "thread"


class PostgresBackend:
    """A fresh schema per test in one database per test session (``imd_test_<pid>``)."""

    name = "postgresql"
    schema_names = "postgresql"
    migrations_module = "imd.store.postgresql"
    database = None
    schemas = itertools.count(1)

    def __init__(self, tmp_path) -> None:
        cls = PostgresBackend
        if cls.database is None:
            cls.database = "imd_test_%d" % os.getpid()
            with psycopg.connect("%s dbname=%s" % (PG_SERVER, PG_ADMIN_DB), autocommit=True) as con:
                con.execute("DROP DATABASE IF EXISTS %s" % cls.database)
                con.execute("CREATE DATABASE %s" % cls.database)
        self.schema = "t_%d" % next(cls.schemas)
        self.server_dsn = "%s dbname=%s" % (PG_SERVER, cls.database)
        with psycopg.connect(self.server_dsn, autocommit=True) as con:
            con.execute("CREATE SCHEMA %s" % self.schema)
        self.dsn = self.dsn_via(PG_SERVER)

    def dsn_via(self, server: str) -> str:
        """This test's DSN through ``server`` ("host=… port=…")."""
        return "%s user=postgres dbname=%s options='-c search_path=%s'" % (
            server, PostgresBackend.database, self.schema)

    def make(self, **kw) -> PostgresStore:
        return PostgresStore(self.dsn, **kw)

    make_here = make

    @contextmanager
    def writes_blocked(self):
        """Hold a lock on ``users`` from another connection: reads pass, writers time out."""
        with psycopg.connect(self.dsn) as con:
            con.execute("LOCK TABLE users IN EXCLUSIVE MODE")
            try:
                yield
            finally:
                con.rollback()

    def execute(self, sql: str) -> None:
        """Run ``sql`` (no parameters) in its own transaction on the backend's database."""
        with psycopg.connect(self.dsn) as con:
            con.execute(sql)

    def spec(self) -> str:
        return "postgresql:" + self.dsn

    def cleanup(self) -> None:
        with psycopg.connect(self.server_dsn, autocommit=True) as con:
            con.execute("DROP SCHEMA %s CASCADE" % self.schema)

    @classmethod
    def drop_database(cls) -> None:
        if cls.database is not None:
            with psycopg.connect("%s dbname=%s" % (PG_SERVER, PG_ADMIN_DB), autocommit=True) as con:
                con.execute("DROP DATABASE IF EXISTS %s WITH (FORCE)" % cls.database)
            cls.database = None


BACKENDS = {
    "sqlite": SqliteBackend,
    "sqlite-thread": SqliteThreadBackend,
    "postgresql": PostgresBackend,
}


def store_from_spec(spec: str, **kw):
    """A fresh store on the data named by ``spec`` (``backend:argument``)."""
    kind, _, arg = spec.partition(":")
    if kind in ("sqlite", "sqlite-thread"):
        return SqliteStore(arg, writer=BACKENDS[kind].writer, **kw)
    if kind == "postgresql":
        return PostgresStore(arg, **kw)
    raise ValueError("unknown store spec %r" % spec)
