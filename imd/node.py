"""Node: the sessions connected to this process, and the engine's handler.

The node knows no protocol. It keeps the local sessions by user (the session
itself for a user with one, a list for a user with several: most users have
one, and a one-element list would cost 80 bytes each), subscribes
the engine to a user's bus channel while that user has a session here, and
turns bus events into deliveries: inbox entries (in seq order, through
:meth:`Session.deliver`; to several sessions through each protocol's
:meth:`Session.fanout` loop, which frames the entry once), presence, read receipts, transient envelopes and
kicks. Publishing goes through the engine even on a single node, so one node
runs exactly the code a cluster runs.

Everything here runs in the hub and never blocks, except where a docstring
says a method blocks.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from itertools import groupby
from typing import Optional

import gevent
from gevent.event import Event as GEvent

from .contacts import Contacts
from .engine.base import Event, user_channel
from .envelope import Out
from .net.conn import bulk_writes
from .presence import Presence
from .session import LIVE
from .store.base import LAST_SEQS_MAX, Entry, StoreError, entry_envelope as envelope_of

log = logging.getLogger("imd.node")

KICK_WAIT = 2.0          # seconds a kick waits for the other nodes' counts


def node_channel(node_id: str) -> str:
    """The bus channel only node ``node_id`` subscribes to (answers meant for it)."""
    return "node:" + node_id


class _KickTally:
    """The answers to one cluster-wide kick: sessions closed elsewhere, the nodes
    still expected to answer, and an event set once none is."""

    __slots__ = ("closed", "waiting", "done")

    def __init__(self, waiting: set) -> None:
        self.closed = 0
        self.waiting = waiting
        self.done = GEvent()


def entry_data(entry: Entry) -> dict:
    """The bus form of an entry (``flags`` only when set: most messages have none)."""
    data = {"user": entry.user, "seq": entry.seq, "mid": entry.mid, "kind": entry.kind,
            "body": entry.body, "ts": entry.ts, "sender": entry.sender,
            "recipient": entry.recipient, "ctx": entry.ctx, "notice_kind": entry.notice_kind,
            "client_id": entry.client_id}
    if entry.flags:
        data["flags"] = entry.flags
    return data


def entry_envelope(d: dict) -> dict:
    """The client envelope of an entry in its bus form (:func:`entry_data`)."""
    return envelope_of(d["kind"], d["mid"], d["seq"], d.get("sender"), d.get("recipient"), d["body"],
                       d["ts"], d.get("ctx"), d.get("notice_kind"), d.get("client_id"))


class Node:
    def __init__(self, node_id: str, engine, store, grace: float) -> None:
        self.id = node_id
        self.engine = engine
        self.store = store
        self.sessions: dict = {}          # user → Session, or a list of 2+ Sessions; see sessions_of
        self.contacts = Contacts(store)
        self.presence = Presence(self, grace)
        self.comet_handlers = {}          # channel → callable(event), for comet channels
        self.delivery_latency = None      # a metrics Histogram, set by the router
        self._kicks: dict[str, _KickTally] = {}
        self._kick_n = 0
        self._handlers: dict = {}         # event kind → bound on_<kind>, filled on first use

    def start(self) -> None:
        self.engine.start(self.id, self.on_event)
        self.engine.subscribe(node_channel(self.id))
        self.presence.start()

    def stop(self) -> None:
        self.presence.stop()
        self.engine.stop()

    # -- local sessions ---------------------------------------------------------
    def sessions_of(self, user: str) -> tuple:
        """The user's local sessions (a snapshot: safe to iterate while they close)."""
        v = self.sessions.get(user)
        if v is None:
            return ()
        return tuple(v) if type(v) is list else (v,)

    def add_session(self, s) -> None:
        user = s.user
        v = self.sessions.get(user)
        if v is None:
            self.sessions[user] = s
            self.engine.subscribe_user(user)
        elif type(v) is list:
            v.append(s)
        else:
            self.sessions[user] = [v, s]
        self.presence.changed(user)

    def remove_session(self, s) -> None:
        user = s.user
        v = self.sessions.get(user)
        if v is s:
            del self.sessions[user]
            self.engine.unsubscribe_user(user)
        elif type(v) is list and s in v:
            v.remove(s)
            if len(v) == 1:
                self.sessions[user] = v[0]
        else:
            return
        self.presence.changed(user)

    def all_sessions(self):
        for v in self.sessions.values():
            if type(v) is list:
                yield from v
            else:
                yield v

    def count(self) -> int:
        return sum(len(v) if type(v) is list else 1 for v in self.sessions.values())

    # -- publishing (never blocks) ------------------------------------------------
    def publish_entry(self, entry: Entry, origin: str = "") -> None:
        data = entry_data(entry)
        if origin:
            data["origin"] = origin
        self.engine.publish(user_channel(entry.user), Event("entry", data))

    def publish_transient(self, user: str, env: dict, device: Optional[str] = None,
                          protocol: Optional[str] = None) -> None:
        """A non-stored envelope for the user's sessions on every node: all of them,
        or only those of one ``device`` and/or one ``protocol`` (``Session.protocol``)."""
        data = {"user": user, "env": env}
        if device is not None:
            data["device"] = device
        if protocol is not None:
            data["protocol"] = protocol
        self.engine.publish(user_channel(user), Event("transient", data))

    def device_elsewhere(self, user: str, device: str) -> bool:
        """Whether another node has a session of ``user``'s ``device`` (per the
        cluster presence records, which list devices). Blocks: a Redis round trip."""
        return any(r.get("node") != self.id and device in r.get("devices", ())
                   for r in self.engine.presence_get([user]).get(user, ()))

    def kick(self, user: str, reason: str = "kicked", wait: float = KICK_WAIT) -> int:
        """Close the user's sessions on every node; returns how many were closed in
        the cluster. Blocks the calling greenlet: one presence read (the nodes that
        hold the user's sessions), then until each of those nodes has answered
        with its count, at most ``wait`` seconds (a node that answers later is
        not counted; its sessions are closed all the same)."""
        here = len(self.sessions_of(user))
        others = {rec["node"] for rec in self.engine.presence_get([user]).get(user, ())
                  if rec.get("node") and rec["node"] != self.id}
        self._kick_n += 1
        ref = f"{self.id}:{self._kick_n}"
        tally = self._kicks[ref] = _KickTally(others)
        try:
            self.engine.publish(user_channel(user), Event("kick", {"user": user, "reason": reason,
                                                                   "ref": ref, "reply_to": self.id}))
            if others:
                tally.done.wait(wait)
                if tally.waiting:
                    log.warning("kick user=%s: no count from nodes %s within %.0fs",
                                user, sorted(tally.waiting), wait)
        finally:
            del self._kicks[ref]
        return here + tally.closed

    def contact_changed(self, op: str, user: str, contact: str) -> None:
        """Add or remove a mutual contact: memory at once, store in a batch, other
        nodes through the bus; both users' sessions get a ``contacts`` envelope and,
        on add, each other's presence (exchanged in a greenlet: it reads)."""
        (self.contacts.add if op == "add" else self.contacts.remove)(user, contact)
        for a, b in ((user, contact), (contact, user)):
            self.engine.publish(user_channel(a), Event("contacts", {"op": op, "user": a, "contact": b}))
        if op == "add":
            gevent.spawn(self.presence.exchange, user, contact)

    # -- the engine's handler -------------------------------------------------------
    def on_event(self, channel: str, event: Event) -> None:
        handler = self._handlers.get(event.kind)
        if handler is None:
            handler = getattr(self, "on_" + event.kind, None)
            if handler is None:
                log.warning("unknown bus event kind=%s channel=%s", event.kind, channel)
                return
            self._handlers[event.kind] = handler
        try:
            handler(channel, event.data)
        except Exception:
            log.exception("bus event failed kind=%s channel=%s", event.kind, channel)

    def on_entry(self, channel: str, d: dict) -> None:
        v = self.sessions.get(d["user"])
        if v is None:
            return
        origin = d.get("origin")
        if origin and type(v) is not list and v.state is LIVE and d["seq"] == v.last_seq + 1 and origin == v.id:
            v.last_seq += 1     # the sender's own copy, next in order: Session.deliver's rule, no Out
            return
        # the envelope is made only if a session sends it (not for the sender's own copy)
        out = Out(None, d["seq"], origin or "", d.get("flags", 0), partial(entry_envelope, d))
        if type(v) is list:
            sessions = tuple(v)
            n = 0
            with bulk_writes(len(sessions)):
                for cls, group in groupby(sessions, type):     # a per-protocol fan-out loop
                    n += cls.fanout(group, out)
            s = sessions[0]
        else:
            n = v.deliver(out)
            s = v
        if n:
            s.router.metrics.out(d["kind"], n)      # the envelope's type
            if self.delivery_latency is not None:
                self.delivery_latency.observe(max(0.0, time.time() - d["ts"] / 1000.0))

    def on_transient(self, channel: str, d: dict) -> None:
        sessions = self.sessions_of(d["user"])
        if not sessions:
            return
        out = Out(d["env"])
        device, protocol = d.get("device"), d.get("protocol")
        with bulk_writes(len(sessions)):
            for s in sessions:
                if (device is None or s.device == device) and (protocol is None or s.protocol == protocol):
                    s.send(out)

    def on_presence(self, channel: str, d: dict) -> None:
        user = channel[2:]
        sessions = self.sessions_of(user)
        if not sessions:
            return
        contacts = self.contacts.cached(user)
        if contacts is not None and d["user"] not in contacts:
            return              # removed meanwhile
        out = Out({"type": "presence", "user": d["user"], "status": d["status"],
                   "platforms": d["platforms"], "last_seen": d["last_seen"]})
        with bulk_writes(len(sessions)):
            for s in sessions:
                s.send(out)

    def on_kick(self, channel: str, d: dict) -> None:
        sessions = self.sessions_of(d["user"])
        for s in sessions:
            s.close(4001, d.get("reason") or "kicked", reconnect=False)
        reply_to = d.get("reply_to")
        if reply_to and reply_to != self.id:
            self.engine.publish(node_channel(reply_to),
                                Event("kicked", {"ref": d["ref"], "node": self.id, "closed": len(sessions)}))

    def on_kicked(self, channel: str, d: dict) -> None:
        """Another node's count for a kick this node asked for."""
        tally = self._kicks.get(d["ref"])
        if tally is None:
            return                  # answered after the kick stopped waiting
        tally.closed += d["closed"]
        tally.waiting.discard(d["node"])
        if not tally.waiting:
            tally.done.set()

    def on_contacts(self, channel: str, d: dict) -> None:
        self.contacts.apply(d["op"], d["user"], d["contact"])
        sessions = self.sessions_of(d["user"])
        if sessions:
            out = Out({"type": "contacts", "op": d["op"], "contact": d["contact"]})
            for s in sessions:
                s.send(out)

    # -- events the engine makes locally (see imd/engine/base.py) ------------------------
    def on_resync(self, channel: str, d: dict) -> None:
        """The bus was down: publications may be lost; bring every live session
        up to its inbox's top from the store (in a greenlet)."""
        gevent.spawn(self._resync)

    def _resync(self) -> None:
        """Read the inbox tops of the local users LAST_SEQS_MAX at a time (one store
        query each) and catch up every live session that is behind (blocks)."""
        users = list(self.sessions)
        caught = queries = 0
        for i in range(0, len(users), LAST_SEQS_MAX):
            batch = [u for u in users[i:i + LAST_SEQS_MAX] if u in self.sessions]
            if not batch:
                continue
            try:
                tops = self.store.last_seqs(batch)
            except StoreError as e:
                log.warning("resync: store unavailable (%s); gaps wait for the next entry", e)
                return
            queries += 1
            for user, top in tops.items():
                for s in self.sessions_of(user):
                    if s.state is LIVE and s.last_seq < top:
                        caught += 1
                        s.router.catch_up(s, top)
            gevent.sleep(0)
        log.info("resync done users=%d sessions_behind=%d store_queries=%d", len(users), caught, queries)

    def on_nodes_lost(self, channel: str, d: dict) -> None:
        log.warning("nodes lost %s: %d users lost their presence there", d["nodes"], len(d["users"]))
        self.presence.lost(d["users"])

    def on_presence_restore(self, channel: str, d: dict) -> None:
        self.presence.restore(d["users"])

    def on_comet(self, channel: str, d: dict) -> None:
        handler = self.comet_handlers.get(channel)
        if handler is not None:
            handler(d)
