"""Roster, presence, messages, offline delivery and IQ routing with slixmpp clients.

Seeded contacts (conftest): alice–bob, alice–carol, hana–gus, ivy–jon, kim–lee.
"""

import asyncio

import pytest
from slixmpp.exceptions import IqError

from .harness import DOMAIN, barrier, client, login, logout, next_message, run


async def presence_from(c, jid: str, ptype: str = "available", timeout: float = 10):
    while True:
        p = await asyncio.wait_for(c.presences.get(), timeout)
        if p["from"].bare == jid and p["type"] == ptype:
            return p


@pytest.mark.imd_only("the roster is the marketplace's contact list, seeded in imd's store")
def test_roster_is_the_contact_list(imd):
    async def scenario():
        a = client("alice")
        await login(a, imd, presence=False)
        roster = a.client_roster
        assert set(roster.keys()) >= {"bob@localhost", "carol@localhost"}
        assert roster["bob@localhost"]["subscription"] == "both"
        with pytest.raises(IqError) as info:
            await a.update_roster("dave@localhost", name="Dave")
        assert info.value.iq["error"]["condition"] == "not-allowed"
        await logout(a)
    run(scenario())


@pytest.mark.imd_only("contacts (and so presence) come from imd's store; prosody needs subscriptions")
def test_chat_both_ways_and_presence_of_contacts(imd):
    async def scenario():
        a = client("alice", resource="desk")
        await login(a, imd)
        b = client("bob", resource="phone")
        await login(b, imd)
        p = await presence_from(a, "bob@localhost")
        assert p["from"].full == "bob@localhost/imd"
        a.send_message(mto="bob@localhost", mbody="is the flat free?", mtype="chat")
        m = await next_message(b)
        assert (m["from"].bare, m["body"], m["type"]) == ("alice@localhost", "is the flat free?", "chat")
        assert not m["delay"]["stamp"]                       # live, not offline
        assert m["to"].bare == "bob@localhost"
        b.send_message(mto="alice@localhost/desk", mbody="yes", mtype="chat")
        m = await next_message(a)
        assert (m["from"].bare, m["body"]) == ("bob@localhost", "yes")
        await logout(b)
        await presence_from(a, "bob@localhost", "unavailable")
        await logout(a)
    run(scenario())


def test_offline_messages_after_initial_presence_with_delay(imd):
    async def scenario():
        h = client("hana")                            # exists before the messages (prosody needs that)
        g = client("gus")
        await login(g, imd)
        g.send_message(mto="hana@localhost", mbody="one", mtype="chat")
        g.send_message(mto="hana@localhost", mbody="two")                       # type normal
        g.send_message(mto="hana@localhost", mbody="flash", mtype="headline")   # never stored
        state = g.make_message(mto="hana@localhost", mtype="chat")
        state.append(__import__("slixmpp").xmlstream.ET.Element("{http://jabber.org/protocol/chatstates}composing"))
        state.send()
        await barrier(g)
        await asyncio.sleep(0.3)                       # the store commits (acks are not awaited here)
        await login(h, imd, presence=False)
        await barrier(h)
        assert h.inbox.empty()                         # nothing before initial presence
        h.send_presence(ppriority=1)
        m1 = await next_message(h)
        m2 = await next_message(h)
        assert [m1["body"], m2["body"]] == ["one", "two"]
        assert m1["delay"]["stamp"] and m2["delay"]["stamp"]
        assert m1["from"].bare == "gus@localhost"
        await barrier(h)
        assert h.inbox.empty()
        await logout(h)
        h2 = client("hana", resource="again")          # a second login gets nothing again
        await login(h2, imd)
        await barrier(h2)
        await asyncio.sleep(0.3)
        assert h2.inbox.empty()
        await logout(h2, g)
    run(scenario())


def test_negative_priority_gets_no_messages(imd):
    async def scenario():
        i = client("ivy")
        j = client("jon")
        await login(j, imd)
        j.send_message(mto="ivy@localhost", mbody="hidden", mtype="chat")
        await barrier(j)
        await asyncio.sleep(0.3)
        await login(i, imd, priority=-1)
        await barrier(i)
        await asyncio.sleep(0.3)
        assert i.inbox.empty()
        await logout(i)
        i2 = client("ivy", resource="r2")              # still offline for a normal login
        await login(i2, imd)
        m = await next_message(i2)
        assert m["body"] == "hidden"
        await logout(i2, j)
    run(scenario())


def test_body_less_messages_and_extensions_between_xmpp_clients(imd):
    async def scenario():
        k = client("kim")
        await login(k, imd)
        lee = client("lee")
        await login(lee, imd)
        state = k.make_message(mto="lee@localhost", mtype="chat")
        state["id"] = "cs1"
        state.append(__import__("slixmpp").xmlstream.ET.Element("{http://jabber.org/protocol/chatstates}composing"))
        state["from"] = "mallory@localhost/x"                  # a lie: the server stamps from
        state.send()
        m = await asyncio.wait_for(lee.raw_messages.get(), 10)
        assert m["from"].full == "kim@localhost/r1" and m["id"] == "cs1"
        assert m.xml.find("{http://jabber.org/protocol/chatstates}composing") is not None
        await logout(k, lee)
    run(scenario())


def test_groupchat_and_error_messages(imd):
    async def scenario():
        a = client("alice", resource="gc")
        await login(a, imd)
        a.send_message(mto="bob@localhost", mbody="x", mtype="groupchat")
        m = await asyncio.wait_for(a.raw_messages.get(), 10)
        # RFC 6121 §8.5.2.1.1: service-unavailable (imd); prosody 0.12 answers not-allowed
        assert m["type"] == "error" and m["error"]["condition"] in ("service-unavailable", "not-allowed")
        a.send_message(mto="bob@localhost", mbody="x", mtype="error")   # never answered
        a.send_message(mto="bob@example.org", mbody="x", mtype="chat")
        m = await asyncio.wait_for(a.raw_messages.get(), 10)
        # no server-to-server: imd answers service-unavailable, prosody (s2s off) not-allowed
        assert m["type"] == "error" and m["error"]["condition"] in ("service-unavailable", "not-allowed")
        await barrier(a)
        assert a.raw_messages.empty()
        await logout(a)
    run(scenario())


def test_disco_ping_and_unknown_iqs(imd):
    async def scenario():
        a = client("u_iq")
        await login(a, imd)
        info = await a.plugin["xep_0030"].get_info(jid=DOMAIN)
        assert ("server", "im", "imd", None) in info["disco_info"]["identities"] or \
            any(i[0] == "server" and i[1] == "im" for i in info["disco_info"]["identities"])
        assert {"http://jabber.org/protocol/disco#info", "urn:xmpp:ping", "msgoffline"} <= \
            set(info["disco_info"]["features"])
        items = await a.plugin["xep_0030"].get_items(jid=DOMAIN)
        assert list(items["disco_items"]["items"]) == []
        await a.plugin["xep_0199"].ping(jid=DOMAIN)
        iq = a.make_iq_get(queryxmlns="urn:example:unknown", ito=DOMAIN)
        with pytest.raises(IqError) as info:
            await iq.send()
        assert info.value.iq["error"]["condition"] == "service-unavailable"
        iq = a.make_iq_get(queryxmlns="http://jabber.org/protocol/disco#info", ito="bob@localhost/nowhere")
        with pytest.raises(IqError) as info:
            await iq.send()
        assert info.value.iq["error"]["condition"] == "service-unavailable"
        await logout(a)
    run(scenario())


def test_iq_between_clients_and_own_resources(imd):
    async def scenario():
        a1 = client("u_multi", resource="r1")
        await login(a1, imd)
        a2 = client("u_multi", resource="r2")
        await login(a2, imd)
        p = await presence_from(a2, "u_multi@localhost")
        assert p["from"].resource in ("r1", "r2")
        seen = {p["from"].resource}
        while seen != {"r1", "r2"}:
            seen.add((await presence_from(a2, "u_multi@localhost"))["from"].resource)
        b = client("u_peer")
        await login(b, imd)
        info = await b.plugin["xep_0030"].get_info(jid="u_multi@localhost/r1")
        assert "http://jabber.org/protocol/disco#info" in info["disco_info"]["features"]
        await logout(a1)
        await presence_from(a2, "u_multi@localhost", "unavailable")
        await logout(a2, b)
    run(scenario())


@pytest.mark.imd_only("subscriptions mirror imd's contact list")
def test_subscription_requests_answered_from_contacts(imd):
    async def scenario():
        a = client("alice", resource="sub")
        await login(a, imd)
        a.send_presence(pto="carol@localhost", ptype="subscribe")        # a contact
        p = await presence_from(a, "carol@localhost", "subscribed")
        assert p["from"].full == "carol@localhost"
        a.send_presence(pto="stranger@localhost", ptype="subscribe")     # not a contact
        await presence_from(a, "stranger@localhost", "unsubscribed")
        await logout(a)
    run(scenario())


def test_directed_presence_reaches_the_resource(imd):
    async def scenario():
        a = client("u_dir_a")
        await login(a, imd)
        b = client("u_dir_b", resource="desk")
        await login(b, imd)
        a.send_presence(pto="u_dir_b@localhost/desk", pstatus="hello there")
        p = await presence_from(b, "u_dir_a@localhost")
        assert p["status"] == "hello there" and p["from"].full == "u_dir_a@localhost/r1"
        await logout(a, b)
    run(scenario())
