"""Server SASL against the RFC 7677 vector and slixmpp's client mechanisms."""

import base64

import pytest
from slixmpp.util import sasl as slix

from imd import passwords
from imd.proto.xmpp import sasl

ALICE = passwords.scram_credentials("s3cret é", iterations=4096)
STORE = {"alice": ALICE}


def lookup(user):
    return STORE.get(user)


def check_plain(user, password):
    return passwords.verify_plain(lookup(user), password)


def slix_client(mech, user="alice", password="s3cret é", authzid="", plus_offered=False):
    def creds(required, optional):
        return {"username": user, "password": password, "authzid": authzid}

    def security(values):
        return {"encrypted": False, "unencrypted_plain": True, "unencrypted_scram": True,
                "tls_version": None, "binding_proposed": plus_offered}
    return slix.choose([mech], creds, security)


def run(client, server):
    """Drive a slixmpp client mechanism against our server mechanism; return the server's result."""
    data = client.process()
    while True:
        done, payload = server.step(data)
        if done:
            if payload or client.name.startswith("SCRAM"):
                client.process(payload)           # slixmpp verifies v= (mutual auth)
            return server.user
        data = client.process(payload)


def test_credentials_shape_never_hold_the_password():
    c = passwords.scram_credentials("pencil")
    assert set(c) == {"salt", "iterations", "sha1", "sha256"} and c["iterations"] == 4096
    assert set(c["sha1"]) == set(c["sha256"]) == {"stored_key", "server_key"}
    assert "pencil" not in repr(c)
    assert len(base64.b64decode(c["sha256"]["stored_key"])) == 32
    assert len(base64.b64decode(c["sha1"]["stored_key"])) == 20
    assert c["salt"] != passwords.scram_credentials("pencil")["salt"]


def test_rfc7677_vector():
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    creds = passwords.scram_credentials("pencil", 4096, salt)
    m = sasl.Scram("SCRAM-SHA-256", {"user": creds}.get, "localhost",
                   server_nonce="%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0")
    done, first = m.step(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO")
    assert not done
    assert first == b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    done, final = m.step(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                         b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    assert done and final == b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=" and m.user == "user"


def test_rfc5802_sha1_vector():
    salt = base64.b64decode("QSXCR+Q6sek8bf92")
    creds = passwords.scram_credentials("pencil", 4096, salt)
    m = sasl.Scram("SCRAM-SHA-1", {"user": creds}.get, "localhost", server_nonce="3rfcNHYJY1ZVvWVs7j")
    m.step(b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL")
    done, final = m.step(b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=")
    assert done and final == b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ="


@pytest.mark.parametrize("mech", ["SCRAM-SHA-1", "SCRAM-SHA-256"])
@pytest.mark.parametrize("plus_offered", [False, True])   # gs2 'y,,' and 'n,,'
def test_scram_with_slixmpp_client(mech, plus_offered):
    client = slix_client(mech, plus_offered=plus_offered)
    assert client.name == mech
    assert run(client, sasl.Scram(mech, lookup, "localhost")) == "alice"
    assert client._mutual_auth


@pytest.mark.parametrize("mech", ["SCRAM-SHA-1", "SCRAM-SHA-256", "PLAIN"])
def test_authzid_own_jid_is_accepted_other_refused(mech):
    server = sasl.mechanism(mech, check_plain, lookup, "localhost")
    assert run(slix_client(mech, authzid="alice@localhost"), server) == "alice"
    server = sasl.mechanism(mech, check_plain, lookup, "localhost")
    with pytest.raises(sasl.SaslFailure) as info:
        run(slix_client(mech, authzid="bob@localhost"), server)
    assert info.value.condition == "invalid-authzid"


@pytest.mark.parametrize("mech", ["SCRAM-SHA-1", "SCRAM-SHA-256", "PLAIN"])
@pytest.mark.parametrize("user, password", [("alice", "wrong"), ("nobody", "s3cret é")])
def test_wrong_password_and_unknown_user_fail_alike(mech, user, password):
    server = sasl.mechanism(mech, check_plain, lookup, "localhost")
    with pytest.raises(sasl.SaslFailure) as info:
        run(slix_client(mech, user=user, password=password), server)
    assert info.value.condition == "not-authorized" and server.user is None


def test_unknown_user_gets_a_stable_fake_salt():
    a = sasl.Scram("SCRAM-SHA-256", lookup, "l").step(b"n,,n=ghost,r=abc")[1]
    b = sasl.Scram("SCRAM-SHA-256", lookup, "l").step(b"n,,n=ghost,r=abc")[1]
    assert a.split(b",")[1:] == b.split(b",")[1:] and b",i=4096" in a


def test_plain_with_slixmpp_client_and_token_verifier():
    seen = []

    def token_first(user, password):
        seen.append((user, password))
        return password == "jwt-for-" + user or check_plain(user, password)
    assert run(slix_client("PLAIN", user="carol", password="jwt-for-carol"),
               sasl.Plain(token_first, "localhost")) == "carol"
    assert run(slix_client("PLAIN"), sasl.Plain(token_first, "localhost")) == "alice"
    assert seen[0] == ("carol", "jwt-for-carol")


def test_verify_plain():
    assert passwords.verify_plain(ALICE, "s3cret é")
    assert not passwords.verify_plain(ALICE, "s3cret e")
    assert not passwords.verify_plain(None, "x")


def test_empty_initial_response_gets_empty_challenge():
    m = sasl.Plain(check_plain, "l")
    assert m.step(b"") == (False, b"")
    assert m.step(b"\0alice\0s3cret \xc3\xa9") == (True, b"")


@pytest.mark.parametrize("mech, messages, condition", [
    ("PLAIN", [b"alice\0pw"], "malformed-request"),
    ("PLAIN", [b"\0\0pw"], "malformed-request"),
    ("PLAIN", [b"\0alice\0"], "malformed-request"),
    ("PLAIN", [b"\xff\0alice\0pw"], "malformed-request"),
    ("SCRAM-SHA-256", [b"p=tls-unique,,n=alice,r=abc"], "malformed-request"),
    ("SCRAM-SHA-256", [b"x,,n=alice,r=abc"], "malformed-request"),
    ("SCRAM-SHA-256", [b"n,,r=abc,n=alice"], "malformed-request"),
    ("SCRAM-SHA-256", [b"n,,n=alice,r="], "malformed-request"),
    ("SCRAM-SHA-256", [b"n,,n=al=ice,r=abc"], "malformed-request"),
    ("SCRAM-SHA-256", [b"n,,m=ext,n=alice,r=abc"], "malformed-request"),
    ("SCRAM-SHA-256", [b"n,,n=alice,r=abc,m=x"], "malformed-request"),
    ("SCRAM-SHA-256", [b"n,,n=alice"], "malformed-request"),
    ("SCRAM-SHA-256", [b"n,,n=alice,r=abc", b"c=eSws,r=abcX,p=AAAA"], "malformed-request"),   # wrong c=
    ("SCRAM-SHA-256", [b"n,,n=alice,r=abc", b"c=biws,r=zzz,p=AAAA"], "malformed-request"),     # wrong nonce
    ("SCRAM-SHA-256", [b"n,,n=alice,r=abc", b"c=biws,p=AAAA"], "malformed-request"),
    ("SCRAM-SHA-256", [b"n,,n=alice,r=abc", b"garbage"], "malformed-request"),
])
def test_malformed_exchanges(mech, messages, condition):
    m = sasl.mechanism(mech, check_plain, lookup, "localhost")
    with pytest.raises(sasl.SaslFailure) as info:
        for msg in messages:
            if msg.startswith(b"c=") and b"r=abcX" in msg:
                msg = msg.replace(b"r=abcX", b"r=" + m._nonce.encode())
            m.step(msg)
    assert info.value.condition == condition and m.user is None


def test_bad_proof_is_not_authorized_even_with_right_shape():
    m = sasl.Scram("SCRAM-SHA-1", lookup, "l")
    m.step(b"n,,n=alice,r=abc")
    with pytest.raises(sasl.SaslFailure) as info:
        m.step(b"c=biws,r=" + m._nonce.encode() + b",p=" + base64.b64encode(b"x" * 20))
    assert info.value.condition == "not-authorized"
    with pytest.raises(sasl.SaslFailure):
        m.step(b"c=biws")                         # no step after a final message


def test_unknown_mechanism():
    assert sasl.mechanism("DIGEST-MD5", check_plain, lookup, "l") is None
    assert sasl.MECHANISMS == ("SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN")


def test_auth_guard_window():
    from imd.proto.xmpp.negotiate import AuthGuard
    g = AuthGuard(limit=3, window=0.2, max_entries=2)
    for _ in range(3):
        assert g.allowed("1.2.3.4")
        g.failed("1.2.3.4")
    assert not g.allowed("1.2.3.4") and g.allowed("5.6.7.8")
    import time
    time.sleep(0.25)
    assert g.allowed("1.2.3.4")
    g.failed("a")
    g.failed("b")
    g.failed("c")                                   # the table stays bounded
    assert len(g._fails) <= 2
