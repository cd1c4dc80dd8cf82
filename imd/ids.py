"""Server-made identifiers: message ids (``mid``) and session ids.

A mid is 22 lowercase hex/base32 characters: the creation time in ms, a random
salt chosen per process (so nodes sharing a database never collide) and a
counter. Mids of one process sort by creation time.
"""

from __future__ import annotations

import itertools
import secrets
import time


class MidGen:
    """``mids()`` makes a mid now; ``mids.at(ms)`` one for a time the caller already read.
    The time-and-salt prefix is made once per millisecond."""

    __slots__ = ("_salt", "_count", "_ms", "_prefix")

    def __init__(self) -> None:
        self._salt = secrets.token_hex(3)
        self._count = itertools.count(secrets.randbelow(1 << 20))
        self._ms = -1
        self._prefix = ""

    def __call__(self) -> str:
        return self.at(int(time.time() * 1000))

    def at(self, ms: int) -> str:
        if ms != self._ms:
            self._ms = ms
            self._prefix = f"{ms:011x}{self._salt}"
        return f"{self._prefix}{next(self._count) & 0xFFFFF:05x}"


def now_ms() -> int:
    return int(time.time() * 1000)
