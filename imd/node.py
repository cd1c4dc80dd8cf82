"""Node: the sessions connected to this process, and the engine's handler.

The node knows no protocol. It keeps the local sessions by user, subscribes
the engine to a user's bus channel while that user has a session here, and
turns bus events into deliveries: inbox entries (in seq order, through
:meth:`Session.deliver`), presence, read receipts, transient envelopes and
kicks. Publishing goes through the engine even on a single node, so one node
runs exactly the code a cluster runs.

Everything here runs in the hub and never blocks, except where a docstring
says a method blocks.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import gevent

from .contacts import Contacts
from .engine.base import Event, user_channel
from .envelope import Out
from .presence import Presence
from .session import LIVE
from .store.base import Entry, StoreError

log = logging.getLogger("imd.node")


def entry_data(entry: Entry) -> dict:
    """The bus form of an entry (``flags`` only when set: most messages have none)."""
    data = {"user": entry.user, "seq": entry.seq, "mid": entry.mid, "kind": entry.kind,
            "body": entry.body, "ts": entry.ts, "sender": entry.sender,
            "recipient": entry.recipient, "ctx": entry.ctx, "notice_kind": entry.notice_kind,
            "client_id": entry.client_id}
    if entry.flags:
        data["flags"] = entry.flags
    return data


class Node:
    def __init__(self, node_id: str, engine, store, grace: float) -> None:
        self.id = node_id
        self.engine = engine
        self.store = store
        self.sessions: dict[str, list] = {}
        self.contacts = Contacts(store)
        self.presence = Presence(self, grace)
        self.comet_handlers = {}          # channel → callable(event), for comet channels
        self.delivery_latency = None      # a metrics Histogram, set by the router

    def start(self) -> None:
        self.engine.start(self.id, self.on_event)
        self.presence.start()

    def stop(self) -> None:
        self.presence.stop()
        self.engine.stop()

    # -- local sessions ---------------------------------------------------------
    def add_session(self, s) -> None:
        lst = self.sessions.get(s.user)
        if lst is None:
            self.sessions[s.user] = [s]
            self.engine.subscribe(user_channel(s.user))
        else:
            lst.append(s)
        self.presence.changed(s.user)

    def remove_session(self, s) -> None:
        lst = self.sessions.get(s.user)
        if not lst or s not in lst:
            return
        lst.remove(s)
        if not lst:
            del self.sessions[s.user]
            self.engine.unsubscribe(user_channel(s.user))
        self.presence.changed(s.user)

    def all_sessions(self):
        for lst in self.sessions.values():
            yield from lst

    def count(self) -> int:
        return sum(len(v) for v in self.sessions.values())

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

    def kick(self, user: str, reason: str = "kicked") -> int:
        """Close the user's sessions on every node; returns how many were here."""
        n = len(self.sessions.get(user, ()))
        self.engine.publish(user_channel(user), Event("kick", {"user": user, "reason": reason}))
        return n

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
        handler = getattr(self, "on_" + event.kind, None)
        if handler is None:
            log.warning("unknown bus event kind=%s channel=%s", event.kind, channel)
            return
        try:
            handler(channel, event.data)
        except Exception:
            log.exception("bus event failed kind=%s channel=%s", event.kind, channel)

    def on_entry(self, channel: str, d: dict) -> None:
        sessions = self.sessions.get(d["user"])
        if not sessions:
            return
        entry = Entry(d["user"], d["seq"], d["mid"], d["kind"], d["body"], d["ts"], d.get("sender"),
                      d.get("recipient"), d.get("ctx"), d.get("notice_kind"), d.get("client_id"),
                      d.get("flags", 0))
        out = Out(entry.envelope(), entry.seq, d.get("origin", ""), entry.flags)
        for s in list(sessions):
            s.deliver(out)
        if self.delivery_latency is not None:
            self.delivery_latency.observe(max(0.0, time.time() - entry.ts / 1000.0))

    def on_transient(self, channel: str, d: dict) -> None:
        sessions = self.sessions.get(d["user"])
        if not sessions:
            return
        out = Out(d["env"])
        device, protocol = d.get("device"), d.get("protocol")
        for s in list(sessions):
            if (device is None or s.device == device) and (protocol is None or s.protocol == protocol):
                s.send(out)

    def on_presence(self, channel: str, d: dict) -> None:
        user = channel[2:]
        sessions = self.sessions.get(user)
        if not sessions:
            return
        contacts = self.contacts.cached(user)
        if contacts is not None and d["user"] not in contacts:
            return              # removed meanwhile
        out = Out({"type": "presence", "user": d["user"], "status": d["status"],
                   "platforms": d["platforms"], "last_seen": d["last_seen"]})
        for s in list(sessions):
            s.send(out)

    def on_kick(self, channel: str, d: dict) -> None:
        for s in list(self.sessions.get(d["user"], ())):
            s.close(4001, d.get("reason") or "kicked", reconnect=False)

    def on_contacts(self, channel: str, d: dict) -> None:
        self.contacts.apply(d["op"], d["user"], d["contact"])
        sessions = self.sessions.get(d["user"])
        if sessions:
            out = Out({"type": "contacts", "op": d["op"], "contact": d["contact"]})
            for s in list(sessions):
                s.send(out)

    # -- events the engine makes locally (see imd/engine/base.py) ------------------------
    def on_resync(self, channel: str, d: dict) -> None:
        """The bus was down: publications may be lost; bring every live session
        up to its inbox's top from the store (in a greenlet, a user at a time)."""
        gevent.spawn(self._resync)

    def _resync(self) -> None:
        users = list(self.sessions)
        caught = 0
        for i, user in enumerate(users):
            sessions = self.sessions.get(user)
            if not sessions:
                continue
            try:
                top = self.store.last_seq(user)
            except StoreError as e:
                log.warning("resync: store unavailable (%s); gaps wait for the next entry", e)
                return
            for s in list(sessions):
                if s.state is LIVE and s.last_seq < top:
                    caught += 1
                    s.router.catch_up(s, top)
            if i % 100 == 99:
                gevent.sleep(0)
        log.info("resync done users=%d sessions_behind=%d", len(users), caught)

    def on_nodes_lost(self, channel: str, d: dict) -> None:
        log.warning("nodes lost %s: %d users lost their presence there", d["nodes"], len(d["users"]))
        self.presence.lost(d["users"])

    def on_presence_restore(self, channel: str, d: dict) -> None:
        self.presence.restore(d["users"])

    def on_comet(self, channel: str, d: dict) -> None:
        handler = self.comet_handlers.get(channel)
        if handler is not None:
            handler(d)
