"""XmppSession: one XMPP c2s connection as a core Session.

The session is the connection's handler (``on_data``/``on_close`` from
:class:`imd.net.conn.Conn`, io watchers, no greenlet while idle), drives the
:class:`StreamParser`, negotiates the stream (:class:`Negotiation`), then maps
stanzas onto the core and core envelopes onto stanzas:

* ``<message>`` chat/normal with a body → a core ``msg`` (stored, in the
  recipient's inbox, delivered to all their devices whatever the protocol);
  an XEP-0184 receipt request is stored with it (the message's flags) and
  rendered again to XMPP recipients, live, offline and from the archive;
  body-less messages (chat states, receipts, markers) and headlines go to the
  recipient's XMPP resources on every node, unstored (:mod:`relay`);
* ``<presence/>`` → core presence (``online``/``away``); it is also sent to
  the user's own XMPP resources on every node; subscription requests are
  answered from the contact list (contacts are managed by the web tier);
* ``<iq>`` → server answers (:mod:`imd.proto.xmpp.iq`) or routing to a full
  JID on any node;
* an XEP-0333 ``<displayed/>`` for a message it got from the inbox → a core
  ``read``; a core ``read`` → ``<displayed/>``.

Until the client sends initial presence (RFC 6121 §4.2) with priority ≥ 0,
inbox entries and contacts' presence are held; then offline entries go out
with an XEP-0203 delay stamp, and every entry written counts as received
(an ``ack`` for the device, XEP-0160 semantics without stream management).

Everything runs in the hub and never blocks, except the greenlets spawned by
negotiation and by IQs that read the store.
"""

from __future__ import annotations

import itertools
import logging

import gevent

from ...envelope import CLIENT_ID_RE, RECEIPT_REQUESTED, EnvelopeError, Out, check_body, validate
from ...net.conn import Conn
from ...net.tls import TlsSocket
from ...session import CLOSED, Session
from . import iq as iqmod
from . import jid as jidmod
from . import relay, render
from .negotiate import Login, Negotiation
from .parser import Dormant, StreamError, StreamParser
from .sm import MOD, SM_NS, StreamManagement
from .stanza import STREAM_CLOSE, Element, error_reply

log = logging.getLogger("imd.xmpp")

_stanza_ids = itertools.count(1)
MAX_HELD = 10000          # entries held before initial presence (the router sends at most this many offline)
MAX_PENDING = 256         # messages awaiting the store's ack, for error replies
MAX_RECENT = 8            # messages remembered for read markers (the newest ones get marked)
MARKERS_NS = "urn:xmpp:chat-markers:0"

_CLOSE_CONDITIONS = {408: "connection-timeout", 4001: "policy-violation", 1001: "system-shutdown",
                     503: "internal-server-error", 500: "internal-server-error"}


class XmppSession(StreamManagement, Negotiation, Session):
    __slots__ = ("proto", "conn", "parser", "login", "resource", "available", "priority", "interested",
                 "waiting", "presences", "attached_top", "acked", "ack_to", "ack_scheduled", "pending",
                 "sm", "carbons", "recent")

    protocol = "xmpp"

    def __init__(self, proto, sock) -> None:
        super().__init__(proto.router)
        self.proto = proto
        self.parser = StreamParser(self)   # between reads of a bound stream: a Dormant (on_data)
        self.login = Login(isinstance(sock, TlsSocket))   # until bound; secure on the direct-TLS port
        self.resource = None          # once bound (the full JID is made from it on demand)
        self.available = False
        self.priority = 0
        self.interested = False
        self.waiting = None           # inbox Outs held until initial presence (a list once any)
        self.presences = None         # contact → latest presence envelope, until initial presence
        self.attached_top = None      # the user's inbox seq at attach: entries up to it are "offline"
        self.acked = self.ack_to = 0
        self.ack_scheduled = False
        self.pending = None           # core client id → (stanza id, to) of messages not yet acked
        self.sm = None                # XEP-0198 state (sm.SmState), once enabled
        self.carbons = False          # XEP-0280 enabled on this resource
        self.recent = None            # (sender, stanza id) → inbox seq of the last messages written (markers)
        self.conn = Conn(sock, self, proto.router.limits.send_buffer)

    # -- Conn's handler protocol ------------------------------------------------------
    def on_data(self, data: bytes) -> None:
        """Parse a read. A bound stream holds no parser between reads that end
        between stanzas: it is given up for the shared Dormant (``hibernate``),
        which gives one back for the next read (a spare: no new expat parser)."""
        self.touch()
        parser = self.parser
        if parser.__class__ is Dormant:
            parser = self.parser = parser.wake(self)
        try:
            parser.feed(data)
        except StreamError as e:
            self.stream_error(e.condition, e.text)
            return
        if self.parser is parser and self.state is not CLOSED:   # (not moved to a resumed session)
            dormant = parser.hibernate()
            if dormant is not None:
                self.parser = dormant

    def on_close(self, reason: str) -> None:
        self.ack_now()             # the client may log in again at once (on any node): no re-sends
        if self.resource is not None and self.sm_detach():
            return                                # XEP-0198: wait for a resume
        self.finish(reason)

    def finish(self, reason: str) -> None:
        """The session ends: leave the resource table, tell own resources, detach from the core."""
        self.sm_unresumable()
        self.ack_now()                            # what was written counts as received now
        if self.resource is not None:
            self.proto.unbound(self)
            if self.available:
                self.available = False
                relay.own_presence(self, Element("presence", attrs={"type": "unavailable", "from": self.full_jid}))
        self.closed(reason)

    # -- parser callbacks ------------------------------------------------------------------
    def on_stream_end(self) -> None:
        self.sm_unresumable()                     # a clean close: no resumption
        self.conn.write(STREAM_CLOSE)
        self.conn.close("stream closed by client")

    def on_stanza(self, el: Element) -> None:
        if self.resource is None:
            self.negotiate(el)
            return
        if self.state is CLOSED:
            return
        tag = el.tag
        if el.ns == SM_NS:
            self.sm_nonza(el)
            return
        sm = self.sm
        if sm is not None and tag in ("message", "presence", "iq"):
            sm.h_in = (sm.h_in + 1) % MOD
        if tag == "message":
            self.on_message(el)
        elif tag == "presence":
            self.on_presence(el)
        elif tag == "iq":
            iqmod.handle(self, el)
        elif el.ns == "urn:xmpp:csi:0":
            pass                                  # XEP-0352 accepted; nothing is held back
        else:
            raise StreamError("unsupported-stanza-type", f"<{tag}> is not supported")

    def bare(self) -> str:
        return f"{self.user}@{self.proto.domain}"

    @property
    def full_jid(self):
        """``user@domain/resource`` once bound, else None (made on demand: not kept per session)."""
        resource = self.resource
        return None if resource is None else f"{self.user}@{self.proto.domain}/{resource}"

    # -- Session's protocol part ----------------------------------------------------------------
    def write_env(self, env: dict) -> None:
        """The store's ``ack`` of one of our messages (one per message sent) only
        forgets its pending entry: no :class:`Out` is made for it (acks come only as dicts)."""
        if env["type"] == "ack":
            self.forget_pending(env["id"])
        else:
            self.write_out(Out(env))

    def write_out(self, out) -> None:
        env = out.env
        t = env["type"]
        if t == "msg" or t == "notice":
            if not self.receiving():
                if self.waiting is None:
                    self.waiting = [out]
                elif len(self.waiting) < MAX_HELD:
                    self.waiting.append(out)
                return
            self.write_entry(out)
        elif t == "presence":
            if not self.available:
                if self.presences is None:
                    self.presences = {}
                self.presences[env["user"]] = env
                return
            self.write(render.presence(env, self.proto.domain, self.full_jid))
        elif t == "auth":
            self.attached_top = env["seq"]
            if self.receiving():
                gevent.get_hub().loop.run_callback(self.release_waiting)
        elif t == "error":
            self.on_core_error(env)
        elif t == "contacts":
            iqmod.roster_push(self, env["op"], env["contact"])
        elif t == "read":
            self.write_read(env)
        elif t == relay.TYPE:
            relay.deliver(self, env)
        elif t == "close":
            cond = _CLOSE_CONDITIONS.get(env.get("code"), "policy-violation")
            self.stream_error(cond, env.get("reason", ""))
        elif t == "ping":
            ping = Element("iq", attrs={"type": "get", "id": f"ping-{next(_stanza_ids)}",
                                        "from": self.proto.domain, "to": self.full_jid})
            ping.add("ping", iqmod.PING_NS)
            self.write(ping)
        # pong, sync, and any other envelope type: nothing to render

    def end(self, reason: str) -> None:
        if self.sm_detached():
            self.sm_finish(reason)
        elif not self.conn.closed:
            self.conn.write(STREAM_CLOSE)
            self.conn.close(reason)

    def drain(self) -> None:
        self.conn.wait_drained(self.conn.limit // 2)

    # -- inbox entries ---------------------------------------------------------------------------
    def receiving(self) -> bool:
        """Whether inbox entries go out now: available with priority ≥ 0 (RFC 6121 §8.5.2)."""
        return self.available and self.priority >= 0 and self.attached_top is not None

    def write_entry(self, out) -> None:
        env, seq = out.env, out.seq
        is_msg = env["type"] == "msg"
        if is_msg and env["from"] == self.user:    # sent from another device of this user
            if self.carbons:
                self.write(render.sent_carbon(env, self.proto.domain, self.full_jid,
                                              out.flags & RECEIPT_REQUESTED), seq)
            else:
                self.note_written(seq)
            return
        top = self.attached_top
        delayed = top is not None and 0 < seq <= top
        domain = self.proto.domain
        self.write_bytes(render.message_bytes(env, domain, f"{self.user}@{domain}", delayed,
                                              out.flags & RECEIPT_REQUESTED), seq)
        if is_msg:
            recent = self.recent
            if recent is None:
                recent = self.recent = {}
            elif len(recent) >= MAX_RECENT:
                del recent[next(iter(recent))]
            recent[(env["from"], render.stanza_id(env))] = seq

    def release_waiting(self) -> None:
        if not self.receiving() or self.state is CLOSED:
            return
        waiting, self.waiting = self.waiting, None
        for out in sorted(waiting or (), key=lambda o: o.seq):
            self.write_entry(out)

    def note_written(self, seq: int) -> None:
        """An entry reached this device: acknowledge it to the core with the node's
        next gathered acks (``XmppProtocol.ack_later``: within ACK_DELAY), or when
        the stream ends (error, close, end of the session), whichever is first."""
        if seq > self.ack_to:
            self.ack_to = seq
            if not self.ack_scheduled:
                self.ack_scheduled = True
                self.proto.ack_later(self)

    def ack_now(self) -> None:
        """Send the gathered ack now, if one is waiting (the stream ends)."""
        if self.ack_scheduled:
            self.send_ack()

    def send_ack(self) -> None:
        """Tell the core (the store's cursor) the newest entry written, if not told yet."""
        self.ack_scheduled = False
        seq = min(self.ack_to, self.last_seq)
        if seq > self.acked and self.state is not CLOSED:
            self.acked = seq
            self.router.receive(self, {"type": "ack", "seq": seq})

    # -- messages ----------------------------------------------------------------------------------
    def on_message(self, msg: Element) -> None:
        attrs = msg.attrs
        mtype = attrs.get("type", "normal")
        if mtype == "error":
            return
        to = self.target(msg)
        if to is None:
            return
        user = jidmod.local_user(to, self.proto.domain)
        if user is None:
            if mtype != "headline":
                self.write(error_reply(msg, "service-unavailable", by=self.proto.domain))
            return
        if mtype == "groupchat":
            self.write(error_reply(msg, "service-unavailable", "no group chat here", by=self.proto.domain))
            return
        body, ctx, receipt = render.message_parts(msg)
        if not body and self.read_marker(msg, user):
            return
        if not body or mtype == "headline" or user == self.user:
            attrs["from"] = self.full_jid
            self.proto.route(user, to.resource, msg, self)
            return
        # a stored message: its stanza is not passed on, so no full JID is stamped on it
        # unless an error reply names it; the server-made id is ``x.<session id>.<n>``
        sid = attrs.get("id", "")
        cid = sid if CLIENT_ID_RE.fullmatch(sid) else f"x.{self.id}.{next(_stanza_ids)}"
        env = {"type": "msg", "id": cid, "to": user, "body": body}
        if ctx:
            env["ctx"] = ctx
        if receipt:
            env["flags"] = RECEIPT_REQUESTED      # stored with it: the recipient is asked too
        max_body = self.router.limits.max_body
        try:
            if ctx is None and len(cid) <= 64:    # id, to and a non-empty str body are valid by construction
                if len(body) * 4 > max_body:      # else its UTF-8 (≤ 4 bytes a character) fits
                    check_body(body, max_body, "msg", cid)
            else:
                validate(env, max_body)
        except EnvelopeError as e:
            attrs["from"] = self.full_jid
            self.write(error_reply(msg, "not-acceptable" if e.code == 413 else "bad-request", e.reason,
                                   by=self.proto.domain))
            return
        pending = self.pending
        if pending is None:
            self.pending = {cid: (sid, attrs.get("to"))}
        elif len(pending) < MAX_PENDING:
            pending[cid] = (sid, attrs.get("to"))
        self.router.receive(self, env)

    def message_flags(self, env: dict) -> int:
        """The flags ``on_message`` put in the core ``msg`` it built from a stanza."""
        return env.get("flags", 0)

    def forget_pending(self, cid):
        """The (stanza id, to) kept for client id ``cid``, removed; None if none."""
        pending = self.pending
        if pending is None:
            return None
        sent = pending.pop(cid, None)
        if not pending:
            self.pending = None           # an idle session keeps no empty dict
        return sent

    def target(self, stanza: Element):
        """The parsed ``to`` (own bare JID when absent); None after answering jid-malformed."""
        to = stanza.get("to")
        if not to:
            return jidmod.JID(self.user, self.proto.domain, "")
        try:
            return jidmod.parse(to)
        except jidmod.JIDError:
            if stanza.get("type") not in ("error", "result"):
                self.write(error_reply(stanza, "jid-malformed", by=self.proto.domain))
            return None

    def on_core_error(self, env: dict) -> None:
        """The router refused one of our messages (e.g. 503 store busy, 403 not a contact)."""
        sent = self.forget_pending(env.get("id"))
        if sent is None:
            log.debug("core error for session %s: %s", self.id, env)
            return
        sid, to = sent
        code = env.get("code", 500)
        cond = {403: "forbidden", 413: "not-acceptable", 400: "bad-request", 429: "policy-violation",
                503: "resource-constraint"}.get(code, "internal-server-error")
        self.write(_message_error(sid, to, self.full_jid, cond, env.get("reason", "")))

    def read_marker(self, msg: Element, peer: str) -> bool:
        """An XEP-0333 ``<displayed/>`` for a message this resource got from the inbox
        becomes a core ``read`` (the peer sees it on any protocol). True if it did."""
        marker = msg.find("displayed", MARKERS_NS)
        seq = self.recent.get((peer, marker.get("id"))) if marker is not None and self.recent else None
        if seq is None or peer == self.user:
            return False
        self.router.receive(self, {"type": "read", "peer": peer, "seq": seq})
        return True

    def write_read(self, env: dict) -> None:
        """A read receipt from a peer → XEP-0333 ``<displayed/>`` for the newest message
        read, named by the id this user's client gave it (else its mid)."""
        if not env.get("mid") or not self.available:
            return
        msg = Element("message", attrs={"type": "chat", "from": f"{env['by']}@{self.proto.domain}",
                                        "to": self.full_jid})
        msg.add("displayed", MARKERS_NS, {"id": render.stanza_id(env)})
        self.write(msg)

    # -- presence ------------------------------------------------------------------------------------
    def on_presence(self, pres: Element) -> None:
        ptype = pres.get("type")
        to = pres.get("to")
        if to:
            target = self.target(pres)
            if target is None:
                return
            user = jidmod.local_user(target, self.proto.domain)
            if ptype in ("subscribe", "subscribed", "unsubscribe", "unsubscribed", "probe"):
                if user is not None:
                    iqmod.subscription(self, user, ptype)
                return
            if user is not None and ptype in (None, "unavailable"):
                pres.attrs["from"] = self.full_jid
                self.proto.route(user, target.resource, pres, self)     # directed presence
            return
        if ptype not in (None, "unavailable"):
            return
        pres.attrs["from"] = self.full_jid
        if ptype == "unavailable":
            self.available = False
            relay.own_presence(self, pres)
            self.status = "away"
            self.router.receive(self, {"type": "presence", "status": "away"})
            return
        try:
            self.priority = max(-128, min(127, int(pres.findtext("priority") or 0)))
        except ValueError:
            self.priority = 0
        initial = not self.available
        self.available = True
        relay.own_presence(self, pres)
        pres.attrs["to"] = self.full_jid          # RFC 6121 §4.2.2: the broadcast reaches the sender too
        self.write(pres)
        self.router.receive(self, {"type": "presence", "status": render.show_status(pres)})
        if initial:
            relay.probe(self)                     # the user's other resources answer with their presence
            held, self.presences = self.presences, None
            for env in (held or {}).values():
                self.write(render.presence(env, self.proto.domain, self.full_jid))
        self.release_waiting()

    def discard(self) -> None:
        """This stream resumed an older session, which took its connection."""
        self.state = CLOSED

    def state_closed(self) -> bool:
        return self.state is CLOSED

    @property
    def last_presence(self):
        """A fresh available presence of this resource (for the user's other resources)."""
        if not self.available:
            return None
        pres = Element("presence", attrs={"from": self.full_jid})
        if self.status == "away":
            pres.add("show", text="away")
        pres.add("priority", text=str(self.priority))
        return pres


def _message_error(sid: str, to, me: str, condition: str, text: str) -> Element:
    """A message error for a message of ours the core refused."""
    original = Element("message", attrs={"from": me})
    if sid:
        original.attrs["id"] = sid
    if to:
        original.attrs["to"] = to
    return error_reply(original, condition, text)
