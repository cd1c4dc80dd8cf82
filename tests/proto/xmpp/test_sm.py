"""XEP-0198 with slixmpp's xep_0198 plugin: acks, resumption after a dropped TCP connection,
and unacked messages staying in the inbox when no resume comes."""

import asyncio

import pytest

from .harness import barrier, client, login, logout, next_message, run

PLUGINS = ("xep_0030", "xep_0199", "xep_0203", "xep_0198")


def test_enable_ack_and_resume_after_abort(imd):
    async def scenario():
        a = client("u_sm_a", resource="phone", plugins=PLUGINS)
        enabled = asyncio.ensure_future(a.wait_until("sm_enabled"))
        await login(a, imd)
        await asyncio.wait_for(enabled, 10)
        b = client("u_sm_b")
        await login(b, imd)
        b.send_message(mto="u_sm_a@localhost", mbody="before", mtype="chat")
        assert (await next_message(a))["body"] == "before"
        await barrier(a)
        sm = a.plugin["xep_0198"]
        assert sm.sm_id and sm.handled > 0
        a.transport.abort()                          # the phone loses its connection
        await a.wait_until("disconnected")
        for i in range(3):
            b.send_message(mto="u_sm_a@localhost", mbody=f"gap {i}", mtype="chat")
        await barrier(b)
        await asyncio.sleep(0.3)
        resumed = asyncio.ensure_future(a.wait_until("session_resumed"))
        a.connect("127.0.0.1", imd.port)
        await asyncio.wait_for(resumed, 10)
        got = [(await next_message(a))["body"] for _ in range(3)]
        assert got == ["gap 0", "gap 1", "gap 2"]
        await barrier(a)
        assert a.inbox.empty()                       # each exactly once
        b.send_message(mto="u_sm_a@localhost", mbody="after", mtype="chat")
        assert (await next_message(a))["body"] == "after"
        await logout(a, b)
    run(scenario())


@pytest.mark.imd_only("imd delivers to every device at once; prosody keeps them in the detached session")
def test_unacked_messages_stay_offline_without_resume(imd):
    async def scenario():
        a = client("u_sm_c", resource="phone", plugins=PLUGINS)
        enabled = asyncio.ensure_future(a.wait_until("sm_enabled"))
        await login(a, imd)
        await asyncio.wait_for(enabled, 10)
        a.transport.abort()
        await a.wait_until("disconnected")
        b = client("u_sm_d")
        await login(b, imd)
        b.send_message(mto="u_sm_c@localhost", mbody="unacked", mtype="chat")
        await barrier(b)
        await asyncio.sleep(0.3)
        fresh = client("u_sm_c", resource="tablet")     # a new login, no resume
        await login(fresh, imd)
        m = await next_message(fresh)
        assert m["body"] == "unacked" and m["delay"]["stamp"]
        await logout(fresh, b)
    run(scenario())


def test_clean_close_is_not_resumable_and_bind_conflict_ends_detached(imd):
    async def scenario():
        a = client("u_sm_e", resource="phone", plugins=PLUGINS)
        await login(a, imd)
        a.transport.abort()
        await a.wait_until("disconnected")
        again = client("u_sm_e", resource="phone")      # same resource, fresh bind: old one is replaced
        await login(again, imd)
        await barrier(again)
        await logout(again)
    run(scenario())


@pytest.mark.imd_only("raw login with a user token")
def test_raw_acks_and_counts(imd):
    from .test_login import raw_login
    r = raw_login(imd, "u_sm_raw")
    r.buf = b""
    r.send(b"<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
    assert b"<enabled xmlns='urn:xmpp:sm:3' id='" in r.read_until(b"max='")
    r.send(b"<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq><r xmlns='urn:xmpp:sm:3'/>")
    r.read_until(b"<a xmlns='urn:xmpp:sm:3' h='1'/>")
    got = r.read_until(b"<r xmlns='urn:xmpp:sm:3'/>")                   # the server asks too
    assert b"id='p1'" in got and b"<r xmlns='urn:xmpp:sm:3'/>" in got
    r.buf = b""
    r.send(b"<a xmlns='urn:xmpp:sm:3' h='7'/>")                          # too high: ignored
    r.send(b"<a xmlns='urn:xmpp:sm:3' h='1'/><r xmlns='urn:xmpp:sm:3'/>")
    assert b"<a xmlns='urn:xmpp:sm:3' h='1'/>" in r.read_until(b"h='1'/>")
    r.send(b"</stream:stream>")
    assert r.read_to_close().endswith(b"</stream:stream>")
