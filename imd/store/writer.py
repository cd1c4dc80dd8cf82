"""The backend-neutral write path of the store: a bounded queue and group commit.

:class:`Writer` owns a bounded queue of operations split into *lanes*, one
writer greenlet per lane (SQLite: one lane; PostgreSQL: one lane per writer
connection). An operation goes to the lane of its key (the sender of a
message), so one sender's messages keep their order. Each lane greenlet takes
everything waiting in its lane (up to ``batch_max`` ops) as one batch and hands
it to the backend's ``apply_batch(lane, ops, pending)``, which must run the
whole batch in ONE transaction and return one result per op. After the commit
the greenlet calls each op's ``callback(result, None)`` in submission order.

Gathering (``batch_wait`` seconds, 0 = off): a commit has a fixed cost (a
transaction, a sync, hand-offs between threads), so when writes keep arriving
faster than one per ``batch_wait`` and fewer than ``GATHER_TARGET`` ops are
waiting, the lane sleeps up to ``batch_wait`` (less when the arrival rate fills
``GATHER_TARGET`` sooner) before taking its batch. The arrival rate is a lane's
moving average over ~``RATE_SPAN`` s, so an op arriving after a quiet spell is
never held.

Fire-and-forget writes (cursors, last-seen, contacts, passwords) are coalesced
in a :class:`Pending` and ride along with the next batch of whichever lane gets
there first; only one batch at a time carries them, so they commit in order.
With no op waiting they commit on their own at most once per
``PENDING_INTERVAL`` (a login storm touches every user twice: this way each
user's touches coalesce instead of costing a transaction, with its fsync,
every few milliseconds); ``flush`` and ``flush_pending`` do not wait for the
interval. Reads that depend on cursors (offline entries, received seqs) must
see the cursor writes made before them: the backends call
:meth:`WriterStore.settle_cursors` first, which commits the coalesced writes
at once when one of the users read has a cursor write not committed yet
(a device that logs out and in again must not get what it acknowledged).

Failures: when ``apply_batch`` raises an error the backend calls transient
(database gone, locked, disk full), nothing is acked and the same batch is
retried with backoff (0.05 s doubling to 2 s) until it commits; meanwhile new
ops keep queueing until ``queue_size`` ops are waiting, then ``submit`` raises
:class:`StoreFull`. Any other error (a bug, a constraint that retrying cannot
fix) splits the batch: each op is retried alone and an op that still fails gets
``callback(None, error)``.

Everything here runs in the hub thread: ``submit`` and the ``note_*`` methods
never block; ``flush`` blocks the calling greenlet; callbacks run in a lane
greenlet and must not block.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from typing import Any, Callable, Optional

import gevent
import orjson
from gevent.event import Event

from .base import Callback, StoreFull, StoreUnavailable

log = logging.getLogger("imd.store.writer")

BACKOFF_FIRST = 0.05
BACKOFF_MAX = 2.0
PENDING_INTERVAL = 0.05   # s between two commits of coalesced writes alone (no op waiting)
GATHER_TARGET = 32        # ops per batch past which a lane never waits for more
RATE_SPAN = 0.1           # seconds: a lane's arrival rate is a moving average over about this span
SETTLE_TIMEOUT = 2.0      # s a cursor-dependent read waits for its user's coalesced cursor writes, at most


class MessageOp:
    """A chat message to store in both inboxes (``body``/``ctx`` pre-encoded with orjson)."""

    __slots__ = ("sender", "recipient", "client_id", "body", "body_json", "ctx", "ctx_json",
                 "mid", "ts", "callback", "flags")

    def __init__(self, sender: str, recipient: str, client_id: Optional[str], body: Any,
                 ctx: Optional[dict], mid: str, ts: int, callback: Callback, flags: int = 0) -> None:
        if sender == recipient:
            raise ValueError("a message to oneself is refused before the store")
        self.sender = sender
        self.recipient = recipient
        self.client_id = client_id
        self.body = body
        self.body_json = orjson.dumps(body).decode()    # raises TypeError at submit
        self.ctx = ctx
        self.ctx_json = None if ctx is None else orjson.dumps(ctx).decode()
        self.mid = mid
        self.ts = ts
        self.callback = callback
        self.flags = flags


class NoticeOp:
    """A reminder for ``users`` (a list), or every known user of ``role`` (or all)."""

    __slots__ = ("users", "role", "kind", "body", "body_json", "mids", "ts", "callback")

    def __init__(self, users: Optional[list], role: Optional[str], kind: str, body: Any,
                 mids: Callable[[], str], ts: int, callback: Callback) -> None:
        self.users = None if users is None else list(dict.fromkeys(users))
        self.role = role
        self.kind = kind
        self.body = body
        self.body_json = orjson.dumps(body).decode()
        self.mids = mids
        self.ts = ts
        self.callback = callback

    def take_mids(self, n: int) -> list:
        """``n`` new mids, one per recipient, in order."""
        mids = self.mids
        return [mids() for _ in range(n)]


class Pending:
    """Coalesced fire-and-forget writes, applied before the ops of a batch.

    ``cursors`` {(user, device): max seq}; ``touches`` {user: [role, platform,
    last_seen]} (None role/platform keep the stored one); ``contacts`` a list of
    (add?, user, contact) in submission order; ``passwords`` {user: JSON text or
    None to delete}.
    """

    __slots__ = ("cursors", "touches", "contacts", "passwords")

    def __init__(self) -> None:
        self.cursors: dict = {}
        self.touches: dict = {}
        self.contacts: list = []
        self.passwords: dict = {}

    def __bool__(self) -> bool:
        return bool(self.cursors or self.touches or self.contacts or self.passwords)


class _Lane:
    __slots__ = ("index", "ops", "inflight", "wake", "submitted", "done", "greenlet",
                 "rate", "mark_time", "mark_count")

    def __init__(self, index: int) -> None:
        self.index = index
        self.rate = 0.0                  # ops/s submitted, moving average over ~RATE_SPAN
        self.mark_time = time.monotonic()
        self.mark_count = 0
        self.ops: deque = deque()
        self.inflight: list = []
        self.wake = Event()
        self.submitted = 0
        self.done = 0
        self.greenlet = None


ApplyBatch = Callable[[int, list, Optional[Pending]], list]


class Writer:
    """Bounded queue + ``lanes`` writer greenlets doing group commit through ``apply_batch``.

    ``apply_batch(lane, ops, pending)`` blocks the lane greenlet (not the hub),
    runs one transaction and returns the list of results, one per op.
    ``is_transient(exc)`` tells errors worth retrying from bugs. ``batch_wait``:
    see Gathering in the module docstring.
    """

    def __init__(self, apply_batch: ApplyBatch, is_transient: Callable[[BaseException], bool],
                 queue_size: int = 100000, batch_max: int = 1000, lanes: int = 1,
                 name: str = "store", batch_wait: float = 0.0) -> None:
        self._apply_batch = apply_batch
        self._is_transient = is_transient
        self.queue_size = queue_size
        self.batch_max = batch_max
        self.batch_wait = batch_wait
        self.name = name
        self._lanes = [_Lane(i) for i in range(lanes)]
        self._queued = 0                 # submitted ops not yet acked or failed
        self._pending = Pending()
        self._pending_gen = 0            # bumped by every coalesced write
        self._pending_done = 0           # generation of the last committed Pending
        self._pending_busy = False       # a batch carrying a Pending is in flight
        self._pending_inflight: Optional[Pending] = None   # that Pending
        self._pending_next = 0.0         # monotonic time before which a Pending alone waits
        self._pending_asked = 0          # generation a waiter wants committed without the interval
        self._progress = Event()         # set and replaced after every commit
        self._running = False
        self._closing = False
        self.batches = 0
        self.committed = 0
        self.retries = 0
        self.failed = 0
        self.last_batch = 0
        self.commit_seconds = 0.0
        self.commit_count = 0
        self.gathers = 0
        self.gather_seconds = 0.0

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        self._running = True
        self._closing = False
        for lane in self._lanes:
            lane.greenlet = gevent.spawn(self._run, lane)
            lane.greenlet.name = "%s-writer-%d" % (self.name, lane.index)

    def stop(self, timeout: float = 10.0) -> bool:
        """Flush (up to ``timeout``), then stop the lanes. Ops still unwritten get
        ``callback(None, StoreUnavailable)``. Returns True if everything committed."""
        if not self._running:
            return True
        flushed = self.flush(timeout)
        self._closing = True
        for lane in self._lanes:
            lane.wake.set()
        for lane in self._lanes:
            lane.greenlet.join(1.0 if flushed else 0.1)
            if not lane.greenlet.dead:
                lane.greenlet.kill()
        self._running = False
        gone = StoreUnavailable("store closed before the write committed")
        for lane in self._lanes:
            dropped = lane.inflight + list(lane.ops)
            lane.inflight, lane.ops = [], deque()
            lane.done += len(dropped)
            self._queued -= len(dropped)
            for op in dropped:
                self._deliver_error(op, gone)
        # coalesced writes not committed by now are dropped (they are fire-and-forget)
        self._pending, self._pending_busy, self._pending_done = Pending(), False, self._pending_gen
        self._pending_inflight = None
        return flushed

    # -- submitting ----------------------------------------------------------
    def submit(self, op: Any, key: str) -> None:
        """Queue ``op`` on the lane of ``key``. Raises StoreFull at the limit."""
        if not self._running or self._closing:
            raise StoreUnavailable("store is not open")
        if self._queued >= self.queue_size:
            raise StoreFull("write queue full (%d ops)" % self._queued)
        lane = self._lanes[hash(key) % len(self._lanes)] if len(self._lanes) > 1 else self._lanes[0]
        self._queued += 1
        lane.submitted += 1
        lane.ops.append(op)
        lane.wake.set()

    def pending(self) -> Pending:
        """The Pending to update in place; call :meth:`noted` right after."""
        return self._pending

    def noted(self) -> None:
        """Record a coalesced write made to :meth:`pending` and wake a lane."""
        self._pending_gen += 1
        if not self._pending_busy:
            self._lanes[0].wake.set()

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Block until everything submitted before the call is committed (or failed).
        Never call it from a store callback (it would wait for its own lane)."""
        return self._wait([(lane, lane.submitted) for lane in self._lanes], timeout)

    def flush_pending(self, timeout: Optional[float] = None) -> bool:
        """Block until the coalesced writes made before the call are committed (not
        waiting for ``PENDING_INTERVAL``, nor for the ops). Same rules as :meth:`flush`."""
        return self._wait([], timeout)

    def cursors_waiting(self, users) -> bool:
        """True if one of ``users`` (a set) has a coalesced cursor write not committed yet."""
        for pending in (self._pending, self._pending_inflight):
            if pending is not None and pending.cursors:
                for user, _ in pending.cursors:
                    if user in users:
                        return True
        return False

    def _wait(self, targets: list, timeout: Optional[float]) -> bool:
        """Block until the lanes in ``targets`` reached their counts and every coalesced
        write made before the call committed."""
        gen = self._pending_gen
        if gen > self._pending_done:
            self._pending_asked = max(self._pending_asked, gen)     # no waiting for the interval
            self._lanes[0].wake.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._pending_done >= gen and all(l.done >= n for l, n in targets):
                return True
            if not self._running:
                return False
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._progress.wait(remaining)

    def stats(self) -> dict:
        return {"queue": self._queued, "batches": self.batches, "committed": self.committed,
                "retries": self.retries, "failed": self.failed, "last_batch": self.last_batch,
                "commit_seconds_sum": self.commit_seconds, "commit_count": self.commit_count,
                "gathers": self.gathers, "gather_seconds_sum": self.gather_seconds,
                "writers": len(self._lanes)}

    # -- the lane greenlets --------------------------------------------------
    def _run(self, lane: _Lane) -> None:
        while True:
            lane.wake.clear()
            if (not lane.ops and self._pending and not self._pending_busy and not self._closing
                    and self._pending_asked <= self._pending_done
                    and time.monotonic() < self._pending_next):
                # coalesced writes alone commit at most once per PENDING_INTERVAL (a login
                # storm's touches coalesce per user); an op arriving takes them along at once
                lane.wake.wait(self._pending_next - time.monotonic())
                continue
            if self.batch_wait and lane.ops:
                self._gather(lane)
            ops = []
            while lane.ops and len(ops) < self.batch_max:
                ops.append(lane.ops.popleft())
            pending, gen = None, 0
            if self._pending and not self._pending_busy:
                pending, gen = self._pending, self._pending_gen
                self._pending, self._pending_busy = Pending(), True
                self._pending_inflight = pending
            if not ops and pending is None:
                if self._closing:
                    return
                lane.wake.wait()
                continue
            lane.inflight = ops
            self._write(lane, ops, pending)
            lane.inflight = []
            if pending is not None:
                self._pending_busy = False
                self._pending_inflight = None
                self._pending_done = gen
                self._pending_next = time.monotonic() + PENDING_INTERVAL
                if self._pending:
                    self._lanes[0].wake.set()
            lane.done += len(ops)
            self._queued -= len(ops)
            progress, self._progress = self._progress, Event()
            progress.set()

    def _gather(self, lane: _Lane) -> None:
        """Update the lane's arrival rate; sleep while a small batch is likely to grow."""
        now = time.monotonic()
        decay = math.exp((lane.mark_time - now) / RATE_SPAN)
        lane.rate = lane.rate * decay + (lane.submitted - lane.mark_count) / RATE_SPAN
        lane.mark_time, lane.mark_count = now, lane.submitted
        missing = min(GATHER_TARGET, self.batch_max) - len(lane.ops)
        if missing <= 0 or lane.rate * self.batch_wait < 1 or self._closing:
            return
        wait = min(self.batch_wait, missing / lane.rate)
        self.gathers += 1
        self.gather_seconds += wait
        gevent.sleep(wait)

    def _write(self, lane: _Lane, ops: list, pending: Optional[Pending]) -> None:
        """Commit ``ops`` (+ ``pending``) and deliver the results; split on a hard error."""
        try:
            results = self._commit(lane, ops, pending)
        except Exception as exc:
            log.error("%s: batch of %d ops failed (%r); retrying them one by one",
                      self.name, len(ops), exc)
            if pending is not None:
                try:
                    self._commit(lane, [], pending)
                except Exception as exc2:
                    log.error("%s: dropping coalesced writes: %r", self.name, exc2)
            for op in ops:
                try:
                    result = self._commit(lane, [op], None)[0]
                except Exception as exc3:
                    self.failed += 1
                    self._deliver_error(op, exc3)
                else:
                    self._deliver(op, result)
            return
        for op, result in zip(ops, results):
            self._deliver(op, result)

    def _commit(self, lane: _Lane, ops: list, pending: Optional[Pending]) -> list:
        """One transaction, retried with backoff while the error is transient."""
        backoff = BACKOFF_FIRST
        while True:
            started = time.perf_counter()
            try:
                results = self._apply_batch(lane.index, ops, pending)
            except Exception as exc:
                if not self._is_transient(exc):
                    raise
                self.retries += 1
                log.warning("%s: write failed (%r); retry in %.2fs", self.name, exc, backoff)
                gevent.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            self.commit_seconds += time.perf_counter() - started
            self.commit_count += 1
            self.batches += 1
            self.committed += len(ops)
            self.last_batch = len(ops)
            return results

    @staticmethod
    def _deliver(op: Any, result: Any) -> None:
        try:
            op.callback(result, None)
        except Exception:
            log.exception("store callback failed")

    @staticmethod
    def _deliver_error(op: Any, exc: BaseException) -> None:
        try:
            op.callback(None, exc)
        except Exception:
            log.exception("store callback failed")


class WriterStore:
    """Mixin implementing the Store write methods on top of ``self._writer``."""

    _writer: Writer

    def send_message(self, sender, recipient, client_id, body, ctx, mid, ts, callback, flags=0) -> None:
        self._writer.submit(MessageOp(sender, recipient, client_id, body, ctx, mid, ts, callback,
                                      flags), sender)

    def add_notices(self, users, role, kind, body, mids, ts, callback) -> None:
        self._writer.submit(NoticeOp(None if users is None else list(users), role, kind, body,
                                     mids, ts, callback), kind)

    def set_cursor(self, user: str, device: str, seq: int) -> None:
        cursors = self._writer.pending().cursors
        key = (user, device)
        if seq > cursors.get(key, 0):
            cursors[key] = seq
            self._writer.noted()

    def touch_user(self, user, role, platform, ts) -> None:
        touches = self._writer.pending().touches
        old = touches.get(user)
        if old is None:
            touches[user] = [role, platform, ts]
        else:
            touches[user] = [role or old[0], platform or old[1], max(ts, old[2])]
        self._writer.noted()

    def add_contact(self, user: str, contact: str) -> None:
        self._writer.pending().contacts.append((True, user, contact))
        self._writer.noted()

    def remove_contact(self, user: str, contact: str) -> None:
        self._writer.pending().contacts.append((False, user, contact))
        self._writer.noted()

    def set_password(self, user: str, credentials: Optional[dict]) -> None:
        text = None if credentials is None else orjson.dumps(credentials).decode()
        self._writer.pending().passwords[user] = text
        self._writer.noted()

    def flush(self, timeout: Optional[float] = None) -> bool:
        return self._writer.flush(timeout)

    def settle_cursors(self, users) -> None:
        """Read-your-writes before a read that depends on cursors (offline entries,
        received seqs): when one of ``users`` has a cursor write still coalesced or
        in flight, commit the coalesced writes now and wait for it, at most
        SETTLE_TIMEOUT (the database gone: the read goes on and fails or, back by
        then, may repeat entries — at least once). Blocks the calling greenlet only
        then (a device that just acknowledged and logs in again)."""
        if self._writer.cursors_waiting(users):
            self._writer.flush_pending(SETTLE_TIMEOUT)

    def stats(self) -> dict:
        return self._writer.stats()
