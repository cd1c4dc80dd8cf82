"""Store backend "postgresql": the production store, a writer pool with group commit.

Writes go through :class:`~imd.store.writer.Writer` with ``writers`` lanes, one
psycopg 3 connection each (cooperative under gevent once gevent has
monkey-patched the process). A message goes to the lane of its sender, so one
sender's messages commit in order. Each batch is one transaction:

1. dedupe: look up every (sender, client_id) of the batch in one query;
2. lock: insert the missing ``users`` rows and ``SELECT … ORDER BY id FOR
   UPDATE`` every user row the batch touches, in id order (so writers of this
   and of other nodes sharing the database never deadlock on each other);
3. allocate the seqs in memory from the locked ``last_seq`` values;
4. bulk-insert messages and inbox rows (COPY), ``UPDATE users SET last_seq``;
5. COMMIT; only then are the callbacks run (by the Writer).

A connection error, deadlock, lock timeout or shutdown is transient: the Writer
retries the batch with backoff and this module reconnects the lane's
connection. If a connection drops during COMMIT the batch may have committed:
the retry finds its messages by client id and, when the stored mid is the op's
own, acks them as the original (not duplicate) store.

Reads use a separate small pool of autocommit connections and block only the
calling greenlet; an unreachable database raises StoreUnavailable.
Retention: ``purge(older_than_ms)``, run every ``purge_interval`` seconds when
``retention_days`` > 0.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from contextlib import contextmanager
from typing import Iterable, Optional

import gevent
import psycopg
from gevent.lock import BoundedSemaphore

from .base import MessageResult, Store, StoreUnavailable, UserInfo
from .migrations import migrations
from .rows import ENTRY_COLUMNS, entry_from_row, load_json, message_entries, notice_entry
from .writer import MessageOp, Pending, Writer, WriterStore

log = logging.getLogger("imd.store.postgresql")

MIGRATION_LOCK = 0x696D64          # pg_advisory_xact_lock key ("imd")
LOCK_TIMEOUT = "2s"                # a writer waiting longer on a row lock retries its batch
PURGE_CHUNK = 5000

MESSAGE_COLUMNS = ("mid", "kind", "sender", "recipient", "body", "ctx", "ts", "client_id",
                   "sender_seq", "recipient_seq", "notice_kind")
INBOX_COLUMNS = ("user_id", "seq", "mid", "inbound")
_NO_TOUCH = (None, None, None)


def is_transient(exc: BaseException) -> bool:
    """True for errors a retry can cure: connection loss, shutdown, deadlock, lock
    timeout, disk full, read-only standby, and a client-id race with another node."""
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError,
                        psycopg.errors.ReadOnlySqlTransaction)):
        return True
    if isinstance(exc, psycopg.errors.UniqueViolation):
        return exc.diag.constraint_name == "messages_client"
    return False


class PostgresStore(WriterStore, Store):
    """The PostgreSQL store. See the module docstring and imd.store.base for the contract.

    ``bulk`` is how rows are inserted: ``"copy"`` (default, measured fastest) or
    ``"executemany"`` (kept for the benchmark that compares them).
    """

    name = "postgresql"

    def __init__(self, dsn: str, writers: int = 4, readers: int = 4, queue_size: int = 100000,
                 batch_max: int = 1000, retention_days: float = 0, purge_interval: float = 3600.0,
                 bulk: str = "copy", connect_timeout: int = 5) -> None:
        if bulk not in ("copy", "executemany"):
            raise ValueError("bulk must be 'copy' or 'executemany'")
        self.dsn = dsn
        self.bulk = bulk
        self.connect_timeout = connect_timeout
        self.retention_days = retention_days
        self.purge_interval = purge_interval
        self._writer = Writer(self._apply_batch, is_transient, queue_size=queue_size,
                              batch_max=batch_max, lanes=writers, name="postgresql")
        self._wcons: list = [None] * writers
        self._idle: deque = deque()               # idle read connections
        self._readers = BoundedSemaphore(readers)
        self._purger = None
        self._open = False
        self.purged = 0

    # -- lifecycle -----------------------------------------------------------
    def _connect(self, autocommit: bool = False) -> psycopg.Connection:
        return psycopg.connect(self.dsn, autocommit=autocommit, connect_timeout=self.connect_timeout)

    def open(self) -> None:
        try:
            with self._connect() as con:
                self._migrate(con)
        except psycopg.OperationalError as exc:
            raise StoreUnavailable("postgresql unreachable: %s" % exc) from exc
        self._open = True
        self._writer.start()
        if self.retention_days > 0:
            self._purger = gevent.spawn(self._purge_loop)

    def _migrate(self, con) -> None:
        con.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        con.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY, "
                    "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        done = {row[0] for row in con.execute("SELECT version FROM schema_version")}
        for version, name, sql in migrations("postgresql"):
            if version not in done:
                log.info("postgresql: applying migration %s", name)
                con.execute(sql)
                con.execute("INSERT INTO schema_version (version, name) VALUES (%s, %s)",
                            (version, name))
        con.commit()

    def close(self, timeout: float = 10.0) -> None:
        if not self._open:
            return
        if self._purger is not None:
            self._purger.kill()
        self._writer.stop(timeout)
        self._open = False
        for con in list(self._idle) + [c for c in self._wcons if c is not None]:
            con.close()
        self._idle.clear()
        self._wcons = [None] * len(self._wcons)

    def stats(self) -> dict:
        stats = self._writer.stats()
        stats["purged"] = self.purged
        return stats

    # -- writes (in the lane greenlets) ---------------------------------------
    def _apply_batch(self, lane: int, ops: list, pending: Optional[Pending]) -> list:
        con = self._wcons[lane]
        if con is None or con.closed:
            con = self._connect()
            con.execute("SET lock_timeout = '%s'" % LOCK_TIMEOUT)
            con.commit()
            self._wcons[lane] = con
        try:
            with con.cursor() as cur:
                results = _Batch(cur, self.bulk).run(ops, pending)
            con.commit()
        except BaseException:
            self._reset(lane, con)
            raise
        return results

    def _reset(self, lane: int, con) -> None:
        """After a failed batch: roll back, or drop the connection if it is broken."""
        try:
            if not con.broken:
                con.rollback()
                return
        except psycopg.Error:
            pass
        self._wcons[lane] = None
        try:
            con.close()
        except psycopg.Error:
            pass

    # -- reads -----------------------------------------------------------------
    @contextmanager
    def _reading(self):
        """A read connection (autocommit) from the pool; StoreUnavailable if the database is not."""
        if not self._open:
            raise StoreUnavailable("store is not open")
        with self._readers:
            try:
                con = self._idle.pop() if self._idle else self._connect(autocommit=True)
            except psycopg.OperationalError as exc:
                raise StoreUnavailable("postgresql unreachable: %s" % exc) from exc
            try:
                yield con
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                con.close()
                raise StoreUnavailable("postgresql read failed: %s" % exc) from exc
            except BaseException:
                con.close()
                raise
            if con.broken or con.closed:
                return
            self._idle.append(con)

    def _rows(self, sql: str, args: tuple) -> list:
        with self._reading() as con:
            return con.execute(sql, args).fetchall()

    def _scalar(self, sql: str, args: tuple) -> int:
        rows = self._rows(sql, args)
        return rows[0][0] if rows and rows[0][0] is not None else 0

    def inbox(self, user: str, since: int, limit: int) -> list:
        rows = self._rows("SELECT %s FROM inbox i JOIN messages m ON m.mid = i.mid "
                          "WHERE i.user_id = %%s AND i.seq > %%s ORDER BY i.seq LIMIT %%s"
                          % ENTRY_COLUMNS, (user, since, limit))
        return [entry_from_row(user, r) for r in rows]

    def offline(self, user: str, limit: int) -> list:
        rows = self._rows("SELECT %s FROM inbox i JOIN messages m ON m.mid = i.mid "
                          "WHERE i.user_id = %%s AND i.inbound AND i.seq > (SELECT COALESCE(MAX(seq), 0) "
                          "FROM cursors WHERE user_id = %%s) ORDER BY i.seq LIMIT %%s"
                          % ENTRY_COLUMNS, (user, user, limit))
        return [entry_from_row(user, r) for r in rows]

    def last_seq(self, user: str) -> int:
        return self._scalar("SELECT last_seq FROM users WHERE id = %s", (user,))

    def cursor(self, user: str, device: str) -> int:
        return self._scalar("SELECT seq FROM cursors WHERE user_id = %s AND device = %s",
                            (user, device))

    def received_seq(self, user: str) -> int:
        return self._scalar("SELECT MAX(seq) FROM cursors WHERE user_id = %s", (user,))

    def contacts(self, user: str) -> set:
        return {r[0] for r in self._rows("SELECT contact FROM contacts WHERE user_id = %s", (user,))}

    def users_info(self, users: Iterable[str]) -> dict:
        wanted = list(dict.fromkeys(users))
        if not wanted:
            return {}
        rows = self._rows("SELECT id, role, last_seen, platform FROM users "
                          "WHERE id = ANY(%s) AND last_seen IS NOT NULL", (wanted,))
        return {r[0]: UserInfo(*r) for r in rows}

    def password(self, user: str) -> Optional[dict]:
        rows = self._rows("SELECT credentials FROM users WHERE id = %s", (user,))
        return load_json(rows[0][0]) if rows else None

    def last_sent_to(self, sender: str, recipient: str, upto_recipient_seq: int):
        rows = self._rows("SELECT sender_seq, mid FROM messages WHERE sender = %s AND recipient = %s "
                          "AND recipient_seq <= %s ORDER BY recipient_seq DESC LIMIT 1",
                          (sender, recipient, upto_recipient_seq))
        return (rows[0][0], rows[0][1]) if rows else None

    # -- retention ---------------------------------------------------------------
    def purge(self, older_than_ms: int) -> int:
        """Delete messages with ts < ``older_than_ms`` and their inbox entries, in
        chunks (each its own transaction). Seqs are never reused. Returns the
        number of messages deleted. Blocks the calling greenlet."""
        total = 0
        while True:
            with self._reading() as con:
                count = con.execute(
                    "WITH gone AS (DELETE FROM messages WHERE mid IN (SELECT mid FROM messages "
                    "WHERE ts < %s LIMIT %s) RETURNING sender, sender_seq, recipient, recipient_seq), "
                    "entries AS (DELETE FROM inbox WHERE (user_id, seq) IN ("
                    "SELECT recipient, recipient_seq FROM gone UNION ALL "
                    "SELECT sender, sender_seq FROM gone WHERE sender IS NOT NULL)) "
                    "SELECT count(*) FROM gone", (older_than_ms, PURGE_CHUNK)).fetchone()[0]
            total += count
            self.purged += count
            if count < PURGE_CHUNK:
                return total

    def _purge_loop(self) -> None:
        while True:
            gevent.sleep(self.purge_interval)
            try:
                gone = self.purge(int(time.time() * 1000 - self.retention_days * 86400000))
                if gone:
                    log.info("postgresql: purged %d messages older than %g days", gone,
                             self.retention_days)
            except Exception as exc:
                log.warning("postgresql: purge failed: %r", exc)


class _Batch:
    """The ops of one writer transaction (see the module docstring for the steps)."""

    __slots__ = ("cur", "bulk", "seqs", "reserved", "by_client", "messages", "inbox")

    def __init__(self, cur, bulk: str) -> None:
        self.cur = cur
        self.bulk = bulk
        self.seqs: dict = {}          # user -> last seq handed out so far in this batch
        self.reserved: dict = {}      # user -> last seq reserved for this batch
        self.by_client: dict = {}
        self.messages: list = []
        self.inbox: list = []

    def run(self, ops: list, pending: Optional[Pending]) -> list:
        cur = self.cur
        stored = self._stored_client_ids(ops)
        recipients = self._notice_recipients(ops)
        need = self._seqs_needed(ops, stored, recipients)
        touches = pending.touches if pending else {}
        ids = sorted(set(need).union(touches, pending.passwords if pending else ()))
        if ids:
            # one upsert creates missing users, locks every row in id order, applies the
            # touches and reserves the seqs: (last_seq - need, last_seq] is this batch's
            cur.execute(
                "INSERT INTO users AS u (id, last_seq, role, platform, last_seen) "
                "SELECT * FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::text[], %s::bigint[]) "
                "ON CONFLICT (id) DO UPDATE SET last_seq = u.last_seq + EXCLUDED.last_seq, "
                "role = COALESCE(EXCLUDED.role, u.role), platform = COALESCE(EXCLUDED.platform, u.platform), "
                "last_seen = GREATEST(u.last_seen, EXCLUDED.last_seen) RETURNING id, last_seq",
                (ids, [need.get(u, 0) for u in ids], [touches.get(u, _NO_TOUCH)[0] for u in ids],
                 [touches.get(u, _NO_TOUCH)[1] for u in ids], [touches.get(u, _NO_TOUCH)[2] for u in ids]))
            self.reserved = dict(cur.fetchall())
            self.seqs = {u: last - need.get(u, 0) for u, last in self.reserved.items()}
        if pending:
            _apply_pending(cur, pending)
        results = [self.message(op, stored) if isinstance(op, MessageOp)
                   else self.notice(op, recipients.get(id(op), op.users)) for op in ops]
        self.finish()
        return results

    def _notice_recipients(self, ops: list) -> dict:
        """id(op) → recipients, for the notices to a role or to all known users."""
        recipients = {}
        for op in ops:
            if not isinstance(op, MessageOp) and op.users is None:
                if op.role is None:
                    self.cur.execute("SELECT id FROM users WHERE last_seen IS NOT NULL ORDER BY id")
                else:
                    self.cur.execute("SELECT id FROM users WHERE role = %s AND last_seen IS NOT NULL "
                                     "ORDER BY id", (op.role,))
                recipients[id(op)] = [r[0] for r in self.cur]
        return recipients

    @staticmethod
    def _seqs_needed(ops: list, stored: dict, recipients: dict) -> dict:
        """user → how many seqs the batch takes from them (as message()/notice() will)."""
        need: dict = {}
        seen = set()
        for op in ops:
            if isinstance(op, MessageOp):
                key = (op.sender, op.client_id)
                if op.client_id is not None:
                    if key in seen or key in stored:
                        continue
                    seen.add(key)
                need[op.sender] = need.get(op.sender, 0) + 1
                need[op.recipient] = need.get(op.recipient, 0) + 1
            else:
                for user in recipients.get(id(op), op.users):
                    need[user] = need.get(user, 0) + 1
        return need

    def _stored_client_ids(self, ops: list) -> dict:
        """(sender, client_id) → (mid, ts, sender_seq, recipient_seq) of those already stored."""
        keys = [(op.sender, op.client_id) for op in ops
                if isinstance(op, MessageOp) and op.client_id is not None]
        if not keys:
            return {}
        self.cur.execute("SELECT m.sender, m.client_id, m.mid, m.ts, m.sender_seq, m.recipient_seq "
                         "FROM messages m JOIN unnest(%s::text[], %s::text[]) AS k(sender, client_id) "
                         "ON m.sender = k.sender AND m.client_id = k.client_id",
                         ([k[0] for k in keys], [k[1] for k in keys]))
        return {(r[0], r[1]): r[2:] for r in self.cur}

    def next_seq(self, user: str) -> int:
        seq = self.seqs[user] + 1
        self.seqs[user] = seq
        return seq

    def message(self, op: MessageOp, stored: dict) -> MessageResult:
        key = (op.sender, op.client_id)
        if op.client_id is not None:
            first = self.by_client.get(key)
            if first is not None:
                return MessageResult(first.mid, first.ts, first.sender_seq, first.recipient_seq,
                                     duplicate=True)
            row = stored.get(key)
            if row is not None:
                mid, ts, sender_seq, recipient_seq = row
                if mid != op.mid:
                    return MessageResult(mid, ts, sender_seq, recipient_seq, duplicate=True)
                # our own batch, committed before the connection dropped: ack it as stored
                result = MessageResult(mid, ts, sender_seq, recipient_seq,
                                       entries=message_entries(op, sender_seq, recipient_seq))
                self.by_client[key] = result
                return result
        sender_seq = self.next_seq(op.sender)
        recipient_seq = self.next_seq(op.recipient)
        self.messages.append((op.mid, "msg", op.sender, op.recipient, op.body_json, op.ctx_json,
                              op.ts, op.client_id, sender_seq, recipient_seq, None))
        self.inbox.append((op.sender, sender_seq, op.mid, False))
        self.inbox.append((op.recipient, recipient_seq, op.mid, True))
        result = MessageResult(op.mid, op.ts, sender_seq, recipient_seq,
                               entries=message_entries(op, sender_seq, recipient_seq))
        if op.client_id is not None:
            self.by_client[key] = result
        return result

    def notice(self, op, users: list) -> list:
        entries = []
        for user in users:
            seq = self.next_seq(user)
            mid = op.mids()
            self.messages.append((mid, "notice", None, user, op.body_json, None, op.ts, None,
                                  None, seq, op.kind))
            self.inbox.append((user, seq, mid, True))
            entries.append(notice_entry(op, user, seq, mid))
        return entries

    def finish(self) -> None:
        if self.seqs != self.reserved:
            raise RuntimeError("seq reservation does not match the seqs handed out")
        _insert(self.cur, self.bulk, "messages", MESSAGE_COLUMNS, self.messages)
        _insert(self.cur, self.bulk, "inbox", INBOX_COLUMNS, self.inbox)


def _insert(cur, bulk: str, table: str, columns: tuple, rows: list) -> None:
    if not rows:
        return
    names = ", ".join(columns)
    if bulk == "copy":
        with cur.copy("COPY %s (%s) FROM STDIN" % (table, names)) as copy:
            for row in rows:
                copy.write_row(row)
    else:
        cur.executemany("INSERT INTO %s (%s) VALUES (%s)"
                        % (table, names, ", ".join(["%s"] * len(columns))), rows)


def _apply_pending(cur, p: Pending) -> None:
    """Write the coalesced fire-and-forget changes but the touches (done by the
    users upsert, which also locked every users row involved)."""
    if p.passwords:
        ids = list(p.passwords)
        cur.execute("UPDATE users SET credentials = v.credentials FROM unnest(%s::text[], %s::text[]) "
                    "AS v(id, credentials) WHERE users.id = v.id",
                    (ids, [p.passwords[u] for u in ids]))
    if p.cursors:
        keys = sorted(p.cursors)
        cur.execute("INSERT INTO cursors (user_id, device, seq) "
                    "SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[]) "
                    "ON CONFLICT (user_id, device) DO UPDATE SET seq = GREATEST(cursors.seq, EXCLUDED.seq)",
                    ([k[0] for k in keys], [k[1] for k in keys], [p.cursors[k] for k in keys]))
    for add, user, contact in p.contacts:
        if add:
            cur.execute("INSERT INTO contacts (user_id, contact) VALUES (%s, %s), (%s, %s) "
                        "ON CONFLICT DO NOTHING", (user, contact, contact, user))
        else:
            cur.execute("DELETE FROM contacts WHERE (user_id, contact) IN ((%s, %s), (%s, %s))",
                        (user, contact, contact, user))
