"""Shared timestamps for per-connection state.

Every idle connection keeps a timestamp or two (last input, opening time),
and a Python float costs 24 bytes. These clocks return the same float object
to every caller within ``SHARE`` seconds (a value at most that much in the
past), so connections that are active in the same ~10 ms hold one object
between them. Use them for timeouts and bookkeeping, not for measuring
durations. Not thread-safe beyond what the GIL gives; never block.
"""

from __future__ import annotations

import time

SHARE = 0.01
_mono = _wall = -1.0


def mono_now() -> float:
    """``time.monotonic()``, shared within ``SHARE`` seconds."""
    global _mono
    t = time.monotonic()
    if t - _mono >= SHARE:
        _mono = t
    return _mono


def wall_now() -> float:
    """``time.time()``, shared within ``SHARE`` seconds (follows the clock back if it is set back)."""
    global _wall
    t = time.time()
    if t - _wall >= SHARE or t < _wall:
        _wall = t
    return _wall
