"""Certificate rotation with SIGHUP: new handshakes see the new certificate, established
connections keep working, and a broken certificate is refused with a log line while the
old one stays in use."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl

import pytest
import requests
import websocket

from imd.client import Client
from tests.daemon import start_daemon, token
from tests.tlsca import TestCA, serial_of

TIMEOUT = 10


@pytest.fixture
def setup(tmp_path):
    ca = TestCA(tmp_path / "ca")
    first = ca.issue("first", serial=0xA1)
    live_cert, live_key = str(tmp_path / "live.pem"), str(tmp_path / "live.key")
    shutil.copy(first[0], live_cert)
    shutil.copy(first[1], live_key)
    (tmp_path / "d").mkdir()
    d = start_daemon(tmp_path / "d", {
        "listen": {"comet": "127.0.0.1:0", "xmpp": "127.0.0.1:0", "xmpps": "127.0.0.1:0"},
        "tls": {"cert": live_cert, "key": live_key, "tcp": True, "comet": True},
    })
    yield ca, d, live_cert, live_key
    d.stop()
    d.cleanup()
    assert "Traceback" not in d.log(), d.log()


def served_serial(d, ca, listener) -> int:
    with socket.create_connection(d.addr[listener], timeout=TIMEOUT) as raw:
        with ca.client_context().wrap_socket(raw, server_hostname="localhost") as s:
            return serial_of(s)


def client(d, ca, user) -> Client:
    host, port = d.addr["tcp"]
    c = Client(host, port, tls=ca.client_context(), server_hostname="localhost")
    c.auth(token(user), device="d-" + user)
    return c


def hup(d, pattern: str) -> None:
    mark = len(d.log())
    d.kill(signal.SIGHUP)
    d.wait_log(pattern, after=mark)


def starttls_serial(d, ca) -> int:
    with socket.create_connection(d.addr["xmpp"], timeout=TIMEOUT) as s:
        s.sendall(b"<?xml version='1.0'?><stream:stream to='localhost' version='1.0' xmlns='jabber:client' "
                  b"xmlns:stream='http://etherx.jabber.org/streams'>")
        buf = b""
        while b"</stream:features>" not in buf:
            buf += s.recv(65536)
        s.sendall(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        while b"<proceed" not in buf:
            buf += s.recv(65536)
        with ca.client_context().wrap_socket(s, server_hostname="localhost") as t:
            return serial_of(t)


def test_rotation_on_hup(setup):
    ca, d, live_cert, live_key = setup
    listeners = ("tcp", "comet", "xmpps")
    assert all(served_serial(d, ca, n) == 0xA1 for n in listeners) and starttls_serial(d, ca) == 0xA1
    old_a, old_b = client(d, ca, "rot_a"), client(d, ca, "rot_b")
    host, port = d.addr["comet"]
    old_ws = websocket.create_connection(f"wss://{host}:{port}/ws?token={token('rot_w')}", timeout=TIMEOUT,
                                         sslopt={"ca_certs": ca.cert, "server_hostname": "localhost"})
    old_ws.recv()
    assert serial_of(old_a.sock) == 0xA1

    second = ca.issue("second", serial=0xB2)
    shutil.copy(second[1], live_key)              # renewed in place, as certbot does
    shutil.copy(second[0], live_cert)
    hup(d, r"tls certificates reloaded listeners=comet,tcp,xmpp,xmpps")
    assert all(served_serial(d, ca, n) == 0xB2 for n in listeners) and starttls_serial(d, ca) == 0xB2
    # established connections go on with the old certificate's session
    old_a.msg("rot_b", "after the rotation")
    assert old_b.wait_for(lambda e: e.get("type") == "msg")["body"] == "after the rotation"
    old_ws.ping()
    new = client(d, ca, "rot_c")
    assert serial_of(new.sock) == 0xB2
    new.msg("rot_a", "from a new connection")
    assert old_a.wait_for(lambda e: e.get("type") == "msg")["body"] == "from a new connection"
    r = requests.get(f"https://{host}:{port}/ping", verify=ca.cert, timeout=TIMEOUT)
    assert r.status_code == 200
    for c in (old_a, old_b, new):
        c.close()
    old_ws.close()


@pytest.mark.parametrize("breakage", ["garbage cert", "key of another certificate", "missing key"])
def test_broken_certificate_is_refused_and_the_old_one_stays(setup, breakage):
    ca, d, live_cert, live_key = setup
    old = client(d, ca, "brk_a")
    other = ca.issue("other", serial=0xC3)
    if breakage == "garbage cert":
        with open(live_cert, "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
        expect = r"reload refused, keeping the running config: config error: tls\.cert: "
    elif breakage == "key of another certificate":
        shutil.copy(other[1], live_key)
        expect = r"reload refused, keeping the running config: config error: tls\.key: .* does not match"
    else:
        os.unlink(live_key)
        expect = r"reload refused, keeping the running config: config error: tls\.key: cannot read"
    hup(d, expect)
    assert served_serial(d, ca, "tcp") == 0xA1 and served_serial(d, ca, "comet") == 0xA1
    assert old.ping()["type"] == "pong"
    host, port = d.addr["comet"]
    text = requests.get(f"https://{host}:{port}/ping", verify=ca.cert, timeout=TIMEOUT).status_code
    assert text == 200
    # fixed files: the next HUP takes them
    shutil.copy(other[0], live_cert)
    shutil.copy(other[1], live_key)
    hup(d, r"tls certificates reloaded")
    assert served_serial(d, ca, "tcp") == 0xC3
    assert old.ping()["type"] == "pong"
    old.close()


def test_hup_with_a_new_path(setup, tmp_path):
    ca, d, _live_cert, _live_key = setup
    cert, key = ca.issue("moved", serial=0xD4)
    d.write_config({"listen": {"comet": "127.0.0.1:0", "xmpp": "127.0.0.1:0", "xmpps": "127.0.0.1:0"},
                    "tls": {"cert": cert, "key": key, "tcp": True, "comet": True}})
    hup(d, r"tls certificates reloaded")
    assert served_serial(d, ca, "comet") == 0xD4


def test_tls_versions_stay_refused_after_reload(setup):
    ca, d, *_ = setup
    hup(d, r"tls certificates reloaded")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with socket.create_connection(d.addr["tcp"], timeout=TIMEOUT) as raw:
        with pytest.raises(ssl.SSLError):
            ctx.wrap_socket(raw, server_hostname="localhost")
