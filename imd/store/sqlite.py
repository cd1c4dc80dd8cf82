"""Store backend "sqlite": the embedded store, one file ``imd.sqlite3`` in the data dir.

WAL mode. Writes go through :class:`~imd.store.writer.Writer` (one lane): each
batch is one ``BEGIN IMMEDIATE`` … ``COMMIT`` on the single writer connection,
run in a real OS thread of gevent's hub threadpool so the hub never waits on
SQLite. Reads also run in the threadpool and block only the calling greenlet;
each takes a read-only connection from a small pool for its duration, so there
are never more read connections than reads at once (at most the threadpool's
size). Not one per thread: gevent retires a pool thread after 5 s idle and
starts new ones, so per-thread connections piled up (memory and descriptors).

Work in the threadpool never raises there: a failure (disk full, I/O error,
locked) comes back as a value and is raised again in the calling greenlet
(:func:`_outcome`), so the writer logs it as one line and retries, instead of
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

The writer thread needs the GIL between SQLite calls (a dozen per batch) while
the hub thread is busy with the network; CPython lets a waiting thread in only
every ``sys.getswitchinterval()`` (5 ms by default), which made every batch's
commit take tens of ms under load (commits grew, batches grew: a convoy).
:meth:`SqliteStore.open` lowers the process's switch interval to
``GIL_SWITCH_INTERVAL``.

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
from typing import Iterable, Optional

import gevent
import orjson
from gevent.event import Event
from gevent.monkey import get_original

from .base import LAST_SEQS_MAX, AttachState, Store, StoreUnavailable, UserInfo
from .batch import BatchPlan, client_keys
from .migrations import migrations
from .retention import purge_loop
from .rows import ENTRY_COLUMNS, entry_from_row, load_json
from .writer import Pending, Writer, WriterStore

log = logging.getLogger("imd.store.sqlite")

FILENAME = "imd.sqlite3"
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
# last_sent_to: the recipient's inbox entries in the window, newest first, joined to their
# messages by mid; it stops at the first from the sender (the index messages_pair served it before
# migration 0003). CROSS JOIN keeps the inbox the outer loop and +m.sender keeps the sender's
# index (sender, client_id) out: either would read every message the sender ever sent.
_LAST_SENT_TO = ("SELECT m.sender_seq, m.mid, m.client_id FROM inbox AS i "
                 "CROSS JOIN messages AS m ON m.mid = i.mid WHERE i.user = ? AND i.seq <= ? AND i.seq > ? "
                 "AND i.inbound = 1 AND +m.sender = ? ORDER BY i.seq DESC LIMIT 1")
VALUES_MAX = 256                 # rows per multi-row INSERT (a power of two; 12 columns: 3,072 parameters)
# Primary SQLite result codes worth retrying: BUSY, LOCKED, NOMEM, READONLY, IOERR, FULL,
# CANTOPEN, PROTOCOL.
TRANSIENT_CODES = {5, 6, 7, 8, 10, 13, 14, 15}

_os_lock = get_original("threading", "Lock")


def is_transient(exc: BaseException) -> bool:
    """True for errors that retrying can cure (locked, busy, disk full, I/O, read-only)."""
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is None or (code & 0xFF) in TRANSIENT_CODES
    return False


class SqliteStore(WriterStore, Store):
    """The embedded store. See the module docstring and imd.store.base for the contract.

    ``path`` is the data directory (the file is ``imd.sqlite3`` in it) or, when it
    ends with ``.sqlite3``, the database file itself. ``retention_days`` (0: keep
    forever) may be changed on a live store."""

    name = "sqlite"

    def __init__(self, path: str, queue_size: int = 100000, batch_max: int = 1000,
                 synchronous: str = "full", retention_days: float = 0,
                 purge_interval: float = 3600.0, batch_wait: float = 0.0) -> None:
        if synchronous not in ("full", "normal"):
            raise ValueError("synchronous must be 'full' or 'normal'")
        path = str(path)
        if path.endswith(".sqlite3"):           # the database file itself
            self.dir, self.file = os.path.dirname(path) or ".", path
        else:                                   # the data directory
            self.dir, self.file = path, os.path.join(path, FILENAME)
        self.synchronous = synchronous
        self._writer = Writer(self._apply_batch, is_transient, queue_size=queue_size,
                              batch_max=batch_max, lanes=1, name="sqlite", batch_wait=batch_wait)
        self._wcon: Optional[sqlite3.Connection] = None
        self._ccon: Optional[sqlite3.Connection] = None   # the checkpointer's connection
        self._dbfd: Optional[int] = None  # the writer connection's descriptor of the file (step 1)
        self._checkpointer = None
        self._wal_dirty = Event()                           # a commit since the last checkpoint
        self._checkpoint_job = None
        self._tail_due = False            # step 2 after the next commit
        self._tail_job = None             # step 2 running (the next batch waits for it)
        self.checkpoints = 0
        self.wal_frames = 0               # WAL frames seen by the last checkpoint
        self._job = None                  # the write transaction running in the threadpool
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
        os.makedirs(self.dir, exist_ok=True)
        if sys.getswitchinterval() > GIL_SWITCH_INTERVAL:
            sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        self._pool = gevent.get_hub().threadpool
        self._wcon, self._dbfd = self._pool.apply(self._connect_writer)
        self._ccon = self._pool.apply(self._connect)
        self._reads_closed = False
        self._open = True
        self._writer.start()
        self._purger = gevent.spawn(purge_loop, self)
        self._checkpointer = gevent.spawn(self._checkpoint_loop)

    def close(self, timeout: float = 10.0) -> None:
        if not self._open:
            return
        if self._purger is not None:
            self._purger.kill()
        self._writer.stop(timeout)
        self._checkpointer.kill()
        self._open = False
        for job in (self._job, self._checkpoint_job, self._tail_job):
            if job is not None:
                job.wait()            # a transaction or checkpoint in a pool thread ends first
        self._job = self._checkpoint_job = self._tail_job = None
        self._tail_due = False
        self._pool.apply(self._close_reads)
        for con in (self._ccon, self._wcon):
            self._pool.apply(con.close)
        self._dbfd = None

    def _close_reads(self) -> None:
        """In a pool thread: close the idle read connections; one in use by a read is
        closed by that read when it ends (closing it under a running statement, from
        another thread, crashed the process: a segfault in SQLite)."""
        with self._read_lock:
            self._reads_closed = True
            idle, self._idle_reads, self._read_cons = self._idle_reads, [], []
        for con in idle:
            con.close()

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.file, isolation_level=None, check_same_thread=False)
        con.execute("PRAGMA busy_timeout = %d" % BUSY_TIMEOUT_MS)
        return con

    def _connect_writer(self) -> tuple:
        """The writer connection, and its descriptor of the database file (None if not
        found: no /proc, or SQLite reused a descriptor it already had). The file is set
        up (WAL mode, migrations) under :func:`_setup_lock`."""
        opened = _db_descriptors(self.file)
        con = self._connect()
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
    def _apply_batch(self, lane: int, ops: list, pending: Optional[Pending]) -> list:
        if self._tail_job is not None:
            self._checkpointed(self._tail_job.get())
            self._tail_job = None
        self._job = self._pool.spawn(_outcome, self._apply_sync, ops, pending)
        plan, base = _result(self._job.get())
        self._wal_dirty.set()
        if self._tail_due:
            self._tail_due = False
            self._tail_job = self._pool.spawn(_outcome, _checkpoint, self._wcon)
        return plan.results(base)         # here: the pool thread holds the GIL as little as it can

    def _apply_sync(self, ops: list, pending: Optional[Pending]) -> list:
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
        return plan, base

    def stats(self) -> dict:
        stats = self._writer.stats()
        stats["purged"] = self.purged
        stats["checkpoints"] = self.checkpoints
        stats["wal_frames"] = self.wal_frames
        return stats

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
                self._checkpoint_job = self._pool.spawn(_outcome, _copy_and_sync, self._ccon, self._dbfd)
                left = self._checkpointed(self._checkpoint_job.get())
                if left is None:
                    break
                before, copied = copied, self.wal_frames - left
                if copied - before <= TAIL_FRAMES:
                    break
            if left is not None:
                self._tail_due = True

    def _checkpointed(self, outcome) -> Optional[int]:
        """Record a checkpoint's outcome (from _checkpoint via _outcome): the WAL frames
        it left uncopied, None if it failed."""
        if isinstance(outcome, _Failed):
            log.warning("sqlite: checkpoint failed (%r)", outcome.exc)
            return None
        self.checkpoints += 1
        self.wal_frames, copied = outcome
        return self.wal_frames - copied

    # -- retention -------------------------------------------------------------
    def purge(self, older_than_ms: int) -> int:
        """Delete messages with ts < ``older_than_ms`` and their inbox entries, in
        chunks (each its own short transaction, on its own connection). Seqs are
        never reused. Returns the number of messages deleted. Blocks the calling
        greenlet."""
        if not self._open:
            raise StoreUnavailable("store is not open")
        gone = _result(self._pool.apply(_outcome, (self._purge_sync, older_than_ms)))
        self.purged += gone
        return gone

    def _purge_sync(self, older_than_ms: int) -> int:
        con = self._connect()
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
        return _result(self._pool.apply(_outcome, (self._read_sync, fn, args)))

    def _read_sync(self, fn, args):
        """In a pool thread: run ``fn(con, *args)`` on an idle read connection (a
        new one if none is idle) and give it back afterwards. The checkout is in
        the thread, so a caller killed while waiting cannot lose or share it."""
        with self._read_lock:
            if self._reads_closed:
                raise StoreUnavailable("store is closed")
            con = self._idle_reads.pop() if self._idle_reads else None
        if con is None:
            con = self._connect()
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
                chunk = _shaped(wanted[i:i + 500], 500)
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
        """From the recipient's inbox (base.Store; :data:`_LAST_SENT_TO`)."""
        def q(con):
            row = con.execute(_LAST_SENT_TO, (recipient, upto_recipient_seq,
                                              upto_recipient_seq - self.read_scan_max, sender)).fetchone()
            return None if row is None else tuple(row)
        return self._read(q)


class _Failed:
    __slots__ = ("exc",)

    def __init__(self, exc: Exception) -> None:
        self.exc = exc


def _outcome(fn, *args):
    """In a pool thread: ``fn(*args)``, or its exception wrapped in _Failed."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001  (handed to the caller, see _result)
        return _Failed(exc)


def _result(value):
    """In the calling greenlet: the value of _outcome, its exception raised here."""
    if isinstance(value, _Failed):
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


def _shaped(chunk: list, most: int = CHUNK) -> list:
    """``chunk`` padded (repeating its last item) to the next power of two, at most
    ``most``: an IN (...) / VALUES list then has a few lengths, not hundreds, and
    each length is one prepared statement in a connection's statement cache (128
    of them, up to tens of KiB each; bigger batches under load kept adding new
    ones). Repeated items change no result here."""
    size = min(most, 1 << (len(chunk) - 1).bit_length())
    return chunk + chunk[-1:] * (size - len(chunk))


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
    """``items`` in pieces of at most CHUNK, each padded by :func:`_shaped`."""
    for i in range(0, len(items), CHUNK):
        yield _shaped(items[i:i + CHUNK])


def _json_rows(con, sql: str, params: list) -> list:
    """The rows of a ``SELECT json_group_array(…) … IN (%s)`` over ``params``: one step."""
    text = con.execute(sql % ",".join("?" * len(params)), params).fetchone()[0]
    return orjson.loads(text)


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
        chunk = _shaped(keys[i:i + CHUNK])
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
        chunk = _shaped(ids[i:i + CHUNK])
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
