"""IQs the server answers, the roster (= contacts), and subscription requests.

* IQ ``get``/``set`` must carry exactly one child (else ``bad-request``);
  ``result``/``error`` are routed to a full JID or dropped, never answered.
* To the server (no ``to``, the domain) or a bare JID: XEP-0030 disco#info
  and disco#items, XEP-0199 ping, the legacy session, and for the own account
  the roster, XEP-0280 carbons enable/disable and XEP-0313 queries
  (:mod:`imd.proto.xmpp.mam`); anything else gets ``service-unavailable``
  (RFC 6120 §8.4).
* To a full JID: routed to that resource on whichever node it is bound
  (``from`` stamped), or ``service-unavailable`` when it is bound nowhere.
* The roster is the user's contact list, server-authoritative: every item has
  ``subscription='both'``; roster sets get ``not-allowed``; the web tier's
  contact changes are pushed (``contacts`` envelopes) to resources that asked
  for the roster. Versioning: ``ver`` is a digest of the list.
* ``subscribe`` to a contact is answered ``subscribed`` (they already share
  presence); to anyone else ``unsubscribed`` (contacts come from the web tier).

Runs in the hub; the roster read and archive queries run in greenlets (store reads).
"""

from __future__ import annotations

import hashlib
import itertools
import logging

import gevent

from ...store.base import StoreError
from . import jid as jidmod
from . import mam
from .stanza import Element, error_reply, iq_result

log = logging.getLogger("imd.xmpp")

PING_NS = "urn:xmpp:ping"
DISCO_INFO = "http://jabber.org/protocol/disco#info"
DISCO_ITEMS = "http://jabber.org/protocol/disco#items"
ROSTER_NS = "jabber:iq:roster"
SESSION_NS = "urn:ietf:params:xml:ns:xmpp-session"
CARBONS_NS = "urn:xmpp:carbons:2"
SERVER_FEATURES = (DISCO_INFO, DISCO_ITEMS, PING_NS, "msgoffline", "urn:xmpp:delay", ROSTER_NS,
                   "urn:xmpp:csi:0", CARBONS_NS, "urn:xmpp:sm:3")

_push_ids = itertools.count(1)


def handle(s, iq: Element) -> None:
    itype = iq.get("type")
    to = s.target(iq)
    if to is None:
        return
    domain = s.proto.domain
    user = jidmod.local_user(to, domain)
    if itype in ("result", "error"):
        if user is not None and to.resource:
            iq.attrs["from"] = s.full_jid
            s.proto.route(user, to.resource, iq, s)
        return
    if itype not in ("get", "set") or len(iq.children) != 1:
        s.write(error_reply(iq, "bad-request", "an iq get/set carries exactly one child", by=domain))
        return
    if to.domain != domain:
        s.write(error_reply(iq, "remote-server-not-found", by=domain))
        return
    if user is not None and to.resource and not (user == s.user and to.resource == s.resource):
        iq.attrs["from"] = s.full_jid
        s.proto.route_iq(user, to.resource, iq, s)
        return
    child = iq.children[0]
    ns = child.ns
    if ns == PING_NS or ns == SESSION_NS:
        s.write(iq_result(iq))
    elif ns == DISCO_INFO and itype == "get":
        s.write(iq_result(iq, disco_info(user, child.get("node"))))
    elif ns == DISCO_ITEMS and itype == "get":
        s.write(iq_result(iq, Element("query", DISCO_ITEMS, dict(child.attrs))))
    elif ns == mam.MAM_NS and itype == "set" and child.tag == "query" and (user is None or user == s.user):
        gevent.spawn(mam.query, s, iq)
    elif ns == CARBONS_NS and itype == "set" and child.tag in ("enable", "disable"):
        s.carbons = child.tag == "enable"
        s.write(iq_result(iq))
    elif ns == ROSTER_NS and (user is None or user == s.user) and to.domain == domain:
        if itype == "get":
            gevent.spawn(_roster_get, s, iq)
        else:
            s.write(error_reply(iq, "not-allowed", "contacts are managed by the marketplace", by=domain))
    else:
        s.write(error_reply(iq, "service-unavailable", by=domain))


def disco_info(user, node) -> Element:
    q = Element("query", DISCO_INFO, {"node": node} if node else None)
    if user is None:
        q.add("identity", attrs={"category": "server", "type": "im", "name": "imd"})
        for feature in SERVER_FEATURES:
            q.add("feature", attrs={"var": feature})
    else:
        q.add("identity", attrs={"category": "account", "type": "registered"})
        q.add("feature", attrs={"var": DISCO_INFO})
        q.add("feature", attrs={"var": mam.MAM_NS})
    return q


def roster_version(contacts) -> str:
    return hashlib.sha1("\n".join(sorted(contacts)).encode()).hexdigest()[:16]


def _roster_get(s, iq: Element) -> None:
    try:
        contacts = s.router.contacts_of(s.user)
    except StoreError as e:
        log.warning("roster: contacts unavailable user=%s error=%s", s.user, e)
        s.write(error_reply(iq, "internal-server-error", by=s.proto.domain))
        return
    s.interested = True
    ver = roster_version(contacts)
    if iq.children[0].get("ver") == ver:
        s.write(iq_result(iq))
        return
    query = Element("query", ROSTER_NS, {"ver": ver})
    for contact in sorted(contacts):
        query.add("item", attrs={"jid": f"{contact}@{s.proto.domain}", "subscription": "both"})
    s.write(iq_result(iq, query))


def roster_push(s, op: str, contact: str) -> None:
    """Push a contact change to a resource that asked for the roster (no ``from``)."""
    if not s.interested:
        return
    attrs = {}
    cached = s.router.cached_contacts(s.user)
    if cached is not None:
        attrs["ver"] = roster_version(cached)
    query = Element("query", ROSTER_NS, attrs)
    query.add("item", attrs={"jid": f"{contact}@{s.proto.domain}",
                             "subscription": "both" if op == "add" else "remove"})
    push = Element("iq", attrs={"type": "set", "id": f"push-{next(_push_ids)}", "to": s.full_jid})
    push.append(query)
    s.write(push)


def subscription(s, user: str, ptype: str) -> None:
    """Answer a subscription request from the contact list (never forwarded)."""
    if ptype != "subscribe":
        return
    contacts = s.router.cached_contacts(s.user) or ()
    answer = "subscribed" if user in contacts else "unsubscribed"
    s.write(Element("presence", attrs={"type": answer, "from": f"{user}@{s.proto.domain}", "to": s.bare()}))
