"""Multi-process load generator: many client connections per process, driven by epoll.

Each worker process holds at most MAX_PER_PROCESS sockets (the fd limit here is 20,000), uses
non-blocking sockets and one epoll loop, binds its connections to source addresses 127.0.0.2..40
with IP_BIND_ADDRESS_NO_PORT (so ephemeral ports are per source address), and exits by itself at
its deadline. The parent talks to its workers through a pipe (`Fleet`): open more connections,
set heartbeats, run chat traffic, churn logins, count delivered messages, stop.

Connection kinds (handshake that must finish before a connection counts as established):
  tcp   imd raw TCP: 4-byte big-endian length + JSON envelope; sends `auth` with a JWT, waits for
        `{"type":"auth","ok":true}`
  sse   HTTP GET with Accept: text/event-stream; waits for the 200 response headers (with
        `await_auth`, imd's user sessions: also for the `auth` answer on the stream)
  ws    WebSocket handshake; waits for 101 (with `await_auth`: also for the `auth` answer)
  mqtt  MQTT 3.1.1 CONNECT (+ SUBSCRIBE when a topic is given); waits for CONNACK (+ SUBACK)
  xmpp  stream, SASL PLAIN over plaintext, bind, optional roster get, initial presence
Delivered messages are counted by a marker (MARK) that every published payload carries once, so
the same counter works for every protocol; chat payloads carry a send timestamp for latency.

The wire helpers at the top are pure functions and are unit-tested in tests/bench/.
"""
import base64
import errno
import itertools
import multiprocessing
import os
import re
import resource
import select
import socket
import struct
import sys
import time
from array import array

import jwt
import orjson

MAX_PER_PROCESS = 19000
IP_BIND_ADDRESS_NO_PORT = 24
SOURCES = [f"127.0.0.{i}" for i in range(2, 41)]
MARK = b"@@M"            # one per delivered payload (fan-out)
TS_MARK = b"@@T"          # followed by the send time in ns (monotonic) and ';' (chat latency)
MAX_FRAME = 65536


# ---------------------------------------------------------------- wire helpers (pure functions)

class FrameError(ValueError):
    """A raw-TCP frame that violates imd's framing (length 0 or above the limit)."""


def encode_frame(obj):
    """One imd raw-TCP frame: 4-byte big-endian length, then the JSON envelope (orjson)."""
    payload = obj if isinstance(obj, (bytes, bytearray)) else orjson.dumps(obj)
    return struct.pack(">I", len(payload)) + payload


class FrameDecoder:
    """Splits a byte stream into imd frames. `feed(data)` returns the complete payloads (bytes);
    raises FrameError on a zero or oversized length; keeps partial frames for the next feed."""

    __slots__ = ("buf", "max_frame")

    def __init__(self, max_frame=MAX_FRAME):
        self.buf = bytearray()
        self.max_frame = max_frame

    def feed(self, data):
        buf = self.buf
        buf += data
        out = []
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            n = int.from_bytes(buf[pos:pos + 4], "big")
            if n == 0 or n > self.max_frame:
                raise FrameError(f"bad frame length {n}")
            if end - pos - 4 < n:
                break
            out.append(bytes(buf[pos + 4:pos + 4 + n]))
            pos += 4 + n
        del buf[:pos]
        return out


def make_token(secret, sub, role="guest", ttl=3600, now=None):
    """A user token as the web tier issues it: JWT HS256 with sub, role, exp."""
    exp = int(now if now is not None else time.time()) + ttl
    return jwt.encode({"sub": sub, "role": role, "exp": exp}, secret, algorithm="HS256")


def auth_envelope(token, device, platform="android"):
    return {"type": "auth", "token": token, "platform": platform, "device": device}


def count_marks(tail, data, mark=MARK):
    """Occurrences of `mark` in tail+data, and the new tail (the last len(mark)-1 bytes), so a mark
    split across two reads is counted exactly once."""
    buf = tail + data
    return buf.count(mark), buf[-(len(mark) - 1):]


def extract_timestamps(buf, mark=TS_MARK):
    """Send times (ints) carried as MARK<digits>; in `buf`, and the unparsed rest to keep (a
    trailing partial mark, at most 32 bytes)."""
    out = []
    pos = 0
    while True:
        i = buf.find(mark, pos)
        if i < 0:
            keep = buf[-(len(mark) - 1):] if len(buf) >= len(mark) - 1 else buf
            return out, bytes(keep)
        j = buf.find(b";", i + len(mark), i + len(mark) + 24)
        if j < 0:
            rest = buf[i:]
            return out, bytes(rest) if len(rest) <= 32 else b""
        digits = buf[i + len(mark):j]
        if digits.isdigit():
            out.append(int(digits))
        pos = j + 1


def http_get(host, path, headers=()):
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def ws_handshake(host, path, key=None):
    key = key or base64.b64encode(os.urandom(16)).decode()
    return http_get(host, path, [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                                 ("Sec-WebSocket-Key", key), ("Sec-WebSocket-Version", "13")])


def ws_frame(payload, opcode=0x1, mask_key=None):
    """A client (masked) WebSocket frame with FIN set."""
    mask_key = mask_key if mask_key is not None else os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    masked = bytes(b ^ mask_key[i & 3] for i, b in enumerate(payload))
    return head + mask_key + masked


class WsReader:
    """Splits a server's (unmasked) WebSocket stream into (opcode, payload) frames; keeps a partial
    frame for the next feed. Raises FrameError on a masked or oversized frame."""

    __slots__ = ("buf", "max_frame")

    def __init__(self, max_frame=1 << 20):
        self.buf = bytearray()
        self.max_frame = max_frame

    def feed(self, data):
        buf = self.buf
        buf += data
        out = []
        pos = 0
        while len(buf) - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            if b1 & 0x80:
                raise FrameError("masked frame from the server")
            n, head = b1 & 0x7F, 2
            if n == 126:
                if len(buf) - pos < 4:
                    break
                n, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
            elif n == 127:
                if len(buf) - pos < 10:
                    break
                n, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
            if n > self.max_frame:
                raise FrameError(f"WebSocket frame of {n} bytes")
            if len(buf) - pos - head < n:
                break
            out.append((b0 & 0x0F, bytes(buf[pos + head:pos + head + n])))
            pos += head + n
        del buf[:pos]
        return out


def _mqtt_len(n):
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _mqtt_str(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def mqtt_connect(client_id, keepalive=0):
    """MQTT 3.1.1 CONNECT with clean session."""
    body = _mqtt_str("MQTT") + bytes([4, 0x02]) + struct.pack("!H", keepalive) + _mqtt_str(client_id)
    return b"\x10" + _mqtt_len(len(body)) + body


def mqtt_subscribe(packet_id, topic, qos=0):
    body = struct.pack("!H", packet_id) + _mqtt_str(topic) + bytes([qos])
    return b"\x82" + _mqtt_len(len(body)) + body


def mqtt_publish(topic, payload, qos=0, packet_id=1):
    """PUBLISH at QoS 0, or QoS 1 with `packet_id` (the server answers PUBACK)."""
    pid = struct.pack("!H", packet_id) if qos else b""
    body = _mqtt_str(topic) + pid + payload
    return bytes([0x30 | (qos << 1)]) + _mqtt_len(len(body)) + body


MQTT_PINGREQ = b"\xc0\x00"
PONG_FRAME = encode_frame({"type": "pong"})
MQTT_CONNACK_OK = b"\x20\x02\x00\x00"


def xmpp_open(domain):
    return (f"<?xml version='1.0'?><stream:stream to='{domain}' version='1.0' xmlns='jabber:client' "
            "xmlns:stream='http://etherx.jabber.org/streams'>").encode()


def xmpp_auth_plain(user, password):
    cred = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode()
    return f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{cred}</auth>".encode()


XMPP_BIND = (b"<iq type='set' id='bnd1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
             b"<resource>bench</resource></bind></iq>")
XMPP_ROSTER = b"<iq type='get' id='rst1'><query xmlns='jabber:iq:roster'/></iq>"
XMPP_PING = b"<iq type='get' id='png'><ping xmlns='urn:xmpp:ping'/></iq>"
_XMPP_SERVER_PING = re.compile(rb"<iq\b[^>]*\bid=['\"]([^'\"]+)['\"][^>]*>\s*<ping\b")


def xmpp_ping_answers(data):
    """Answers (bytes) to the XEP-0199 pings a server sent in `data` (type='get' with <ping/>)."""
    return b"".join(b"<iq type='result' id='" + m.group(1) + b"'/>"
                    for m in _XMPP_SERVER_PING.finditer(data) if b"'get'" in m.group(0) or b'"get"' in m.group(0))


def xmpp_message(to_jid, body):
    return f"<message to='{to_jid}' type='chat'><body>{body}</body></message>".encode()


# ---------------------------------------------------------------- worker process

CONNECTING, HANDSHAKE, READY, CLOSED = range(4)


class Conn:
    __slots__ = ("sock", "fd", "idx", "state", "step", "inbuf", "out", "tail", "marks",
                 "decoder", "sent", "inflight", "seq", "received", "started")

    def __init__(self, sock, idx):
        self.sock = sock
        self.fd = sock.fileno()
        self.idx = idx
        self.state = CONNECTING
        self.step = 0
        self.inbuf = b""
        self.out = b""
        self.tail = b""
        self.marks = 0
        self.decoder = None
        self.sent = None
        self.inflight = 0
        self.seq = 0
        self.received = 0
        self.started = 0.0


class Worker:
    """One load-generator process: an epoll loop over its connections, driven by pipe commands.

    spec keys: kind, host, port, path (sse/ws; may name {i} and {token}), secret, role, user_fmt,
    user_pool (login churn: the worker cycles through users base..base+pool-1), device_fmt,
    password (xmpp; without it the user's token is the PLAIN password, as imd expects),
    domain, topic (mqtt), roster (xmpp), await_auth (ws/sse: established once imd's `auth`
    answer arrives), base (first global connection index), deadline (wall
    clock time at which the worker exits whatever happens), window (handshakes in flight).
    """

    def __init__(self, spec, ctrl):
        self.spec = spec
        self.ctrl = ctrl
        self.kind = spec["kind"]
        self.ep = select.epoll()
        self.conns = {}                   # fd -> Conn
        self.ready = []                   # established, in index order
        self.next_idx = spec.get("base", 0)
        self.sources = itertools.cycle(spec.get("sources", SOURCES))
        self.pending = 0                  # connections still handshaking
        self.to_open = 0
        self.failed = 0
        self.heartbeat = 0.0
        self.hb_slot = 0
        self.latencies = array("I")       # microseconds
        self.churn = False
        self.churn_ok = 0
        self.closed_by_peer = 0
        self.tokens = {}
        self.ep.register(ctrl.fileno(), select.EPOLLIN)

    # -- handshake bytes per kind
    def user(self, idx):
        pool = self.spec.get("user_pool")
        if pool:
            base = self.spec.get("base", 0)
            idx = base + (idx - base) % pool
        return self.spec.get("user_fmt", "u{}").format(idx)

    def first_bytes(self, c):
        s = self.spec
        k = self.kind
        if k == "tcp":
            c.decoder = FrameDecoder()
            token = self._token(c.idx)
            return encode_frame(auth_envelope(token, s.get("device_fmt", "d{}").format(c.idx)))
        if k == "sse":
            path = s["path"].format(i=c.idx, token=self._token(c.idx))
            return http_get(s["host"], path, [("Accept", "text/event-stream")])
        if k == "ws":
            c.decoder = WsReader()
            return ws_handshake(s["host"], s["path"].format(i=c.idx, token=self._token(c.idx)))
        if k == "mqtt":
            return mqtt_connect(f"b{os.getpid()}-{c.idx}")
        if k == "xmpp":
            return xmpp_open(s["domain"])
        return b""

    def _token(self, idx):
        """The user's token, made once per user (logins reuse a pool of users)."""
        s = self.spec
        if not s.get("secret"):
            return ""
        user = self.user(idx)
        token = self.tokens.get(user)
        if token is None:
            token = self.tokens[user] = make_token(s["secret"], user, s.get("role", "guest"))
        return token

    def handshake(self, c, data):
        """Feed handshake bytes; returns True when established, raises ConnectionError on refusal."""
        k = self.kind
        s = self.spec
        if k == "tcp":
            frames = c.decoder.feed(data)
            for i, frame in enumerate(frames):
                msg = orjson.loads(frame)
                if msg.get("type") == "auth":
                    if msg.get("ok"):
                        self.on_frames(c, frames[i + 1:])
                        return True
                    raise ConnectionError(f"auth refused: {msg}")
                if msg.get("type") in ("error", "close"):
                    raise ConnectionError(f"auth refused: {msg}")
            return False
        if k in ("sse", "ws") and c.step == 1:
            return self._auth_answer(c, data)
        c.inbuf += data
        if k in ("sse", "ws"):
            end = c.inbuf.find(b"\r\n\r\n")
            if end < 0:
                if len(c.inbuf) > 16384:
                    raise ConnectionError("response headers too long")
                return False
            status = c.inbuf[:c.inbuf.find(b"\r\n")]
            want = b" 101" if k == "ws" else b" 200"
            if want not in status:
                raise ConnectionError(status.decode("latin-1"))
            rest, c.inbuf = c.inbuf[end + 4:], b""
            if s.get("await_auth"):
                c.step = 1
                return self._auth_answer(c, rest)
            if rest:
                self.on_data(c, rest)
            return True
        if k == "mqtt":
            if c.step == 0:
                if len(c.inbuf) < 4:
                    return False
                if c.inbuf[:4] != MQTT_CONNACK_OK:
                    raise ConnectionError(f"CONNACK {c.inbuf[:4]!r}")
                c.inbuf = c.inbuf[4:]
                if not self.spec.get("topic"):
                    return True
                c.step = 1
                self.send(c, mqtt_subscribe(1, self.spec["topic"]))
            if len(c.inbuf) < 5:
                return False
            if c.inbuf[0] != 0x90 or c.inbuf[4] == 0x80:
                raise ConnectionError(f"SUBACK {c.inbuf[:5]!r}")
            rest, c.inbuf = c.inbuf[5:], b""
            if rest:
                self.on_data(c, rest)
            return True
        if k == "xmpp":
            return self._xmpp_step(c)
        return True

    def _auth_answer(self, c, data):
        """imd's ws/sse with spec `await_auth`: True once the session's `auth` answer arrived
        (so a connection counts as established only when it is authenticated, as on tcp)."""
        if self.kind == "ws":
            payloads = [p for op, p in c.decoder.feed(data) if op == 0x1]
        else:
            c.inbuf += data
            payloads = [c.inbuf]
        for i, p in enumerate(payloads):
            at = p.find(b'"type":"auth"')
            if at >= 0:
                if b'"ok":true' not in p:
                    raise ConnectionError(f"auth refused: {p[:200]!r}")
                c.inbuf = b""
                c.marks += sum(q.count(MARK) for q in payloads[i + 1:]) + p[at:].count(MARK)
                return True
            if b'"type":"error"' in p or b'"type":"close"' in p:
                raise ConnectionError(f"auth refused: {p[:200]!r}")
        if len(c.inbuf) > 65536:
            raise ConnectionError("no auth answer in the first 64 KB")
        return False

    def _xmpp_step(self, c):
        s = self.spec
        while True:
            buf = c.inbuf
            if b"<failure" in buf or b"<stream:error" in buf or b"type='error'" in buf:
                raise ConnectionError(buf[-300:].decode("utf-8", "replace"))
            if c.step in (0, 2):
                end = buf.find(b"</stream:features>")
                if end < 0:
                    return False
                c.inbuf = buf[end + 18:]
                if c.step == 0:
                    password = s.get("password") or self._token(c.idx)
                    self.send(c, xmpp_auth_plain(self.user(c.idx), password))
                else:
                    self.send(c, XMPP_BIND)
                c.step += 1
            elif c.step == 1:
                end = buf.find(b"<success")
                if end < 0:
                    return False
                c.inbuf = b""
                self.send(c, xmpp_open(s["domain"]))
                c.step = 2
            elif c.step == 3:
                end = buf.find(b"bnd1")
                if end < 0:
                    return False
                c.inbuf = b""
                if s.get("roster"):
                    self.send(c, XMPP_ROSTER)
                    c.step = 4
                else:
                    c.step = 5
            elif c.step == 4:
                end = buf.find(b"rst1")
                if end < 0:
                    return False
                c.inbuf = b""
                c.step = 5
            if c.step == 5:
                if not self.churn:
                    self.send(c, b"<presence/>")
                return True

    # -- established traffic
    def on_data(self, c, data):
        if self.kind == "tcp":
            self.on_frames(c, c.decoder.feed(data))
            return
        if self.kind == "ws":
            self.on_ws(c, data)
            return
        if self.kind == "xmpp" and b"urn:xmpp:ping" in data:
            answers = xmpp_ping_answers(data)
            if answers:
                self.send(c, answers)
        if self.timestamps:
            stamps, c.tail = extract_timestamps(c.tail + data)
            if stamps:
                now = time.monotonic_ns()
                for t in stamps:
                    self.latencies.append(min((now - t) // 1000, 0xFFFFFFFF))
                c.received += len(stamps)
            return
        n, c.tail = count_marks(c.tail, data)
        c.marks += n

    timestamps = False
    slip = 0.0

    def on_ws(self, c, data):
        """WebSocket frames after the handshake: answer pings (control frames and imd's ping
        envelopes), count marks in the payloads."""
        for opcode, payload in c.decoder.feed(data):
            if opcode == 0x9:
                self.send(c, ws_frame(payload, opcode=0xA))
            elif opcode == 0x8:
                self.send(c, ws_frame(payload[:2], opcode=0x8))
            else:
                c.marks += payload.count(MARK)
                if b'"ping"' in payload and b'"type":"ping"' in payload.replace(b" ", b""):
                    self.send(c, ws_frame(b'{"type":"pong"}'))

    def on_frames(self, c, frames):
        """imd frames after auth: answer server pings, count marks, time acks (chat)."""
        now = time.monotonic_ns()
        for frame in frames:
            if c.sent is None:
                c.marks += frame.count(MARK)
                if b'"ping"' in frame and orjson.loads(frame).get("type") == "ping":
                    self.send(c, PONG_FRAME)
                continue
            msg = orjson.loads(frame)
            t = msg.get("type")
            if t == "ack":
                sent = c.sent.pop(msg.get("id"), None)
                if sent is not None:
                    c.inflight -= 1
                    self.latencies.append(min((now - sent) // 1000, 0xFFFFFFFF))
            elif t == "msg":
                c.received += 1
            elif t == "ping":
                self.send(c, PONG_FRAME)

    def send(self, c, data):
        if c.out:
            c.out += data
            return
        try:
            n = c.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            self.drop(c, peer=True)
            return
        if n < len(data):
            c.out = data[n:]
            self.ep.modify(c.fd, select.EPOLLIN | select.EPOLLOUT)

    def flush(self, c):
        try:
            n = c.sock.send(c.out)
        except BlockingIOError:
            return
        except OSError:
            self.drop(c, peer=True)
            return
        c.out = c.out[n:]
        if not c.out:
            self.ep.modify(c.fd, select.EPOLLIN)

    # -- opening and closing
    def open_one(self):
        s = self.spec
        idx = self.next_idx
        self.next_idx += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.bind((next(self.sources), 0))
        sock.setblocking(False)
        c = Conn(sock, idx)
        c.started = time.monotonic()
        err = sock.connect_ex((s.get("connect_host", "127.0.0.1"), s["port"]))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.failed += 1
            return
        self.conns[c.fd] = c
        self.pending += 1
        self.ep.register(c.fd, select.EPOLLOUT | select.EPOLLIN)

    def drop(self, c, peer=False, failed=False):
        if c.state == CLOSED:
            return
        if c.state != READY:
            self.pending -= 1
            if failed or peer:
                self.failed += 1
                if self.failed <= 3:
                    self.errors.append(f"conn {c.idx}: {self.last_error}")
        elif peer:
            self.closed_by_peer += 1
        c.state = CLOSED
        self.conns.pop(c.fd, None)
        try:
            self.ep.unregister(c.fd)
        except (OSError, ValueError):
            pass
        c.sock.close()

    errors = None
    last_error = ""

    def established(self, c):
        self.pending -= 1
        if self.churn:
            self.churn_ok += 1
            c.state = READY
            self.drop(c)
            return
        c.state = READY
        self.ready.append(c)

    def on_event(self, fd, ev):
        c = self.conns.get(fd)
        if c is None:
            return
        if c.state == CONNECTING:
            if ev & (select.EPOLLERR | select.EPOLLHUP):
                self.last_error = "connect failed: " + os.strerror(
                    c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or errno.ECONNREFUSED)
                self.drop(c, failed=True)
                return
            if ev & select.EPOLLOUT:
                c.state = HANDSHAKE
                self.ep.modify(fd, select.EPOLLIN)
                first = self.first_bytes(c)
                if first:
                    self.send(c, first)
                elif self.handshake(c, b""):
                    self.established(c)
            return
        if ev & select.EPOLLOUT and c.out:
            self.flush(c)
        if ev & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
            try:
                data = c.sock.recv(262144)
            except BlockingIOError:
                return
            except OSError as e:
                self.last_error = str(e)
                self.drop(c, peer=True)
                return
            if not data:
                self.last_error = "closed by server" + (f": {c.inbuf[-200:]!r}" if c.inbuf else "")
                self.drop(c, peer=True)
                return
            if c.state == HANDSHAKE:
                try:
                    done = self.handshake(c, data)
                except (ConnectionError, FrameError, ValueError) as e:
                    self.last_error = str(e)
                    self.drop(c, failed=True)
                    return
                if done:
                    self.established(c)
            else:
                try:
                    self.on_data(c, data)
                except (FrameError, ValueError) as e:
                    self.last_error = str(e)
                    self.drop(c, peer=True)

    def send_heartbeats(self, now):
        """Every 0.1 s, ping one slice of the connections, so each is pinged every `heartbeat` s."""
        slots = max(1, int(self.heartbeat / 0.1))
        slot = self.hb_slot % slots
        self.hb_slot += 1
        ping = {"tcp": encode_frame({"type": "ping"}), "mqtt": MQTT_PINGREQ, "xmpp": XMPP_PING,
                "ws": None, "sse": None}.get(self.kind)
        for c in self.ready[slot::slots]:
            if c.state != READY:
                continue
            if self.kind == "ws":
                self.send(c, ws_frame(b"", opcode=0x9))
            elif ping:
                self.send(c, ping)

    # -- chat traffic
    def chat_payload(self, c, now_ns):
        s = self.spec
        partner = self.user(c.idx ^ 1)
        body = f"hello from {c.idx} {TS_MARK.decode()}{now_ns};"
        if self.kind == "tcp":
            c.seq += 1
            mid = str(c.seq)
            c.sent[mid] = now_ns
            c.inflight += 1
            return encode_frame({"type": "msg", "id": mid, "to": partner, "body": body})
        return xmpp_message(f"{partner}@{s['domain']}", body)

    def traffic(self, rate, window, duration, drain=30.0):
        """Send chat messages for `duration` s: `rate` per second over this worker's connections
        (0 = closed loop: keep `window` unacked per connection, tcp only). Then wait up to `drain`
        s for the answers, so that the next phase does not start behind the server's backlog.
        Returns (sent, answered, elapsed)."""
        conns = [c for c in self.ready if c.state == READY]
        if not conns:
            return 0, 0, 0.0
        self.latencies = array("I")
        tcp = self.kind == "tcp"
        self.timestamps = not tcp
        for c in conns:
            c.received = 0
            if tcp:
                c.sent = {}
                c.inflight = 0
        sent = 0
        self.slip = 0.0                   # the most this worker fell behind its rate schedule (s)
        t0 = time.monotonic()
        end = t0 + duration
        rr = 0
        ncon = len(conns)
        cap = window if window else 64
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if rate:
                due = int((now - t0) * rate) - sent
                if due > 1:
                    self.slip = max(self.slip, (due - 1) / rate)
                tries = 0
                while due > 0 and tries < ncon:
                    c = conns[rr % ncon]
                    rr += 1
                    if c.state != READY or (tcp and c.inflight >= cap):
                        tries += 1
                        continue
                    self.send(c, self.chat_payload(c, time.monotonic_ns()))
                    sent += 1
                    due -= 1
            else:
                for c in conns:
                    while c.state == READY and c.inflight < window:
                        self.send(c, self.chat_payload(c, time.monotonic_ns()))
                        sent += 1
            self.poll(0.001 if rate else 0.01)
        elapsed = time.monotonic() - t0
        drain_end = time.monotonic() + drain
        while time.monotonic() < drain_end and len(self.latencies) < sent:
            self.poll(0.01)
        for c in conns:
            c.sent = None
        self.timestamps = False
        return sent, len(self.latencies), elapsed

    def logins(self, window, duration):
        """Open, authenticate and close connections for `duration` s with `window` handshakes in
        flight. Returns (ok, failed, elapsed)."""
        self.churn = True
        self.churn_ok = 0
        failed0 = self.failed
        t0 = time.monotonic()
        end = t0 + duration
        while time.monotonic() < end:
            while self.pending < window:
                self.open_one()
            self.poll(0.005)
        elapsed = time.monotonic() - t0
        for c in list(self.conns.values()):
            if c.state != READY:
                self.drop(c)
        self.churn = False
        return self.churn_ok, self.failed - failed0, elapsed

    # -- the loop
    def poll(self, timeout):
        for fd, ev in self.ep.poll(timeout, 4096):
            if fd == self.ctrl_fd:
                self.ctrl_ready = True
            else:
                self.on_event(fd, ev)
        now = time.monotonic()
        if self.heartbeat and now >= self.next_hb:
            self.next_hb = now + 0.1
            self.send_heartbeats(now)
        if self.to_open:
            window = self.spec.get("window", 512)
            while self.to_open and self.pending < window:
                self.to_open -= 1
                self.open_one()

    def connect(self, n, timeout):
        """Open n more connections; returns (established, failed, elapsed) for this batch."""
        if len(self.conns) + n > MAX_PER_PROCESS:
            raise ValueError(f"more than {MAX_PER_PROCESS} sockets in one process")
        ok0, failed0 = len(self.ready), self.failed
        t0 = time.monotonic()
        self.to_open = n
        while (self.to_open or self.pending) and time.monotonic() - t0 < timeout:
            self.poll(0.01)
        for c in list(self.conns.values()):
            if c.state in (CONNECTING, HANDSHAKE):
                self.last_error = "handshake timeout"
                self.drop(c, failed=True)
        self.to_open = 0
        return len(self.ready) - ok0, self.failed - failed0, time.monotonic() - t0

    def run(self):
        resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
        self.errors = []
        self.ctrl_fd = self.ctrl.fileno()
        self.ctrl_ready = False
        self.next_hb = 0.0
        deadline = self.spec.get("deadline", time.time() + 600)
        while time.time() < deadline:
            self.poll(0.05)
            if not (self.ctrl_ready or self.ctrl.poll()):
                continue
            self.ctrl_ready = False
            cmd, *args = self.ctrl.recv()
            if cmd == "connect":
                reply = self.connect(*args)
            elif cmd == "heartbeat":
                self.heartbeat = args[0]
                reply = True
            elif cmd == "traffic":
                cpu0 = _cpu_self()
                sent, answered, elapsed = self.traffic(*args)
                reply = (sent, answered, elapsed, self.latencies.tobytes(), _cpu_self() - cpu0,
                         self.slip)
            elif cmd == "logins":
                reply = self.logins(*args)
            elif cmd == "count":
                alive = [c for c in self.ready if c.state == READY]
                reply = (sum(c.marks for c in self.ready), len(alive), self.closed_by_peer)
            elif cmd == "errors":
                reply = list(self.errors)
            elif cmd == "stop":
                self.ctrl.send(len(self.ready))
                break
            else:
                reply = ValueError(f"unknown command {cmd}")
            self.ctrl.send(reply)
        for c in list(self.conns.values()):
            c.sock.close()


def _cpu_self():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _worker_main(spec, ctrl):
    try:
        Worker(spec, ctrl).run()
    except KeyboardInterrupt:
        pass


class _Duplex:
    """Two one-way pipes used as one duplex channel. multiprocessing's duplex Pipe is a
    socketpair, and in a gevent-patched parent (the test suite) that socketpair is non-blocking;
    os.pipe()-based one-way pipes stay plain blocking fds either way."""

    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer

    def send(self, obj):
        self.writer.send(obj)

    def recv(self):
        return self.reader.recv()

    def poll(self, timeout=0.0):
        return self.reader.poll(timeout)

    def fileno(self):
        return self.reader.fileno()

    def close(self):
        self.reader.close()
        self.writer.close()


def _duplex_pair(ctx):
    down_r, down_w = ctx.Pipe(duplex=False)
    up_r, up_w = ctx.Pipe(duplex=False)
    return _Duplex(up_r, down_w), _Duplex(down_r, up_w)


def _mp_context():
    """fork, unless gevent has patched this process (then the children start clean: spawn)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_anything_patched():
        return multiprocessing.get_context("spawn")
    return multiprocessing.get_context("fork")


class Fleet:
    """Several worker processes sharing one spec (see Worker); connection indices are global and
    consecutive per worker (pairs 2k, 2k+1 always land in the same worker).

    Blocking API for the bench: connect(), heartbeat(), traffic(), logins(), count(), stop().
    Every worker exits by itself at `deadline` seconds from start even if the parent dies."""

    def __init__(self, spec, processes=1, deadline=900):
        self.spec = dict(spec)
        self.processes = processes
        self.deadline = deadline
        self.workers = []
        self.client_load = 0.0
        self.client_slip = 0.0

    def start(self):
        ctx = _mp_context()
        for i in range(self.processes):
            parent, child = _duplex_pair(ctx)
            spec = dict(self.spec, base=self.spec.get("base", 0) + i * MAX_PER_PROCESS,
                        deadline=time.time() + self.deadline)
            p = ctx.Process(target=_worker_main, args=(spec, child), daemon=True)
            p.start()
            child.close()
            self.workers.append((p, parent))
        return self

    def _all(self, cmd, per_worker_args):
        for (_, pipe), args in zip(self.workers, per_worker_args):
            pipe.send((cmd, *args))
        out = []
        for p, pipe in self.workers:
            out.append(pipe.recv())
        return out

    def connect(self, n, timeout=120):
        """Open n more connections spread over the workers; returns (ok, failed, seconds)."""
        k = len(self.workers)
        share = [(n // k + (1 if i < n % k else 0)) for i in range(k)]
        share = [s + (s & 1) if self.spec.get("pairs") else s for s in share]
        t0 = time.monotonic()
        res = self._all("connect", [(s, timeout) for s in share])
        return sum(r[0] for r in res), sum(r[1] for r in res), time.monotonic() - t0

    def heartbeat(self, interval):
        self._all("heartbeat", [(interval,)] * len(self.workers))

    def traffic(self, rate, window, duration):
        """Chat traffic at `rate` msgs/s in total (0 = closed loop with `window`).
        Returns (sent, answered, seconds, latencies_us as array); the busiest worker's CPU share
        over the run is left in `self.client_load` (near 1.0 = the load generator may be the
        bottleneck), and in `self.client_slip` the most any worker fell behind its rate schedule
        (seconds; send times are taken when a message is written, so slip is not latency)."""
        k = len(self.workers)
        res = self._all("traffic", [(rate / k, window, duration)] * k)
        lat = array("I")
        for r in res:
            lat.frombytes(r[3])
        self.client_load = max(r[4] / max(r[2], 1e-9) for r in res)
        self.client_slip = max(r[5] for r in res)
        return sum(r[0] for r in res), sum(r[1] for r in res), max(r[2] for r in res), lat

    def logins(self, window, duration):
        res = self._all("logins", [(window, duration)] * len(self.workers))
        return sum(r[0] for r in res), sum(r[1] for r in res), max(r[2] for r in res)

    def count(self):
        """(marks received, connections alive, connections closed by the server)."""
        res = self._all("count", [()] * len(self.workers))
        return tuple(sum(r[i] for r in res) for i in range(3))

    def errors(self):
        return [e for r in self._all("errors", [()] * len(self.workers)) for e in r]

    def stop(self):
        for p, pipe in self.workers:
            try:
                pipe.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
        for p, pipe in self.workers:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        self.workers = []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def quantile(sorted_values, q):
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]
