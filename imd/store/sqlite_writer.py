"""The write side of the SQLite store: one file's writer connection, its transactions
and its checkpoints (:class:`SqliteWriter`), and the SQL helpers both sides share.

A :class:`SqliteWriter` runs in whichever process holds it: the writer process
(:mod:`imd.store.sqlite_proc`, the default) or imd's own (``store.sqlite_writer =
"thread"``). Either way it lives in a gevent hub: :meth:`SqliteWriter.apply` runs a
batch's transaction in a real OS thread of the hub's threadpool and blocks only the
calling greenlet.

Work in the threadpool never raises there: a failure (disk full, I/O error,
locked) comes back as a value and is raised again in the calling greenlet
(:func:`outcome`), so the store's writer logs it as one line and retries, instead of
gevent's hub printing a traceback per attempt.

Checkpoints (copying the WAL back into the database file and syncing it) are
kept off the commit path, in two steps. (1) ``CHECKPOINT_DELAY`` s after the
first commit since the last checkpoint, a checkpointer greenlet runs a PASSIVE
checkpoint on its own connection in the threadpool: it copies the bulk of the
WAL while the writer keeps committing, then writes the database file back a
few MiB at a time (``sync_file_range`` where there is one, so the device never
queues more than a piece of it ahead of a commit's WAL sync) and syncs it
(``os.fdatasync`` on the writer connection's own descriptor of it, found in
/proc/self/fd when the connection opens — not a descriptor of the store's own:
closing that would drop every POSIX lock the process holds on the file,
SQLite's included; without /proc there is no such sync): SQLite syncs
the database only when a checkpoint reaches the WAL's end, so without it the
sync of everything step 1 copied fell to step 2, on the commit path (16–48 ms
at 2,000–13,000 msgs/s here). Again, up to ``CHECKPOINT_ROUNDS`` rounds in a
row, while a round copied more than ``TAIL_FRAMES`` new frames (those written
during the round before). (2) Step 1 cannot finish while commits keep
appending, and SQLite restarts the WAL at its beginning only after a complete
checkpoint, so right after the next commit (its acks already on their way) the
writer connection checkpoints the tail written meanwhile, with SQLite's own
syncs of the WAL and the database, before it starts the next transaction; then
the WAL restarts. The WAL thus holds about ``CHECKPOINT_DELAY`` s of writes.
The extra sync writes nothing SQLite would not have written and removes none of
its syncs; SQLite's own descriptor still sees any write-back error (Linux
reports it to every open file description). SQLite's own checkpoint on commit
(``wal_autocheckpoint``) is only the cap, at ``WAL_CAP_PAGES``, and
``journal_size_limit`` cuts a WAL file grown past it back when it restarts.

The writer thread needs the GIL between SQLite calls (a dozen per batch, and
every parameter of a multi-row INSERT is bound holding it) while the hub thread
is busy: CPython lets a waiting thread in only every ``sys.getswitchinterval()``
(5 ms by default), which made every batch's commit take tens of ms under load
(commits grew, batches grew: a convoy). :meth:`SqliteWriter.open` lowers the
process's switch interval to ``GIL_SWITCH_INTERVAL``. In the writer process the
hub has little else to do, and imd's network loop does not share its GIL.

The writer connection keeps ``WRITER_CACHE_KIB`` of pages (a batch touches
several pages per message; with SQLite's default 2,000 KiB batches of 300–1,000
messages cost 10–28 % more CPU) and its temp store in memory: a multi-row
INSERT inside a transaction keeps a statement journal (the pages it changes,
to undo the statement alone on a constraint error), and with file temp storage
it spilled to a new file in /var/tmp per batch, one pwrite per changed page —
about as many as the WAL's own. Neither changes what a commit makes durable.

``synchronous`` is ``"full"`` (durable against power loss) or ``"normal"``
(in WAL mode durable against a process crash/``kill -9``, not power loss).
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import sqlite3
import sys
import time
from contextlib import contextmanager
from itertools import chain
from typing import Optional

import gevent
import orjson
from gevent.event import Event

from .batch import BatchPlan, client_keys
from .migrations import migrations
from .writer import Pending

log = logging.getLogger("imd.store.sqlite")

BUSY_TIMEOUT_MS = 2000
CHUNK = 400                      # rows per IN (...) / VALUES list (bound parameters)
# Checkpoints (module docstring). The checkpointer runs CHECKPOINT_DELAY s after the first commit
# since its last run: a page rewritten by many commits meanwhile is copied once. The writer's own
# (SQLite's wal_autocheckpoint, PASSIVE, on the commit path) only past WAL_CAP_PAGES (4 KiB each).
# Durability is the WAL's (synchronous as configured): unchanged.
CHECKPOINT_DELAY = 0.5
CHECKPOINT_ROUNDS = 6            # step-1 rounds (checkpoint + sync) in a row at most, while a round
TAIL_FRAMES = 512                # copied more than this many new frames (4 KiB each)
WAL_CAP_PAGES = 32768
WAL_KEEP_BYTES = WAL_CAP_PAGES * 4096   # journal_size_limit: a larger WAL file is cut to this
GIL_SWITCH_INTERVAL = 0.0005     # seconds (module docstring)
WRITER_CACHE_KIB = 16384         # the writer connection's page cache (SQLite's default: 2,000 KiB)
WRITEBACK_CHUNK = 4 << 20        # bytes of the database file written back at a time in step 1
SYNC_RANGE_FLAGS = 1 | 2 | 4     # SYNC_FILE_RANGE_WAIT_BEFORE | _WRITE | _WAIT_AFTER
VALUES_MAX = 256                 # rows per multi-row INSERT (a power of two; 12 columns: 3,072 parameters)
# Primary SQLite result codes worth retrying: BUSY, LOCKED, NOMEM, READONLY, IOERR, FULL,
# CANTOPEN, PROTOCOL.
TRANSIENT_CODES = {5, 6, 7, 8, 10, 13, 14, 15}


class WriterGone(Exception):
    """The writer process is gone (it died, or it could not start): a batch sent to it
    may or may not have committed. Transient: the store's writer retries the batch,
    which starts a new writer process; messages with a client id are deduplicated."""


def is_transient(exc: BaseException) -> bool:
    """True for errors that retrying can cure (locked, busy, disk full, I/O, read-only,
    the writer process gone)."""
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is None or (code & 0xFF) in TRANSIENT_CODES
    return isinstance(exc, WriterGone)


def lower_switch_interval() -> None:
    """Lower this process's GIL switch interval to GIL_SWITCH_INTERVAL (module docstring):
    a pool thread running SQLite for the hub gets the GIL back within it."""
    if sys.getswitchinterval() > GIL_SWITCH_INTERVAL:
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)


def connect(file: str) -> sqlite3.Connection:
    """A connection to ``file`` usable from any thread, in autocommit mode (transactions
    are explicit), waiting up to BUSY_TIMEOUT_MS for another connection's lock."""
    con = sqlite3.connect(file, isolation_level=None, check_same_thread=False)
    con.execute("PRAGMA busy_timeout = %d" % BUSY_TIMEOUT_MS)
    return con


class SqliteWriter:
    """The writer connection of ``file`` and its checkpointer (module docstring).

    ``open()`` blocks the calling greenlet while the file is set up (WAL mode,
    migrations); ``apply(ops, pending)`` runs one batch as one transaction and
    returns ``(plans, base)`` for :func:`imd.store.batch.batch_results`; ``close()``
    waits for a transaction or checkpoint under way, then closes the connections.
    One ``apply`` at a time (the store's writer has one lane). Hub thread only."""

    def __init__(self, file: str, synchronous: str = "full") -> None:
        self.file = file
        self.synchronous = synchronous
        self._pool = None
        self._wcon: Optional[sqlite3.Connection] = None
        self._ccon: Optional[sqlite3.Connection] = None   # the checkpointer's connection
        self._dbfd: Optional[int] = None  # the writer connection's descriptor of the file (step 1)
        self._checkpointer = None
        self._wal_dirty = Event()                           # a commit since the last checkpoint
        self._checkpoint_job = None
        self._tail_due = False            # step 2 after the next commit
        self._tail_job = None             # step 2 running (the next batch waits for it)
        self._job = None                  # the write transaction running in the threadpool
        self.checkpoints = 0
        self.wal_frames = 0               # WAL frames seen by the last checkpoint

    def open(self) -> None:
        lower_switch_interval()
        self._pool = gevent.get_hub().threadpool
        self._wcon, self._dbfd = reraise(self._pool.apply(outcome, (self._connect_writer,)))
        self._ccon = self._pool.apply(connect, (self.file,))
        self._checkpointer = gevent.spawn(self._checkpoint_loop)

    def close(self) -> None:
        if self._checkpointer is None:
            return
        self._checkpointer.kill()
        self._checkpointer = None
        for job in (self._job, self._checkpoint_job, self._tail_job):
            if job is not None:
                job.wait()            # a transaction or checkpoint in a pool thread ends first
        self._job = self._checkpoint_job = self._tail_job = None
        self._tail_due = False
        for con in (self._ccon, self._wcon):
            self._pool.apply(con.close)
        self._dbfd = None

    def _connect_writer(self) -> tuple:
        """The writer connection, and its descriptor of the database file (None if not
        found: no /proc, or SQLite reused a descriptor it already had). The file is set
        up (WAL mode, migrations) under :func:`_setup_lock`."""
        opened = _db_descriptors(self.file)
        con = connect(self.file)
        new = _db_descriptors(self.file) - opened
        with _setup_lock(self.file):
            con.execute("PRAGMA journal_mode = WAL")
            _migrate(con)
        con.execute("PRAGMA synchronous = %s" % self.synchronous.upper())
        con.execute("PRAGMA wal_autocheckpoint = %d" % WAL_CAP_PAGES)
        con.execute("PRAGMA cache_size = -%d" % WRITER_CACHE_KIB)
        con.execute("PRAGMA temp_store = MEMORY")      # statement journals in memory: no temp file
        con.execute("PRAGMA journal_size_limit = %d" % WAL_KEEP_BYTES)
        return con, (new.pop() if len(new) == 1 else None)

    # -- writes (in a threadpool thread, one batch = one transaction) --------
    def apply(self, ops: list, pending: Optional[Pending]) -> tuple:
        if self._tail_job is not None:
            self._checkpointed(self._tail_job.get())
            self._tail_job = None
        self._job = self._pool.spawn(outcome, self._apply_sync, ops, pending)
        result = reraise(self._job.get())
        self._wal_dirty.set()
        if self._tail_due:
            self._tail_due = False
            self._tail_job = self._pool.spawn(outcome, _checkpoint, self._wcon)
        return result

    def _apply_sync(self, ops: list, pending: Optional[Pending]) -> tuple:
        con = self._wcon
        con.execute("BEGIN IMMEDIATE")
        try:
            if pending:
                _apply_pending(con, pending)
            plan = BatchPlan(ops, _stored(con, client_keys(ops)), lambda role: _known_users(con, role))
            base = _reserve(con, plan.taken)
            _insert_rows(con, plan.rows, base)
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        return plan.plans, base

    # -- checkpoints (module docstring) ----------------------------------------
    def _checkpoint_loop(self) -> None:
        """Greenlet: step 1 (module docstring) CHECKPOINT_DELAY s after the first
        commit since the last one, in rounds until one copies at most TAIL_FRAMES
        new frames, then step 2 is due after the next commit. A failure (disk full,
        I/O) is logged; the next commit starts another round."""
        while True:
            self._wal_dirty.wait()
            gevent.sleep(CHECKPOINT_DELAY)
            self._wal_dirty.clear()
            copied = 0
            for _ in range(CHECKPOINT_ROUNDS):      # until the tail left for step 2 is short
                self._checkpoint_job = self._pool.spawn(outcome, _copy_and_sync, self._ccon, self._dbfd)
                left = self._checkpointed(self._checkpoint_job.get())
                if left is None:
                    break
                before, copied = copied, self.wal_frames - left
                if copied - before <= TAIL_FRAMES:
                    break
            if left is not None:
                self._tail_due = True

    def _checkpointed(self, outcome) -> Optional[int]:
        """Record a checkpoint's outcome (from _checkpoint via outcome): the WAL frames
        it left uncopied, None if it failed."""
        if isinstance(outcome, Failed):
            log.warning("sqlite: checkpoint failed (%r)", outcome.exc)
            return None
        self.checkpoints += 1
        self.wal_frames, copied = outcome
        return self.wal_frames - copied


class Failed:
    __slots__ = ("exc",)

    def __init__(self, exc: Exception) -> None:
        self.exc = exc


def outcome(fn, *args):
    """In a pool thread: ``fn(*args)``, or its exception wrapped in Failed."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001  (handed to the caller, see reraise)
        return Failed(exc)


def reraise(value):
    """In the calling greenlet: the value of outcome, its exception raised here."""
    if isinstance(value, Failed):
        raise value.exc
    return value


def _db_descriptors(path: str) -> set:
    """This process's descriptors of the file at ``path`` (empty without /proc)."""
    want = os.path.realpath(path)
    found = set()
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            if os.readlink("/proc/self/fd/" + fd) == want:
                found.add(int(fd))
        except OSError:                  # closed meanwhile
            pass
    return found


@contextmanager
def _setup_lock(file: str):
    """In a pool thread: hold an exclusive ``flock`` on ``<file>.lock`` (made if missing) for
    the block, waiting for another process that holds it. Setting a new file's journal mode
    needs SQLite's exclusive lock, which a second process opening the file at the same moment
    (``node.workers`` over one file) got refused at once ("database is locked", no busy
    wait), and both processes found a migration missing and ran it. A file of its own: a
    descriptor of the database file, closed, would drop SQLite's POSIX locks on it."""
    fd = os.open(file + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)                  # releases the flock


def _migrate(con) -> None:
    """Apply the migrations the database lacks (each in its own transaction), and record them."""
    con.execute("CREATE TABLE IF NOT EXISTS schema_version "
                "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)")
    done = {row[0] for row in con.execute("SELECT version FROM schema_version")}
    for version, name, sql in migrations("sqlite"):
        if version in done:
            continue
        log.info("sqlite: applying migration %s", name)
        con.executescript("BEGIN IMMEDIATE;\n%s\nINSERT INTO schema_version VALUES "
                          "(%d, '%s', %d);\nCOMMIT;" % (sql, version, name, int(time.time())))


def _copy_and_sync(con, fd: Optional[int]) -> tuple:
    """In a pool thread: step 1, a PASSIVE checkpoint on ``con``, then the database file
    written back (:func:`_write_back`) and synced through ``fd`` (if known); returns what
    :func:`_checkpoint` returns."""
    frames = _checkpoint(con)
    if fd is not None:
        _write_back(fd)
        os.fdatasync(fd)
    return frames


def _sync_file_range():
    """libc's sync_file_range (Linux), or None."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range()


def _write_back(fd: int) -> None:
    """In a pool thread: write the file's dirty pages back WRITEBACK_CHUNK bytes of the file
    at a time, waiting for each piece, so the device's queue never holds more than one piece
    of it when a commit syncs the WAL (one fdatasync queued 10–80 MB there at 10,000 msgs/s:
    commits behind it took 20–65 ms). The fdatasync after it finds little left to write.
    Without sync_file_range (not Linux) or on its failure, nothing: fdatasync does it all."""
    if _SYNC_FILE_RANGE is None:
        return
    size = os.fstat(fd).st_size
    for offset in range(0, size, WRITEBACK_CHUNK):
        if _SYNC_FILE_RANGE(fd, offset, WRITEBACK_CHUNK, SYNC_RANGE_FLAGS) != 0:
            return


def _checkpoint(con) -> tuple:
    """In a pool thread: a PASSIVE checkpoint on ``con``; returns the WAL's frames and
    how many of them are copied into the database now."""
    return tuple(con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1:])



def shaped(chunk: list, most: int = CHUNK) -> list:
    """``chunk`` padded (repeating its last item) to the next power of two, at most
    ``most``: an IN (...) / VALUES list then has a few lengths, not hundreds, and
    each length is one prepared statement in a connection's statement cache (128
    of them, up to tens of KiB each; bigger batches under load kept adding new
    ones). Repeated items change no result here."""
    size = min(most, 1 << (len(chunk) - 1).bit_length())
    return chunk + chunk[-1:] * (size - len(chunk))



def _apply_pending(con, p: Pending) -> None:
    """Write the coalesced fire-and-forget changes (inside the batch transaction)."""
    if p.touches:                 # a login storm touches thousands: multi-row statements
        _values(con, "INSERT INTO users (id, role, platform, last_seen)", 4,
                [(u, r, pl, ts) for u, (r, pl, ts) in p.touches.items()],
                " ON CONFLICT (id) DO UPDATE SET role = COALESCE(excluded.role, role), "
                "platform = COALESCE(excluded.platform, platform), "
                "last_seen = MAX(COALESCE(last_seen, 0), excluded.last_seen)")
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


def _stored(con, keys: list) -> dict:
    """(sender, client_id) → (mid, ts, sender_seq, recipient_seq) of those already stored."""
    found = {}
    for i in range(0, len(keys), CHUNK):
        chunk = shaped(keys[i:i + CHUNK])
        sql = ("SELECT m.sender, m.client_id, m.mid, m.ts, m.sender_seq, m.recipient_seq "
               "FROM (VALUES %s) AS k JOIN messages m ON m.sender = k.column1 AND m.client_id = k.column2"
               % ",".join(["(?, ?)"] * len(chunk)))
        for row in con.execute(sql, [x for key in chunk for x in key]):
            found[(row[0], row[1])] = row[2:]
    return found


def _known_users(con, role: Optional[str]) -> list:
    if role is None:
        cur = con.execute("SELECT id FROM users WHERE last_seen IS NOT NULL ORDER BY id")
    else:
        cur = con.execute("SELECT id FROM users WHERE role = ? AND last_seen IS NOT NULL ORDER BY id",
                          (role,))
    return [r[0] for r in cur]


def _reserve(con, taken: dict) -> dict:
    """Reserve ``taken[user]`` seqs per user; returns user → last seq before the batch
    (0 for a user without a row, who gets one). One aggregate read and one upsert per
    piece, whatever the number of users (see :func:`_values`)."""
    ids = list(taken)
    base = dict.fromkeys(ids, 0)
    for i in range(0, len(ids), CHUNK):
        chunk = shaped(ids[i:i + CHUNK])
        text = con.execute("SELECT json_group_array(json_array(id, last_seq)) FROM users WHERE id IN (%s)"
                           % ",".join("?" * len(chunk)), chunk).fetchone()[0]
        base.update(orjson.loads(text))
    _values(con, "INSERT INTO users (id, last_seq)", 2,
            [(u, base[u] + n) for u, n in taken.items()],
            " ON CONFLICT (id) DO UPDATE SET last_seq = excluded.last_seq")
    return base


def _insert_rows(con, rows: list, base: dict) -> None:
    """Insert a BatchPlan's rows (messages and both inbox entries) with absolute seqs."""
    messages, inbox = [], []
    for mid, kind, sender, recipient, body, ctx, ts, client_id, sender_k, recipient_k, nk, flags in rows:
        recipient_seq = base[recipient] + recipient_k
        sender_seq = None if sender is None else base[sender] + sender_k
        messages.append((mid, kind, sender, recipient, body, ctx, ts, client_id, sender_seq,
                         recipient_seq, nk, flags))
        inbox.append((recipient, recipient_seq, mid, 1))
        if sender is not None:
            inbox.append((sender, sender_seq, mid, 0))
    _values(con, "INSERT INTO messages (mid, kind, sender, recipient, body, ctx, ts, client_id, "
                 "sender_seq, recipient_seq, notice_kind, flags)", 12, messages)
    _values(con, "INSERT INTO inbox (user, seq, mid, inbound)", 4, inbox)


_VALUES_SQL: dict = {}


def _values(con, head: str, width: int, rows: list, tail: str = "") -> None:
    """``head VALUES (…), (…), … tail`` for ``rows`` (tuples of ``width`` values), in pieces
    of a power of two rows (at most VALUES_MAX): one statement run per piece where
    executemany runs one per row. Each run (sqlite3_step) releases and retakes the GIL,
    which the hub thread is busy with, so a batch costs a few handoffs instead of several
    per message; and the statement texts stay few (cached per connection)."""
    i, n = 0, len(rows)
    while i < n:
        size = min(VALUES_MAX, 1 << ((n - i).bit_length() - 1))
        key = (head, size, tail)
        sql = _VALUES_SQL.get(key)
        if sql is None:
            one = "(" + ",".join("?" * width) + ")"
            sql = _VALUES_SQL[key] = "%s VALUES %s%s" % (head, ",".join([one] * size), tail)
        con.execute(sql, list(chain.from_iterable(rows[i:i + size])))
        i += size
