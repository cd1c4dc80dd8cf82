"""XMPP across two imd nodes (separate processes, redis engine, one PostgreSQL):
what the core does not store — IQs between clients, chat states, receipts, directed
presence, a user's own resources, bind conflicts — reaches resources on the other
node; XEP-0198 resumption on the wrong node fails cleanly and the inbox fills the gap.

slixmpp clients, PLAIN with user tokens (tests/integration/cluster.py's secret).
"""

import asyncio
import types

import pytest
import slixmpp
from slixmpp.exceptions import IqError

from tests.proto.xmpp.harness import barrier, client, login, logout, next_message, run

from .cluster import admin, token
from .test_cluster import cluster, db  # noqa: F401  (fixtures)

CHATSTATES = "http://jabber.org/protocol/chatstates"
DISCO_INFO = "http://jabber.org/protocol/disco#info"
RECEIPTS = "urn:xmpp:receipts"


def xclient(user: str, resource: str, plugins=("xep_0030", "xep_0199", "xep_0203")):
    return client(user, password=token(user), mech="PLAIN", resource=resource, plugins=plugins)


def at(node):
    return types.SimpleNamespace(port=node.addr["xmpp"][1])


async def presence_from(c, full_jid: str, ptype: str = "available", timeout: float = 10):
    while True:
        p = await asyncio.wait_for(c.presences.get(), timeout)
        if p["from"].full == full_jid and p["type"] == ptype:
            return p


async def raw_with(c, tag: str, timeout: float = 10):
    while True:
        m = await asyncio.wait_for(c.raw_messages.get(), timeout)
        if m.xml.find(tag) is not None:
            return m


def test_iq_chat_states_receipts_and_directed_presence_across_nodes(cluster):
    n1, n2 = cluster.start("n1", "n2")

    async def scenario():
        a = xclient("xa", "desk", plugins=("xep_0030", "xep_0199", "xep_0203", "xep_0184"))
        b = xclient("xb", "phone", plugins=("xep_0030", "xep_0199", "xep_0203", "xep_0184"))
        receipts = asyncio.Queue()
        a.add_event_handler("receipt_received", receipts.put_nowait)
        await login(a, at(n1))
        await login(b, at(n2))

        # an IQ from n1 to a full JID on n2 is answered by that client
        info = await a.plugin["xep_0030"].get_info(jid="xb@localhost/phone", timeout=10)
        assert DISCO_INFO in info["disco_info"]["features"]
        for nowhere in ("xb@localhost/tablet", "xnobody@localhost/r1"):
            with pytest.raises(IqError) as err:
                await a.make_iq_get(queryxmlns=DISCO_INFO, ito=nowhere).send(timeout=10)
            assert err.value.iq["error"]["condition"] == "service-unavailable"

        # a chat state to the bare JID
        state = a.make_message(mto="xb@localhost", mtype="chat")
        state.append(slixmpp.xmlstream.ET.Element(f"{{{CHATSTATES}}}composing"))
        state.send()
        m = await raw_with(b, f"{{{CHATSTATES}}}composing")
        assert m["from"].full == "xa@localhost/desk"

        # a stored message without a request arrives without one (the bus entry has no flags)
        plain = a.make_message(mto="xb@localhost", mbody="no receipt needed", mtype="chat")
        plain.send()
        got = await next_message(b)
        assert got["id"] == plain["id"] and got.xml.find(f"{{{RECEIPTS}}}request") is None
        # a stored message asking for a receipt: the request crosses the bus with the entry,
        # and B's automatic receipt (for this message only) comes back over the bus
        msg = a.make_message(mto="xb@localhost", mbody="are you there?", mtype="chat")
        msg["request_receipt"] = True
        msg.send()
        got = await next_message(b)
        assert got["id"] == msg["id"] and got.xml.find(f"{{{RECEIPTS}}}request") is not None
        assert (await asyncio.wait_for(receipts.get(), 10))["receipt"] == msg["id"]

        # directed presence from n2 to a full JID on n1
        b.send_presence(pto="xa@localhost/desk", pstatus="here on n2")
        p = await presence_from(a, "xb@localhost/phone")
        assert p["status"] == "here on n2"
        await logout(a, b)
    run(scenario())


def test_own_resources_and_bind_conflict_across_nodes(cluster):
    n1, n2 = cluster.start("n1", "n2")

    async def scenario():
        r1 = xclient("xown", "r1")
        await login(r1, at(n1))
        r2 = xclient("xown", "r2")
        await login(r2, at(n2))
        await presence_from(r2, "xown@localhost/r1")          # r2's probe, answered from n1
        await presence_from(r1, "xown@localhost/r2")          # r2's broadcast reaching n1
        # an IQ to one's own resource on the other node
        info = await r2.plugin["xep_0030"].get_info(jid="xown@localhost/r1", timeout=10)
        assert DISCO_INFO in info["disco_info"]["features"]

        # the same resource bound on n2: the older session on n1 ends with <conflict/>
        errors = asyncio.Queue()
        r1.add_event_handler("stream_error", errors.put_nowait)
        gone = asyncio.ensure_future(r1.wait_until("disconnected"))
        again = xclient("xown", "r1")
        await login(again, at(n2))
        err = await asyncio.wait_for(errors.get(), 10)
        assert err["condition"] == "conflict"
        await asyncio.wait_for(gone, 10)
        await presence_from(r2, "xown@localhost/r1", "unavailable")
        await barrier(again)
        await logout(again, r2)
    run(scenario())


def test_resume_on_another_node_fails_and_the_inbox_fills_the_gap(cluster):
    n1, n2 = cluster.start("n1", "n2")

    async def scenario():
        plugins = ("xep_0030", "xep_0199", "xep_0203", "xep_0198")
        a = xclient("xsm", "phone", plugins=plugins)
        enabled = asyncio.ensure_future(a.wait_until("sm_enabled"))
        await login(a, at(n1))
        await asyncio.wait_for(enabled, 10)
        b = xclient("xsmpeer", "desk")
        await login(b, at(n2))
        b.send_message(mto="xsm@localhost", mbody="before", mtype="chat")
        assert (await next_message(a))["body"] == "before"
        await barrier(a)
        a.transport.abort()                                   # the phone drops off n1 ...
        await a.wait_until("disconnected")
        b.send_message(mto="xsm@localhost", mbody="while away", mtype="chat")
        await barrier(b)
        await asyncio.sleep(0.3)
        failed = asyncio.ensure_future(a.wait_until("sm_failed"))
        await login(a, at(n2))                                # ... and comes back on n2
        assert (await asyncio.wait_for(failed, 10)).xml.find("{urn:ietf:params:xml:ns:xmpp-stanzas}item-not-found") \
            is not None
        m = await next_message(a)
        assert m["body"] == "while away" and m["delay"]["stamp"]
        await barrier(a)
        assert a.inbox.empty()
        # the detached session on n1 was ended by the new bind of the same resource:
        # a kick asked on n1 counts over the cluster only the live session on n2
        status, res = await asyncio.to_thread(admin, n1, "POST", "/api/v1/users/xsm/kick")
        assert (status, res) == (200, {"closed": 1})
        await logout(a, b)
    run(scenario())
