"""Router: authentication, policy and dispatch of client envelopes by type.

Protocols hand every validated client envelope to :meth:`Router.receive`
(from the hub, non-blocking). The router authenticates, applies policy,
queues writes on the store (acks go out from the store's commit callback),
publishes entries through the node, and spawns greenlets for the work that
reads the store (replay after auth, sync, gap fill, read receipts). It knows
no protocol: it talks to sessions through ``send``/``close``/``deliver``.

The web tier's operations (notices, messages, contacts, kick, inbox) are here
too, as methods that block the calling greenlet until committed; so are what
protocols need beyond envelopes (transient envelopes to a user's sessions on
every node, credentials, roles, history, contacts): protocol code never
reads the store or the engine itself.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Optional

import gevent
from gevent.event import AsyncResult

from . import auth, passwords
from .attach import AttachReads
from .contacts import EMPTY
from .envelope import VALIDATORS, EnvelopeError, Out, error
from .ids import MidGen, now_ms
from .metrics import Metrics
from .net.wheel import Wheel
from .session import AUTH, AUTHING, CLOSED, LIVE, SYNC
from .store.base import AttachState, StoreError, StoreFull

log = logging.getLogger("imd.router")

REPLAY_PAGE = 200
OFFLINE_MAX = 10000
PUBLISH_SLICE = 1000      # entries published between yields by a bulk operation
MAX_BACKLOG = 64          # envelopes a client may pipeline behind its auth
RATED = frozenset(("msg", "read", "sync"))   # envelope types under limits.msg_rate
LOOKUPS_MAX = 64          # store reads in flight asking whether a message refused by a full queue is stored


def _ack(cid: str, mid: str, seq: int, ts: int) -> dict:
    """The ack of a stored message (DESIGN.md §3)."""
    return {"type": "ack", "id": cid, "mid": mid, "seq": seq, "ts": ts}


class Router:
    def __init__(self, cfg, node, store, metrics: Optional[Metrics] = None) -> None:
        self.cfg = cfg
        self.limits = cfg.limits      # Sections: a reload updates them in place; plain attribute reads
        self.policy = cfg.policy
        self.node = node
        self.store = store
        self.metrics = metrics or Metrics()
        self.mids = MidGen()
        self._inflight: dict = {}   # (sender, client id) of a message being stored → sessions awaiting its answer
        self._lookups = 0           # _stored_or_refused greenlets running
        self._handlers = {t: getattr(self, "on_" + t) for t in VALIDATORS}   # envelope type → on_<type>
        self.auth_wheel = Wheel("on_auth_deadline")
        self.wheel = Wheel("on_deadline")
        self.attach_reads = AttachReads(store)
        self.sessions_opened = 0
        self._opened_labels: dict = {}   # (protocol, role, platform) → imd_sessions_opened_total labels
        self._ack_latency = self.metrics.histogram(
            "imd_ack_latency_seconds", "time from receiving a message to acking it (store commit)")
        self.delivery_latency = self.metrics.histogram(
            "imd_delivery_latency_seconds", "time from a message's timestamp to its delivery to a session")
        node.delivery_latency = self.delivery_latency

    def start(self) -> None:
        self.auth_wheel.start()
        self.wheel.start()

    def stop(self) -> None:
        self.auth_wheel.stop()
        self.wheel.stop()

    # -- session lifecycle -------------------------------------------------------
    def opened(self, session) -> None:
        """A protocol accepted a connection: start its authentication deadline."""
        self.sessions_opened += 1
        self.auth_wheel.add(session, time.monotonic() + self.limits.auth_timeout)

    def unopened(self, session) -> None:
        """A session closed before authenticating (called by Session.closed)."""
        self.auth_wheel.discard(session)

    def detach(self, session, reason: str) -> None:
        """The session's transport is gone (called by Session.closed)."""
        self.wheel.discard(session)
        self.node.remove_session(session)
        self.store.touch_user(session.user, None, session.platform, now_ms())
        if log.isEnabledFor(logging.DEBUG):
            log.debug("session closed conn=%s user=%s reason=%s", session.id, session.user, reason)

    # -- dispatch -------------------------------------------------------------------
    def receive(self, s, env: dict) -> None:
        """Handle one validated client envelope (non-blocking)."""
        t = env["type"]
        self.metrics.msg_in(t)
        st = s.state
        if st is AUTH:
            if t != "auth":
                self.refuse(s, 401, "authenticate first")
                return
            self.authenticate(s, env)
            return
        if st is AUTHING:
            if len(s.backlog) >= MAX_BACKLOG:
                self.refuse(s, 429, "too many envelopes before the auth answer")
                return
            s.backlog.append(env)
            return
        if st is CLOSED:
            return
        if t in RATED and self.limits.msg_rate and not self._allow(s):
            self.metrics.inc("imd_rate_limited_total", (("type", t),))
            s.send(error(429, f"rate limit: at most {self.limits.msg_rate:g} per second", env.get("id")))
            return
        handler = self._handlers[t]
        try:
            handler(s, env)
        except EnvelopeError as e:
            s.send(e.envelope())
            if e.fatal:
                s.end(e.reason)
        except Exception:
            log.exception("handler failed conn=%s type=%s", s.id, t)
            s.send(error(500, "internal error", env.get("id")))

    def _allow(self, s) -> bool:
        """The session's token bucket (limits.msg_rate per second, limits.msg_burst deep);
        only called while limits.msg_rate is set (0 turns the limit off)."""
        lim = self.limits
        rate = lim.msg_rate
        burst = lim.msg_burst
        now = time.monotonic()
        b = s.bucket
        if b is None:
            s.bucket = [burst - 1.0, now]
            return True
        tokens = min(burst, b[0] + (now - b[1]) * rate)
        b[1] = now
        if tokens < 1.0:
            b[0] = tokens
            return False
        b[0] = tokens - 1.0
        return True

    def refuse(self, s, code: int, reason: str, id: Optional[str] = None) -> None:
        """Answer with ``error`` and end the connection."""
        log.info("refused conn=%s user=%s code=%d reason=%s", s.id, s.user, code, reason)
        s.send(error(code, reason, id))
        s.end(reason)

    # -- auth ---------------------------------------------------------------------------
    def authenticate(self, s, env: dict) -> None:
        try:
            ident = auth.verify(env["token"], self.cfg.auth.secret, self.cfg.auth.leeway)
        except auth.AuthError as e:
            self.metrics.inc("imd_auth_failures_total")
            log.debug("auth refused conn=%s reason=%s", s.id, e.reason)
            self.refuse(s, 401, e.reason)
            return
        platform = env["platform"]
        if ident.platform is not None and ident.platform != platform:
            self.refuse(s, 403, f"token is for platform {ident.platform}")
            return
        self.start_session(s, ident.user, ident.role, platform, env["device"], env.get("since"))

    def start_session(self, s, user: str, role: str, platform: str, device: str,
                      since: Optional[int]) -> None:
        """Give the session its identity and attach it (replay runs in a greenlet)."""
        s.user, s.role, s.platform, s.device = user, sys.intern(role), sys.intern(platform), device
        if log.isEnabledFor(logging.DEBUG):
            log.debug("session opened conn=%s user=%s source=%s device=%s protocol=%s",
                      s.id, user, s.source, device, s.protocol)
        s.state = AUTHING
        s.backlog = []
        s.held = []
        self.auth_wheel.discard(s)    # its auth deadline is moot now
        self.wheel.add(s, s.last_rx + self.limits.heartbeat)
        key = (s.protocol, s.role, s.platform)
        labels = self._opened_labels.get(key)
        if labels is None:            # a few kinds in all: made once each
            labels = self._opened_labels[key] = (("protocol", s.protocol), ("source", s.source))
        self.metrics.inc("imd_sessions_opened_total", labels)
        self.node.add_session(s)      # live entries from now on are held until the replay is done
        self.attach_reads.request(s.user, self.node.contacts.cached(s.user) is None,
                                  OFFLINE_MAX if since is None else 0,
                                  lambda state, err: self._attach(s, since, state, err))

    def _attach(self, s, since: Optional[int], state, err) -> None:
        """The store reads of an attaching session are done (AttachReads' callback:
        must not block): answer the auth, then replay. What may block (presence of
        contacts, paged replay after ``since``, gap fill) goes to a greenlet."""
        if s.state is CLOSED:
            return
        if err is not None:
            if isinstance(err, StoreError):
                log.warning("attach failed conn=%s user=%s error=%s", s.id, s.user, err)
                s.close(503, "store unavailable", reconnect=True)
            else:
                log.error("attach failed conn=%s user=%s", s.id, s.user, exc_info=err)
                s.close(500, "internal error", reconnect=True)
            return
        contacts = self.node.contacts
        if state.contacts is not None:
            contacts.loaded(s.user, state.contacts)
        elif contacts.cached(s.user) is None:     # dropped since the request: read them again
            self.attach_reads.request(s.user, True, 0, lambda again, err: self._attach(
                s, since, None if err else AttachState(state.top, again.contacts, state.offline), err))
            return
        self.store.touch_user(s.user, s.role, s.platform, now_ms())
        top = state.top
        s.send({"type": "auth", "ok": True, "user": s.user, "role": s.role, "session": s.id,
                "seq": top, "heartbeat": self.limits.heartbeat})
        s.state = SYNC                # live entries are still held until the replay is done
        backlog, s.backlog = s.backlog, None
        for env in backlog:
            self.receive(s, env)
        if s.state is CLOSED:
            return
        s.last_seq = top              # what the replay sends; held entries come after
        if since is not None or contacts.cached(s.user) is not EMPTY:
            gevent.spawn(self._replay, s, since, top, state.offline)
            return
        self._send_offline(s, top, state.offline)
        if s.end_sync() is not None:  # a gap among the held entries: fill it from the store
            gevent.spawn(self._release, s)

    def _send_offline(self, s, top: int, offline: list) -> None:
        for e in offline:
            if e.seq <= top:
                s.send(Out(e.envelope(), e.seq, flags=e.flags))

    def _replay(self, s, since: Optional[int], top: int, offline: Optional[list]) -> None:
        """The blocking part of attaching: contacts' presence, then the offline
        entries or the inbox after ``since`` (paged, with backpressure)."""
        try:
            self._send_contacts_presence(s)
            if since is None:
                self._send_offline(s, top, offline)
            else:
                cur = min(since, top)
                while cur < top and s.state is not CLOSED:
                    page = self.store.inbox(s.user, cur, min(REPLAY_PAGE, top - cur))
                    if not page:
                        break
                    for e in page:
                        s.send(Out(e.envelope(), e.seq, flags=e.flags))
                    cur = page[-1].seq
                    s.drain()
        except StoreError as e:
            log.warning("attach failed conn=%s user=%s error=%s", s.id, s.user, e)
            s.close(503, "store unavailable", reconnect=True)
            return
        except Exception:
            log.exception("attach failed conn=%s user=%s", s.id, s.user)
            s.close(500, "internal error", reconnect=True)
            return
        if s.state is not CLOSED:
            self._release(s)

    def _send_contacts_presence(self, s) -> None:
        contacts = self.node.contacts.get(s.user)
        if not contacts:
            return
        for user, st in self.node.presence.lookup(sorted(contacts)).items():
            s.send({"type": "presence", "user": user, "status": st["status"],
                    "platforms": st["platforms"], "last_seen": st["last_seen"]})

    def _release(self, s) -> None:
        """End the session's sync; fetch gaps from the store until none is left."""
        gap = s.end_sync()
        while gap is not None and s.state is not CLOSED:
            target = min(o.seq for o in s.held) - 1
            try:
                page = self.store.inbox(s.user, s.last_seq, target - s.last_seq)
            except StoreError as e:
                log.warning("gap fill failed conn=%s error=%s", s.id, e)
                s.close(503, "store unavailable", reconnect=True)
                return
            for e in page:
                if e.seq > s.last_seq:
                    s.last_seq = e.seq
                    s.send(Out(e.envelope(), e.seq, flags=e.flags))
            if s.last_seq < target:
                log.warning("gap not in store conn=%s user=%s from=%d to=%d", s.id, s.user, s.last_seq, target)
                s.last_seq = target
            gap = s.end_sync()

    def catch_up(self, s, top: int) -> None:
        """Send a live session the entries after its ``last_seq`` up to ``top``
        from the store (the bus may have lost them; blocks: call from a greenlet).
        Live entries arriving meanwhile are held and released in order."""
        if s.state is not LIVE:
            return
        s.state = SYNC
        s.held = []
        try:
            while s.last_seq < top and s.state is not CLOSED:
                page = self.store.inbox(s.user, s.last_seq, min(REPLAY_PAGE, top - s.last_seq))
                if not page:
                    break
                for e in page:
                    if e.seq > s.last_seq:
                        s.last_seq = e.seq
                        s.send(Out(e.envelope(), e.seq, flags=e.flags))
        except StoreError as e:
            log.warning("catch-up failed session=%s error=%s", s.id, e)
            s.close(503, "store unavailable", reconnect=True)
            return
        self._release(s)

    def fill_gap(self, s) -> None:
        """Called by a live session that saw a seq gap (the bus lost something)."""
        self.metrics.inc("imd_gaps_total")
        gevent.spawn(self._release, s)

    # -- client envelopes -----------------------------------------------------------------
    def on_auth(self, s, env: dict) -> None:
        s.send(error(400, "already authenticated"))

    def on_ping(self, s, env: dict) -> None:
        s.send({"type": "pong"})

    def on_pong(self, s, env: dict) -> None:
        pass

    def on_close(self, s, env: dict) -> None:
        s.end("closed by client")

    def on_presence(self, s, env: dict) -> None:
        s.status = env["status"]
        self.node.presence.changed(s.user)

    def on_ack(self, s, env: dict) -> None:
        seq = env["seq"]
        if seq > s.last_seq:
            raise EnvelopeError(400, f"ack: seq {seq} was never sent to this device", fatal=False)
        self.store.set_cursor(s.user, s.device, seq)

    def on_msg(self, s, env: dict) -> None:
        to, cid = env["to"], env["id"]
        if to == s.user:
            raise EnvelopeError(400, "msg: cannot send a message to yourself", cid, fatal=False)
        if self.policy.contacts_only:
            contacts = self.node.contacts.cached(s.user)
            if contacts is None or to not in contacts:
                raise EnvelopeError(403, f"msg: {to} is not a contact", cid, fatal=False)
        key = (s.user, cid)
        waiting = self._inflight.get(key)
        if waiting is not None:
            # a re-send (e.g. from a new connection after a timeout) of a message still on
            # its way to the store: it gets the same answer, and nothing is stored twice
            waiting.append(s)
            return
        ts = now_ms()
        t0 = time.monotonic()

        def stored(result, err, cid=cid, key=key):
            if err is not None:
                code = 503 if isinstance(err, (StoreError,)) else 500
                self._answer(key, error(code, "message not stored, retry", cid))
                return
            self._ack_latency.observe(time.monotonic() - t0)
            waiting = self._answer(key, _ack(cid, result.mid, result.sender_seq, result.ts))
            origin = waiting[-1].id if waiting else ""
            for e in result.entries:
                self.node.publish_entry(e, origin if e.user == key[0] else "")

        self._inflight[key] = [s]
        try:
            self.store.send_message(s.user, to, cid, env["body"], env.get("ctx"), self.mids.at(ts), ts, stored,
                                    s.message_flags(env))
        except StoreFull:
            # not queued; but a re-send of a message stored before (its ack lost with a
            # connection) must get that ack, not a 503 that says it is not stored
            if self._lookups < LOOKUPS_MAX:
                self._lookups += 1
                gevent.spawn(self._stored_or_refused, key)
            else:
                self._refuse(key)
        except BaseException:
            self._inflight.pop(key, None)
            raise

    def _stored_or_refused(self, key: tuple) -> None:
        """Greenlet: answer the sessions waiting on ``key`` (a message the full write queue
        refused; re-sends meanwhile join it) with the ack of the message stored under that
        client id before, if the store has one, else with a 503."""
        try:
            found = self.store.stored_ack(*key)
        except Exception as e:  # noqa: BLE001  (the store cannot answer: the message is not queued either)
            log.debug("stored-ack lookup failed user=%s error=%s", key[0], e)
            found = None
        except BaseException:
            self._inflight.pop(key, None)     # killed (shutdown): no answer will come
            raise
        finally:
            self._lookups -= 1
        if found is None:
            self._refuse(key)
        else:
            self._answer(key, _ack(key[1], *found))

    def _refuse(self, key: tuple) -> None:
        """503 to the sessions waiting on ``key``: the store cannot take the message now."""
        self.metrics.inc("imd_store_refused_total")
        self._answer(key, error(503, "server busy, retry later", key[1]))

    def _answer(self, key: tuple, env: dict) -> list:
        """Send ``env`` to every session waiting on message ``key``; returns them."""
        waiting = self._inflight.pop(key, ())
        for w in waiting:
            w.send(env)
        return waiting

    def on_read(self, s, env: dict) -> None:
        gevent.spawn(self._read, s, env["peer"], env["seq"])

    def _read(self, s, peer: str, seq: int) -> None:
        ev = {"type": "read", "by": s.user, "seq": seq, "ts": now_ms()}
        try:
            last = self.store.last_sent_to(peer, s.user, seq)
        except StoreError:
            last = None
        if last is not None:
            ev["peer_seq"], ev["mid"], cid = last
            if cid is not None:
                ev["id"] = cid
        self.node.publish_transient(peer, ev)

    def on_sync(self, s, env: dict) -> None:
        gevent.spawn(self._sync, s, env["since"], env.get("limit") or 100)

    def _sync(self, s, since: int, limit: int) -> None:
        try:
            entries = self.store.inbox(s.user, since, limit)
        except StoreError:
            s.send(error(503, "store unavailable, retry"))
            return
        for e in entries:
            s.send(Out(e.envelope(), e.seq, flags=e.flags))
        s.send({"type": "sync", "done": True, "seq": entries[-1].seq if entries else since,
                "more": len(entries) == limit})

    # -- the web tier's operations (block the calling greenlet) -----------------------------
    def post_message(self, sender: str, to: str, body: Any, ctx: Optional[dict],
                     client_id: Optional[str] = None, timeout: float = 30.0) -> dict:
        """Store and deliver a message on behalf of ``sender``; returns the ack fields."""
        if sender == to:
            raise EnvelopeError(400, "cannot send a message to oneself", fatal=False)
        mid = self.mids()
        res = AsyncResult()
        try:
            self.store.send_message(sender, to, client_id, body, ctx, mid, now_ms(),
                                    lambda r, e: res.set_exception(e) if e else res.set(r))
        except StoreFull:
            # as on_msg: a re-send of an id stored before gets that message's ack
            found = None if client_id is None else self.store.stored_ack(sender, client_id)
            if found is None:
                raise
            mid, seq, ts = found
            return {"mid": mid, "seq": seq, "ts": ts}
        r = res.get(timeout=timeout)
        for e in r.entries:
            self.node.publish_entry(e)
        return {"mid": r.mid, "seq": r.sender_seq, "ts": r.ts}

    def post_notices(self, users, role: Optional[str], kind: str, body: Any,
                     timeout: Optional[float] = None) -> list:
        """Append a reminder to the inboxes of ``users`` (or of a role, or of everyone
        when both are None) and deliver it; returns the stored entries. Waits for the
        store up to ``timeout`` s: by default 60 for a list of users, 600 for a role or
        everyone (a row per user: a million take ~40 s in SQLite here)."""
        if timeout is None:
            timeout = 60.0 if users is not None else 600.0
        res = AsyncResult()
        self.store.add_notices(users, role, kind, body, self.mids, now_ms(),
                               lambda r, e: res.set_exception(e) if e else res.set(r))
        entries = res.get(timeout=timeout)
        for i, e in enumerate(entries, 1):
            self.node.publish_entry(e)
            if i % PUBLISH_SLICE == 0:
                gevent.sleep(0)     # let the bus drain a reminder to many users as it goes
        self.metrics.inc("imd_notices_total", value=len(entries))
        return entries

    def kick(self, user: str, reason: str = "kicked") -> int:
        return self.node.kick(user, reason)

    # -- for protocols: what the core does not carry, and reads (see each docstring) -------------
    def publish_transient(self, user: str, env: dict, device: Optional[str] = None,
                          protocol: Optional[str] = None) -> None:
        """Send a non-stored envelope to ``user``'s sessions on every node (optionally
        one device, one protocol); at most once, never blocks."""
        self.node.publish_transient(user, env, device, protocol)

    def device_elsewhere(self, user: str, device: str) -> bool:
        """Whether ``user``'s ``device`` is connected to another node (blocks)."""
        return self.node.device_elsewhere(user, device)

    def credentials(self, user: str) -> Optional[dict]:
        """The user's stored SCRAM credentials (:mod:`imd.passwords`), None when no
        password is set. Blocks (a store read); raises StoreError."""
        return self.store.password(user)

    def check_password(self, user: str, password: str) -> bool:
        """Whether ``password`` is the one set for ``user``. Blocks (a store read,
        then a PBKDF2 run); raises StoreError."""
        return passwords.verify_plain(self.store.password(user), password)

    def set_password(self, user: str, password: str) -> None:
        """Store the SCRAM keys of ``password`` for ``user`` (never the password);
        costs the CPU a few ms, then written in a batch like every fire-and-forget write."""
        self.store.set_password(user, passwords.scram_credentials(password))

    def role_of(self, user: str) -> Optional[str]:
        """The role the store has seen ``user`` log in with, None if unknown. Blocks."""
        info = self.store.users_info([user]).get(user)
        return info.role if info is not None else None

    def history(self, user: str, since: int, limit: int) -> list:
        """The user's inbox entries after ``since`` (at most ``limit``). Blocks."""
        return self.store.inbox(user, since, limit)

    def last_seq(self, user: str) -> int:
        """The top of the user's inbox. Blocks."""
        return self.store.last_seq(user)

    def contacts_of(self, user: str) -> set:
        """The user's contacts (loaded from the store if not in memory). Blocks."""
        return self.node.contacts.get(user)

    def cached_contacts(self, user: str) -> Optional[set]:
        """The user's contacts if they are in memory (a connected user's are), else None."""
        return self.node.contacts.cached(user)

    def add_contact(self, user: str, contact: str) -> None:
        self.node.contact_changed("add", user, contact)

    def remove_contact(self, user: str, contact: str) -> None:
        self.node.contact_changed("remove", user, contact)
