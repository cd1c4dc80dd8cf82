"""Blocking client connections for the fault load, one per transport, all with the
same small interface as :class:`imd.client.Client`: ``send(env)``, ``recv(timeout)``
(TimeoutError when nothing came), ``wait_for(pred, timeout)``, ``ack(seq)``, ``close()``.

    conn = dial("ws", addr, token, user, device, since)   # logged in; raises on failure

``addr`` is the (host, port) of the listener the transport uses (``tcp``, ``comet``
for ws/sse/poll, ``xmpp``). How each one resumes after the daemon comes back:

* ``tcp``, ``ws``: the auth envelope's ``since`` (the highest seq held without gaps).
* ``sse``: the ``Last-Event-ID`` header (what a browser's EventSource sends by itself);
  envelopes go out with ``POST /im/send``, one request at a time (so in order).
* ``poll``: long-poll ``/im/poll`` with ``since`` on the first poll, ``ack=`` on the next.
* ``xmpp``: a raw-socket XMPP client (SASL PLAIN with a token, bind, XEP-0198 stream
  management, initial presence). It has no ``since``: what it did not acknowledge
  with ``<a h/>`` stays unreceived and comes back as offline messages at the next
  login. Its entries carry neither mid nor seq (``None``): the stanza id is the
  sender's client id (the checker matches it to the acked mid).
  Messages it sends get no imd ack (XMPP has none), so they are not "acked".

Nothing here is greenlet-aware beyond plain sockets; use threads.
"""

from __future__ import annotations

import base64
import http.client
import socket
import time
import xml.parsers.expat
from collections import deque
from urllib.parse import quote

import orjson
import websocket

from imd.client import Client, ClientError

DOMAIN = "localhost"
SM_NS = "urn:xmpp:sm:3"


class _Queued:
    """recv/wait_for over a ``_read(deadline)`` that returns a list of envelopes."""

    def __init__(self) -> None:
        self._queue: deque = deque()

    def recv(self, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while not self._queue:
            if time.monotonic() >= deadline:
                raise TimeoutError("nothing received")
            self._queue.extend(self._read(deadline))
        return self._queue.popleft()

    def wait_for(self, pred, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        kept = deque()
        try:
            while True:
                env = self.recv(max(0.0, deadline - time.monotonic()))
                if pred(env):
                    return env
                kept.append(env)
        finally:
            self._queue.extendleft(reversed(kept))

    def ack(self, seq: int) -> None:
        self.send({"type": "ack", "seq": seq})


class WsConn(_Queued):
    def __init__(self, addr, token: str, device: str, since) -> None:
        super().__init__()
        q = f"token={quote(token)}&platform=web&device={device}"
        if since is not None:
            q += f"&since={since}"
        try:
            self.ws = websocket.create_connection(f"ws://{addr[0]}:{addr[1]}/ws?{q}", timeout=10)
        except websocket.WebSocketException as e:
            raise ClientError(f"ws: {e}") from e
        hello = self.recv(10)
        if hello.get("type") != "auth" or not hello.get("ok"):
            self.close()
            raise ClientError(f"ws auth failed: {hello}")

    def _read(self, deadline: float) -> list:
        self.ws.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = self.ws.recv()
        except websocket.WebSocketTimeoutException:
            return []
        except websocket.WebSocketException as e:
            raise ClientError(f"ws: {e}") from e
        if not data:
            raise ClientError("ws closed")
        return [orjson.loads(data)]

    def send(self, env: dict) -> None:
        try:
            self.ws.send(orjson.dumps(env).decode())
        except websocket.WebSocketException as e:
            raise ClientError(f"ws: {e}") from e

    def close(self) -> None:
        try:
            self.ws.close(timeout=0.2)
        except Exception:  # noqa: BLE001  (closing a dead socket)
            pass


class _Http:
    """One keep-alive HTTP/1.1 connection for POST /im/send (and the polls)."""

    def __init__(self, addr) -> None:
        self.addr = addr
        self.con = http.client.HTTPConnection(addr[0], addr[1], timeout=10)

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 10.0):
        self.con.timeout = timeout
        if self.con.sock is not None:
            self.con.sock.settimeout(timeout)
        try:
            self.con.request(method, path, body=body, headers={"Content-Type": "application/json"})
            r = self.con.getresponse()
            return r.status, r.read()
        except (OSError, http.client.HTTPException) as e:
            self.con.close()
            raise ClientError(f"http: {e}") from e

    def close(self) -> None:
        self.con.close()


class SseConn(_Queued):
    def __init__(self, addr, token: str, device: str, since) -> None:
        super().__init__()
        self.token = token
        self.sock = socket.create_connection(addr, timeout=10)
        self.buf = b""
        self.text = b""                 # event-stream bytes not yet split into events
        extra = f"Last-Event-ID: {since}\r\n" if since is not None else ""
        self.sock.sendall(f"GET /im/events?token={quote(token)}&platform=web&device={device} HTTP/1.1\r\n"
                          f"Host: {addr[0]}\r\nAccept: text/event-stream\r\n{extra}\r\n".encode())
        head = self._until(b"\r\n\r\n", time.monotonic() + 10)
        if b" 200 " not in head.split(b"\r\n", 1)[0]:
            self.close()
            raise ClientError(f"sse: {head[:80]!r}")
        hello = self.recv(10)
        if hello.get("type") != "auth" or not hello.get("ok"):
            self.close()
            raise ClientError(f"sse auth failed: {hello}")
        self.post = _Http(addr)
        self.path = f"/im/send?token={quote(token)}&session={quote(str(hello['session']))}"

    def _fill(self, deadline: float) -> bool:
        """Read more bytes into ``buf``; False on timeout."""
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return False
        except OSError as e:
            raise ClientError(f"sse: {e}") from e
        if not data:
            raise ClientError("sse stream closed")
        self.buf += data
        return True

    def _until(self, marker: bytes, deadline: float) -> bytes:
        while marker not in self.buf:
            if not self._fill(deadline):
                raise TimeoutError("sse: no answer")
        i = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def _read(self, deadline: float) -> list:
        """Take the complete chunks in ``buf`` into ``text``, return its complete events."""
        while True:
            while b"\r\n" in self.buf:
                line, rest = self.buf.split(b"\r\n", 1)
                size = int(line, 16)
                if len(rest) < size + 2:
                    break
                if size == 0:
                    raise ClientError("sse stream ended")
                self.text += rest[:size]
                self.buf = rest[size + 2:]
            if b"\n\n" in self.text:
                break
            if not self._fill(deadline):
                return []
        *events, self.text = self.text.split(b"\n\n")
        out = []
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    out.append(orjson.loads(line[5:]))
        return out

    def send(self, env: dict) -> None:
        status, body = self.post.request("POST", self.path, orjson.dumps(env))
        if status != 202:
            raise ClientError(f"/im/send answered {status} {body[:80]!r}")

    def close(self) -> None:
        self.sock.close()
        if getattr(self, "post", None) is not None:
            self.post.close()


class PollConn(_Queued):
    """Long-poll: each ``_read`` is one ``GET /im/poll`` (answered at once when something
    is queued, else after ``limits.heartbeat`` seconds)."""

    def __init__(self, addr, token: str, device: str, since) -> None:
        super().__init__()
        self.token = quote(token)
        self.polls, self.sends = _Http(addr), _Http(addr)
        self.acked = None
        q = f"/im/poll?token={self.token}&platform=web&device={device}"
        envs = self._get(q + (f"&since={since}" if since is not None else ""))
        hello = envs[0] if envs else {}
        if hello.get("type") != "auth" or not hello.get("ok"):
            self.close()
            raise ClientError(f"poll auth failed: {hello}")
        self.session = quote(str(hello["session"]))
        self._queue.extend(envs[1:])

    def _get(self, path: str) -> list:
        status, body = self.polls.request("GET", path, timeout=30)
        if status != 200:
            raise ClientError(f"/im/poll answered {status} {body[:80]!r}")
        return orjson.loads(body)

    def _read(self, deadline: float) -> list:
        q = f"/im/poll?token={self.token}&session={self.session}"
        if self.acked is not None:
            q, self.acked = q + f"&ack={self.acked}", None
        return self._get(q)               # may block up to limits.heartbeat, past the deadline

    def ack(self, seq: int) -> None:
        self.acked = seq                  # sent with the next poll

    def send(self, env: dict) -> None:
        status, body = self.sends.request("POST", f"/im/send?token={self.token}&session={self.session}",
                                          orjson.dumps(env))
        if status != 202:
            raise ClientError(f"/im/send answered {status} {body[:80]!r}")

    def close(self) -> None:
        self.polls.close()
        self.sends.close()


class _Tree:
    """Incremental XML: complete stanzas (depth-2 elements) as [tag, attrs, children, text]."""

    def __init__(self) -> None:
        self.parser = xml.parsers.expat.ParserCreate()
        self.parser.StartElementHandler = self._start
        self.parser.EndElementHandler = self._end
        self.parser.CharacterDataHandler = self._text
        self.stack: list = []
        self.done: deque = deque()

    def feed(self, data: bytes) -> None:
        try:
            self.parser.Parse(data, False)
        except xml.parsers.expat.ExpatError as e:
            raise ClientError(f"xmpp: {e}") from e

    def _start(self, tag, attrs) -> None:
        el = [tag, attrs, [], []]
        if len(self.stack) >= 2:
            self.stack[-1][2].append(el)
        self.stack.append(el)

    def _end(self, tag) -> None:
        el = self.stack.pop()
        if len(self.stack) == 1:
            self.done.append(el)
        elif not self.stack:
            raise ClientError("xmpp: stream closed by the server")

    def _text(self, data) -> None:
        if len(self.stack) >= 2:
            self.stack[-1][3].append(data)


def _child(el, tag):
    return next((c for c in el[2] if c[0] == tag), None)


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("'", "&apos;")


class XmppConn(_Queued):
    HEADER = (f"<?xml version='1.0'?><stream:stream to='{DOMAIN}' version='1.0' xmlns='jabber:client' "
              "xmlns:stream='http://etherx.jabber.org/streams'>").encode()

    def __init__(self, addr, token: str, user: str, device: str) -> None:
        super().__init__()
        self.user = user
        self.sock = socket.create_connection(addr, timeout=10)
        self.h = 0                       # stanzas received since <enable/> (XEP-0198)
        self.asked = False               # an <r/> to answer at the next read
        try:
            self._login(token, device)
        except (TimeoutError, OSError, ClientError):
            self.sock.close()
            raise

    def _restart(self) -> None:
        self.tree = _Tree()
        self.sock.sendall(self.HEADER)

    def _next(self, deadline: float):
        """The next complete stanza, or None at the deadline."""
        while not self.tree.done:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                return None
            except OSError as e:
                raise ClientError(f"xmpp: {e}") from e
            if not data:
                raise ClientError("xmpp: connection closed")
            self.tree.feed(data)
        return self.tree.done.popleft()

    def _expect(self, tag: str) -> list:
        el = self._next(time.monotonic() + 10)
        if el is None or el[0] != tag:
            raise ClientError(f"xmpp: expected <{tag}>, got {el and el[0]} {el and el[1]}")
        return el

    def _login(self, token: str, device: str) -> None:
        self._restart()
        self._expect("stream:features")
        auth = base64.b64encode(b"\0" + self.user.encode() + b"\0" + token.encode()).decode()
        self.sock.sendall(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{auth}</auth>".encode())
        self._expect("success")
        self._restart()
        self._expect("stream:features")
        self.sock.sendall(f"<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                          f"<resource>{device}</resource></bind></iq>".encode())
        if self._expect("iq")[1].get("type") != "result":
            raise ClientError("xmpp: bind refused")
        self.sock.sendall(f"<enable xmlns='{SM_NS}'/>".encode())
        self._expect("enabled")
        self.sock.sendall(b"<presence/>")

    def _read(self, deadline: float) -> list:
        if self.asked:                   # everything before the <r/> was taken by the caller
            self.asked = False
            self._write(f"<a xmlns='{SM_NS}' h='{self.h}'/>")
        out = []
        while not self.asked:
            el = self._next(deadline if not out else time.monotonic())
            if el is None:
                break
            tag, attrs = el[0], el[1]
            if tag in ("message", "presence", "iq"):
                self.h += 1
            if tag == "r":
                self.asked = True
            elif tag == "iq" and attrs.get("type") == "get":
                self._write(f"<iq type='result' id='{_xml_escape(attrs.get('id', ''))}' to='{DOMAIN}'/>")
            elif tag == "message" and attrs.get("type") in ("chat", "headline", "normal"):
                body = _child(el, "body")
                if body is None:
                    continue
                sender = attrs.get("from", "").split("@", 1)[0] if attrs.get("type") == "chat" else None
                out.append({"type": "msg" if sender else "notice", "id": attrs.get("id"), "mid": None, "seq": None,
                            "from": sender, "body": "".join(body[3])})
            elif tag == "stream:error":
                raise ClientError(f"xmpp stream error: {[c[0] for c in el[2]]}")
        return out

    def _write(self, text: str) -> None:
        try:
            self.sock.sendall(text.encode())
        except OSError as e:
            raise ClientError(f"xmpp: {e}") from e

    def send(self, env: dict) -> None:
        if env.get("type") == "msg":
            self._write(f"<message to='{env['to']}@{DOMAIN}' type='chat' id='{env['id']}'>"
                        f"<body>{_xml_escape(env['body'])}</body></message>")

    def ack(self, seq) -> None:
        pass                              # XEP-0198 acks are answered in _read

    def close(self) -> None:
        try:
            self.sock.sendall(b"</stream:stream>")
        except OSError:
            pass
        self.sock.close()


def dial(proto: str, addr, token: str, user: str, device: str, since, timeout: float = 10.0):
    """A logged-in connection of ``user``'s ``device`` over ``proto`` (see the module doc)."""
    if proto == "tcp":
        c = Client(*addr, timeout=timeout)
        try:
            c.auth(token, platform="android", device=device, since=since)
        except BaseException:
            c.close()
            raise
        return c
    if proto == "ws":
        return WsConn(addr, token, device, since)
    if proto == "sse":
        return SseConn(addr, token, device, since)
    if proto == "poll":
        return PollConn(addr, token, device, since)
    if proto == "xmpp":
        return XmppConn(addr, token, user, device)
    raise ValueError(proto)


LISTENER = {"tcp": "tcp", "ws": "comet", "sse": "comet", "poll": "comet", "xmpp": "xmpp"}
