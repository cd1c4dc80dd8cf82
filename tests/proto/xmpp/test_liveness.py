"""Heartbeats and shutdown on their own daemon (short timers): the server pings idle clients
(XEP-0199), closes silent ones with connection-timeout, and sends system-shutdown on SIGTERM."""

import pytest

from .harness import Imd, client, login, logout, run
from .test_login import raw_login

pytestmark = pytest.mark.imd_only("imd's heartbeat and shutdown")


@pytest.fixture
def fast(tmp_path):
    d = Imd(tmp_path, limits={"heartbeat": 1, "idle_timeout": 3})
    d.start()
    yield d
    d.stop()


def test_server_pings_and_answering_clients_stay(fast):
    async def scenario():
        import asyncio
        c = client("u_live")
        pings = []
        c.add_filter("in", lambda st: (pings.append(st) if st.xml.find("{urn:xmpp:ping}ping") is not None
                                       else None) or st)      # slixmpp's xep_0199 answers them
        await login(c, fast)
        await asyncio.sleep(5)                                  # past idle_timeout: still connected
        assert pings and pings[0]["from"] == "localhost"
        assert c.is_connected()
        await c.plugin["xep_0199"].ping(jid="localhost")
        await logout(c)
    run(scenario())


def test_silent_client_gets_connection_timeout(fast):
    r = raw_login(fast, "u_silent")
    r.buf = b""
    got = r.read_to_close(timeout=15)
    assert b"<ping xmlns='urn:xmpp:ping'/>" in got
    assert b"<connection-timeout xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in got


def test_shutdown_sends_system_shutdown(fast):
    r = raw_login(fast, "u_bye")
    r.buf = b""
    fast.stop()
    got = r.read_to_close(timeout=15)
    assert b"<system-shutdown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in got and got.endswith(
        b"</stream:stream>")


def test_failed_logins_from_one_address_are_throttled(fast):
    import asyncio

    async def scenario():
        async def attempt(password):
            c = client("sam_guess", password, mech="PLAIN", resource="")
            failed = asyncio.get_running_loop().create_future()
            c.add_event_handler("failed_auth", lambda *a: failed.done() or failed.set_result(True))
            c.connect("127.0.0.1", fast.port)
            await asyncio.wait_for(failed, 10)
            c.abort()
        await asyncio.gather(*(attempt(f"guess{i}") for i in range(20)))
        # the right credentials (a valid token) are refused for a while from this address
        ok = client("u_after_guessing")
        with pytest.raises(AssertionError, match="failed_auth"):
            await login(ok, fast)
        ok.abort()
    run(scenario())


def test_connections_over_the_per_address_limit_get_a_stream_error(tmp_path):
    from .harness import Raw
    d = Imd(tmp_path, limits={"max_connections_per_ip": 2})
    d.start()
    try:
        keep = [Raw(d), Raw(d)]
        extra = Raw(d)
        got = extra.read_to_close()
        assert b"<policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in got
        assert got.startswith(b"<?xml version='1.0'?><stream:stream ") and got.endswith(b"</stream:stream>")
        for r in keep:
            r.close()
    finally:
        d.stop()


def test_message_rate_limit_is_a_message_error(tmp_path):
    d = Imd(tmp_path, limits={"msg_rate": 1, "msg_burst": 2})
    d.start()

    async def scenario():
        import asyncio
        a = client("u_rate")
        await login(a, d)
        for i in range(6):
            m = a.make_message(mto="u_rate_peer@localhost", mbody=f"m{i}", mtype="chat")
            m["id"] = f"r{i}"
            m.send()
        err = await asyncio.wait_for(a.raw_messages.get(), 10)
        while err["type"] != "error":
            err = await asyncio.wait_for(a.raw_messages.get(), 10)
        # slixmpp's error plugin predates RFC 6120's policy-violation: read the element itself
        cond = err.xml.find("{jabber:client}error/{urn:ietf:params:xml:ns:xmpp-stanzas}policy-violation")
        assert cond is not None and err["id"].startswith("r"), str(err)
        await logout(a)
    try:
        run(scenario())
    finally:
        d.stop()
