"""Integration harness: imd in a subprocess with its XMPP listener, slixmpp clients, raw sockets.

    d = Imd(tmp_path, seed={"passwords": {"carol": "pw"}, "contacts": [["alice", "bob"]]})
    d.start()                      # d.addr["xmpp"] = (host, port), read from the log
    c = client("alice")            # slixmpp ClientXMPP, password = a user token
    await login(c, d)              # session_start; roster; initial presence
    d.stop()

slixmpp runs on asyncio in the test process; ``run(coro)`` runs one scenario.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

import orjson
import slixmpp
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from imd.auth import issue
from tests import daemon
from tests.daemon import SECRET

DOMAIN = "localhost"
HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 10
ACTIVE = None             # the server under test (set by conftest); prosody needs registered users


def token(user: str, role: str = "guest", **kw) -> str:
    return issue(SECRET, user, role, 3600, **kw)


class Imd(daemon.Imd):
    """tests.daemon.Imd with every listener on (XMPP without TLS unless ``xmpp`` says
    otherwise) and, before it starts, the store seeded with ``seed`` (seed.py)."""

    def __init__(self, tmp_path, xmpp: dict | None = None, seed: dict | None = None,
                 limits: dict | None = None, listen: dict | None = None) -> None:
        super().__init__(tmp_path, {
            "node": {"id": "x1"},
            "listen": {"xmpp": "127.0.0.1:0", "comet": "127.0.0.1:0", "admin": "127.0.0.1:0", **(listen or {})},
            "xmpp": {"domain": DOMAIN, "tls": "disabled", **(xmpp or {})},
            "presence": {"grace": 0.2},
            "limits": limits or {},
        })
        self.seed = seed

    def start(self) -> "Imd":
        if self.seed:
            subprocess.run([sys.executable, os.path.join(HERE, "seed.py"), str(self.config_path),
                            orjson.dumps(self.seed).decode()], env=self.env, check=True, timeout=60)
        return super().start(timeout=30)

    @property
    def port(self) -> int:
        return self.addr["xmpp"][1]

    def errors(self) -> list:
        """Log lines at error level or with a traceback."""
        return [ln for ln in self.lines if " error " in ln or "Traceback" in ln]


def client(user: str, password: str | None = None, resource: str = "r1", mech: str | None = None,
           tls: bool = False, ca: str | None = None, plugins=("xep_0030", "xep_0199", "xep_0203"),
           direct_tls: bool = False):
    """A slixmpp client; ``tls``: STARTTLS, ``direct_tls``: TLS from the first byte (XEP-0368)."""
    if password is None and hasattr(ACTIVE, "register"):     # prosody: no tokens, a registered password
        password = "pw-" + user
        ACTIVE.register(user, password)
    elif password is None:                # a user token: only PLAIN can carry it
        password, mech = token(user), mech or "PLAIN"
    c = slixmpp.ClientXMPP(f"{user}@{DOMAIN}/{resource}" if resource else f"{user}@{DOMAIN}",
                           password, sasl_mech=mech)
    c.enable_direct_tls = direct_tls
    c.enable_starttls = tls and not direct_tls
    c.enable_plaintext = not direct_tls
    fm = c.plugin["feature_mechanisms"]
    fm.unencrypted_plain = True
    fm.unencrypted_scram = True
    if ca:
        c.ca_certs = ca
    c.auto_authorize = None
    c.auto_subscribe = False
    for p in plugins:
        c.register_plugin(p)
    c.inbox = asyncio.Queue()
    c.presences = asyncio.Queue()
    c.add_event_handler("message", c.inbox.put_nowait)
    c.raw_messages = asyncio.Queue()        # every <message>, with or without a body
    c.register_handler(Callback("raw messages", MatchXPath("{jabber:client}message"), c.raw_messages.put_nowait))
    c.add_event_handler("presence", c.presences.put_nowait)
    return c


async def login(c, d: Imd, *, roster: bool = True, presence: bool = True, priority: int | None = 5,
                port: int | None = None):
    failed = asyncio.get_running_loop().create_future()
    c.add_event_handler("failed_auth", lambda *a: failed.done() or failed.set_result("failed_auth"))
    c.connect("127.0.0.1", port or d.port)
    start = asyncio.ensure_future(c.wait_until("session_start"))
    done, _ = await asyncio.wait({start, failed}, timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
    if start not in done:
        start.cancel()
        raise AssertionError(f"login of {c.boundjid} failed: {failed.result() if failed.done() else 'timeout'}")
    if roster:
        await c.get_roster()
    if presence:
        c.send_presence(ppriority=priority)
        await barrier(c)                  # the server has processed the initial presence
    return c


async def barrier(c) -> None:
    """Everything the server sent because of earlier stanzas has arrived (ping round trip)."""
    await c.plugin["xep_0199"].ping(jid=DOMAIN, timeout=TIMEOUT)


async def next_message(c, timeout: float = TIMEOUT):
    return await asyncio.wait_for(c.inbox.get(), timeout)


async def logout(*clients) -> None:
    waits = [asyncio.ensure_future(c.wait_until("disconnected")) for c in clients]
    for c in clients:
        c.disconnect()
    await asyncio.wait(waits, timeout=5)
    for w in waits:
        w.cancel()


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# -- raw sockets ----------------------------------------------------------------------
HEADER = (b"<?xml version='1.0'?><stream:stream to='localhost' version='1.0' xml:lang='en' "
          b"xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>")


class Raw:
    """A plain socket speaking XMPP by hand."""

    def __init__(self, d: Imd) -> None:
        self.sock = socket.create_connection(("127.0.0.1", d.port), timeout=TIMEOUT)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until(self, needle: bytes, timeout: float = TIMEOUT) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.buf:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buf += chunk
        return self.buf

    def read_to_close(self, timeout: float = TIMEOUT) -> bytes:
        """Everything until the server closes the connection (raises on timeout)."""
        self.sock.settimeout(timeout)
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            self.buf += chunk
        return self.buf

    def close(self) -> None:
        self.sock.close()
