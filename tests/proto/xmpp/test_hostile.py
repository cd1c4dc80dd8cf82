"""Hostile and malformed XML on raw sockets: the named stream error, then close; others unaffected."""

import base64

import pytest

from .harness import HEADER, Raw, barrier, client, login, logout, run, token
from .test_login import raw_login

STREAM = b"<stream:stream to='localhost' version='1.0' xmlns='jabber:client' " \
         b"xmlns:stream='http://etherx.jabber.org/streams'>"


def error_of(data: bytes) -> bytes:
    end = data.find(b"</stream:error>")
    start = data.find(b"<stream:error>")
    assert start >= 0 and end > start, data[-500:]
    return data[start:end]


@pytest.mark.parametrize("data, condition", [
    (b"<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'><!ENTITY lol2 '&lol;&lol;&lol;'>]>"
     + STREAM + b"<message><body>&lol2;</body></message>", b"restricted-xml"),
    (b"<!DOCTYPE x SYSTEM 'http://127.0.0.1:1/evil.dtd'>" + STREAM, b"restricted-xml"),
    (HEADER + b"<!-- hello -->", b"restricted-xml"),
    (HEADER + b"<?php echo 1 ?>", b"restricted-xml"),
    (HEADER + b"<message><body>&foo;</body></message>", b"restricted-xml"),
    (b"<?xml version='1.0' encoding='ISO-8859-1'?>" + STREAM, b"unsupported-encoding"),
    (b"<stream:stream to='localhost' xmlns='jabber:client' xmlns:stream='urn:not:streams'>", b"invalid-namespace"),
    (b"<stream:stream to='example.org' version='1.0' xmlns='jabber:client' "
     b"xmlns:stream='http://etherx.jabber.org/streams'>", b"host-unknown"),
    (HEADER + b"<message>" + b"<a>" * 100, b"policy-violation"),
    (HEADER + b"<message><body>" + b"x" * (300 * 1024) + b"</body></message>", b"policy-violation"),
    (HEADER + b"<message to='bob@localhost'><body>hi</body></message>", b"not-authorized"),
    (HEADER + b"<message><body>caf\xe9</body></message>", b"not-well-formed"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, b"not-well-formed"),
])
@pytest.mark.imd_only("exact bytes of imd's stream errors (prosody differs in layout and in some conditions)")
def test_stream_error_then_close(imd, data, condition):
    r = Raw(imd)
    try:
        r.send(data)
    except (BrokenPipeError, ConnectionResetError):
        pass
    got = r.read_to_close()
    assert b"<" + condition + b" xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in error_of(got)
    assert got.startswith(b"<?xml version='1.0'?><stream:stream ")     # our header comes first
    assert got.endswith(b"</stream:stream>")


def test_ten_mib_without_gt_is_cut_early(imd):
    r = Raw(imd)
    r.send(HEADER + b"<message a='")
    sent = 0
    try:
        while sent < 10 * 1024 * 1024:
            r.sock.sendall(b"y" * 65536)
            sent += 65536
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert sent < 10 * 1024 * 1024          # the server closed the connection long before
    try:
        r.read_to_close()
    except ConnectionResetError:
        pass


@pytest.mark.imd_only("imd's auth_timeout")
def test_connection_timeout_without_header(imd):
    r = Raw(imd)
    got = r.read_to_close(timeout=15)              # the test daemon's auth_timeout is 3 s
    assert b"<connection-timeout" in got


@pytest.mark.imd_only('raw login with a user token')
def test_stanza_size_limit_after_auth(imd):
    r = raw_login(imd, "u_big")
    r.buf = b""
    r.send(b"<message to='u_peer2@localhost' type='chat'><body>" + b"x" * (300 * 1024) + b"</body></message>")
    assert b"<policy-violation" in error_of(r.read_to_close())


@pytest.mark.imd_only('raw login with a user token')
def test_whole_session_one_byte_at_a_time(imd):
    r = Raw(imd)
    script = [HEADER, b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
              + base64.b64encode(b"\0u_bytes\0" + token("u_bytes").encode()) + b"</auth>", HEADER,
              b"<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
              b"<resource>slow</resource></bind></iq>", b"  \n ",
              b"<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>"]
    expect = [b"</stream:features>", b"<success", b"</stream:features>", b"</iq>", None, b"id='p1'"]
    for chunk, wait in zip(script, expect):
        for i in range(len(chunk)):
            r.sock.sendall(chunk[i:i + 1])
        if wait:
            r.read_until(wait)
            assert wait in r.buf
    assert b"<jid>u_bytes@localhost/slow</jid>" in r.buf
    assert b"<iq type='result' id='p1'" in r.buf
    r.close()


@pytest.mark.imd_only('raw login with a user token')
def test_pipelined_auth_and_restart(imd):
    r = Raw(imd)
    r.send(HEADER + b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
           + base64.b64encode(b"\0u_pipe\0" + token("u_pipe").encode()) + b"</auth>" + HEADER
           + b"<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"
           + b"<iq type='get' id='x'/>")
    got = r.read_until(b"id='x'")
    assert b"<success" in got and b"<jid>u_pipe@localhost/imd-" in got
    assert b"<bad-request" in got.split(b"id='x'")[-1] or b"<bad-request" in got
    r.close()


@pytest.mark.imd_only('raw login with a user token')
def test_iq_with_two_children_is_bad_request(imd):
    r = raw_login(imd, "u_twokids")
    r.buf = b""
    r.send(b"<iq type='get' id='k2'><ping xmlns='urn:xmpp:ping'/><ping xmlns='urn:xmpp:ping'/></iq>")
    assert b"<bad-request" in r.read_until(b"</iq>")
    r.send(b"<bogus xmlns='urn:x'/>")
    assert b"<unsupported-stanza-type" in r.read_to_close()


@pytest.mark.imd_only("raw login with a user token; imd's roster")
def test_roster_versioning(imd):
    r = raw_login(imd, "alice", "rv")
    r.buf = b""
    r.send(b"<iq type='get' id='r1'><query xmlns='jabber:iq:roster'/></iq>")
    got = r.read_until(b"</iq>")
    ver = got.split(b"ver='")[1].split(b"'")[0]
    r.buf = b""
    r.send(b"<iq type='get' id='r2'><query xmlns='jabber:iq:roster' ver='" + ver + b"'/></iq>")
    assert r.read_until(b"id='r2'/>").endswith(b"<iq type='result' id='r2'/>")
    r.close()


@pytest.mark.imd_only("imd's tls=disabled answer")
def test_tls_not_offered_when_disabled_and_auth_works(imd):
    r = Raw(imd)
    r.send(HEADER)
    assert b"starttls" not in r.read_until(b"</stream:features>")
    r.send(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    assert b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>" in r.read_to_close()


def test_others_unaffected_by_hostile_peers(imd):
    async def scenario():
        c = client("u_calm")
        await login(c, imd)
        bad = Raw(imd)
        bad.send(HEADER + b"<!-- x -->")
        bad.read_to_close()
        await barrier(c)
        await logout(c)
    run(scenario())


@pytest.mark.imd_only("imd's limits.max_body (16384 bytes of UTF-8 by default)")
def test_message_body_size_is_counted_in_utf8_bytes(imd):
    """The body limit is on UTF-8 bytes, not characters: 4,096 four-byte characters fit,
    one more (or 16,385 ASCII bytes) is answered not-acceptable; the stream stays open."""
    r = raw_login(imd, "u_sized")
    r.buf = b""
    emoji = "\U0001F600".encode()
    for n, body in enumerate((emoji * 4096, emoji * 4097, b"x" * 16385, b"x" * 16384)):
        r.send(b"<message to='u_peer2@localhost' type='chat' id='s%d'><body>" % n + body + b"</body></message>"
               + b"<iq type='get' id='p%d'><ping xmlns='urn:xmpp:ping'/></iq>" % n)
        got = r.read_until(b"id='p%d'" % n)
        refused = b"id='s%d'" % n in got and b"<not-acceptable" in got
        assert refused == (n in (1, 2)), got[-600:]
        if refused:         # the error goes back to the sending resource, from the recipient
            assert b"from='u_peer2@localhost' to='u_sized@localhost/" in got, got[-600:]
        r.buf = b""
    r.close()


@pytest.mark.imd_only("imd's server-made message ids")
def test_a_message_without_id_gets_a_server_made_one(imd):
    """A chat message sent without ``id`` is stored under a server-made client id,
    ``x.<sending session's id>.<n>``, which the recipient sees as the stanza id; two
    such messages get two ids, and the sender's stanza is not echoed to it."""
    import re
    b = raw_login(imd, "u_noid_b")
    b.send(b"<presence/><iq type='get' id='p0'><ping xmlns='urn:xmpp:ping'/></iq>")
    b.read_until(b"id='p0'")
    a = raw_login(imd, "u_noid_a")
    a.buf = b.buf = b""
    for n in (1, 2):
        a.send(b"<message to='u_noid_b@localhost' type='chat'><body>m%d</body></message>" % n)
        b.read_until(b"<body>m%d</body></message>" % n)
    ids = re.findall(rb"<message type='chat' from='u_noid_a@localhost' to='u_noid_b@localhost' "
                     rb"id='x\.([^']+)\.([0-9a-f]+)\.([0-9]+)'><body>m[12]</body>", b.buf)
    assert len(ids) == 2 and ids[0][:2] == ids[1][:2] and ids[0][2] != ids[1][2], b.buf
    a.send(b"<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>")
    assert b"<message" not in a.read_until(b"id='p1'")
    a.close()
    b.close()
