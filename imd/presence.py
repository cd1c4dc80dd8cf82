"""Per-user presence aggregated over sessions on every node (DESIGN.md §5).

A user is ``online`` while any session is connected and not away, ``away``
when every session says so, ``offline`` when none is left anywhere; going
offline is announced only after ``grace`` seconds so a reconnecting phone
does not flap. Announcements go to the user's contacts only, through the
engine (``presence`` events on each contact's user channel), and to local
presence listeners (``/psub``-style callbacks).

Recomputations are queued and run in one worker greenlet, because reading the
cluster view (``engine.presence_get``) may block; the worker takes up to
``BATCH`` queued users per cluster read, so a login storm costs one Redis
round trip per batch, not per user; so do the contact lists of users announced
before their login's own read cached them (one store read per batch).
``changed`` never blocks.
"""

from __future__ import annotations

import logging
import time

import gevent
from gevent.event import Event as GEvent

from .engine.base import Event, aggregate, user_channel

log = logging.getLogger("imd.presence")

BATCH = 500         # users recomputed per cluster read


class Presence:
    def __init__(self, node, grace: float) -> None:
        self.node = node
        self.grace = grace
        self.listeners = []                     # callables(user, status, platforms)
        self._announced: dict[str, tuple] = {}  # user → shared_state() last announced here
        self._offline_timers: dict[str, object] = {}
        self._queue: dict[str, None] = {}
        self._lost: dict[str, None] = {}        # users whose node died (engine ``nodes_lost``)
        self._wake = GEvent()
        self._worker = None

    def start(self) -> None:
        self._worker = gevent.spawn(self._run)

    def stop(self) -> None:
        if self._worker is not None:
            self._worker.kill()
        for t in self._offline_timers.values():
            t.stop()
        self._offline_timers.clear()

    def changed(self, user: str) -> None:
        """The user's local sessions changed (opened, closed, status)."""
        self._queue[user] = None
        self._wake.set()

    def lost(self, users) -> None:
        """Another node died with these users' sessions: announce the ones left
        with no session anywhere as offline (no grace: they are gone already)."""
        for u in users:
            self._lost[u] = None
        self._wake.set()

    def restore(self, users) -> None:
        """Our records had been removed by another node (which announced these
        users offline): announce them again."""
        for u in users:
            self._announced.pop(u, None)
            self._queue[u] = None
        self._wake.set()

    def local_state(self, user: str):
        sessions = self.node.sessions_of(user)
        if not sessions:
            return None
        if len(sessions) == 1:        # most users: no sets to build
            s = sessions[0]
            return {"status": "online" if s.status == "online" else "away", "platforms": [s.platform],
                    "devices": [s.device]}
        status = "online" if any(s.status == "online" for s in sessions) else "away"
        return {"status": status, "platforms": sorted({s.platform for s in sessions}),
                "devices": sorted({s.device for s in sessions})}

    def lookup(self, users) -> dict:
        """{user: {"status", "platforms", "last_seen"}} for every user asked (blocks)."""
        users = list(users)
        recs = self.node.engine.presence_get(users)
        info = self.node.store.users_info(users)
        out = {}
        for u in users:
            status, platforms = aggregate(recs.get(u, []))
            i = info.get(u)
            out[u] = {"status": status, "platforms": platforms,
                      "last_seen": i.last_seen if i is not None else None}
        return out

    def exchange(self, a: str, b: str) -> None:
        """Tell two new contacts each other's presence (blocks: run in a greenlet)."""
        try:
            states = self.lookup([a, b])
        except Exception:
            log.exception("presence exchange failed users=%s,%s", a, b)
            return
        for who, to in ((a, b), (b, a)):
            st = states[who]
            data = {"user": who, "status": st["status"], "platforms": st["platforms"],
                    "last_seen": st["last_seen"]}
            self.node.engine.publish(user_channel(to), Event("presence", data))

    # -- worker ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while self._queue or self._lost:
                if self._queue:
                    users = self._take(self._queue)
                    try:
                        self._recompute(users)
                    except Exception:
                        log.exception("presence recompute failed users=%d first=%s", len(users), users[0])
                else:
                    users = self._take(self._lost)
                    try:
                        self._offline_elsewhere(users)
                    except Exception:
                        log.exception("presence of a lost node's users failed users=%d", len(users))

    @staticmethod
    def _take(queue: dict) -> list:
        """Up to BATCH users off a queue: one cluster read serves them all."""
        users = []
        for user in queue:
            users.append(user)
            if len(users) == BATCH:
                break
        for user in users:
            del queue[user]
        return users

    def _recompute(self, users: list) -> None:
        engine = self.node.engine
        for user in users:
            engine.presence_set(user, self.local_state(user))
        states = engine.presence_states(users)
        announce = []
        for user in users:
            state = states.get(user)
            if state is None:           # offline
                if user in self._announced and user not in self._offline_timers:
                    t = gevent.get_hub().loop.timer(self.grace)
                    self._offline_timers[user] = t
                    t.start(self._grace_over, user)
                continue
            t = self._offline_timers.pop(user, None)
            if t is not None:
                t.stop()
            if self._announced.get(user) != state:
                self._announced[user] = state
                announce.append((user, state))
        if not announce:
            return
        try:        # first logins: their contacts in one store read, not one each in _announce
            self.node.contacts.preload([user for user, _ in announce])
        except Exception as e:
            log.warning("presence: contacts not preloaded (%s); read one by one", e)
        for user, state in announce:
            self._announce(user, state[0], list(state[1]), None)

    def _offline_elsewhere(self, users: list) -> None:
        users = [u for u in users if u not in self.node.sessions]
        records = self.node.engine.presence_get(users) if users else {}
        now = int(time.time() * 1000)
        for user in users:
            if aggregate(records.get(user, []))[0] != "offline":
                continue
            self._announced.pop(user, None)
            self.node.store.touch_user(user, None, None, now)
            self._announce(user, "offline", [], now)
            self.node.contacts.drop(user)

    def _grace_over(self, user: str) -> None:
        self._offline_timers.pop(user, None)
        gevent.spawn(self._confirm_offline, user)

    def _confirm_offline(self, user: str) -> None:
        status, _ = aggregate(self.node.engine.presence_get([user]).get(user, []))
        if status != "offline" or user not in self._announced:
            return
        del self._announced[user]
        now = int(time.time() * 1000)
        self.node.store.touch_user(user, None, None, now)
        self._announce(user, "offline", [], now)
        if user not in self.node.sessions:
            self.node.contacts.drop(user)

    def _announce(self, user: str, status: str, platforms: list, last_seen) -> None:
        data = {"user": user, "status": status, "platforms": platforms, "last_seen": last_seen}
        for fn in self.listeners:
            try:
                fn(user, status, platforms)
            except Exception:
                log.exception("presence listener failed")
        try:
            contacts = self.node.contacts.get(user)
        except Exception:
            log.exception("presence: contacts of %s unavailable", user)
            return
        for c in contacts:
            self.node.engine.publish(user_channel(c), Event("presence", data))
