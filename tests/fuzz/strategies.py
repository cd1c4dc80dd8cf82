"""Shared hypothesis helpers for the parser property tests.

``FUZZ`` is the settings every test uses (about 200 examples, no deadline: the
suite stays fast and a slow example on a loaded machine is not a failure).
``split(data, draw)`` cuts bytes at random places; ``mutate(data, draw)`` flips,
inserts, deletes or duplicates bytes of a valid input.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


def split(data: bytes, draw) -> list:
    """``data`` cut into 1..n pieces at drawn positions (empty pieces included)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    out, prev = [], 0
    for c in cuts:
        out.append(data[prev:c])
        prev = c
    out.append(data[prev:])
    return out


def mutate(data: bytes, draw) -> bytes:
    """A few random edits of ``data``."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(("flip", "insert", "delete", "dup", "truncate")))
        pos = draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "flip" and buf:
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and buf:
            del buf[pos:pos + draw(st.integers(1, 8))]
        elif op == "dup" and buf:
            buf[pos:pos] = buf[pos:pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del buf[pos:]
    return bytes(buf)
