"""Store backend "postgresql": the production store, a writer pool with group commit.

Writes go through :class:`~imd.store.writer.Writer` with ``writers`` lanes, one
psycopg 3 connection each (cooperative under gevent once gevent has
monkey-patched the process). A message goes to the lane of its sender, so one
sender's messages commit in order. Each batch is one transaction:

1. without any lock: give each new entry its seq *relative* to its user (the
   k-th seq the batch takes from that user, :class:`~imd.store.batch.BatchPlan`);
2. one WRITE statement — on the autocommit connection it is the transaction, so
   one round trip and its result arrives after the COMMIT; when cursors, contacts
   or passwords ride along, BEGIN, those, WRITE and COMMIT go in one psycopg
   pipeline (one round trip too). The rows travel as one text parameter per
   column (``_texts``). WRITE looks up the batch's (sender, client_id) (dedupe;
   if any is stored it inserts nothing and the batch is planned again knowing
   them), upserts the ``users`` rows in id order — which creates missing users,
   locks the rows (so writers of this and of other nodes sharing the database
   never deadlock on each other), applies last-seen touches and reserves the
   seqs — then inserts the messages rows with absolute seqs; users rows stay
   locked for one statement and the commit. The Writer runs the callbacks
   afterwards.

Why (docs/store.md): each round trip is a wait on gevent's hub, which serves
every client connection between two of them; more writers than 2 only add lock
waits on this 2-core box, since concurrent batches nearly always share some user.

A connection error, deadlock, lock timeout or shutdown is transient: the Writer
retries the batch with backoff and this module reconnects the lane's
connection. If a connection drops during COMMIT the batch may have committed:
the retry finds its messages by client id and, when the stored mid is the op's
own, acks them as the original (not duplicate) store. Notices and messages
without a client id have no such key: after such an ambiguous commit they may
be stored twice (under new seqs); nothing acked is ever lost.

Reads use a separate small pool of autocommit connections and block only the
calling greenlet; an unreachable database raises StoreUnavailable.
Retention: ``purge(older_than_ms)``, run every ``purge_interval`` seconds while
``retention_days`` > 0 (an attribute: may be changed on a live store).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Iterable, Optional

import gevent
import psycopg
from gevent.lock import BoundedSemaphore

from .base import LAST_SEQS_MAX, AttachState, Store, StoreUnavailable, UserInfo
from .batch import ROW_COLUMNS, BatchPlan
from .migrations import migrations
from .retention import purge_loop
from .rows import entry_from_row, load_json
from .writer import Pending, Writer, WriterStore

log = logging.getLogger("imd.store.postgresql")

MIGRATION_LOCK = 0x696D64          # pg_advisory_xact_lock key ("imd")
LOCK_TIMEOUT = "2s"                # a writer waiting longer on a row lock retries its batch
PURGE_CHUNK = 5000

# A user's inbox is the messages table (migration 0003): inbound entries are the rows with
# (recipient, recipient_seq) = (user, seq), outbound ones (the sender's copy) those with
# (sender, sender_seq). Columns in the order of rows.entry_from_row.
_ENTRY_REST = "mid, kind, sender, recipient, body, ctx, ts, notice_kind, client_id, flags"
INBOUND_COLUMNS = "recipient_seq AS seq, " + _ENTRY_REST
OUTBOUND_COLUMNS = "sender_seq AS seq, " + _ENTRY_REST



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
    """The PostgreSQL store. See the module docstring and imd.store.base for the contract."""

    name = "postgresql"

    def __init__(self, dsn: str, writers: int = 2, readers: int = 4, queue_size: int = 100000,
                 batch_max: int = 1000, retention_days: float = 0, purge_interval: float = 3600.0,
                 connect_timeout: int = 5) -> None:
        self.dsn = dsn
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
        # keepalives + tcp_user_timeout: a database that vanishes without a RST (a
        # partition, a dead host) fails the pending query in ~30 s instead of never
        return psycopg.connect(self.dsn, autocommit=autocommit, connect_timeout=self.connect_timeout,
                               keepalives=1, keepalives_idle=10, keepalives_interval=5,
                               keepalives_count=3, tcp_user_timeout=30000)

    def open(self) -> None:
        try:
            with self._connect() as con:
                self._migrate(con)
        except psycopg.OperationalError as exc:
            raise StoreUnavailable("postgresql unreachable: %s" % exc) from exc
        self._open = True
        self._writer.start()
        self._purger = gevent.spawn(purge_loop, self)

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
            con = self._connect(autocommit=True)
            try:
                con.execute("SET lock_timeout = '%s'" % LOCK_TIMEOUT)
                # WRITE's generic plan (which the plan cache may pick after 5 runs) cost
                # PostgreSQL 1.7-2.2x the CPU of a plan for the batch at hand (docs/store.md)
                con.execute("SET plan_cache_mode = force_custom_plan")
            except BaseException:
                con.close()
                raise
            self._wcons[lane] = con
        try:
            stored: dict = {}
            while True:
                plan = BatchPlan(ops, stored, lambda role: _known_users(con, role))
                base, found = _write(con, plan, pending)
                if not found:
                    return plan.results(base)
                # some client ids were stored before (a retry, or a client resending):
                # that transaction inserted nothing; plan again knowing them
                stored.update(found)
                pending = None
        except BaseException as exc:
            self._reset(lane, con, isinstance(exc, Exception))
            raise

    def _reset(self, lane: int, con, error: bool) -> None:
        """After a failed batch: roll back, or drop the connection if it is broken. When
        the lane is being killed (``error`` False; close) the pipeline may still be queued
        on the server, COMMIT included: cancel the running statement first (which makes
        the server skip the rest of the pipeline) so that a write reported as failed does
        not commit later. Only a kill that lands after the server took the COMMIT stays
        ambiguous, like a connection lost during COMMIT (module docstring)."""
        try:
            if error and not con.broken:
                con.rollback()
                return
            if not error and not con.broken:
                con.cancel_safe(timeout=1.0)
        except psycopg.Error:
            pass
        self._wcons[lane] = None
        try:
            con.close()
        except psycopg.Error:
            pass

    # -- reads -----------------------------------------------------------------
    def _query(self, fn):
        """``fn(con)`` on a pooled autocommit read connection. A pooled connection
        found dead (the database went away since) is dropped with every other idle
        one and the query runs once more on a fresh connection; StoreUnavailable
        if the database cannot be reached."""
        if not self._open:
            raise StoreUnavailable("store is not open")
        with self._readers:
            while True:
                fresh = not self._idle
                try:
                    con = self._connect(autocommit=True) if fresh else self._idle.pop()
                except psycopg.OperationalError as exc:
                    raise StoreUnavailable("postgresql unreachable: %s" % exc) from exc
                try:
                    result = fn(con)
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    con.close()
                    if fresh:
                        raise StoreUnavailable("postgresql read failed: %s" % exc) from exc
                    while self._idle:
                        self._idle.pop().close()
                    continue
                except BaseException:
                    con.close()
                    raise
                if self._open:
                    self._idle.append(con)
                else:                           # the store closed during this read
                    con.close()
                return result

    def _rows(self, sql: str, args: tuple) -> list:
        return self._query(lambda con: con.execute(sql, args).fetchall())

    def _scalar(self, sql: str, args: tuple) -> int:
        rows = self._rows(sql, args)
        return rows[0][0] if rows and rows[0][0] is not None else 0

    def inbox(self, user: str, since: int, limit: int) -> list:
        rows = self._rows("SELECT * FROM ((SELECT %s FROM messages WHERE recipient = %%(u)s "
                          "AND recipient_seq > %%(since)s ORDER BY recipient_seq LIMIT %%(n)s) UNION ALL "
                          "(SELECT %s FROM messages WHERE sender = %%(u)s AND sender_seq > %%(since)s "
                          "ORDER BY sender_seq LIMIT %%(n)s)) e ORDER BY seq LIMIT %%(n)s"
                          % (INBOUND_COLUMNS, OUTBOUND_COLUMNS), {"u": user, "since": since, "n": limit})
        return [entry_from_row(user, r) for r in rows]

    def offline(self, user: str, limit: int) -> list:
        self.settle_cursors({user})
        rows = self._rows("SELECT %s FROM messages WHERE recipient = %%(u)s AND recipient_seq > "
                          "(SELECT COALESCE(MAX(seq), 0) FROM cursors WHERE user_id = %%(u)s) "
                          "ORDER BY recipient_seq LIMIT %%(n)s" % INBOUND_COLUMNS, {"u": user, "n": limit})
        return [entry_from_row(user, r) for r in rows]

    def last_seq(self, user: str) -> int:
        return self._scalar("SELECT last_seq FROM users WHERE id = %s", (user,))

    def last_seqs(self, users: list) -> dict:
        users = list(users)
        if len(users) > LAST_SEQS_MAX:
            raise ValueError(f"last_seqs: more than {LAST_SEQS_MAX} users")
        out = dict.fromkeys(users, 0)
        if users:
            out.update(self._rows("SELECT id, last_seq FROM users WHERE id = ANY(%s)", (users,)))
        return out

    def attach_states(self, requests: list) -> list:
        """Three statements for the whole batch (tops, contacts, offline entries
        per request through a LATERAL join), on one pooled connection."""
        users = list(dict.fromkeys(user for user, _, _ in requests))
        contact_users = list(dict.fromkeys(user for user, want, _ in requests if want))
        offline = [(k, user, limit) for k, (user, _, limit) in enumerate(requests) if limit]
        self.settle_cursors(set(users))

        def q(con):
            tops = dict(con.execute("SELECT id, last_seq FROM users WHERE id = ANY(%s)", (users,)).fetchall())
            contacts = {user: set() for user in contact_users}
            if contact_users:
                for user, contact in con.execute("SELECT user_id, contact FROM contacts WHERE user_id = ANY(%s)",
                                                 (contact_users,)):
                    contacts[user].add(contact)
            entries = {k: [] for k, _, _ in offline}
            if offline:
                rows = con.execute(
                    "SELECT r.k, e.* FROM unnest(%%s::int[], %%s::text[], %%s::int[]) AS r(k, id, lim) "
                    "CROSS JOIN LATERAL (SELECT %s FROM messages WHERE recipient = r.id AND "
                    "recipient_seq > (SELECT COALESCE(MAX(seq), 0) FROM cursors WHERE user_id = r.id) "
                    "ORDER BY recipient_seq LIMIT r.lim) e ORDER BY r.k, e.seq"
                    % INBOUND_COLUMNS, ([k for k, _, _ in offline], [u for _, u, _ in offline],
                                      [n for _, _, n in offline])).fetchall()
                for row in rows:
                    entries[row[0]].append(entry_from_row(requests[row[0]][0], row[1:]))
            return [AttachState(tops.get(user) or 0, contacts[user] if want else None,
                                entries[k] if limit else None)
                    for k, (user, want, limit) in enumerate(requests)]
        return self._query(q)

    def cursor(self, user: str, device: str) -> int:
        self.settle_cursors({user})
        return self._scalar("SELECT seq FROM cursors WHERE user_id = %s AND device = %s",
                            (user, device))

    def received_seq(self, user: str) -> int:
        self.settle_cursors({user})
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

    def stored_ack(self, sender: str, client_id: str):
        """base.Store; the index messages_client answers it."""
        rows = self._rows("SELECT mid, sender_seq, ts FROM messages WHERE sender = %s AND client_id = %s",
                          (sender, client_id))
        return tuple(rows[0]) if rows else None

    def last_sent_to(self, sender: str, recipient: str, upto_recipient_seq: int):
        # the recipient's inbound entries in the window (messages_inbound, newest first), the
        # first from the sender (the index messages_pair served it before migration 0006). OFFSET 0
        # keeps the window a subquery of its own: flattened, the planner may take messages_outbound
        # for the sender and read every message the sender ever sent.
        rows = self._rows("SELECT sender_seq, mid, client_id FROM (SELECT sender, sender_seq, mid, client_id "
                          "FROM messages WHERE recipient = %s AND recipient_seq <= %s AND recipient_seq > %s "
                          "ORDER BY recipient_seq DESC OFFSET 0) AS w WHERE sender = %s LIMIT 1",
                          (recipient, upto_recipient_seq, upto_recipient_seq - self.read_scan_max, sender))
        return tuple(rows[0]) if rows else None

    # -- retention ---------------------------------------------------------------
    def purge(self, older_than_ms: int) -> int:
        """Delete messages with ts < ``older_than_ms`` (and so their inbox entries), in
        chunks (each its own transaction). Seqs are never reused. Returns the
        number of messages deleted. Blocks the calling greenlet."""
        total = 0
        while True:
            count = self._query(lambda con: con.execute(
                "WITH gone AS (DELETE FROM messages WHERE ctid IN (SELECT ctid FROM messages "
                "WHERE ts < %s LIMIT %s) RETURNING 1) SELECT count(*) FROM gone",
                (older_than_ms, PURGE_CHUNK)).fetchone()[0])
            total += count
            self.purged += count
            if count < PURGE_CHUNK:
                return total


# The rows and the users rows of a batch travel as one text parameter per column: the
# values joined by a separator that none of them holds, None as a null marker, split again
# in the statement by string_to_array. Joining is one C call per column (psycopg's list
# dumper ran Python code per value) and the batch needs no COPY round trip before its
# statement. Control characters make the separators: orjson escapes all of them, so
# bodies never hold one, and a batch whose ids or client ids hold every candidate goes
# as psycopg arrays instead (``_texts`` returns None).
_MARKERS = tuple((chr(c), chr(c - 1)) for c in range(0x1f, 0x01, -2))   # (separator, null)
ROW_TYPES = ("text", "text", "text", "text", "text", "text", "bigint", "text", "bigint",
             "bigint", "text", "integer")
USER_COLUMNS = ("id", "need", "role", "platform", "last_seen")
USER_TYPES = ("text", "bigint", "text", "text", "bigint")


def _unnest(columns: tuple, types: tuple, texts: bool) -> str:
    if texts:
        args = ("string_to_array(%%(%s)s, %%(sep)s, %%(null)s)%s" % (c, "" if t == "text" else "::%s[]" % t)
                for c, t in zip(columns, types))
    else:
        args = ("%%(%s)s::%s[]" % (c, t) for c, t in zip(columns, types))
    return "unnest(%s) AS x(%s)" % (", ".join(args), ", ".join(columns))


def _joined(values, sep: str, null: str, text: bool) -> Optional[str]:
    """``values`` joined by ``sep``, None as ``null``; None if a text value holds either
    marker (string_to_array would not give the values back)."""
    if not values:
        return ""
    nones = values.count(None)
    if nones:
        values = [null if v is None else v for v in values]
    if not text:
        return sep.join(map(str, values))
    joined = sep.join(values)
    if (joined.count(sep) != len(values) - 1 or joined.count(null) != nones
            or not joined):          # one empty string: string_to_array('') is {}
        return None
    return joined


def _texts(columns: dict, types: dict) -> Optional[dict]:
    """The text parameters of ``columns`` (name → values), or None if no marker pair fits."""
    for sep, null in _MARKERS:
        params = {"sep": sep, "null": null}
        for name, values in columns.items():
            text = _joined(values, sep, null, types[name] == "text")
            if text is None:
                break
            params[name] = text
        else:
            return params
    return None


# The batch's one write statement. ``r``: the batch's rows; ``dup``: those whose
# (sender, client_id) is already stored (the dedupe lookup: one probe of messages_client
# per key — a plain join let the planner hash the whole messages table while its
# statistics were small); if there is any, the statement inserts nothing and reserves no
# seq (the caller plans again knowing them). The users upsert creates missing users, locks
# every row in id order (so writers of this and of other nodes sharing the database never
# deadlock on each other), applies the touches and reserves the seqs (base, base + need];
# messages rows (each one inbox entry for its recipient and one for its sender) are
# inserted with absolute seqs. Returns (id, base, NULL × 5) per user and (sender, NULL,
# client_id, mid, ts, sender_seq, recipient_seq) per stored duplicate.
WRITE = """
WITH r AS (
    SELECT * FROM {rows}
), dup AS (
    SELECT m.* FROM r
    CROSS JOIN LATERAL (SELECT sender, client_id, mid, ts, sender_seq, recipient_seq FROM messages
                        WHERE sender = r.sender AND client_id = r.client_id LIMIT 1) m
    WHERE r.client_id IS NOT NULL
), v AS (
    SELECT id, CASE WHEN EXISTS (SELECT FROM dup) THEN 0 ELSE need END AS need,
           role, platform, last_seen
    FROM {users}
), up AS (
    INSERT INTO users AS u (id, last_seq, role, platform, last_seen)
    SELECT id, need, role, platform, last_seen FROM v ORDER BY id
    ON CONFLICT (id) DO UPDATE SET last_seq = u.last_seq + EXCLUDED.last_seq,
        role = COALESCE(EXCLUDED.role, u.role), platform = COALESCE(EXCLUDED.platform, u.platform),
        last_seen = GREATEST(u.last_seen, EXCLUDED.last_seen)
    RETURNING id, last_seq
), base AS (
    SELECT up.id, up.last_seq - v.need AS base FROM up JOIN v ON v.id = up.id
), m AS (
    INSERT INTO messages (mid, kind, sender, recipient, body, ctx, ts, client_id, sender_seq,
                          recipient_seq, notice_kind, flags)
    SELECT r.mid, r.kind, r.sender, r.recipient, r.body, r.ctx, r.ts, r.client_id,
           sb.base + r.sender_k, rb.base + r.recipient_k, r.notice_kind, r.flags
    FROM r JOIN base rb ON rb.id = r.recipient LEFT JOIN base sb ON sb.id = r.sender
    WHERE NOT EXISTS (SELECT FROM dup)
)
SELECT id, base, NULL, NULL, NULL::bigint, NULL::bigint, NULL::bigint FROM base
UNION ALL
SELECT sender, NULL, client_id, mid, ts, sender_seq, recipient_seq FROM dup
"""
WRITE_FROM_TEXTS = WRITE.format(rows=_unnest(ROW_COLUMNS, ROW_TYPES, True),
                                users=_unnest(USER_COLUMNS, USER_TYPES, True))
WRITE_FROM_ARRAYS = WRITE.format(rows=_unnest(ROW_COLUMNS, ROW_TYPES, False),
                                 users=_unnest(USER_COLUMNS, USER_TYPES, False))
_TYPES = dict(zip(ROW_COLUMNS + USER_COLUMNS, ROW_TYPES + USER_TYPES))


def _write_statement(rows: list, ids: list, taken: dict, touches: dict) -> tuple:
    """(sql, params) of the WRITE statement for ``rows`` and the users ``ids``."""
    columns = dict(zip(ROW_COLUMNS, zip(*rows))) if rows else dict.fromkeys(ROW_COLUMNS, ())
    no = (None, None, None)
    columns.update(id=ids, need=[taken.get(u, 0) for u in ids],
                   role=[touches.get(u, no)[0] for u in ids],
                   platform=[touches.get(u, no)[1] for u in ids],
                   last_seen=[touches.get(u, no)[2] for u in ids])
    params = _texts(columns, _TYPES)
    if params is not None:
        return WRITE_FROM_TEXTS, params
    return WRITE_FROM_ARRAYS, {name: list(values) for name, values in columns.items()}


def _write(con, plan: BatchPlan, pending: Optional[Pending]):
    """Run ``plan`` (+ ``pending``) as one transaction on the autocommit connection ``con``.

    One round trip: without cursors, contacts or passwords to write the WRITE statement
    is the transaction (autocommit: its result arrives after the COMMIT); with them,
    BEGIN, cursors, contacts, the WRITE statement, passwords and COMMIT go in one
    pipeline. Returns (base, stored): user → last seq before the batch, and the
    duplicates found by WRITE ((sender, client_id) → (mid, ts, sender_seq,
    recipient_seq)); when ``stored`` is not empty nothing of the plan was inserted (but
    ``pending`` was committed)."""
    rows, taken = plan.rows, plan.taken
    touches = pending.touches if pending else {}
    passwords = pending.passwords if pending else {}
    ids = sorted(set(taken).union(touches, passwords))
    write = con.cursor()
    if ids:
        sql, params = _write_statement(rows, ids, taken, touches)
    if not (pending and (pending.cursors or pending.contacts or passwords)):
        if ids:
            write.execute(sql, params)
    else:
        try:
            with con.pipeline():
                con.execute("BEGIN")
                _apply_cursors_contacts(con, pending)
                if ids:
                    write.execute(sql, params)
                if passwords:
                    pw = list(passwords)
                    con.execute("UPDATE users SET credentials = v.credentials "
                                "FROM unnest(%s::text[], %s::text[]) AS v(id, credentials) "
                                "WHERE users.id = v.id", (pw, [passwords[u] for u in pw]))
                con.execute("COMMIT")
        except Exception as exc:
            # a kill (GreenletExit at close) while the pipeline syncs comes out of psycopg as
            # "cannot exit pipeline mode while busy": let the kill itself through
            if not isinstance(exc.__context__, Exception) and exc.__context__ is not None:
                raise exc.__context__
            raise
    base, stored = {}, {}
    if ids:
        for user, user_base, client_id, *dup in write.fetchall():
            if user_base is None:
                stored[(user, client_id)] = tuple(dup)
            else:
                base[user] = user_base
    return base, stored


def _known_users(con, role: Optional[str]) -> list:
    if role is None:
        rows = con.execute("SELECT id FROM users WHERE last_seen IS NOT NULL ORDER BY id")
    else:
        rows = con.execute("SELECT id FROM users WHERE role = %s AND last_seen IS NOT NULL "
                           "ORDER BY id", (role,))
    return [r[0] for r in rows]


def _apply_cursors_contacts(con, p: Pending) -> None:
    """Write the coalesced cursors and contact changes (touches and passwords go
    with the users upsert)."""
    if p.cursors:
        keys = sorted(p.cursors)
        con.execute("INSERT INTO cursors (user_id, device, seq) "
                    "SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[]) "
                    "ON CONFLICT (user_id, device) DO UPDATE SET seq = GREATEST(cursors.seq, EXCLUDED.seq)",
                    ([k[0] for k in keys], [k[1] for k in keys], [p.cursors[k] for k in keys]))
    for add, user, contact in p.contacts:
        if add:
            con.execute("INSERT INTO contacts (user_id, contact) VALUES (%s, %s), (%s, %s) "
                        "ON CONFLICT DO NOTHING", (user, contact, contact, user))
        else:
            con.execute("DELETE FROM contacts WHERE (user_id, contact) IN ((%s, %s), (%s, %s))",
                        (user, contact, contact, user))
