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
    __slots__ = ("_salt", "_count")

    def __init__(self) -> None:
        self._salt = secrets.token_hex(3)
        self._count = itertools.count(secrets.randbelow(1 << 20))

    def __call__(self) -> str:
        return f"{int(time.time() * 1000):011x}{self._salt}{next(self._count) & 0xFFFFF:05x}"


def now_ms() -> int:
    return int(time.time() * 1000)
