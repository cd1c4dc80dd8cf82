"""XEP-0184 delivery receipts and XEP-0333 markers name the sender's own message id,
end to end: slixmpp's xep_0184 plugin acks automatically, the sender matches the id.
Across protocols: a raw-TCP client's message id is the XMPP stanza id, and the other way."""

import asyncio

import pytest
import slixmpp

from .harness import client, login, logout, next_message, run
from .test_cross import tcp_login

PLUGINS = ("xep_0030", "xep_0199", "xep_0203", "xep_0184")
MARKERS = "urn:xmpp:chat-markers:0"


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


@pytest.mark.imd_only("the raw-TCP bridge is imd's")
def test_ids_cross_protocols(imd):
    async def scenario():
        x = client("u_rc_x", resource="xr", plugins=PLUGINS)
        await login(x, imd)
        t = await asyncio.to_thread(tcp_login, imd, "u_rc_t")
        ack = await asyncio.to_thread(t.msg, "u_rc_x", "from the app", None, "app-42")
        m = await next_message(x)
        assert m["id"] == "app-42" and m["request_receipt"]
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
