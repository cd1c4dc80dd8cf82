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
"""

from __future__ import annotations

import gc

GEN0 = 50_000


def apply() -> None:
    """Freeze the boot-time objects and raise the young threshold (once per process)."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0, gen1, gen2)
