"""Store backend "sqlite": the embedded store, one file ``imd.sqlite3`` in the data dir.

WAL mode. Writes go through :class:`~imd.store.writer.Writer` (one lane): each
batch is one ``BEGIN IMMEDIATE`` … ``COMMIT`` on the single writer connection,
held by a :class:`~imd.store.sqlite_writer.SqliteWriter` (the transactions and
the checkpoints) in the writer process (:mod:`imd.store.sqlite_proc`;
``writer="process"``, the default) or in this process, in a real OS thread of
gevent's hub threadpool (``writer="thread"``); either way the hub never waits on
SQLite. Reads run in the threadpool of this process and block only the calling
greenlet; each takes a read-only connection from a small pool for its duration,
so there are never more read connections than reads at once (at most the
threadpool's size). Not one per thread: gevent retires a pool thread after 5 s
idle and starts new ones, so per-thread connections piled up (memory and
descriptors).

Work in the threadpool never raises there: a failure comes back as a value and
is raised again in the calling greenlet (:func:`~imd.store.sqlite_writer.outcome`).
"""

from __future__ import annotations

import logging
import os
from typing import Iterable, Optional

import gevent
import orjson
from gevent.monkey import get_original

from .base import LAST_SEQS_MAX, AttachState, Store, StoreUnavailable, UserInfo
from .batch import batch_results
from .retention import purge_loop
from .rows import ENTRY_COLUMNS, entry_from_row, load_json
from .sqlite_proc import WriterProcess
from .sqlite_writer import (CHUNK, SqliteWriter, connect, is_transient, lower_switch_interval, outcome,
                            reraise, shaped)
from .writer import Writer, WriterStore

log = logging.getLogger("imd.store.sqlite")

FILENAME = "imd.sqlite3"
WRITERS = {"process": WriterProcess, "thread": SqliteWriter}
# last_sent_to: the recipient's inbox entries in the window, newest first, joined to their
# messages by mid; it stops at the first from the sender (the index messages_pair served it before
# migration 0003). CROSS JOIN keeps the inbox the outer loop and +m.sender keeps the sender's
# index (sender, client_id) out: either would read every message the sender ever sent.
_LAST_SENT_TO = ("SELECT m.sender_seq, m.mid, m.client_id FROM inbox AS i "
                 "CROSS JOIN messages AS m ON m.mid = i.mid WHERE i.user = ? AND i.seq <= ? AND i.seq > ? "
                 "AND i.inbound = 1 AND +m.sender = ? ORDER BY i.seq DESC LIMIT 1")

_os_lock = get_original("threading", "Lock")


class SqliteStore(WriterStore, Store):
    """The embedded store. See the module docstring and imd.store.base for the contract.

    ``path`` is the data directory (the file is ``imd.sqlite3`` in it) or, when it
    ends with ``.sqlite3``, the database file itself. ``retention_days`` (0: keep
    forever) may be changed on a live store."""

    name = "sqlite"

    def __init__(self, path: str, queue_size: int = 100000, batch_max: int = 1000,
                 synchronous: str = "full", retention_days: float = 0,
                 purge_interval: float = 3600.0, batch_wait: float = 0.0,
                 writer: str = "process") -> None:
        if synchronous not in ("full", "normal"):
            raise ValueError("synchronous must be 'full' or 'normal'")
        if writer not in WRITERS:
            raise ValueError("writer must be 'process' or 'thread'")
        path = str(path)
        if path.endswith(".sqlite3"):           # the database file itself
            self.dir, self.file = os.path.dirname(path) or ".", path
        else:                                   # the data directory
            self.dir, self.file = path, os.path.join(path, FILENAME)
        self.synchronous = synchronous
        self._core = WRITERS[writer](self.file, synchronous)   # the writer connection's holder
        self._writer = Writer(self._apply_batch, is_transient, queue_size=queue_size,
                              batch_max=batch_max, lanes=1, name="sqlite", batch_wait=batch_wait)
        self._read_cons: list = []        # every open read connection
        self._idle_reads: list = []       # those not in use by a read now
        self._read_lock = _os_lock()      # guards both lists; taken in pool threads only
        self._reads_closed = False        # set by close(): no read may start, open or keep a connection
        self._open = False
        self.retention_days = retention_days
        self.purge_interval = purge_interval
        self._purger = None
        self.purged = 0

    # -- lifecycle -----------------------------------------------------------
    def open(self) -> None:
        """Blocks the calling greenlet until the file is set up (WAL mode, migrations)
        by the writer; raises what failed there."""
        os.makedirs(self.dir, exist_ok=True)
        lower_switch_interval()            # reads run in pool threads too
        self._pool = gevent.get_hub().threadpool
        self._core.open()
        self._reads_closed = False
        self._open = True
        self._writer.start()
        self._purger = gevent.spawn(purge_loop, self)

    def close(self, timeout: float = 10.0) -> None:
        if not self._open:
            return
        if self._purger is not None:
            self._purger.kill()
        self._writer.stop(timeout)
        self._open = False
        self._pool.apply(self._close_reads)
        self._core.close()

    def _close_reads(self) -> None:
        """In a pool thread: close the idle read connections; one in use by a read is
        closed by that read when it ends (closing it under a running statement, from
        another thread, crashed the process: a segfault in SQLite)."""
        with self._read_lock:
            self._reads_closed = True
            idle, self._idle_reads, self._read_cons = self._idle_reads, [], []
        for con in idle:
            con.close()

    # -- writes: one batch = one transaction, in the writer's thread or process --------
    def _apply_batch(self, lane: int, ops: list, pending) -> list:
        plans, base = self._core.apply(ops, pending)
        return batch_results(ops, plans, base)     # here, from the ops kept: the entries never cross

    def stats(self) -> dict:
        stats = self._writer.stats()
        stats["purged"] = self.purged
        stats["checkpoints"] = self._core.checkpoints
        stats["wal_frames"] = self._core.wal_frames
        return stats

    # -- retention -------------------------------------------------------------
    def purge(self, older_than_ms: int) -> int:
        """Delete messages with ts < ``older_than_ms`` and their inbox entries, in
        chunks (each its own short transaction, on its own connection). Seqs are
        never reused. Returns the number of messages deleted. Blocks the calling
        greenlet."""
        if not self._open:
            raise StoreUnavailable("store is not open")
        gone = reraise(self._pool.apply(outcome, (self._purge_sync, older_than_ms)))
        self.purged += gone
        return gone

    def _purge_sync(self, older_than_ms: int) -> int:
        con = connect(self.file)
        total = 0
        try:
            while True:
                con.execute("BEGIN IMMEDIATE")
                rows = con.execute("SELECT mid, sender, sender_seq, recipient, recipient_seq "
                                   "FROM messages WHERE ts < ? LIMIT 1000", (older_than_ms,)).fetchall()
                con.executemany("DELETE FROM inbox WHERE user = ? AND seq = ?",
                                [(r[3], r[4]) for r in rows] +
                                [(r[1], r[2]) for r in rows if r[1] is not None])
                con.executemany("DELETE FROM messages WHERE mid = ?", [(r[0],) for r in rows])
                con.execute("COMMIT")
                total += len(rows)
                if len(rows) < 1000:
                    return total
        finally:
            if con.in_transaction:
                con.execute("ROLLBACK")
            con.close()

    # -- reads (in a threadpool thread, on a pooled read connection) --------
    def _read(self, fn, *args):
        if not self._open:
            raise StoreUnavailable("store is not open")
        return reraise(self._pool.apply(outcome, (self._read_sync, fn, args)))

    def _read_sync(self, fn, args):
        """In a pool thread: run ``fn(con, *args)`` on an idle read connection (a
        new one if none is idle) and give it back afterwards. The checkout is in
        the thread, so a caller killed while waiting cannot lose or share it."""
        with self._read_lock:
            if self._reads_closed:
                raise StoreUnavailable("store is closed")
            con = self._idle_reads.pop() if self._idle_reads else None
        if con is None:
            con = connect(self.file)
            con.execute("PRAGMA query_only = ON")
            with self._read_lock:
                closed = self._reads_closed
                if not closed:
                    self._read_cons.append(con)
            if closed:                              # the store closed while it opened
                con.close()
                raise StoreUnavailable("store is closed")
        try:
            return fn(con, *args)
        finally:
            with self._read_lock:
                keep = con in self._read_cons       # not closed meanwhile
                if keep:
                    self._idle_reads.append(con)
            if not keep:
                con.close()                         # the store closed during this read

    def inbox(self, user: str, since: int, limit: int) -> list:
        def q(con):
            rows = con.execute("SELECT %s FROM inbox i JOIN messages m ON m.mid = i.mid "
                               "WHERE i.user = ? AND i.seq > ? ORDER BY i.seq LIMIT ?"
                               % ENTRY_COLUMNS, (user, since, limit)).fetchall()
            return [entry_from_row(user, r) for r in rows]
        return self._read(q)

    def offline(self, user: str, limit: int) -> list:
        self.settle_cursors({user})
        return self._read(_offline, user, limit)

    def last_seq(self, user: str) -> int:
        return self._read(_last_seq, user)

    def attach_states(self, requests: list) -> list:
        """One aggregate statement per CHUNK users for the tops and received seqs, one
        for the contacts asked for, and the offline query only for the users whose
        top is above what their devices received (most logins have nothing offline).
        Each statement returns one JSON row: the pool thread retakes the GIL, which
        the hub is busy with, once per statement instead of once per row."""
        users = list(dict.fromkeys(user for user, _, _ in requests))
        contact_users = list(dict.fromkeys(user for user, want, _ in requests if want))
        self.settle_cursors(set(users))

        def q(con):
            tops = {}                     # user → (top, received)
            for chunk in _chunks(users):
                tops.update((u, (top, rcv)) for u, top, rcv in _json_rows(
                    con, "SELECT json_group_array(json_array(id, last_seq, (SELECT MAX(seq) FROM "
                    "cursors WHERE cursors.user = users.id))) FROM users WHERE id IN (%s)", chunk))
            contacts = {user: set() for user in contact_users}
            for chunk in _chunks(contact_users):
                for user, contact in _json_rows(
                        con, "SELECT json_group_array(json_array(user, contact)) FROM contacts "
                        "WHERE user IN (%s)", chunk):
                    contacts[user].add(contact)
            out = []
            for user, want, limit in requests:
                top, received = tops.get(user, (0, None))
                offline = None
                if limit:
                    offline = _offline_after(con, user, received or 0, limit) if top > (received or 0) else []
                out.append(AttachState(top, contacts[user] if want else None, offline))
            return out
        return self._read(q)

    def last_seqs(self, users: list) -> dict:
        users = list(users)
        if len(users) > LAST_SEQS_MAX:
            raise ValueError(f"last_seqs: more than {LAST_SEQS_MAX} users")

        def q(con):
            out = dict.fromkeys(users, 0)
            if users:
                out.update(con.execute("SELECT id, last_seq FROM users WHERE id IN (%s)"
                                       % ",".join("?" * len(users)), users).fetchall())
            return out
        return self._read(q)

    def cursor(self, user: str, device: str) -> int:
        self.settle_cursors({user})
        return self._read(lambda con: _scalar(
            con, "SELECT seq FROM cursors WHERE user = ? AND device = ?", user, device))

    def received_seq(self, user: str) -> int:
        self.settle_cursors({user})
        return self._read(_received, user)

    def contacts(self, user: str) -> set:
        return self._read(_contacts, user)

    def users_info(self, users: Iterable[str]) -> dict:
        wanted = list(dict.fromkeys(users))

        def q(con):
            found = {}
            for i in range(0, len(wanted), 500):
                chunk = shaped(wanted[i:i + 500], 500)
                for uid, role, last_seen, platform in con.execute(
                        "SELECT id, role, last_seen, platform FROM users WHERE last_seen IS NOT NULL "
                        "AND id IN (%s)" % ",".join("?" * len(chunk)), chunk):
                    found[uid] = UserInfo(uid, role, last_seen, platform)
            return found
        return self._read(q)

    def password(self, user: str) -> Optional[dict]:
        def q(con):
            row = con.execute("SELECT credentials FROM users WHERE id = ?", (user,)).fetchone()
            return None if row is None else load_json(row[0])
        return self._read(q)

    def stored_ack(self, sender: str, client_id: str):
        """base.Store; the (sender, client_id) index answers it."""
        def q(con):
            row = con.execute("SELECT mid, sender_seq, ts FROM messages WHERE sender = ? AND client_id = ?",
                              (sender, client_id)).fetchone()
            return None if row is None else tuple(row)
        return self._read(q)

    def last_sent_to(self, sender: str, recipient: str, upto_recipient_seq: int):
        """From the recipient's inbox (base.Store; :data:`_LAST_SENT_TO`)."""
        def q(con):
            row = con.execute(_LAST_SENT_TO, (recipient, upto_recipient_seq,
                                              upto_recipient_seq - self.read_scan_max, sender)).fetchone()
            return None if row is None else tuple(row)
        return self._read(q)


def _scalar(con, sql: str, *args) -> int:
    row = con.execute(sql, args).fetchone()
    return 0 if row is None or row[0] is None else row[0]


def _received(con, user: str) -> int:
    return _scalar(con, "SELECT MAX(seq) FROM cursors WHERE user = ?", user)


def _last_seq(con, user: str) -> int:
    return _scalar(con, "SELECT last_seq FROM users WHERE id = ?", user)


def _contacts(con, user: str) -> set:
    return {r[0] for r in con.execute("SELECT contact FROM contacts WHERE user = ?", (user,))}


def _offline(con, user: str, limit: int) -> list:
    return _offline_after(con, user, _received(con, user), limit)


def _offline_after(con, user: str, received: int, limit: int) -> list:
    rows = con.execute("SELECT %s FROM inbox i JOIN messages m ON m.mid = i.mid "
                       "WHERE i.user = ? AND i.seq > ? AND i.inbound = 1 "
                       "ORDER BY i.seq LIMIT ?" % ENTRY_COLUMNS,
                       (user, received, limit)).fetchall()
    return [entry_from_row(user, r) for r in rows]


def _chunks(items: list):
    """``items`` in pieces of at most CHUNK, each padded by :func:`shaped`."""
    for i in range(0, len(items), CHUNK):
        yield shaped(items[i:i + CHUNK])


def _json_rows(con, sql: str, params: list) -> list:
    """The rows of a ``SELECT json_group_array(…) … IN (%s)`` over ``params``: one step."""
    text = con.execute(sql % ",".join("?" * len(params)), params).fetchone()[0]
    return orjson.loads(text)
