"""Coarse deadlines for very many connections with one periodic timer.

Each tracked object sits in exactly one one-second bucket. Activity does not
move it (that would cost work per message); when its bucket comes due, the
wheel calls ``obj.<method>(now)`` (``on_deadline`` unless another name is
given), which returns the next deadline (a
monotonic time) to be re-filed under, or None to drop it. So the work per
second is proportional to the deadlines due, not to the connections held.
Runs in the hub; callbacks must not block.
"""

from __future__ import annotations

import logging
import time

import gevent

log = logging.getLogger("imd.net")


class Wheel:
    def __init__(self, method: str = "on_deadline", tick: float = 1.0, after=None) -> None:
        self.method = method
        self.tick = tick
        self.after = after            # called with no arguments after each tick's handlers
        self._buckets: dict[int, list] = {}
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

    def _run(self) -> None:
        now = time.monotonic()
        due = [k for k in self._buckets if k <= now]
        for key in sorted(due):
            for obj in self._buckets.pop(key):
                try:
                    nxt = getattr(obj, self.method)(now)
                except Exception:
                    log.exception("deadline handler failed")
                    continue
                if nxt is not None:
                    self.add(obj, nxt)
        if self.after is not None:
            try:
                self.after()
            except Exception:
                log.exception("after-tick hook failed")
