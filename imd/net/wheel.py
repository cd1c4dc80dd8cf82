"""Coarse deadlines for very many connections with one periodic timer.

Each tracked object sits in exactly one one-second bucket. Activity does not
move it (that would cost work per message); when its bucket comes due, the
wheel calls ``obj.<method>(now)`` (``on_deadline`` unless another name is
given), which returns the next deadline (a
monotonic time) to be re-filed under, or None to drop it. So the work per
second is proportional to the deadlines due, not to the connections held.

An object whose deadline no longer matters (a closed session: its handler
would return None) may be ``discard``-ed: it is forgotten in bulk once the
discarded objects are at least half of what the wheel holds (every bucket is
filtered then: O(1) work per discard, amortized), so a reconnect storm does
not keep every closed session alive until its deadline comes.
Runs in the hub; callbacks must not block.
"""

from __future__ import annotations

import logging
import time

import gevent

log = logging.getLogger("imd.net")

COMPACT_MIN = 1024        # discarded objects before the buckets are ever filtered


class Wheel:
    def __init__(self, method: str = "on_deadline", tick: float = 1.0) -> None:
        self.method = method
        self.tick = tick
        self._buckets: dict[int, list] = {}
        self._size = 0                # objects filed in the buckets (discarded ones included)
        self._gone: set = set()       # discarded, possibly still filed
        self._timer = None

    def start(self) -> None:
        self._timer = gevent.get_hub().loop.timer(self.tick, self.tick)
        self._timer.start(self._run)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None

    def add(self, obj, deadline: float) -> None:
        key = int(deadline) + 1
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = [obj]
        else:
            bucket.append(obj)
        self._size += 1

    def discard(self, obj) -> None:
        """Forget ``obj`` (at the latest when its bucket comes due): only for an
        object whose handler would do nothing more (return None). An object that is
        no longer filed (its handler already returned None, and it is discarded later
        than from inside that handler) stays referenced until the next bulk filter:
        at most as many as half of what the wheel holds."""
        gone = self._gone
        gone.add(obj)
        if len(gone) >= COMPACT_MIN and 2 * len(gone) >= self._size:
            self._compact()

    def _compact(self) -> None:
        gone, size = self._gone, 0
        for key, bucket in list(self._buckets.items()):
            kept = [obj for obj in bucket if obj not in gone]
            if kept:
                self._buckets[key] = kept
                size += len(kept)
            else:
                del self._buckets[key]
        self._size = size
        gone.clear()

    def _run(self) -> None:
        now = time.monotonic()
        due = [k for k in self._buckets if k <= now]
        gone = self._gone
        for key in sorted(due):
            bucket = self._buckets.pop(key, ())       # () if a handler's discard emptied it
            self._size -= len(bucket)
            for obj in bucket:
                if gone and obj in gone:
                    gone.discard(obj)
                    continue
                try:
                    nxt = getattr(obj, self.method)(now)
                except Exception:
                    log.exception("deadline handler failed")
                    nxt = None
                if gone and obj in gone:
                    gone.discard(obj)      # discarded by its own handler (it closed): not filed
                elif nxt is not None:
                    self.add(obj, nxt)
