"""XEP-0184 delivery receipts and XEP-0333 markers name the sender's own message id,
end to end: slixmpp's xep_0184 plugin acks automatically, the sender matches the id.
A receipt request is passed through (stored with the message): the recipient is asked
exactly when the sender asked, live, offline, in carbons and in the archive.
Across protocols: a raw-TCP client's message id is the XMPP stanza id, and the other way."""

import asyncio

import pytest
import slixmpp

from .harness import barrier, client, login, logout, next_message, run
from .test_cross import tcp_login

PLUGINS = ("xep_0030", "xep_0199", "xep_0203", "xep_0184")
MARKERS = "urn:xmpp:chat-markers:0"
REQUEST = "{urn:xmpp:receipts}request"


def asks(stanza) -> bool:
    """Whether a received <message> carries an XEP-0184 request (checked on the XML)."""
    return stanza.xml.find(REQUEST) is not None


def send(c, to: str, body: str, receipt: bool) -> str:
    m = c.make_message(mto=to, mbody=body, mtype="chat")
    if receipt:
        m["request_receipt"] = True
    m.send()
    return m["id"]


def test_receipt_names_the_senders_id(imd):
    async def scenario():
        a = client("u_rc_a", resource="phone", plugins=PLUGINS)
        b = client("u_rc_b", resource="desk", plugins=PLUGINS)
        assert b.plugin["xep_0184"].auto_ack
        receipts = asyncio.Queue()
        a.add_event_handler("receipt_received", receipts.put_nowait)
        await login(a, imd)
        await login(b, imd)
        sent = []
        for text in ("first", "second"):
            m = a.make_message(mto="u_rc_b@localhost", mbody=text, mtype="chat")
            m["request_receipt"] = True
            sent.append(m["id"])
            m.send()
            got = await next_message(b)
            assert got["body"] == text and got["id"] == m["id"]       # the stanza id B sees is A's
        acked = [(await asyncio.wait_for(receipts.get(), 10))["receipt"] for _ in sent]
        assert acked == sent
        await logout(a, b)
    run(scenario())


def test_no_request_no_receipt_live(imd):
    """A message sent without a request reaches the recipient without one, so its
    client sends no receipt; the next message, with one, gets exactly its receipt."""
    async def scenario():
        a = client("u_rc_la", resource="phone", plugins=PLUGINS)
        b = client("u_rc_lb", resource="desk", plugins=PLUGINS)
        receipts = asyncio.Queue()
        a.add_event_handler("receipt_received", receipts.put_nowait)
        await login(a, imd)
        await login(b, imd)
        plain = send(a, "u_rc_lb@localhost", "no receipt please", False)
        got = await next_message(b)
        assert got["id"] == plain and not asks(got) and not got["request_receipt"]
        await barrier(b)                       # a receipt b sent would be on its way by now
        asked = send(a, "u_rc_lb@localhost", "receipt please", True)
        got = await next_message(b)
        assert got["id"] == asked and asks(got)
        assert (await asyncio.wait_for(receipts.get(), 10))["receipt"] == asked
        await barrier(b)
        await barrier(a)
        assert receipts.empty()                # one receipt: for the message that asked
        await logout(a, b)
    run(scenario())


def test_request_passed_through_offline_carbons_and_archive(imd):
    """Offline delivery (XEP-0160, delay-stamped) renders the stored request only on the
    message that had one; the receipt of the offline message reaches the sender; the
    sender's carbon copy and the archive keep the request as it was sent."""
    async def scenario():
        c = client("u_rc_oc", resource="late", plugins=PLUGINS)          # exists before (prosody)
        a = client("u_rc_oa", resource="phone", plugins=PLUGINS)
        a2 = client("u_rc_oa", resource="tablet", plugins=PLUGINS + ("xep_0280", "xep_0059", "xep_0313"))
        receipts = asyncio.Queue()
        a.add_event_handler("receipt_received", receipts.put_nowait)
        carbons = asyncio.Queue()
        a2.add_event_handler("carbon_sent", carbons.put_nowait)
        await login(a, imd)
        await login(a2, imd)
        await a2.plugin["xep_0280"].enable()
        asked = send(a, "u_rc_oc@localhost", "asks while you were away", True)
        plain = send(a, "u_rc_oc@localhost", "plain while you were away", False)
        copies = [(await asyncio.wait_for(carbons.get(), 10)) for _ in range(2)]   # both stored
        assert [(m["carbon_sent"]["id"], m["carbon_sent"].xml.find(REQUEST) is not None)
                for m in copies] == [(asked, True), (plain, False)]
        archived = {m["mam_result"]["forwarded"]["stanza"]["id"]: asks(m["mam_result"]["forwarded"]["stanza"])
                    async for m in a2.plugin["xep_0313"].iterate(with_jid="u_rc_oc@localhost")}
        assert archived == {asked: True, plain: False}
        await login(c, imd)
        first, second = await next_message(c), await next_message(c)
        assert (first["id"], second["id"]) == (asked, plain)
        assert first["delay"]["stamp"] and second["delay"]["stamp"]
        assert asks(first) and not asks(second)
        assert (await asyncio.wait_for(receipts.get(), 10))["receipt"] == asked
        await barrier(c)
        await barrier(a)
        assert receipts.empty()
        await logout(a, a2, c)
    run(scenario())


@pytest.mark.imd_only("the raw-TCP bridge is imd's")
def test_ids_cross_protocols(imd):
    async def scenario():
        x = client("u_rc_x", resource="xr", plugins=PLUGINS)
        await login(x, imd)
        t = await asyncio.to_thread(tcp_login, imd, "u_rc_t")
        ack = await asyncio.to_thread(t.msg, "u_rc_x", "from the app", None, "app-42")
        m = await next_message(x)
        assert m["id"] == "app-42" and not asks(m)          # the app asked for no XEP-0184 receipt
        marker = x.make_message(mto="u_rc_t@localhost", mtype="chat")
        marker.append(slixmpp.xmlstream.ET.Element(f"{{{MARKERS}}}displayed", {"id": "app-42"}))
        marker.send()
        read = await asyncio.to_thread(t.wait_for, lambda e: e.get("type") == "read")
        assert (read["id"], read["mid"]) == ("app-42", ack["mid"])

        out = x.make_message(mto="u_rc_t@localhost", mbody="from xmpp", mtype="chat")
        out.send()
        env = await asyncio.to_thread(t.wait_for, lambda e: e.get("type") == "msg" and e.get("body") == "from xmpp")
        assert env["id"] == out["id"]
        t.send({"type": "read", "peer": "u_rc_x", "seq": env["seq"]})
        while True:
            shown = await asyncio.wait_for(x.raw_messages.get(), 10)
            d = shown.xml.find(f"{{{MARKERS}}}displayed")
            if d is not None:
                break
        assert d.get("id") == out["id"] and shown["from"].bare == "u_rc_t@localhost"
        t.close()
        await logout(x)
    run(scenario())
