"""STARTTLS and direct TLS (XEP-0368) with a test CA (openssl CLI): login matrix over both,
required mode, injection, a STARTTLS offer on the direct-TLS port never made."""

import base64
import os
import socket
import ssl
import subprocess

import pytest

from .harness import HEADER, Imd, Raw, barrier, client, login, logout, next_message, run, token

STREAM_SEED = {"passwords": {"tess": "tls-pass"}}

pytestmark = pytest.mark.imd_only("imd's TLS configuration")


def make_ca(path) -> tuple[str, str, str]:
    """A CA and a certificate for 'localhost' signed by it; returns (ca, cert, key) paths."""
    ca_key, ca, key, csr, cert = (os.path.join(path, n) for n in ("ca.key", "ca.pem", "srv.key", "srv.csr",
                                                                  "srv.pem"))
    ext = os.path.join(path, "ext.cnf")
    with open(ext, "w") as f:
        f.write("subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n")
    run_ = lambda *a: subprocess.run(a, check=True, capture_output=True, timeout=60)  # noqa: E731
    run_("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
         "-days", "2", "-subj", "/CN=imd test CA")
    run_("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=localhost")
    run_("openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
         "-days", "2", "-extfile", ext)
    return ca, cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_ca(str(tmp_path_factory.mktemp("ca")))


@pytest.fixture(scope="module", params=["optional", "required"])
def tls_imd(request, tmp_path_factory, certs):
    ca, cert, key = certs
    d = Imd(tmp_path_factory.mktemp("imd-tls"), xmpp={"tls": request.param, "cert": cert, "key": key},
            seed=STREAM_SEED, listen={"xmpps": "127.0.0.1:0"}, limits={"auth_timeout": 3})
    d.start()
    d.mode = request.param
    yield d
    d.stop()
    assert not d.errors(), "\n".join(d.errors())


@pytest.mark.parametrize("mech, user, password", [
    ("PLAIN", "u_tls", None), ("SCRAM-SHA-1", "tess", "tls-pass"), ("SCRAM-SHA-256", "tess", "tls-pass")])
@pytest.mark.parametrize("how", ["starttls", "direct"])
def test_starttls_login_and_chat(tls_imd, certs, mech, user, password, how):
    direct = how == "direct"
    port = tls_imd.addr["xmpps"][1] if direct else None

    async def scenario():
        c = client(user, password, mech=mech, tls=True, ca=certs[0], direct_tls=direct)
        await login(c, tls_imd, port=port)
        assert c.transport.get_extra_info("sslcontext") is not None      # the stream is encrypted
        peer = client("u_tls_peer", tls=True, ca=certs[0], direct_tls=not direct)   # one of each way
        await login(peer, tls_imd, port=None if direct else tls_imd.addr["xmpps"][1])
        bodies = [str(i) * 12000 for i in range(5)]           # coalesced: several TLS records per write
        for body in bodies:
            c.send_message(mto="u_tls_peer@localhost", mbody=body, mtype="chat")
        for body in bodies:
            m = await next_message(peer)
            assert m["body"] == body
        await barrier(c)
        await logout(c, peer)
    run(scenario())


def test_features_and_required_policy(tls_imd):
    r = Raw(tls_imd)
    r.send(HEADER)
    feats = r.read_until(b"</stream:features>")
    assert b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'" in feats
    if tls_imd.mode == "required":
        assert b"<required/>" in feats and b"mechanisms" not in feats
        r.send(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
               + base64.b64encode(b"\0u_x\0" + token("u_x").encode()) + b"</auth>")
        assert b"<encryption-required/>" in r.read_until(b"</failure>")
    else:
        assert b"<required/>" not in feats and b"<mechanism>PLAIN</mechanism>" in feats
    r.close()


def test_plaintext_after_starttls_is_dropped(tls_imd, certs):
    r = Raw(tls_imd)
    r.send(HEADER)
    r.read_until(b"</stream:features>")
    # the injected stanza rides in the same segment as <starttls/>: it must never be parsed
    r.send(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><iq type='get' id='inj'>"
           b"<ping xmlns='urn:xmpp:ping'/></iq>")
    r.read_until(b"<proceed")
    ctx = ssl.create_default_context(cafile=certs[0])
    tls = ctx.wrap_socket(r.sock, server_hostname="localhost")
    tls.sendall(HEADER)
    got = b""
    while b"</stream:features>" not in got:
        got += tls.recv(65536)
    assert b"starttls" not in got and b"<mechanism>SCRAM-SHA-256</mechanism>" in got
    tls.sendall(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
                + base64.b64encode(b"\0u_inj\0" + token("u_inj").encode()) + b"</auth>")
    while b"<success" not in got:
        got += tls.recv(65536)
    assert b"inj" not in got
    tls.close()


def direct_tls(d, ca: str):
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(["xmpp-client"])
    raw = socket.create_connection(d.addr["xmpps"], timeout=10)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def read_until(sock, needle: bytes, buf: bytes = b"") -> bytes:
    while needle not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


def test_direct_tls_offers_no_starttls_and_allows_sasl(tls_imd, certs):
    with direct_tls(tls_imd, certs[0]) as t:
        assert t.selected_alpn_protocol() == "xmpp-client"
        t.sendall(HEADER)
        feats = read_until(t, b"</stream:features>")
        assert b"starttls" not in feats and b"<mechanism>PLAIN</mechanism>" in feats   # even when "required"
        t.sendall(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")             # TLS in TLS: refused
        assert b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>" in read_until(t, b"</stream:stream>")


def test_direct_tls_auth_deadline_covers_the_handshake(tls_imd):
    with socket.create_connection(tls_imd.addr["xmpps"], timeout=20) as s:
        s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")      # the start of a ClientHello, no more
        s.settimeout(20)
        assert s.recv(100) == b""           # closed by the auth deadline, nothing sent
