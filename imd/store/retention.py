"""Retention: the greenlet that purges old messages (shared by the SQL backends)."""

from __future__ import annotations

import logging
import time

import gevent

log = logging.getLogger("imd.store.retention")


def purge_loop(store) -> None:
    """Every ``store.purge_interval`` s, ``store.purge()`` what is older than
    ``store.retention_days`` (read each time, so a config reload applies; 0 keeps
    everything). Runs as a greenlet; errors are logged and retried at the next
    interval."""
    while True:
        gevent.sleep(store.purge_interval)
        if store.retention_days <= 0:
            continue
        try:
            gone = store.purge(int(time.time() * 1000 - store.retention_days * 86400000))
            if gone:
                log.info("%s: purged %d messages older than %g days", store.name, gone,
                         store.retention_days)
        except Exception as exc:
            log.warning("%s: purge failed: %r", store.name, exc)
