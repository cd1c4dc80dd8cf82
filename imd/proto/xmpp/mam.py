"""XEP-0313 message archive (urn:xmpp:mam:2) over the user's inbox.

The archive is the inbox (DESIGN.md §3): the archive id of an entry is its
inbox seq, so every protocol's history is the same. Supported: the form
fields ``with`` (a peer's JID), ``start`` and ``end`` (XEP-0082 times), XEP-0059
paging forward with ``<after>`` and backward with ``<before>`` (empty: the last
page), ``<max>`` (at most MAX_PAGE). Each match is a ``<message>`` with
``<result><forwarded><delay/><message/></forwarded></result>``, then the IQ
result carries ``<fin>`` with ``<first>``/``<last>`` and ``complete``.

Runs in a greenlet (store reads); spawned by the IQ handler.
"""

from __future__ import annotations

import calendar
import logging
import time
from typing import Optional

from ...envelope import RECEIPT_REQUESTED
from ...store.base import StoreError
from . import jid as jidmod
from . import render
from .stanza import Element, error_reply, iq_result

log = logging.getLogger("imd.xmpp")

MAM_NS = "urn:xmpp:mam:2"
RSM_NS = "http://jabber.org/protocol/rsm"
DATA_NS = "jabber:x:data"
FORWARD_NS = "urn:xmpp:forward:0"
MAX_PAGE = 200
DEFAULT_PAGE = 50
SCAN_LIMIT = 5000             # entries read at most for one filtered page


class QueryError(Exception):
    """A query the archive cannot answer: ``condition`` is the stanza error."""

    def __init__(self, text: str, condition: str = "bad-request") -> None:
        super().__init__(text)
        self.condition = condition


def parse_time(text: str) -> int:
    """XEP-0082 date-time → ms since the epoch."""
    text = text.strip()
    base, _, frac = text.rstrip("Z").partition(".")
    if "+" in base[10:] or base[10:].count("-"):
        raise QueryError("only UTC (Z) times are supported")
    try:
        secs = calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        raise QueryError(f"bad time {text!r}") from None
    ms = int((frac + "000")[:3]) if frac.isdigit() else 0
    return secs * 1000 + ms


def _form(query: Element) -> dict:
    fields = {}
    form = query.find("x", DATA_NS)
    if form is not None:
        for field in form.iter_ns(DATA_NS):
            if field.tag == "field" and field.get("var") not in (None, "FORM_TYPE"):
                fields[field.get("var")] = field.findtext("value", DATA_NS, "") or ""
    return fields


def _seq(text: Optional[str]) -> Optional[int]:
    if text is None:
        return None
    if text == "":
        return -1
    if not text.isdigit():
        raise QueryError("unknown archive id", "item-not-found")        # XEP-0059 §2.6
    return int(text)


def query(s, iq: Element) -> None:
    q = iq.children[0]
    try:
        fields = _form(q)
        peer = None
        if fields.get("with"):
            try:
                peer = jidmod.local_user(jidmod.parse(fields["with"]), s.proto.domain)
            except jidmod.JIDError:
                raise QueryError("bad 'with'") from None
        start = parse_time(fields["start"]) if fields.get("start") else None
        end = parse_time(fields["end"]) if fields.get("end") else None
        rsm = q.find("set", RSM_NS)
        limit, after, before = DEFAULT_PAGE, None, None
        if rsm is not None:
            mx = rsm.findtext("max", RSM_NS)
            if mx is not None:
                limit = max(0, min(MAX_PAGE, int(mx) if mx.isdigit() else DEFAULT_PAGE))
            after = _seq(rsm.findtext("after", RSM_NS))
            before = _seq(rsm.findtext("before", RSM_NS))
    except QueryError as e:
        s.write(error_reply(iq, e.condition, str(e), by=s.proto.domain))
        return

    def wanted(e) -> bool:
        if peer is not None and peer not in (e.sender, e.recipient) or peer is not None and e.kind != "msg":
            return False
        return (start is None or e.ts >= start) and (end is None or e.ts <= end)

    router = s.router
    try:
        if before is not None:
            top = router.last_seq(s.user) + 1 if before == -1 else before
            found = _backward(router, s.user, top, limit, wanted)
            complete = len(found) < limit
        else:
            found, complete = _forward(router, s.user, max(after or 0, 0), limit, wanted)
    except StoreError as e:
        log.warning("mam: store unavailable: %s", e)
        s.write(error_reply(iq, "internal-server-error", by=s.proto.domain))
        return
    qid = q.get("queryid")
    for e in found:
        s.write(_result(s, e, qid))
    fin = Element("fin", MAM_NS, {"complete": "true" if complete else "false"})
    st = fin.add("set", RSM_NS)
    if found:
        st.add("first", attrs={"index": "0"}, text=str(found[0].seq))
        st.add("last", text=str(found[-1].seq))
    s.write(iq_result(iq, fin))


def _forward(router, user, since, limit, wanted):
    found, scanned = [], 0
    while len(found) < limit and scanned < SCAN_LIMIT:
        page = router.history(user, since, MAX_PAGE)
        if not page:
            return found, True
        for e in page:
            since = e.seq
            if wanted(e):
                found.append(e)
                if len(found) == limit:
                    break
        scanned += len(page)
        if len(page) < MAX_PAGE and len(found) < limit:
            return found, True
    return found, False


def _backward(router, user, top, limit, wanted):
    found, scanned = [], 0
    while len(found) < limit and top > 1 and scanned < SCAN_LIMIT:
        since = max(0, top - 1 - MAX_PAGE)
        page = [e for e in router.history(user, since, top - 1 - since) if e.seq < top]
        found[:0] = [e for e in page if wanted(e)]
        scanned += len(page)
        top = since + 1
    return found[-limit:] if limit else []


def _result(s, e, qid) -> Element:
    env = e.envelope()
    domain = s.proto.domain
    to = f"{env['to']}@{domain}" if env["type"] == "msg" else f"{s.user}@{domain}"
    inner = render.message(env, domain, to, False, e.flags & RECEIPT_REQUESTED)
    wrapper = Element("message", attrs={"to": s.full_jid, "from": f"{s.user}@{domain}"})
    res = wrapper.add("result", MAM_NS, {"id": str(e.seq)})
    if qid:
        res.attrs["queryid"] = qid
    fwd = res.add("forwarded", FORWARD_NS)
    fwd.add("delay", render.DELAY_NS, {"stamp": render.stamp(e.ts)})
    fwd.append(inner)
    return wrapper
