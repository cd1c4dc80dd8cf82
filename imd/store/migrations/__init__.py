"""Versioned schema migrations: ``<backend>/NNNN_name.sql``, applied in order at open().

Each backend records the applied versions in its ``schema_version`` table and
applies the missing ones, each in its own transaction.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def migrations(backend: str) -> list[tuple[int, str, str]]:
    """``[(version, name, sql), ...]`` for ``backend``, ascending by version."""
    found = []
    for path in sorted((HERE / backend).glob("[0-9][0-9][0-9][0-9]_*.sql")):
        found.append((int(path.name[:4]), path.stem, path.read_text()))
    return found
