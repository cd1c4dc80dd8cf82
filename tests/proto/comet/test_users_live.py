"""Users on the comet port (/ws, /im/events, /im/poll, /im/send) and /api/v1, against a real imd."""

import base64
import os
import time

import orjson
import pytest
import websocket

from imd.fastpath import ws_close_payload
from tests.proto.comet.live import Imd, Raw, Stream, _head, request, token


@pytest.fixture(scope="module", params=["default", "pure-python"])
def imd(request, tmp_path_factory):
    """The daemon, once with the compiled fast path (if built) and once with its
    pure-Python twin (WebSocket frames are decoded by either)."""
    env = {"IMD_PURE_PYTHON": "1"} if request.param == "pure-python" else {}
    d = Imd(tmp_path_factory.mktemp("users"), env=env, overrides={
        "limits": {"heartbeat": 2, "idle_timeout": 4, "auth_timeout": 1, "max_frame": 4096,
                   "max_body": 1024},
        "comet": {"origins": ["https://app.example"]}}).start()
    if request.param == "pure-python":
        assert "fastpath=python" in d.log_text()
    yield d
    d.stop()
    assert "Traceback" not in d.log_text(), d.log_text()


def ws_url(d, query=""):
    host, port = d.addr["comet"]
    return f"ws://{host}:{port}/ws{query}"


def ws_login(d, user, role="guest", **q):
    q = "&".join(f"{k}={v}" for k, v in q.items())
    ws = websocket.create_connection(ws_url(d, f"?token={token(user, role)}&{q}"), timeout=10)
    hello = orjson.loads(ws.recv())
    assert hello["type"] == "auth" and hello["ok"] is True and hello["user"] == user
    return ws


def recv_type(ws, type_):
    while True:
        env = orjson.loads(ws.recv())
        if env["type"] == type_:
            return env


def api(d, method, path, body=None, **kw):
    data = orjson.dumps(body) if body is not None else None
    st, h, raw = request(d.addr["admin"], method, path, body=data,
                         headers={"Content-Type": "application/json"} if data else {}, **kw)
    return st, orjson.loads(raw) if raw else None


def test_ws_chat_between_two_users(imd):
    alice = ws_login(imd, "alice", "host", device="a1")
    bob = ws_login(imd, "bob", "guest", platform="h5", device="b1")
    alice.send(orjson.dumps({"type": "msg", "id": "c1", "to": "bob", "body": "hi bob",
                             "ctx": {"listing": "L1"}}))
    ack = recv_type(alice, "ack")
    assert ack["id"] == "c1" and ack["seq"] >= 1
    msg = recv_type(bob, "msg")
    assert msg["from"] == "alice" and msg["body"] == "hi bob" and msg["ctx"] == {"listing": "L1"}
    bob.send(orjson.dumps({"type": "ping"}))
    assert recv_type(bob, "pong") == {"type": "pong"}
    bob.send(orjson.dumps({"type": "ack", "seq": msg["seq"]}))
    alice.close()
    bob.close()


def test_ws_auth_by_first_frame_and_server_ping(imd):
    ws = websocket.create_connection(ws_url(imd), timeout=10)
    ws.send(orjson.dumps({"type": "auth", "token": token("carol"), "platform": "web", "device": "c"}))
    assert recv_type(ws, "auth")["user"] == "carol"
    assert recv_type(ws, "ping") == {"type": "ping"}       # limits.heartbeat = 2
    ws.close()


def test_ws_refuses_bad_token_and_bad_envelopes(imd):
    ws = websocket.create_connection(ws_url(imd), timeout=10)
    ws.send(orjson.dumps({"type": "auth", "token": "nope", "platform": "web", "device": "c"}))
    err = recv_type(ws, "error")
    assert err["code"] == 401
    with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionResetError)):
        while True:
            ws.recv()
    ws = ws_login(imd, "dave")
    ws.send(b"{not json")
    assert recv_type(ws, "error")["code"] == 400


def test_ws_origin_check(imd):
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        websocket.create_connection(ws_url(imd, f"?token={token('eve')}"), timeout=10,
                                    origin="https://evil.example")
    assert e.value.status_code == 403
    ws = websocket.create_connection(ws_url(imd, f"?token={token('eve')}"), timeout=10,
                                     origin="https://app.example")
    assert recv_type(ws, "auth")["user"] == "eve"
    ws.close()


def raw_ws(d):
    r = Raw(d.addr["comet"])
    key = base64.b64encode(os.urandom(16)).decode()
    r.send((f"GET /ws?token={token('frank')} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    assert r.read_until(b"\r\n\r\n").startswith(b"HTTP/1.1 101")
    return r


def frame(op, payload, fin=True, mask=True, length=None):
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | op
    if n < 126:
        head = bytes((b0, (0x80 if mask else 0) | n))
    else:
        head = bytes((b0, (0x80 if mask else 0) | 127)) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(c ^ key[i % 4] for i, c in enumerate(payload))


def close_code(r):
    """Read frames until the server's close frame; its code."""
    while True:
        b0, b1 = r.read_exact(2)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(r.read_exact(2), "big")
        elif n == 127:
            n = int.from_bytes(r.read_exact(8), "big")
        payload = r.read_exact(n)
        if b0 & 0x0F == 8:
            return int.from_bytes(payload[:2], "big")


@pytest.mark.parametrize("bad,code", [
    (frame(1, b'{"type":"ping"}', mask=False), 1002),               # unmasked client frame
    (frame(1, b"", length=10 ** 6), 1009),                          # oversized message
    (frame(1, b"\xff\xfe"), 1007),                                  # invalid UTF-8
    (frame(9, b"x", fin=False), 1002),                              # fragmented control frame
    (frame(2, b"bin"), 1003),                                       # binary
])
def test_ws_bad_frames_get_close_codes(imd, bad, code):
    r = raw_ws(imd)
    r.send(bad)
    assert close_code(r) == code
    assert r.read_all() is not None


def test_ws_close_handshake_and_ping(imd):
    r = raw_ws(imd)
    r.send(frame(9, b"hb"))
    r.send(frame(8, ws_close_payload(1000, "bye")))
    assert close_code(r) == 1000


def test_ws_frames_split_across_reads_and_fragmented_messages(imd):
    r = raw_ws(imd)
    while b'"type":"auth"' not in r.buf:
        r.buf += r.sock.recv(65536)
    whole = frame(1, b'{"type":"ping"}')
    for i in range(len(whole)):                       # one byte per read: the decoder waits between
        r.send(whole[i:i + 1])
        time.sleep(0.002)
    r.send(frame(1, b'{"type":', fin=False))         # a message in two frames, apart in time
    time.sleep(0.05)
    r.send(frame(0, b'"ping"}'))
    got = 0
    while got < 2:
        r.read_until(b'{"type":"pong"}')
        got += 1
    r.send(frame(1, b'{"type":', fin=False))         # closed with a message still incomplete
    time.sleep(0.05)
    r.close()


def test_sse_over_http_1_0_is_not_chunked(imd):
    r = Raw(imd.addr["comet"])
    r.send(f"GET /im/events?token={token('olga')}&device=o1 HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    status, headers = _head(
        r.read_until(b"\r\n\r\n").decode("latin-1"))
    assert status == 200 and "transfer-encoding" not in headers
    assert r.read_until(b"\n\n") == b"retry: 3000\n\n"
    hello = orjson.loads(r.read_until(b"\n\n")[len(b"data: "):])
    assert hello["type"] == "auth" and hello["user"] == "olga"
    sender = ws_login(imd, "pete", "host")
    sender.send(orjson.dumps({"type": "msg", "id": "p1", "to": "olga", "body": "raw"}))
    ack = recv_type(sender, "ack")
    event = r.read_until(b"\n\n")
    assert event.startswith(b"id: %d\ndata: {" % ack["seq"]) and b'"body":"raw"' in event
    sender.close()
    r.close()


def sse_events(stream):
    """Parsed SSE events from chunks: (id or None, envelope)."""
    while True:
        data = stream.chunk()
        if not data:
            return
        fields = dict(line.split(": ", 1) for line in data.decode().strip("\n").split("\n"))
        if "data" in fields:
            yield (int(fields["id"]) if "id" in fields else None), orjson.loads(fields["data"])


def test_sse_receive_send_and_resume(imd):
    s = Stream(imd.addr["comet"], f"/im/events?token={token('gina')}&device=g1")
    assert s.headers["content-type"] == "text/event-stream; charset=utf-8"
    ev = sse_events(s)
    _, hello = next(ev)
    assert hello["type"] == "auth" and hello["user"] == "gina"
    sender = ws_login(imd, "hank", "host")
    for i in range(3):
        sender.send(orjson.dumps({"type": "msg", "id": f"h{i}", "to": "gina", "body": f"m{i}"}))
        recv_type(sender, "ack")
    got = [(i, e) for i, e in (next(ev) for _ in range(3))]
    assert [e["body"] for _, e in got] == ["m0", "m1", "m2"]
    assert [i for i, _ in got] == [e["seq"] for _, e in got]
    # reply through /im/send on this session; the ack comes on the stream
    st, h, body = request(imd.addr["comet"], "POST",
                          f"/im/send?token={token('gina')}&session={hello['session']}",
                          body=orjson.dumps({"type": "msg", "id": "g1", "to": "hank", "body": "yo"}))
    assert st == 202 and orjson.loads(body) == {"ok": True}
    assert next(e for _, e in ev if e["type"] == "ack")["id"] == "g1"
    assert recv_type(sender, "msg")["body"] == "yo"
    s.close()
    # missed while away, resumed with Last-Event-ID
    last = got[0][0]
    s2 = Stream(imd.addr["comet"], f"/im/events?token={token('gina')}&device=g1",
                headers={"Last-Event-ID": str(last)})
    ev2 = sse_events(s2)
    assert next(ev2)[1]["type"] == "auth"
    resumed = [next(ev2) for _ in range(2)]
    assert [e["body"] for _, e in resumed] == ["m1", "m2"]
    sender.close()


def test_sse_and_send_refusals(imd):
    c = imd.addr["comet"]
    assert request(c, "GET", "/im/events?token=bad")[0] == 401
    assert request(c, "POST", f"/im/send?token={token('ivy')}&session=nope", body=b"{}")[0] == 404
    assert request(c, "GET", f"/im/send?token={token('ivy')}")[0] == 405
    st, h, _ = request(c, "GET", f"/im/events?token={token('ivy')}",
                       headers={"Origin": "https://evil.example"})
    assert st == 403
    st, h, _ = request(c, "OPTIONS", "/im/send", headers={"Origin": "https://app.example"})
    assert st == 204 and h["access-control-allow-origin"] == "https://app.example"


def test_long_poll_session(imd):
    c = imd.addr["comet"]
    tok = token("jill")
    st, h, body = request(c, "GET", f"/im/poll?token={tok}&device=j1&cb=cb")
    assert body.startswith(b"cb([") and body.endswith(b"]);\n")
    first = orjson.loads(body[3:-3])
    assert first[0]["type"] == "auth"
    sid = first[0]["session"]
    r = Raw(c)
    r.send(f"GET /im/poll?token={tok}&session={sid} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    time.sleep(0.2)
    st, res = api(imd, "POST", "/api/v1/messages", {"from": "kim", "to": "jill", "body": "hello"})
    assert st == 200 and set(res) == {"mid", "seq", "ts"}
    envs = []
    while not any(e["type"] == "msg" for e in envs):
        envs += orjson.loads(r.response()[2])
        r.send(f"GET /im/poll?token={tok}&session={sid} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    msg = next(e for e in envs if e["type"] == "msg")
    assert msg["from"] == "kim" and msg["body"] == "hello"
    st, _, _ = request(c, "POST", f"/im/send?token={tok}&session={sid}",
                       body=orjson.dumps({"type": "msg", "id": "j1", "to": "kim", "body": "hey"}))
    assert st == 202
    acks = []
    while not any(e["type"] == "ack" for e in acks):
        acks += orjson.loads(r.response()[2])
        r.send(f"GET /im/poll?token={tok}&session={sid} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert next(e for e in acks if e["type"] == "ack")["id"] == "j1"
    assert request(c, "GET", "/im/poll?token=bad")[0] == 401


def test_api_v1(imd):
    st, res = api(imd, "POST", "/api/v1/tokens", {"sub": "lee", "role": "host", "ttl": 60})
    assert st == 200 and res["token"].count(".") == 2
    assert api(imd, "POST", "/api/v1/contacts", {"user": "lee", "contact": "max"}) == (200, {"ok": True})
    assert api(imd, "GET", "/api/v1/contacts?user=max") == (200, {"user": "max", "contacts": ["lee"]})
    ws = ws_login(imd, "lee", "host")
    deadline = time.time() + 10
    while api(imd, "GET", "/api/v1/presence?users=lee,max")[1]["lee"]["status"] != "online":
        assert time.time() < deadline
        time.sleep(0.1)
    st, res = api(imd, "GET", "/api/v1/presence?users=lee,max")
    assert res["max"]["status"] == "offline" and res["lee"]["platforms"] == ["web"]
    st, res = api(imd, "POST", "/api/v1/notices", {"to": ["lee"], "kind": "booking.confirmed",
                                                   "body": {"booking": "B9"}})
    assert st == 200 and res["count"] == 1 and len(res["mids"]) == 1
    notice = recv_type(ws, "notice")
    assert notice["kind"] == "booking.confirmed" and notice["body"] == {"booking": "B9"}
    st, res = api(imd, "GET", "/api/v1/users/lee/inbox?since=0&limit=10")
    assert st == 200 and res["user"] == "lee" and res["entries"][-1]["mid"] == notice["mid"]
    assert res["seq"] == notice["seq"]
    assert api(imd, "POST", "/api/v1/users/lee/kick") == (200, {"closed": 1})
    assert recv_type(ws, "close")["code"] == 4001
    assert api(imd, "DELETE", "/api/v1/contacts", {"user": "lee", "contact": "max"})[0] == 200
    assert api(imd, "GET", "/api/v1/contacts?user=max")[1]["contacts"] == []
    st, res = api(imd, "PUT", "/api/v1/users/lee/password", {"password": "pw"})
    assert st == 200
    # errors
    assert api(imd, "POST", "/api/v1/contacts", {"user": "bad user", "contact": "x"})[0] == 400
    assert api(imd, "POST", "/api/v1/notices", {"kind": "k", "body": "b"})[0] == 400
    assert api(imd, "POST", "/api/v1/messages", {"from": "a", "to": "a", "body": "x"})[0] == 400
    assert api(imd, "GET", "/api/v1/users/lee/inbox?limit=9999")[0] == 400
    assert api(imd, "GET", "/api/v1/notices")[0] == 405
    assert api(imd, "GET", "/api/v1/nothing")[0] == 404
    st, h, body = request(imd.addr["admin"], "POST", "/api/v1/notices", body=b"[1,2")
    assert st == 400 and "error" in orjson.loads(body)


def test_psub_users(imd):
    p = Stream(imd.addr["admin"], "/psub?users=1")
    ws = ws_login(imd, "nina")
    lines = iter(p.chunk, None)
    assert next(x for x in lines if x.endswith(b" nina\n")) == b"1 nina\n"
    ws.close()
    assert next(x for x in lines if x.endswith(b" nina\n")) == b"0 nina\n"


def test_metrics_and_healthz(imd):
    st, h, body = request(imd.addr["admin"], "GET", "/metrics")
    text = body.decode()
    assert st == 200 and h["content-type"].startswith("text/plain; version=0.0.4")
    for name in ("imd_comet_channels", "imd_comet_subscribers", "imd_messages_in_total"):
        assert f"# TYPE {name} " in text
    assert orjson.loads(request(imd.addr["admin"], "GET", "/healthz")[2])["ok"] is True


def test_api_v1_notices_by_role_and_all_and_idempotent_messages(imd):
    host = ws_login(imd, "olga_host", "host")
    guest = ws_login(imd, "paul_guest", "guest")
    st, res = api(imd, "POST", "/api/v1/notices", {"role": "host", "kind": "payout.sent", "body": "paid"})
    assert st == 200 and res["count"] >= 1
    assert recv_type(host, "notice")["kind"] == "payout.sent"
    st, res = api(imd, "POST", "/api/v1/notices", {"all": True, "kind": "maintenance", "body": "tonight"})
    assert st == 200 and res["count"] >= 2
    assert recv_type(guest, "notice")["kind"] == "maintenance"
    assert recv_type(host, "notice")["kind"] == "maintenance"
    first = api(imd, "POST", "/api/v1/messages", {"from": "olga_host", "to": "paul_guest",
                                                  "body": "once", "id": "web-42"})
    again = api(imd, "POST", "/api/v1/messages", {"from": "olga_host", "to": "paul_guest",
                                                  "body": "once", "id": "web-42"})
    assert first[0] == 200 and first == again
    assert api(imd, "POST", "/api/v1/notices", {"role": "admin", "kind": "k", "body": "b"})[0] == 400
    assert api(imd, "POST", "/api/v1/notices", {"to": ["x"], "kind": "bad kind", "body": "b"})[0] == 400
    assert api(imd, "POST", "/api/v1/notices", {"to": ["x"], "kind": "k", "body": "x" * 2000})[0] == 413
    host.close()
    guest.close()
