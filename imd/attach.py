"""Batched store reads for sessions being attached (right after their auth).

Attaching a session reads the user's inbox top, their contacts (unless this
node has them cached) and, without ``since``, their offline entries. Read per
login, that is one to three threadpool round trips each; :class:`AttachReads`
queues the requests and serves every login waiting at that moment with one
``Store.attach_states`` call: while one batch is in the store the next one
fills up, so a login storm costs one round trip per batch, not per login.

``request`` never blocks (call it from the hub or a greenlet). Callbacks run
in the reader greenlet, in request order, one after the other: they must not
block (spawn a greenlet for what does).
"""

from __future__ import annotations

import logging

import gevent

log = logging.getLogger("imd.attach")

BATCH_MAX = 256        # logins served by one store call


class AttachReads:
    def __init__(self, store) -> None:
        self.store = store
        self._queue: list = []
        self._running = False
        self.batches = 0
        self.requests = 0

    def request(self, user: str, contacts: bool, offline: int, callback) -> None:
        """Read for ``user`` (their contacts if ``contacts``; up to ``offline``
        offline entries if > 0), then ``callback(AttachState, None)``, or
        ``callback(None, error)`` when the store failed."""
        self.requests += 1
        self._queue.append((user, contacts, offline, callback))
        if not self._running:
            self._running = True
            gevent.spawn(self._run)

    def _run(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:BATCH_MAX], self._queue[BATCH_MAX:]
                self.batches += 1
                try:
                    states, err = self.store.attach_states([r[:3] for r in batch]), None
                except Exception as e:       # every waiting login hears of it
                    states, err = [None] * len(batch), e
                for (user, _, _, callback), state in zip(batch, states):
                    try:
                        callback(state, err)
                    except Exception:
                        log.exception("attach callback failed user=%s", user)
        finally:
            self._running = False
