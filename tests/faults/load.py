"""Sustained load that survives daemon restarts, recorded by a Checker.

``Sender`` keeps a window of messages in flight to random recipients; on a lost
connection it reconnects and re-sends its unacknowledged messages with the same
client ids (the server answers a repeated id with the original ack and stores
nothing new). ``Receiver`` follows one device's inbox: it records every entry,
acknowledges them, and on a lost connection reconnects with ``since`` = the
highest seq up to which it holds everything. Both run until ``stop`` is set,
retrying connections while the daemon is away.

Both speak raw TCP by default; ``proto`` picks another transport
(tests/faults/transports.py: ws, sse, poll, xmpp), and ``addr`` then returns that
transport's listener. An XMPP sender gets no imd acks: it sends at its rate and
records only ``sent``; :func:`acked_from_store` later marks as acked what the store
holds in its outbox, so those messages are checked like acked ones.

Plain blocking sockets: use threads, or greenlets under gevent's monkey patching.
``addr`` is a callable returning the current (host, port), because a restarted
daemon listens on a new port.
"""

from __future__ import annotations

import http.client
import random
import threading
import time

import orjson

from imd.client import Client, ClientError

from .checker import Checker
from .transports import dial

ERRORS = (OSError, ClientError, TimeoutError, ValueError)


def connect(addr, token_for, user: str, role: str, device: str, since, stop: threading.Event,
            timeout: float = 10.0, proto: str = "tcp"):
    """Log in, retrying every 50 ms while the daemon is away; None once ``stop`` is set."""
    while not stop.is_set():
        try:
            return dial(proto, addr(), token_for(user, role), user, device, since, timeout)
        except (KeyError, *ERRORS):              # KeyError: a restarting daemon has no address yet
            time.sleep(0.05)
    return None


def read_inbox(admin_addr, user: str) -> list:
    """Every entry of ``user``'s inbox, read from the store through the admin API
    (``GET /api/v1/users/U/inbox``; no device, so no cursor moves)."""
    entries, since = [], 0
    while True:
        con = http.client.HTTPConnection(*admin_addr, timeout=30)
        try:
            con.request("GET", f"/api/v1/users/{user}/inbox?since={since}&limit=500")
            r = con.getresponse()
            page = orjson.loads(r.read())
        finally:
            con.close()
        assert r.status == 200, page
        entries += page["entries"]
        if len(page["entries"]) < 500:
            return entries
        since = page["entries"][-1]["seq"]


def acked_from_store(admin_addr, senders, checker: Checker) -> None:
    """For senders without imd acks (XMPP): what their outbox in the store holds was
    stored, so it counts as acked (and must reach its recipients)."""
    for s in senders:
        for e in read_inbox(admin_addr, s.user):
            cid = client_id(e)
            if e.get("from") == s.user and cid is not None:
                checker.acked(s.user, cid, e["mid"], e["seq"])


def client_id(env: dict):
    """The sender's client id, which Sender puts first in every body."""
    body = env.get("body")
    return body.split(" ", 1)[0] if isinstance(body, str) and env.get("type") == "msg" else None


def audit(addr, token_for, users, checker: Checker, device: str = "audit", timeout: float = 30.0) -> None:
    """Read every user's whole inbox from the store with a fresh device (``since`` = 0),
    as an expected device of the checker: a message acked but not stored shows as lost."""
    for user in users:
        checker.expect(user, device)
        checker.connected(user, device)
        with Client(*addr(), timeout=timeout) as c:
            top = c.auth(token_for(user, "guest"), platform="android", device=device, since=0)["seq"]
            deadline = time.monotonic() + timeout
            got = 0
            while got < top and time.monotonic() < deadline:
                env = c.recv(timeout=max(0.1, deadline - time.monotonic()))
                if env.get("type") in ("msg", "notice"):
                    checker.received(user, device, env, client_id(env))
                    got += 1


def wind_down(d, token_for, users, senders, receivers, stop_send: threading.Event,
              stop_recv: threading.Event, timeout: float = 30.0) -> None:
    """Stop the senders, then let every receiver catch up to its inbox's top (read by a
    probe device of each user), then stop the receivers."""
    stop_send.set()
    for s in senders:
        s.join(timeout)
        assert not s.is_alive()
    tops = {}
    for u in users:
        with Client(*d.addr["tcp"]) as c:
            tops[u] = c.auth(token_for(u), device="probe")["seq"]
    for r in receivers:
        assert r.catch_up(lambda u: tops[u], timeout), f"{r.name} did not catch up"
    stop_recv.set()
    for r in receivers:
        r.join(10)


class _LoadThread(threading.Thread):
    """What a sender and a receiver share: one user's connection, re-opened until ``stop``."""

    def __init__(self, thread_name: str, user: str, addr, token_for, checker: Checker,
                 stop: threading.Event, proto: str) -> None:
        super().__init__(daemon=True, name=thread_name)
        self.proto = proto
        self.user = user
        self.addr = addr
        self.token_for = token_for
        self.chk = checker
        self.stop = stop
        self.reconnects = 0

    def _connect(self, role: str, device: str, since=None):
        """A new logged-in connection, counted in ``reconnects``; None once ``stop`` is set."""
        c = connect(self.addr, self.token_for, self.user, role, device, since, self.stop, proto=self.proto)
        if c is not None:
            self.reconnects += 1
        return c


class Sender(_LoadThread):
    def __init__(self, name: str, recipients: list, addr, token_for, checker: Checker,
                 stop: threading.Event, window: int = 20, rate: float = 0.0, body_size: int = 40,
                 proto: str = "tcp") -> None:
        super().__init__(f"sender-{name}", name, addr, token_for, checker, stop, proto)
        self.recipients = recipients
        self.window = window
        self.interval = 1.0 / rate if rate else 0.0
        self.body = "x" * body_size
        self.n = 0
        self.pending: dict = {}       # cid -> envelope sent, not yet answered

    def _new(self) -> dict:
        self.n += 1
        cid = f"{self.user}-{self.n}"
        to = random.choice(self.recipients)
        self.chk.sent(self.user, cid, to)
        return {"type": "msg", "id": cid, "to": to, "body": f"{cid} {self.body}"}

    def run(self) -> None:
        if self.proto == "xmpp":
            return self._run_unacked()
        c = None
        next_at = time.monotonic()
        while True:
            if self.stop.is_set() and not self.pending:
                break
            if c is None:
                c = self._connect("host", "s")
                if c is None:
                    break
                try:
                    for env in self.pending.values():    # same ids: answered with the original ack
                        c.send(env)
                except ERRORS:
                    c.close()
                    c = None
                    continue
            try:
                while not self.stop.is_set() and len(self.pending) < self.window:
                    if self.interval:
                        now = time.monotonic()
                        if now < next_at:
                            if self.pending:
                                break
                            time.sleep(next_at - now)
                        next_at = max(next_at + self.interval, time.monotonic() - 1.0)
                    env = self._new()
                    self.pending[env["id"]] = env
                    c.send(env)
                if not self.pending:
                    continue
                reply = c.wait_for(lambda e: e.get("type") in ("ack", "error") and e.get("id") in self.pending,
                                   timeout=2.0 if self.stop.is_set() else 10.0)
            except ERRORS:
                c.close()
                c = None
                if self.stop.is_set():
                    time.sleep(0.05)
                continue
            cid = reply["id"]
            if reply["type"] == "ack":
                self.chk.acked(self.user, cid, reply["mid"], reply["seq"])
                del self.pending[cid]
            else:
                self.chk.refused(self.user, cid, reply["code"])
                del self.pending[cid]
                time.sleep(0.05)
        if c is not None:
            c.close()

    def _run_unacked(self) -> None:
        """XMPP: one message per interval (or ``window`` at a time), no acks to wait for."""
        c = None
        while not self.stop.is_set():
            if c is None:
                c = self._connect("host", "s")
                if c is None:
                    break
            try:
                for _ in range(1 if self.interval else self.window):
                    c.send(self._new())
                c.recv(self.interval or 0.01)     # answers the server's <r/> and pings
            except TimeoutError:
                pass
            except ERRORS:
                c.close()
                c = None
        if c is not None:
            c.close()


class Receiver(_LoadThread):
    def __init__(self, user: str, device: str, addr, token_for, checker: Checker,
                 stop: threading.Event, churn: float = 0.0, proto: str = "tcp") -> None:
        """``churn`` > 0: drop and re-open the connection every ``churn`` seconds."""
        super().__init__(f"receiver-{user}-{device}", user, addr, token_for, checker, stop, proto)
        self.device = device
        self.churn = churn
        checker.expect(user, device)

    def run(self) -> None:
        while not self.stop.is_set():
            since = self.chk.contiguous(self.user, self.device)
            c = self._connect("guest", self.device, since)
            if c is None:
                return
            self.chk.connected(self.user, self.device)
            until = time.monotonic() + self.churn if self.churn else None
            try:
                self._follow(c, until)
            except ERRORS:
                pass
            c.close()

    def _follow(self, c: Client, until) -> None:
        last_ack = 0
        while not self.stop.is_set() and (until is None or time.monotonic() < until):
            try:
                env = c.recv(timeout=0.5)
            except TimeoutError:
                continue
            if env.get("type") in ("msg", "notice"):
                self.chk.received(self.user, self.device, env, client_id(env))
                if env["seq"] is not None and env["seq"] - last_ack >= 20:
                    c.ack(env["seq"])
                    last_ack = env["seq"]
            elif env.get("type") == "close":
                return

    def catch_up(self, top_for, timeout: float = 30.0) -> bool:
        """After the load: wait until this device holds its whole inbox (``top_for(user)``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.chk.contiguous(self.user, self.device) >= top_for(self.user):
                return True
            time.sleep(0.1)
        return False
