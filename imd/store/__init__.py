"""The durable store (DESIGN.md §6): interface in ``base``, backends ``sqlite`` and ``postgresql``."""

from __future__ import annotations

from .base import Store


def make_store(backend: str, data_dir: str = "./var", dsn: str = "", **options) -> Store:
    """An unopened store of ``backend`` ("sqlite" | "postgresql").

    sqlite: a file under ``data_dir``; options queue_size, batch_max, synchronous,
    retention_days, purge_interval. postgresql: ``dsn``; options writers, readers,
    queue_size, batch_max, retention_days, purge_interval, connect_timeout.
    """
    if backend == "sqlite":
        from .sqlite import SqliteStore
        return SqliteStore(data_dir, **options)
    if backend == "postgresql":
        if not dsn:
            raise ValueError("store.dsn is required for the postgresql backend")
        from .postgresql import PostgresStore
        return PostgresStore(dsn, **options)
    raise ValueError("unknown store backend %r (sqlite | postgresql)" % backend)
