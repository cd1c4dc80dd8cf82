"""XMPP against an in-process node, for the web tier's Python API: contact changes
become roster pushes and presence, reminders arrive as headline messages, a kick
ends the stream. (slixmpp's asyncio loop and the gevent hub share this thread:
the process is gevent-patched, so asyncio's selector yields to the hub.)"""

import asyncio
import time

import gevent
import pytest

from imd import daemon as daemon_mod
from imd.proto.xmpp.listener import XmppProtocol
from imd.proto.xmpp.parser import Dormant, StreamParser
from tests import inproc

from .harness import client, login, logout, run
from .test_login import raw_login

pytestmark = pytest.mark.imd_only("the web tier's Python API is imd's")


@pytest.fixture
def node(tmp_path, monkeypatch):
    original = daemon_mod.Daemon.protocols

    def protocols(self):
        found = original(self)
        found.setdefault("xmpp", XmppProtocol(self.router, self.cfg))
        return found
    monkeypatch.setattr(daemon_mod.Daemon, "protocols", protocols)
    d = inproc.start(tmp_path, {"listen": {"xmpp": "127.0.0.1:0"}, "xmpp": {"tls": "disabled"}})
    d.port = inproc.addr(d, "xmpp")[1]
    yield d
    d.stop(reconnect=False, timeout=5)


async def until(c, event: str, timeout: float = 10):
    return await asyncio.wait_for(c.wait_until(event), timeout)


async def eventually(condition, timeout: float = 10) -> None:
    """Wait (polling) until ``condition()`` holds; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


def test_contact_changes_are_roster_pushes_with_presence(node):
    async def scenario():
        a = client("u_host", resource="phone")
        await login(a, node)
        assert "u_guest@localhost" not in a.client_roster
        node.router.add_contact("u_host", "u_guest")
        await eventually(lambda: "u_guest@localhost" in a.client_roster)
        assert a.client_roster["u_guest@localhost"]["subscription"] == "both"
        g = client("u_guest")
        await login(g, node)
        p = await harness_presence(a, "u_guest@localhost")       # offline first (added while away)
        while p["type"] != "available":
            p = await harness_presence(a, "u_guest@localhost")
        assert p["from"].full == "u_guest@localhost/imd"
        node.router.remove_contact("u_host", "u_guest")
        await eventually(lambda: "u_guest@localhost" not in a.client_roster)
        await logout(a, g)
    run(scenario())


async def harness_presence(c, jid):
    while True:
        p = await asyncio.wait_for(c.presences.get(), 10)
        if p["from"].bare == jid:
            return p


def test_reminders_arrive_as_headlines(node):
    async def scenario():
        a = client("u_notified")
        await login(a, node)
        node.router.post_notices(["u_notified"], None, "booking.confirmed", {"text": "Booking B9 confirmed"})
        m = await asyncio.wait_for(a.raw_messages.get(), 10)
        while m["type"] != "headline":
            m = await asyncio.wait_for(a.raw_messages.get(), 10)
        assert (m["from"], m["subject"], m["body"]) == ("localhost", "booking.confirmed", "Booking B9 confirmed")
        await logout(a)
    run(scenario())


def test_kick_ends_the_stream(node):
    async def scenario():
        a = client("u_kicked")
        await login(a, node)
        gone = asyncio.ensure_future(until(a, "disconnected"))
        errors = []
        a.add_event_handler("stream_error", errors.append)
        assert node.router.kick("u_kicked", "account suspended") == 1
        await gone
        assert errors and errors[0]["condition"] == "policy-violation"
        assert "suspended" in errors[0]["text"]
    run(scenario())


def test_streams_hold_no_parser_between_reads_and_wake_on_data(node):
    """A bound stream holds no parser between reads (the shared Dormant instead);
    its next stanza wakes one and is routed as usual."""
    async def scenario():
        a, b = client("u_sleepy_a"), client("u_sleepy_b")
        await login(a, node)
        await login(b, node)
        sessions = [s for s in node.node.all_sessions() if s.protocol == "xmpp"]
        assert len(sessions) == 2
        await eventually(lambda: all(isinstance(s.parser, Dormant) for s in sessions))
        a.send_message(mto="u_sleepy_b@localhost", mbody="still there?", mtype="chat")
        m = await asyncio.wait_for(b.raw_messages.get(), 10)
        while m["type"] != "chat":
            m = await asyncio.wait_for(b.raw_messages.get(), 10)
        assert m["body"] == "still there?"
        await eventually(lambda: all(isinstance(s.parser, Dormant) for s in sessions))
        await logout(a)
        await logout(b)
    run(scenario())


def test_entries_written_are_acked_with_the_gathered_acks_or_at_stream_end(node):
    """Without XEP-0198 an inbox entry written to a stream counts as received: the
    session tells the core with the node's gathered acks (XmppProtocol.send_acks,
    ACK_DELAY after the first), or when the stream ends, whichever comes first."""
    async def scenario():
        a, b = client("u_acks_a"), client("u_acks_b", resource="phone")
        await login(a, node)
        await login(b, node)
        proto = next(s for s in node.node.all_sessions() if s.protocol == "xmpp").proto
        proto.ack_delay = 3600                      # only send_acks() or the stream's end ack now

        async def chat(body):
            a.send_message(mto="u_acks_b@localhost", mbody=body, mtype="chat")
            m = await asyncio.wait_for(b.raw_messages.get(), 10)
            while m["type"] != "chat":
                m = await asyncio.wait_for(b.raw_messages.get(), 10)
            assert m["body"] == body

        await chat("one")
        assert node.store.cursor("u_acks_b", "phone") == 0     # written, not yet told
        proto.send_acks()
        await eventually(lambda: node.store.cursor("u_acks_b", "phone") == 1)
        await chat("two")
        await logout(b)
        await eventually(lambda: node.store.cursor("u_acks_b", "phone") == 2)
        await logout(a)
    run(scenario())


def wait_until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        gevent.sleep(0.05)


def sleeping_stream(node, user: str):
    """A raw stream of ``user``, bound and available, once its parser sleeps; and its session."""
    r = raw_login(node, user)
    r.send(b"<presence/>")
    r.read_until(b"<presence")
    s = next(s for s in node.node.all_sessions() if s.protocol == "xmpp" and s.user == user)
    wait_until(lambda: isinstance(s.parser, Dormant))
    r.buf = b""
    return r, s


def test_a_sleeping_stream_wakes_for_its_next_stanza_and_sleeps_again(node):
    r, s = sleeping_stream(node, "u_nap")
    r2, s2 = sleeping_stream(node, "u_nap2")
    assert s.parser is s2.parser                 # alike headers: one shared Dormant
    r.send(b"<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>")
    assert b"<iq type='result' id='p1'" in r.read_until(b"id='p1'")
    assert isinstance(s.parser, Dormant)         # asleep again at once: the read ended between stanzas
    r.send(b"<iq type='get' id='p2'><ping xmlns='urn:xmpp:ping'/>")
    wait_until(lambda: isinstance(s.parser, StreamParser))     # a partial stanza keeps its parser
    assert s.parser.handler is s
    r.send(b"</iq>")
    assert b"<iq type='result' id='p2'" in r.read_until(b"id='p2'")
    assert isinstance(s.parser, Dormant)
    r.send(b"<message to='u_nap2@localhost' type='chat' id='m1'><body>awake?</body></message>")
    assert b"awake?" in r2.read_until(b"awake?")
    r.send(b"</stream:stream>")                   # the replayed header's end tag closes cleanly
    assert r.read_to_close().endswith(b"</stream:stream>")
    r2.close()


@pytest.mark.parametrize("data, condition", [
    (b"<message><body>caf\xe9</body></message>", b"not-well-formed"),
    (b"<message><body>&xxe;</body></message>", b"restricted-xml"),
    (b"<message><body>" + b"x" * (300 * 1024) + b"</body></message>", b"policy-violation"),
    (b"<message>" + b"<a>" * 100, b"policy-violation"),
    (b"hello", b"bad-format"),
])
def test_bad_input_to_a_sleeping_stream_gets_its_stream_error(node, data, condition):
    """A woken parser keeps the stream's checks and limits; other streams are unaffected."""
    other, _ = sleeping_stream(node, "u_calm")
    r, _ = sleeping_stream(node, "u_rude")
    try:
        r.send(data)
    except (BrokenPipeError, ConnectionResetError):
        pass
    got = r.read_to_close()
    assert b"<" + condition + b" xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in got
    assert got.endswith(b"</stream:stream>")
    other.send(b"<iq type='get' id='p2'><ping xmlns='urn:xmpp:ping'/></iq>")
    assert b"<iq type='result' id='p2'" in other.read_until(b"id='p2'")
    other.close()
