"""Stanzas the core does not store, between a user's XMPP resources on any node.

IQs to full JIDs and their answers, body-less messages (chat states, receipts,
markers), headlines, directed presence, the presence of a user's own
resources and bind conflicts travel as transient envelopes through the router
(:meth:`Router.publish_transient`, i.e. the engine: the memory engine on one
node, Redis in a cluster, the very same code path), to the addressed user's
XMPP sessions on every node. The envelope::

    {"type": "xmpp", "op": OP, "sid": sending session id, "res": resource or "",
     "xml": serialized stanza, "ts": when the binding connection opened (bind only)}

Ops, as each receiving session (:func:`deliver`) applies them:

* ``stanza``: write ``xml`` unchanged, to the resource ``res`` or, with no
  ``res`` (a bare JID), to every available resource with priority ≥ 0 except
  the sending session;
* ``own``: a resource's presence (``xml`` has no ``to``) for the user's other
  available resources, each getting its own full JID as ``to``;
* ``probe``: resource ``res`` became available; every other available resource
  answers with its current presence (a ``stanza`` to ``res``);
* ``bind``: session ``sid`` bound resource ``res`` on a connection opened at
  ``ts``; a session of that resource opened no later gets a ``<conflict/>``
  stream error: the newest connection wins, whichever node it is on, also
  when two nodes bind the same resource at the same moment.

A publication is at most once (DESIGN.md §7): like stanzas between federated
servers, a transient stanza may be lost when the bus is; nothing stored is.
Everything here runs in the hub and never blocks.
"""

from __future__ import annotations

from typing import Optional

from . import jid as jidmod
from .stanza import escape_attr, tostring

TYPE = "xmpp"


def envelope(op: str, sid: str, res: str = "", xml: str = "") -> dict:
    return {"type": TYPE, "op": op, "sid": sid, "res": res, "xml": xml}


def publish(proto, user: str, env: dict) -> None:
    """To ``user``'s XMPP sessions on every node (for ``stanza`` and ``bind`` with a
    ``res``: only that resource's device)."""
    res = env["res"]
    device: Optional[str] = proto.device_of(res) if res and env["op"] in ("stanza", "bind") else None
    proto.router.publish_transient(user, env, device, TYPE)


def stanza(proto, user: str, resource: str, el, sender) -> None:
    publish(proto, user, envelope("stanza", sender.id, resource, tostring(el)))


def own_presence(s, pres) -> None:
    """``pres`` (no ``to``) of ``s`` for the user's other available resources."""
    publish(s.proto, s.user, envelope("own", s.id, s.resource, tostring(pres)))


def probe(s) -> None:
    publish(s.proto, s.user, envelope("probe", s.id, s.resource))


def bound(s) -> None:
    env = envelope("bind", s.id, s.resource)
    env["ts"] = s.opened
    publish(s.proto, s.user, env)


def _with_to(xml: str, to: str) -> str:
    """``xml`` (a serialized element) with a ``to`` attribute after its tag name."""
    cut = min(i for i in (xml.find(" "), xml.find("/>"), xml.find(">")) if i > 0)
    return xml[:cut] + " to='" + escape_attr(to) + "'" + xml[cut:]


def deliver(s, env: dict) -> None:
    """A transient XMPP envelope reached session ``s`` (one of the addressed user's)."""
    op, sid, res = env["op"], env["sid"], env["res"]
    if sid == s.id or s.resource is None:
        return
    if op == "stanza":
        if res:
            if res == s.resource:
                s.write_bytes(env["xml"].encode())
        elif s.available and s.priority >= 0:
            s.write_bytes(env["xml"].encode())
    elif op == "own":
        if s.available:
            s.write_bytes(_with_to(env["xml"], s.full_jid).encode())
    elif op == "probe":
        pres = s.last_presence
        if pres is not None:
            pres.attrs["to"] = jidmod.make(s.user, s.proto.domain, res)
            stanza(s.proto, s.user, res, pres, s)
    elif op == "bind":
        if res == s.resource and s.opened <= env["ts"] and not s.state_closed():
            s.stream_error("conflict", "replaced by a new connection")
