"""Core envelopes ↔ XMPP stanzas (pure functions, nothing blocks).

Outgoing: an inbox entry ``msg`` becomes ``<message type='chat'>`` from the
sender's bare JID with ``<body>``; a ``notice`` (reminder) becomes
``<message type='headline'>`` from the server domain with ``<subject>`` = kind;
a ``presence`` envelope (a contact's aggregated presence) becomes
``<presence>`` from ``contact@domain/imd`` (one resource stands for all of the
contact's devices). Offline deliveries carry an XEP-0203 ``<delay>``. The
message ``id`` is the sender's client id (for an XMPP sender: its own stanza
id, so XEP-0184 receipts and XEP-0333 markers name an id the sender knows), or
the entry's ``mid`` when the sender gave none (notices, the web tier). A chat
message carries an XEP-0184 ``<request/>`` exactly when its sender's stanza
did (the entry's flags have RECEIPT_REQUESTED; the caller says so).

Message bodies may be JSON objects (from web or app clients): the XMPP body
is then the object's ``text`` string if it has one, else the compact JSON,
and the object itself travels in ``<json xmlns='urn:xmpp:json:0'>``
(XEP-0335). ``ctx`` (listing, booking…) travels in ``<ctx xmlns='urn:imd:ctx'>``
as attributes, both ways.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import orjson

from .stanza import ATTR_SPECIAL, Element, escape_attr, escape_text, tostring

PRESENCE_RESOURCE = "imd"
CTX_NS = "urn:imd:ctx"
JSON_NS = "urn:xmpp:json:0"
DELAY_NS = "urn:xmpp:delay"
RECEIPTS_NS = "urn:xmpp:receipts"


def stamp(ts_ms: int) -> str:
    """XEP-0082 UTC timestamp with milliseconds."""
    secs, ms = divmod(int(ts_ms), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ms:03d}Z"


def body_text(body: Any) -> str:
    if isinstance(body, str):
        return body
    if isinstance(body, dict) and isinstance(body.get("text"), str):
        return body["text"]
    return orjson.dumps(body).decode()


def ctx_element(ctx: dict) -> Element:
    return Element("ctx", CTX_NS, {k: ("" if v is None else str(v).lower() if isinstance(v, bool) else str(v))
                                   for k, v in ctx.items()})


def message_parts(stanza: Element) -> tuple[Optional[str], Optional[dict], bool]:
    """What a core ``msg`` takes from a ``<message>``, in one pass over its children:
    the text of the first ``<body>`` (None without one), the attributes of the first
    ``<ctx xmlns='urn:imd:ctx'>`` (None without one or when it has none), and whether
    it carries an XEP-0184 ``<request/>``."""
    body = ctx = None
    receipt = False
    ns = stanza.ns
    for child in stanza.children:
        cns = child.ns
        if cns == ns and body is None and child.tag == "body":
            body = child.text
        if cns == RECEIPTS_NS and child.tag == "request":
            receipt = True
        if cns == CTX_NS and ctx is None and child.tag == "ctx":
            ctx = dict(child.attrs)
    return body, ctx or None, receipt


def stanza_id(env: dict) -> str:
    """The XMPP id of an inbox entry envelope: the sender's client id, else the mid."""
    return env.get("id") or env["mid"]


def message(env: dict, domain: str, to: str, delayed: bool, receipt: bool = False) -> Element:
    """``<message>`` for an inbox entry envelope (``msg`` or ``notice``) addressed to
    ``to``; ``receipt`` (the sender asked for one) adds an XEP-0184 request to a chat message."""
    if env["type"] == "notice":
        msg = Element("message", attrs={"type": "headline", "from": domain, "to": to, "id": env["mid"]})
        msg.add("subject", text=str(env.get("kind") or ""))
    else:
        msg = Element("message", attrs={"type": "chat", "from": f"{env['from']}@{domain}", "to": to,
                                        "id": stanza_id(env)})
    body = env["body"]
    msg.add("body", text=body_text(body))
    if not isinstance(body, str):
        msg.add("json", JSON_NS, text=orjson.dumps(body).decode())
    if env.get("ctx"):
        msg.append(ctx_element(env["ctx"]))
    if receipt and env["type"] == "msg":
        msg.add("request", RECEIPTS_NS)
    if delayed:
        msg.add("delay", DELAY_NS, {"from": domain, "stamp": stamp(env["ts"])})
    return msg


def message_bytes(env: dict, domain: str, to: str, delayed: bool, receipt: bool = False) -> bytes:
    """``tostring(message(...)).encode()``, built as one string without an element
    tree for the common case (a live ``msg`` with a text body and no ctx)."""
    body = env["body"]
    if env["type"] != "msg" or delayed or env.get("ctx") or not isinstance(body, str):
        return tostring(message(env, domain, to, delayed, receipt)).encode()
    text = "<body>" + escape_text(body) + "</body>" if body else "<body/>"
    frm, sid = env["from"], stanza_id(env)
    if ATTR_SPECIAL.search(frm) or ATTR_SPECIAL.search(sid) or ATTR_SPECIAL.search(to):
        frm, to, sid = escape_attr(frm), escape_attr(to), escape_attr(sid)   # (the domain is plain)
    return ("<message type='chat' from='" + frm + "@" + domain + "' to='" + to + "' id='" + sid + "'>"
            + text + (_RECEIPT_REQUEST if receipt else "") + "</message>").encode()


_RECEIPT_REQUEST = f"<request xmlns='{RECEIPTS_NS}'/>"


def presence(env: dict, domain: str, to: str) -> Element:
    """``<presence>`` for a contact's aggregated presence envelope."""
    attrs = {"from": f"{env['user']}@{domain}/{PRESENCE_RESOURCE}", "to": to}
    status = env["status"]
    if status == "offline":
        attrs["type"] = "unavailable"
    pres = Element("presence", attrs=attrs)
    if status == "away":
        pres.add("show", text="away")
    if status != "offline" and env.get("platforms"):
        pres.add("status", text=",".join(env["platforms"]))
    if status == "offline" and env.get("last_seen"):
        pres.add("delay", DELAY_NS, {"from": domain, "stamp": stamp(env["last_seen"])})
    return pres


def show_status(pres: Element) -> str:
    """The core status (``online``/``away``) an XMPP ``<show>`` maps to."""
    return "away" if pres.findtext("show") in ("away", "xa", "dnd") else "online"


CARBONS_NS = "urn:xmpp:carbons:2"
FORWARD_NS = "urn:xmpp:forward:0"


def sent_carbon(env: dict, domain: str, to: str, receipt: bool = False) -> Element:
    """XEP-0280 ``<sent>`` copy of a message this user sent from another device
    (with the receipt request it was sent with)."""
    inner = message(env, domain, f"{env['to']}@{domain}", False, receipt)
    outer = Element("message", attrs={"from": f"{env['from']}@{domain}", "to": to, "type": "chat"})
    outer.add("sent", CARBONS_NS).add("forwarded", FORWARD_NS).append(inner)
    return outer
