"""Store backend "sqlite": the embedded store, one file ``imd.sqlite3`` in the data dir.

WAL mode. Writes go through :class:`~imd.store.writer.Writer` (one lane): each
batch is one ``BEGIN IMMEDIATE`` … ``COMMIT`` on the single writer connection,
run in a real OS thread of gevent's hub threadpool so the hub never waits on
SQLite. Reads also run in the threadpool, each thread on its own read-only
connection (thread-local), and block only the calling greenlet.

``synchronous`` is ``"full"`` (durable against power loss) or ``"normal"``
(in WAL mode durable against a process crash/``kill -9``, not power loss).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from typing import Iterable, Optional

import gevent
from gevent.monkey import get_original

from .base import MessageResult, Store, StoreUnavailable, UserInfo
from .migrations import migrations
from .rows import ENTRY_COLUMNS, entry_from_row, load_json, message_entries, notice_entry
from .writer import MessageOp, Pending, Writer, WriterStore

log = logging.getLogger("imd.store.sqlite")

FILENAME = "imd.sqlite3"
BUSY_TIMEOUT_MS = 2000
# Primary SQLite result codes worth retrying: BUSY, LOCKED, NOMEM, READONLY, IOERR, FULL,
# CANTOPEN, PROTOCOL.
TRANSIENT_CODES = {5, 6, 7, 8, 10, 13, 14, 15}

_thread_local = get_original("threading", "local")


def is_transient(exc: BaseException) -> bool:
    """True for errors that retrying can cure (locked, busy, disk full, I/O, read-only)."""
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is None or (code & 0xFF) in TRANSIENT_CODES
    return False


class SqliteStore(WriterStore, Store):
    """The embedded store. See the module docstring and imd.store.base for the contract."""

    name = "sqlite"

    def __init__(self, path: str, queue_size: int = 100000, batch_max: int = 1000,
                 synchronous: str = "full") -> None:
        if synchronous not in ("full", "normal"):
            raise ValueError("synchronous must be 'full' or 'normal'")
        self.dir = str(path)
        self.file = os.path.join(self.dir, FILENAME)
        self.synchronous = synchronous
        self._writer = Writer(self._apply_batch, is_transient, queue_size=queue_size,
                              batch_max=batch_max, lanes=1, name="sqlite")
        self._wcon: Optional[sqlite3.Connection] = None
        self._local = _thread_local()
        self._read_cons: list = []
        self._open = False

    # -- lifecycle -----------------------------------------------------------
    def open(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        self._pool = gevent.get_hub().threadpool
        self._wcon = self._pool.apply(self._connect_writer)
        self._open = True
        self._writer.start()

    def close(self, timeout: float = 10.0) -> None:
        if not self._open:
            return
        self._writer.stop(timeout)
        self._open = False
        cons, self._read_cons = self._read_cons, []
        for con in cons + [self._wcon]:
            self._pool.apply(con.close)

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.file, isolation_level=None, check_same_thread=False)
        con.execute("PRAGMA busy_timeout = %d" % BUSY_TIMEOUT_MS)
        return con

    def _connect_writer(self) -> sqlite3.Connection:
        con = self._connect()
        con.execute("PRAGMA journal_mode = WAL")
        con.execute("PRAGMA synchronous = %s" % self.synchronous.upper())
        con.execute("CREATE TABLE IF NOT EXISTS schema_version "
                    "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)")
        done = {row[0] for row in con.execute("SELECT version FROM schema_version")}
        for version, name, sql in migrations("sqlite"):
            if version in done:
                continue
            log.info("sqlite: applying migration %s", name)
            con.executescript("BEGIN IMMEDIATE;\n%s\nINSERT INTO schema_version VALUES "
                              "(%d, '%s', %d);\nCOMMIT;" % (sql, version, name, int(time.time())))
        return con

    # -- writes (in a threadpool thread, one batch = one transaction) --------
    def _apply_batch(self, lane: int, ops: list, pending: Optional[Pending]) -> list:
        return self._pool.apply(self._apply_sync, (ops, pending))

    def _apply_sync(self, ops: list, pending: Optional[Pending]) -> list:
        con = self._wcon
        con.execute("BEGIN IMMEDIATE")
        try:
            if pending:
                _apply_pending(con, pending)
            tx = _Batch(con)
            results = [tx.message(op) if isinstance(op, MessageOp) else tx.notice(op)
                       for op in ops]
            tx.finish()
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        return results

    # -- reads (in a threadpool thread, one read connection per thread) -----
    def _read(self, fn, *args):
        if not self._open:
            raise StoreUnavailable("store is not open")
        return self._pool.apply(self._read_sync, (fn, args))

    def _read_sync(self, fn, args):
        con = getattr(self._local, "con", None)
        if con is None:
            con = self._connect()
            con.execute("PRAGMA query_only = ON")
            self._local.con = con
            self._read_cons.append(con)
        return fn(con, *args)

    def inbox(self, user: str, since: int, limit: int) -> list:
        def q(con):
            rows = con.execute("SELECT %s FROM inbox i JOIN messages m ON m.mid = i.mid "
                               "WHERE i.user = ? AND i.seq > ? ORDER BY i.seq LIMIT ?"
                               % ENTRY_COLUMNS, (user, since, limit)).fetchall()
            return [entry_from_row(user, r) for r in rows]
        return self._read(q)

    def offline(self, user: str, limit: int) -> list:
        def q(con):
            received = _received(con, user)
            rows = con.execute("SELECT %s FROM inbox i JOIN messages m ON m.mid = i.mid "
                               "WHERE i.user = ? AND i.seq > ? AND i.inbound = 1 "
                               "ORDER BY i.seq LIMIT ?" % ENTRY_COLUMNS,
                               (user, received, limit)).fetchall()
            return [entry_from_row(user, r) for r in rows]
        return self._read(q)

    def last_seq(self, user: str) -> int:
        return self._read(lambda con: _scalar(con, "SELECT last_seq FROM users WHERE id = ?", user))

    def cursor(self, user: str, device: str) -> int:
        return self._read(lambda con: _scalar(
            con, "SELECT seq FROM cursors WHERE user = ? AND device = ?", user, device))

    def received_seq(self, user: str) -> int:
        return self._read(_received, user)

    def contacts(self, user: str) -> set:
        return self._read(lambda con: {r[0] for r in con.execute(
            "SELECT contact FROM contacts WHERE user = ?", (user,))})

    def users_info(self, users: Iterable[str]) -> dict:
        wanted = list(dict.fromkeys(users))

        def q(con):
            found = {}
            for i in range(0, len(wanted), 500):
                chunk = wanted[i:i + 500]
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

    def last_sent_to(self, sender: str, recipient: str, upto_recipient_seq: int):
        def q(con):
            row = con.execute("SELECT sender_seq, mid FROM messages WHERE sender = ? AND recipient = ? "
                              "AND recipient_seq <= ? ORDER BY recipient_seq DESC LIMIT 1",
                              (sender, recipient, upto_recipient_seq)).fetchone()
            return None if row is None else (row[0], row[1])
        return self._read(q)


def _scalar(con, sql: str, *args) -> int:
    row = con.execute(sql, args).fetchone()
    return 0 if row is None or row[0] is None else row[0]


def _received(con, user: str) -> int:
    return _scalar(con, "SELECT MAX(seq) FROM cursors WHERE user = ?", user)


def _apply_pending(con, p: Pending) -> None:
    """Write the coalesced fire-and-forget changes (inside the batch transaction)."""
    if p.touches:
        con.executemany(
            "INSERT INTO users (id, role, platform, last_seen) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET role = COALESCE(excluded.role, role), "
            "platform = COALESCE(excluded.platform, platform), "
            "last_seen = MAX(COALESCE(last_seen, 0), excluded.last_seen)",
            [(u, r, pl, ts) for u, (r, pl, ts) in p.touches.items()])
    if p.passwords:
        con.executemany("INSERT INTO users (id, credentials) VALUES (?, ?) "
                        "ON CONFLICT (id) DO UPDATE SET credentials = excluded.credentials",
                        list(p.passwords.items()))
    if p.cursors:
        con.executemany("INSERT INTO cursors (user, device, seq) VALUES (?, ?, ?) "
                        "ON CONFLICT (user, device) DO UPDATE SET seq = MAX(seq, excluded.seq)",
                        [(u, d, s) for (u, d), s in p.cursors.items()])
    for add, user, contact in p.contacts:
        if add:
            con.executemany("INSERT OR IGNORE INTO contacts (user, contact) VALUES (?, ?)",
                            [(user, contact), (contact, user)])
        else:
            con.execute("DELETE FROM contacts WHERE (user = ? AND contact = ?) "
                        "OR (user = ? AND contact = ?)", (user, contact, contact, user))


class _Batch:
    """The ops of one transaction: dedupe, seq allocation, rows to insert at the end."""

    __slots__ = ("con", "seqs", "by_client", "messages", "inbox")

    def __init__(self, con) -> None:
        self.con = con
        self.seqs: dict = {}          # user -> last seq allocated in this transaction
        self.by_client: dict = {}     # (sender, client_id) -> MessageResult of this batch
        self.messages: list = []
        self.inbox: list = []

    def next_seq(self, user: str) -> int:
        seq = self.seqs.get(user)
        if seq is None:
            self.con.execute("INSERT OR IGNORE INTO users (id) VALUES (?)", (user,))
            seq = self.con.execute("SELECT last_seq FROM users WHERE id = ?", (user,)).fetchone()[0]
        seq += 1
        self.seqs[user] = seq
        return seq

    def message(self, op: MessageOp) -> MessageResult:
        key = (op.sender, op.client_id)
        if op.client_id is not None:
            first = self.by_client.get(key)
            if first is not None:
                return MessageResult(first.mid, first.ts, first.sender_seq, first.recipient_seq,
                                     duplicate=True)
            row = self.con.execute("SELECT mid, ts, sender_seq, recipient_seq FROM messages "
                                   "WHERE sender = ? AND client_id = ?", key).fetchone()
            if row is not None:
                return MessageResult(*row, duplicate=True)
        sender_seq = self.next_seq(op.sender)
        recipient_seq = self.next_seq(op.recipient)
        self.messages.append((op.mid, "msg", op.sender, op.recipient, op.body_json, op.ctx_json,
                              op.ts, op.client_id, sender_seq, recipient_seq, None))
        self.inbox.append((op.sender, sender_seq, op.mid, 0))
        self.inbox.append((op.recipient, recipient_seq, op.mid, 1))
        result = MessageResult(op.mid, op.ts, sender_seq, recipient_seq,
                               entries=message_entries(op, sender_seq, recipient_seq))
        if op.client_id is not None:
            self.by_client[key] = result
        return result

    def notice(self, op) -> list:
        users = op.users
        if users is None:
            if op.role is None:
                cur = self.con.execute("SELECT id FROM users WHERE last_seen IS NOT NULL ORDER BY id")
            else:
                cur = self.con.execute("SELECT id FROM users WHERE role = ? AND last_seen IS NOT NULL "
                                       "ORDER BY id", (op.role,))
            users = [r[0] for r in cur]
        entries = []
        for user in users:
            seq = self.next_seq(user)
            mid = op.mids()
            self.messages.append((mid, "notice", None, user, op.body_json, None, op.ts, None,
                                  None, seq, op.kind))
            self.inbox.append((user, seq, mid, 1))
            entries.append(notice_entry(op, user, seq, mid))
        return entries

    def finish(self) -> None:
        con = self.con
        con.executemany("INSERT INTO messages (mid, kind, sender, recipient, body, ctx, ts, "
                        "client_id, sender_seq, recipient_seq, notice_kind) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", self.messages)
        con.executemany("INSERT INTO inbox (user, seq, mid, inbound) VALUES (?, ?, ?, ?)",
                        self.inbox)
        con.executemany("UPDATE users SET last_seq = ? WHERE id = ?",
                        [(seq, user) for user, seq in self.seqs.items()])
