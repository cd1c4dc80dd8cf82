"""Registry of store backends for the contract suite: adding one is one line in BACKENDS.

A backend factory is built per test with a scratch directory; it makes fresh
(unopened) stores on the same data (``make``), blocks all writes for a while
(``writes_blocked``), and names its data with a ``spec`` string that a
subprocess can reopen through :func:`store_from_spec`.
"""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager

from imd.store.sqlite import FILENAME, SqliteStore


class SqliteBackend:
    name = "sqlite"

    def __init__(self, tmp_path) -> None:
        self.dir = str(tmp_path / "data")

    def make(self, **kw) -> SqliteStore:
        return SqliteStore(self.dir, **kw)

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

    def spec(self) -> str:
        return "sqlite:" + self.dir

    def cleanup(self) -> None:
        pass


BACKENDS = {
    "sqlite": SqliteBackend,
}


def store_from_spec(spec: str, **kw):
    """A fresh store on the data named by ``spec`` (``backend:argument``)."""
    kind, _, arg = spec.partition(":")
    if kind == "sqlite":
        return SqliteStore(arg, **kw)
    raise ValueError("unknown store spec %r" % spec)
