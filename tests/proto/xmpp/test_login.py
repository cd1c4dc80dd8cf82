"""Login matrix with slixmpp: PLAIN (token or set password), SCRAM-SHA-1/256, bind, conflicts."""

import asyncio

import pytest

from .harness import DOMAIN, HEADER, Raw, barrier, client, login, logout, run, token


NO_SHA256 = pytest.mark.imd_only("prosody 0.12 offers no SCRAM-SHA-256")


@pytest.mark.parametrize("mech, user, password", [
    ("PLAIN", "u_plain_token", None),                 # password = user token
    ("PLAIN", "sam", "sam-pass"),                     # password set through the admin API
    ("SCRAM-SHA-1", "sam", "sam-pass"),
    pytest.param("SCRAM-SHA-256", "pat", "pat pass \u00e9", marks=NO_SHA256),
    (None, "pat", "pat pass \u00e9"),                  # slixmpp's own choice: the best SCRAM offered
])
def test_login_matrix(imd, mech, user, password):
    async def scenario():
        c = client(user, password, resource="phone", mech=mech)
        await login(c, imd)
        assert c.boundjid.full == f"{user}@{DOMAIN}/phone"
        await barrier(c)
        await logout(c)
    run(scenario())


def test_generated_resource(imd):
    async def scenario():
        c = client("u_nores", resource="")
        await login(c, imd)
        assert c.boundjid.resource                 # imd: imd-<random>; prosody: a UUID
        await logout(c)
    run(scenario())


@pytest.mark.parametrize("mech, user, password", [
    ("PLAIN", "sam", "wrong"),
    pytest.param("SCRAM-SHA-256", "sam", "wrong", marks=NO_SHA256),
    ("SCRAM-SHA-1", "nobody", "x"),
    ("PLAIN", "u_other", None),                       # a token for someone else
])
def test_wrong_credentials_then_right_ones(imd, mech, user, password):
    async def scenario():
        if password is None:
            bad = client(user, token("somebody_else"), mech=mech)
        else:
            bad = client(user, password, mech=mech)
        failed = asyncio.get_running_loop().create_future()
        bad.add_event_handler("failed_auth", lambda *a: failed.done() or failed.set_result(True))
        bad.connect("127.0.0.1", imd.port)
        assert await asyncio.wait_for(failed, 10)
        bad.abort()
        good = client("sam", "sam-pass", mech=mech)
        await login(good, imd)
        await logout(good)
    run(scenario())


@pytest.mark.imd_only("user tokens are imd's")
def test_expired_token_is_refused(imd):
    from imd.auth import issue

    from .harness import SECRET

    async def scenario():
        bad = client("u_expired", issue(SECRET, "u_expired", "guest", -100), mech="PLAIN")
        failed = asyncio.get_running_loop().create_future()
        bad.add_event_handler("failed_auth", lambda *a: failed.done() or failed.set_result(True))
        bad.connect("127.0.0.1", imd.port)
        assert await asyncio.wait_for(failed, 10)
        bad.abort()
    run(scenario())


def test_bind_conflict_kicks_the_old_session(imd):
    async def scenario():
        old = client("u_conflict", resource="phone")
        await login(old, imd)
        gone = asyncio.ensure_future(old.wait_until("disconnected"))
        new = client("u_conflict", resource="phone")
        await login(new, imd)
        await asyncio.wait_for(gone, 10)
        assert new.boundjid.resource == "phone"
        await barrier(new)
        await logout(new)
    run(scenario())


def raw_login(imd, user="u_raw", resource="raw"):
    import base64
    r = Raw(imd)
    r.send(HEADER)
    r.read_until(b"</stream:features>")
    r.send(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
           + base64.b64encode(b"\0" + user.encode() + b"\0" + token(user).encode()) + b"</auth>")
    r.read_until(b"<success")
    r.send(HEADER)
    r.read_until(b"<bind")
    r.send(b"<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>"
           + resource.encode() + b"</resource></bind></iq>")
    r.read_until(b"</iq>")
    return r


@pytest.mark.imd_only("raw login with a user token; exact bytes of imd's features")
def test_session_iq_and_features(imd):
    r = raw_login(imd)
    assert b"<session xmlns='urn:ietf:params:xml:ns:xmpp-session'><optional/></session>" in r.buf
    assert b"<ver xmlns='urn:xmpp:features:rosterver'/>" in r.buf       # roster versioning offered
    assert b"<jid>u_raw@localhost/raw</jid>" in r.buf
    r.buf = b""
    r.send(b"<iq type='set' id='s1'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>")
    assert b"<iq type='result' id='s1'" in r.read_until(b"id='s1'")
    r.send(b"</stream:stream>")
    assert r.read_to_close().endswith(b"</stream:stream>")
