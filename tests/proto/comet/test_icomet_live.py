"""iComet request sequences against a real imd subprocess, answered as iComet's source answers."""

import time
import urllib.parse

import orjson
import pytest

from tests.proto.comet.live import Imd, Raw, Stream, request

MSG = b'{"type":"%s","cname":"%s","seq":%d,"content":"%s"}'


@pytest.fixture(scope="module")
def imd(tmp_path_factory):
    d = Imd(tmp_path_factory.mktemp("icomet"), {
        "comet": {"polling_timeout": 2, "channel_timeout": 3, "max_subscribers_per_channel": 3},
        "presence": {"grace": 0.5}, "limits": {"auth_timeout": 1.5}}).start()
    yield d
    d.stop()
    assert "Traceback" not in d.log_text(), d.log_text()


def admin(d, path, **kw):
    return request(d.addr["admin"], kw.pop("method", "GET"), path, **kw)


def poll_start(d, path) -> Raw:
    r = Raw(d.addr["comet"])
    r.send(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return r


def test_ping(imd):
    st, h, body = request(imd.addr["comet"], "GET", "/ping")
    assert st == 200 and body == b'icomet_cb({"type":"ping","sub_timeout":2});\n'
    assert request(imd.addr["comet"], "GET", "/ping?cb=my.cb")[2] == (
        b'my.cb({"type":"ping","sub_timeout":2});\n')


def test_long_poll_sequence_like_icomet_js(imd):
    st, h, body = request(imd.addr["comet"], "GET", "/sub?cname=lp1&seq=0&noop=0&cb=icomet_cb_0")
    assert st == 200 and body == b"icomet_cb_0(" + MSG % (b"next_seq", b"lp1", 1, b"") + b");\n"
    assert h["cache-control"] == "no-cache" and h["expires"] == "0"
    r = poll_start(imd, "/poll?cname=lp1&seq=1&noop=0&cb=icomet_cb_0")
    time.sleep(0.2)
    assert admin(imd, "/pub?cname=lp1&content=hello")[2] == b'{"type":"ok"}\n'
    st, h, body = r.response()
    assert body == b"icomet_cb_0(" + MSG % (b"data", b"lp1", 1, b"hello") + b");\n"
    r.close()


def test_backlog_is_one_array_and_broadcast_adds_next_seq(imd):
    for i in range(3):
        admin(imd, f"/push?cname=bk1&content=m{i}")
    body = request(imd.addr["comet"], "GET", "/sub?cname=bk1&seq=2")[2]
    assert body == b"[" + MSG % (b"data", b"bk1", 2, b"m1") + b"," + MSG % (
        b"data", b"bk1", 3, b"m2") + b"]\n"
    r = poll_start(imd, "/sub?cname=bk1&seq=4&cb=f")
    time.sleep(0.2)
    assert admin(imd, "/broadcast?content=all")[2] == b"ok\n"
    body = r.response()[2]
    assert body == b"f([" + MSG % (b"broadcast", b"bk1", 4, b"all") + b"," + MSG % (
        b"next_seq", b"bk1", 5, b"") + b"]);\n"


def test_future_seq_gets_next_seq(imd):
    admin(imd, "/push?cname=fs1&content=x")
    body = request(imd.addr["comet"], "GET", "/sub?cname=fs1&seq=99")[2]
    assert body == MSG % (b"next_seq", b"fs1", 2, b"") + b"\n"


def test_noop_after_polling_timeout_with_own_counter(imd):
    r = poll_start(imd, "/sub?cname=np1&seq=1&noop=7")
    assert r.response()[2] == MSG % (b"noop", b"np1", 7, b"") + b"\n"


def test_stream_pub_noop_close(imd):
    s = Stream(imd.addr["comet"], "/stream?cname=st1&seq=1")
    assert s.status == 200 and s.headers["transfer-encoding"] == "chunked"
    assert s.headers["content-type"] == "application/json; charset=utf-8"
    admin(imd, "/push?cname=st1&content=one")
    assert s.chunk() == MSG % (b"data", b"st1", 1, b"one") + b"\n"
    assert s.chunk() == MSG % (b"noop", b"st1", 0, b"") + b"\n"
    assert admin(imd, "/close?cname=st1")[2] == b"ok 2\n"
    assert s.chunk() == MSG % (b"close", b"st1", 2, b"") + b"\n"
    assert s.chunk() == b""
    assert admin(imd, "/close?cname=st1")[:3:2] == (404, b"channel[st1] not connected\n")


def test_sse_framing(imd):
    s = Stream(imd.addr["comet"], "/sse?cname=se1")
    assert s.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert s.headers["access-control-allow-origin"] == "*"
    assert s.chunk() == b"data: " + MSG % (b"next_seq", b"se1", 1, b"") + b"\n\n"
    admin(imd, "/push?cname=se1&content=x")
    assert s.chunk() == b"data: " + MSG % (b"data", b"se1", 1, b"x") + b"\n\n"


def test_iframe_framing(imd):
    s = Stream(imd.addr["comet"], "/iframe?cname=if1&seq=1")
    assert s.headers["content-type"].startswith("text/html")
    head = s.chunk()
    assert head.startswith(b"<html><head>") and head.endswith(b"<body>\n")
    admin(imd, "/push?cname=if1&content=" + urllib.parse.quote("</script><b>"))
    chunk = s.chunk()
    assert chunk.startswith(b"<script>parent.icomet_cb(") and chunk.endswith(b");</script>\n")
    inner = chunk[len(b"<script>parent.icomet_cb("):-len(b");</script>\n")]
    assert b"<" not in inner and orjson.loads(inner)["content"] == "</script><b>"


def test_push_escapes_and_pub_is_decoded(imd):
    s = Stream(imd.addr["comet"], "/stream?cname=esc1&seq=1")
    nasty = 'q"\\ \r\n\t\x01 </script> 中文'
    admin(imd, "/push", method="POST", body=urllib.parse.urlencode({"cname": "esc1", "content": nasty}),
          headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert orjson.loads(s.chunk())["content"] == nasty
    admin(imd, "/pub?cname=esc1&content=" + urllib.parse.quote('{\\"a\\":1}'))
    assert orjson.loads(orjson.loads(s.chunk())["content"]) == {"a": 1}
    admin(imd, "/pub?cname=esc1&content=" + urllib.parse.quote('broken"quote'))
    assert orjson.loads(s.chunk())["content"] == 'broken"quote'


def test_pub_jsonp_and_post_body_overrides_query(imd):
    st, h, body = admin(imd, "/pub?cname=jp1&content=q&cb=done", method="POST", body="content=b",
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert body == b'done({"type":"ok"});\n' and h["content-type"].startswith("text/javascript")
    assert request(imd.addr["comet"], "GET", "/sub?cname=jp1&seq=1")[2] == (
        b"[" + MSG % (b"data", b"jp1", 1, b"b") + b"]\n")


def test_bad_input_is_refused(imd):
    c = imd.addr["comet"]
    assert request(c, "GET", "/sub?cname=" + urllib.parse.quote("a\n1 x"))[0] == 400
    assert request(c, "GET", "/sub?cname=")[0] == 400
    assert request(c, "GET", "/sub?cname=a&cb=alert(1)//")[0] == 400
    assert request(c, "GET", "/ping?cb=" + urllib.parse.quote("<script>"))[0] == 400
    assert request(c, "POST", "/sub?cname=a", body=b"")[0] == 405
    assert admin(imd, "/pub?cname=a&cb=x;y")[0] == 400
    evil = 'a","type":"close'                      # a legal name, escaped wherever it goes
    assert admin(imd, "/push?cname=" + urllib.parse.quote(evil) + "&content=x")[0] == 200
    [msg] = orjson.loads(request(c, "GET", "/sub?seq=1&cname=" + urllib.parse.quote(evil))[2])
    assert msg == {"type": "data", "cname": evil, "seq": 1, "content": "x"}
    assert orjson.loads(admin(imd, "/check?cname=" + urllib.parse.quote(evil))[2]) == {evil: 1}
    assert admin(imd, "/pub?cname=a", method="PUT")[0] == 405
    assert request(c, "GET", "/nothing")[0] == 404


def test_too_many_subscribers_in_band(imd):
    subs = [Stream(imd.addr["comet"], "/stream?cname=full1&seq=1") for _ in range(3)]
    st, h, body = request(imd.addr["comet"], "GET", "/sub?cname=full1&seq=1&cb=c")
    assert st == 200 and body == b'c({"type":"429","cname":"full1","seq":0,"content":"Too many subscribers"});\n'
    s = Stream(imd.addr["comet"], "/sse?cname=full1")
    assert s.chunk() == b'data: {"type":"429","cname":"full1","seq":0,"content":"Too many subscribers"}\n\n'
    assert s.chunk() == b""
    for x in subs:
        x.close()


def test_info_check_clear(imd):
    admin(imd, "/push?cname=ic1&content=a")
    admin(imd, "/push?cname=ic1&content=b")
    s = Stream(imd.addr["comet"], "/stream?cname=ic1&seq=3")
    time.sleep(0.1)
    assert admin(imd, "/info?cname=ic1")[2] == b'{"cname": "ic1", "subscribers": 1}\n'
    info = orjson.loads(admin(imd, "/info")[2])
    assert info["version"] == "0.2.5" and info["channels"] >= 1 and info["subscribers"] >= 1
    assert admin(imd, "/check?cname=ic1")[2] == b'{"ic1": 1}\n'
    assert admin(imd, "/check?cname=nope")[2] == b"{}\n"
    assert admin(imd, "/clear?cname=ic1")[2] == b"ok 3\n"
    assert admin(imd, "/clear?cname=nope")[0] == 404
    s.close()


def test_sign_answer(imd):
    st, h, body = admin(imd, "/sign?cname=sg1&expires=60")
    obj = orjson.loads(body)
    assert list(obj) == ["type", "cname", "seq", "token", "expires", "sub_timeout"]
    assert obj["type"] == "sign" and obj["seq"] == 1 and obj["expires"] == 60
    assert len(obj["token"]) == 32 and obj["sub_timeout"] == 2
    assert orjson.loads(admin(imd, "/sign?cname=sg1")[2])["token"] == obj["token"]
    assert admin(imd, "/sign?cname=sg1&cb=f")[2].startswith(b'f({"type":"sign"')


def test_psub_follows_subscribers(imd):
    p = Stream(imd.addr["admin"], "/psub")
    assert p.status == 200
    admin(imd, "/push?cname=ps1&content=x")          # a pub alone is no presence
    s = Stream(imd.addr["comet"], "/stream?cname=ps1&seq=2")
    lines = iter(p.chunk, None)                       # other tests' channels come and go too
    assert next(x for x in lines if x.endswith(b" ps1\n")) == b"1 ps1\n"
    s.close()
    assert next(x for x in lines if x.endswith(b" ps1\n")) == b"0 ps1\n"


def test_channel_expires_after_last_subscriber(imd):
    s = Stream(imd.addr["comet"], "/stream?cname=ex1")
    s.chunk()
    assert admin(imd, "/check?cname=ex1")[2] == b'{"ex1": 1}\n'
    s.close()
    deadline = time.time() + 10
    while admin(imd, "/check?cname=ex1")[2] != b"{}\n":
        assert time.time() < deadline
        time.sleep(0.3)


def test_keep_alive_and_pipelining(imd):
    r = Raw(imd.addr["comet"])
    r.send(b"GET /ping?cb=a HTTP/1.1\r\nHost: x\r\n\r\nGET /ping?cb=b HTTP/1.1\r\nHost: x\r\n\r\n"
           b"GET /sub?cname=ka1&seq=0 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.response()[2].startswith(b"a(")
    assert r.response()[2].startswith(b"b(")
    assert r.response()[2] == MSG % (b"next_seq", b"ka1", 1, b"") + b"\n"
    r.send(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    st, h, body = r.response()
    assert h["connection"] == "close" and r.read_all() == b""


def test_hostile_connections_do_not_affect_others(imd):
    s = Stream(imd.addr["comet"], "/stream?cname=calm1&seq=1")
    big = Raw(imd.addr["comet"])
    big.send(b"GET /ping HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
    st, h, body = big.response()
    assert st == 431 and big.read_all() == b""
    slow = Raw(imd.addr["comet"])
    slow.send(b"GET /ping HTTP/1.1\r\nX-Slow: ")
    st, h, body = slow.response()                   # head not finished in auth_timeout
    assert st == 408 and slow.read_all() == b""
    silent = Raw(imd.addr["comet"])
    assert silent.response()[0] == 408
    bad = Raw(imd.addr["comet"])
    bad.send(b"BREW /pot HTTP/1.1\r\n\r\n")
    assert bad.response()[0] == 400 and bad.read_all() == b""
    long = Raw(imd.addr["comet"])
    long.send(b"GET /" + b"x" * 5000 + b" HTTP/1.1\r\n\r\n")
    assert long.response()[0] == 414
    many = Raw(imd.addr["comet"])
    many.send(b"GET / HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(100)) + b"\r\n")
    assert many.response()[0] == 431
    body = Raw(imd.addr["comet"])
    body.send(b"POST /im/send HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n")
    assert body.response()[0] == 413
    admin(imd, "/push?cname=calm1&content=still-here")
    msgs = (orjson.loads(x) for x in iter(s.chunk, None))
    assert next(m for m in msgs if m["type"] == "data")["content"] == "still-here"


def test_http10_stream_ends_by_close(imd):
    r = Raw(imd.addr["comet"])
    r.send(b"GET /stream?cname=h10&seq=1 HTTP/1.0\r\n\r\n")
    head = r.read_until(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head
    admin(imd, "/push?cname=h10&content=x")
    assert r.read_until(b"\n") == MSG % (b"data", b"h10", 1, b"x") + b"\n"
    admin(imd, "/close?cname=h10")
    assert r.read_all() == MSG % (b"close", b"h10", 2, b"") + b"\n"


@pytest.fixture(scope="module")
def token_imd(tmp_path_factory):
    d = Imd(tmp_path_factory.mktemp("icomet-token"), {
        "comet": {"auth": "token", "max_channels": 2},
        "admin": {"allow": ["10.9.9.9"], "deny": ["all"]}}).start()
    yield d
    d.stop()
    assert "Traceback" not in d.log_text(), d.log_text()


def test_token_auth_and_limits(token_imd, tmp_path):
    d = token_imd
    st, h, body = request(d.addr["comet"], "GET", "/sub?cname=t1&cb=c")
    assert body == b'c({"type":"401","cname":"t1","seq":0,"content":"Token error"});\n'
    # the admin port refuses this client: allow list without 127.0.0.1, deny all
    st, h, body = request(d.addr["admin"], "GET", "/sign?cname=t1")
    assert st == 403 and h.get("connection") == "close"


def test_token_flow(tmp_path):
    d = Imd(tmp_path, {"comet": {"auth": "token", "max_channels": 2},
                       "admin": {"secret": "s3cret"}}).start()
    try:
        assert request(d.addr["admin"], "GET", "/sign?cname=t1")[0] == 401
        auth = {"Authorization": "Bearer s3cret"}
        tok = orjson.loads(request(d.addr["admin"], "GET", "/sign?cname=t1", headers=auth)[2])["token"]
        assert request(d.addr["comet"], "GET", "/sub?cname=t1&token=" + "0" * 32)[2] == (
            MSG % (b"401", b"t1", 0, b"Token error") + b"\n")
        assert request(d.addr["comet"], "GET", f"/sub?cname=t1&token={tok}")[2] == (
            MSG % (b"next_seq", b"t1", 1, b"") + b"\n")
        request(d.addr["admin"], "GET", "/sign?cname=t2", headers=auth)
        st, h, body = request(d.addr["admin"], "GET", "/sign?cname=t3", headers=auth)
        assert st == 429
        assert request(d.addr["admin"], "GET", "/healthz")[0] == 200
    finally:
        d.stop()


def test_expect_continue_and_foreign_upgrade(imd):
    r = Raw(imd.addr["admin"])
    r.send(b"POST /push HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
           b"Content-Length: 22\r\nExpect: 100-continue\r\n\r\n")
    assert r.read_until(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    r.send(b"cname=ec1&content=body")
    assert r.response()[2] == b'{"type":"ok"}\n'
    u = Raw(imd.addr["comet"])
    u.send(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
    st, h, body = u.response()
    assert st == 200 and h["connection"] == "close" and u.read_all() == b""


def test_slow_stream_consumer_is_cut_off(tmp_path):
    d = Imd(tmp_path, {"limits": {"send_buffer": 65536}}).start()
    try:
        import socket
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(d.addr["comet"])
        slow.sendall(b"GET /stream?cname=slow1&seq=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        calm = Stream(d.addr["comet"], "/stream?cname=calm2&seq=1")
        content = "x" * 30000
        for _ in range(400):                            # ~12 MB the slow one never reads
            request(d.addr["admin"], "POST", "/push",
                    body=urllib.parse.urlencode({"cname": "slow1", "content": content}),
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
            if admin(d, "/info?cname=slow1")[2] == b'{"cname": "slow1", "subscribers": 0}\n':
                break
        assert admin(d, "/info?cname=slow1")[2] == b'{"cname": "slow1", "subscribers": 0}\n'
        assert "slow consumer" in d.log_text()
        admin(d, "/push?cname=calm2&content=fine")
        assert orjson.loads(calm.chunk())["content"] == "fine"
        slow.close()
    finally:
        d.stop()


def test_head_answers_carry_no_body(imd):
    r = Raw(imd.addr["comet"])
    r.send(b"HEAD /sub?cname=hd1 HTTP/1.1\r\nHost: x\r\n\r\nGET /ping?cb=after HTTP/1.1\r\nHost: x\r\n\r\n")
    head = r.read_until(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405") and b"Content-Length: 19" in head
    assert r.response()[2].startswith(b"after(")          # the next answer is not misread
