"""The cyclic garbage collector's settings for a running node.

CPython starts a young collection whenever the count of container objects
(dicts, lists, tuples, functions, class instances) allocated and not yet freed
grows by 700, a middle one every 10 young ones, and a full one every 10 middle
ones once the objects promoted since the last full collection reach a quarter
of those it kept. A chat message makes about a dozen such objects that live
until its store batch commits (0.1–0.3 s under load): with the default
threshold they outlive two collections, are promoted to the oldest generation
and die there, so a node under chat load ran a full collection every few
tenths of a second: 10–15 % of its CPU went to the collector (timed with
``gc.callbacks``), and raising the threshold took the CPU per 1k acked
messages from 0.042 to 0.034 s (SQLite closed loop, 500 pairs, window 8).

:func:`apply`, called once the node is up:

* ``gc.freeze()``: what booting made (modules, configuration, listeners) moves
  to the permanent generation and is never traversed again;
* young threshold ``GEN0``: above the swing of live objects that a store batch
  of up to 1,000 messages causes, so under steady load the collector hardly
  runs. Cyclic garbage is what waits for it: at most about ``GEN0`` objects
  (a few MB) before a young collection takes it.

Reference counting frees everything else at once, as before. Runs in the hub
at boot; never blocks.

:data:`PAUSES` times every collection of the process (``gc.callbacks``; installed
by :func:`apply`): the collections per generation and a histogram of how long
each one held the process, which /metrics shows (docs/operations.md). A full
collection walks every tracked object that is not frozen, so its pause grows with
the sessions a node holds.
"""

from __future__ import annotations

import gc
import time

from .metrics import Histogram

GEN0 = 50_000


class Pauses:
    """A ``gc.callbacks`` entry: ``collections[generation]`` and ``histogram`` (seconds
    per collection). The callback runs in whichever thread collects, holding the GIL;
    CPython never runs two collections at once, so no lock is needed."""

    __slots__ = ("collections", "histogram", "_started")

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.histogram = Histogram()
        self._started = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        self.histogram.observe(time.perf_counter() - self._started)
        self.collections[info["generation"]] += 1

    def install(self) -> None:
        """Add to gc.callbacks (once)."""
        if self not in gc.callbacks:
            gc.callbacks.append(self)


PAUSES = Pauses()


def apply() -> None:
    """Freeze the boot-time objects, raise the young threshold and time the collections
    (once per process)."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0, gen1, gen2)
    PAUSES.install()
