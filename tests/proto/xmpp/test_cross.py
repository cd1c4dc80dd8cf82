"""One routing space: an XMPP user and a raw-TCP user chat both ways; presence crosses too.

The raw-TCP side is imd.client.Client (blocking), driven through asyncio.to_thread.
"""

import asyncio

import pytest

from imd.client import Client

from .harness import barrier, client, login, logout, next_message, run, token

pytestmark = pytest.mark.imd_only("the raw-TCP bridge is imd's")


def tcp_login(imd, user: str, platform: str = "ios", device: str = "phone") -> Client:
    c = Client(*imd.addr["tcp"])
    c.auth(token(user, "host"), platform, device)
    return c


def test_xmpp_and_tcp_users_chat_both_ways(imd):
    async def scenario():
        x = client("alice", resource="xw")
        await login(x, imd)
        t = await asyncio.to_thread(tcp_login, imd, "bob")
        ack = await asyncio.to_thread(t.msg, "alice", "from the app", {"listing": "L1"})
        m = await next_message(x)
        assert (m["from"].bare, m["body"], m["id"]) == ("bob@localhost", "from the app", ack["id"])   # the app's id
        ctx = m.xml.find("{urn:imd:ctx}ctx")
        assert ctx is not None and ctx.get("listing") == "L1"
        reply = x.make_message(mto="bob@localhost", mbody="from xmpp", mtype="chat")
        reply.append(__import__("slixmpp").xmlstream.ET.Element("{urn:imd:ctx}ctx", {"booking": "B9"}))
        reply.send()
        env = await asyncio.to_thread(t.wait_for, lambda e: e.get("type") == "msg" and e.get("from") == "alice")
        assert env["body"] == "from xmpp" and env["to"] == "bob" and env["ctx"] == {"booking": "B9"}
        await asyncio.to_thread(t.wait_for, lambda e: e.get("type") == "presence" and e.get("user") == "alice")
        t.close()
        await logout(x)
    run(scenario())


def test_object_bodies_reach_xmpp_as_text_and_json(imd):
    async def scenario():
        x = client("carol", resource="xo")
        await login(x, imd)
        t = await asyncio.to_thread(tcp_login, imd, "alice", "web", "tab")
        await asyncio.to_thread(t.msg, "carol", {"text": "card", "kind": "offer", "price": 120})
        m = await next_message(x)
        assert m["body"] == "card"
        payload = m.xml.find("{urn:xmpp:json:0}json")
        assert payload is not None and '"price":120' in payload.text
        t.close()
        await logout(x)
    run(scenario())


def test_xmpp_message_reaches_tcp_user_offline_then_online(imd):
    async def scenario():
        x = client("u_xsender")
        await login(x, imd)
        x.send_message(mto="u_tcpoff@localhost", mbody="while you were away", mtype="chat")
        await barrier(x)
        await asyncio.sleep(0.3)
        t = await asyncio.to_thread(tcp_login, imd, "u_tcpoff")
        env = await asyncio.to_thread(t.wait_for, lambda e: e.get("type") == "msg")
        assert env["from"] == "u_xsender" and env["body"] == "while you were away"
        t.close()
        await logout(x)
    run(scenario())


def test_read_markers_become_read_receipts_both_ways(imd):
    async def scenario():
        import slixmpp
        x = client("u_reader", resource="xr")
        await login(x, imd)
        t = await asyncio.to_thread(tcp_login, imd, "u_writer")
        ack = await asyncio.to_thread(t.msg, "u_reader", "did you read this?")
        m = await next_message(x)
        marker = x.make_message(mto="u_writer@localhost", mtype="chat")
        marker.append(slixmpp.xmlstream.ET.Element("{urn:xmpp:chat-markers:0}displayed", {"id": m["id"]}))
        marker.send()
        env = await asyncio.to_thread(t.wait_for, lambda e: e.get("type") == "read")
        assert env["by"] == "u_reader" and env["mid"] == ack["mid"]
        # and the other way: the app reports it read the XMPP user's message
        x.send_message(mto="u_writer@localhost", mbody="yes", mtype="chat")
        got = await asyncio.to_thread(t.wait_for, lambda e: e.get("type") == "msg" and e.get("body") == "yes")
        t.send({"type": "read", "peer": "u_reader", "seq": got["seq"]})
        shown = await asyncio.wait_for(x.raw_messages.get(), 10)
        while shown.xml.find("{urn:xmpp:chat-markers:0}displayed") is None:
            shown = await asyncio.wait_for(x.raw_messages.get(), 10)
        assert shown["from"].bare == "u_writer@localhost"
        t.close()
        await logout(x)
    run(scenario())


def test_xmpp_show_becomes_core_presence(imd):
    async def scenario():
        x = client("alice", resource="aw")
        await login(x, imd)
        t = await asyncio.to_thread(tcp_login, imd, "bob")
        await asyncio.to_thread(t.wait_for, lambda e: e.get("type") == "presence" and e.get("user") == "alice"
                                and e.get("status") == "online")
        x.send_presence(pshow="away", ppriority=5)
        env = await asyncio.to_thread(t.wait_for, lambda e: e.get("type") == "presence" and e.get("user") == "alice"
                                      and e.get("status") == "away")
        assert env["platforms"]                  # e.g. ["android"]: the XMPP platform default
        x.send_presence(ppriority=5)
        await asyncio.to_thread(t.wait_for, lambda e: e.get("type") == "presence" and e.get("user") == "alice"
                                and e.get("status") == "online")
        t.close()
        await logout(x)
    run(scenario())
