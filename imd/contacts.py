"""Contacts: the host↔guest relationships (DESIGN.md §5), mutual.

Changes apply in memory at once and go to the store's write queue (batched).
Contact lists are cached for users connected to this node; a miss loads from
the store. Because a queued change may not be committed when a load happens,
recent changes are remembered for a while and replayed over every load.

``get`` and ``preload`` may block (a store read): call them from a greenlet.
``cached``, ``add`` and ``remove`` never block.
"""

from __future__ import annotations

import time
from collections import deque

RECENT_SECONDS = 120.0
EMPTY = frozenset()       # the cached list of a user without contacts (no set per user)


class Contacts:
    def __init__(self, store) -> None:
        self.store = store
        self._cache: dict[str, set] = {}
        self._recent: deque = deque()          # (monotonic, op, user, contact)

    def cached(self, user: str):
        return self._cache.get(user)

    def get(self, user: str):
        """The user's contacts (a set, or the shared empty frozenset); do not mutate it."""
        s = self._cache.get(user)
        if s is None:
            s = self.loaded(user, self.store.contacts(user))
        return s

    def preload(self, users) -> None:
        """Load the lists of those of ``users`` not cached with one store call (the
        store's batched login read; blocks). Raises StoreError."""
        missing = [u for u in dict.fromkeys(users) if u not in self._cache]
        if missing:
            for user, state in zip(missing, self.store.attach_states([(u, True, 0) for u in missing])):
                self.loaded(user, state.contacts)

    def loaded(self, user: str, stored) -> set:
        """Cache ``stored`` (the user's contacts as just read from the store) with
        the recent changes replayed over it, unless a list is cached already;
        returns the cached list. Never blocks."""
        s = set(stored)
        self._prune()
        for _, op, a, b in self._recent:
            for x, y in ((a, b), (b, a)):
                if x == user:
                    (s.add if op == "add" else s.discard)(y)
        cur = self._cache.get(user)       # a change may have loaded it meanwhile
        if cur is not None:
            return cur
        s = self._cache[user] = s or EMPTY
        return s

    def drop(self, user: str) -> None:
        """Forget the cached list (the user left this node)."""
        self._cache.pop(user, None)

    def apply(self, op: str, user: str, contact: str) -> bool:
        """Apply a change to the cache only (a change seen on the bus). True if it changed."""
        changed = False
        for x, y in ((user, contact), (contact, user)):
            s = self._cache.get(x)
            if s is None:
                continue
            if op == "add":
                if s is EMPTY:
                    s = self._cache[x] = set()
                changed |= y not in s
                s.add(y)
            elif y in s:
                s.discard(y)
                changed = True
        return changed

    def add(self, user: str, contact: str) -> bool:
        return self._change("add", user, contact)

    def remove(self, user: str, contact: str) -> bool:
        return self._change("remove", user, contact)

    def _change(self, op: str, user: str, contact: str) -> bool:
        changed = self.apply(op, user, contact)
        self._recent.append((time.monotonic(), op, user, contact))
        if op == "add":
            self.store.add_contact(user, contact)
        else:
            self.store.remove_contact(user, contact)
        return changed

    def _prune(self) -> None:
        limit = time.monotonic() - RECENT_SECONDS
        r = self._recent
        while r and r[0][0] < limit:
            r.popleft()
