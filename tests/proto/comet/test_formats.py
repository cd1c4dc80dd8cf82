"""iComet's response encodings: exact bytes, valid JSON, no injection."""

import orjson
import pytest

from imd.proto.comet import formats as f
from imd.proto.comet.channels import Message, Registry


def m(type="data", cname="a", seq=1, content="hi"):
    return Message(type, cname, seq, content)


def test_message_object_exact_bytes():
    assert f.stream_chunk(m()) == b'{"type":"data","cname":"a","seq":1,"content":"hi"}\n'
    assert f.sse_event(m()) == b'data: {"type":"data","cname":"a","seq":1,"content":"hi"}\n\n'


def test_poll_single_array_and_jsonp():
    a, b = m(seq=1), m("next_seq", seq=2, content="")
    assert f.poll_body([a], False) == b'{"type":"data","cname":"a","seq":1,"content":"hi"}\n'
    assert f.poll_body([a], False, "cb") == (
        b'cb({"type":"data","cname":"a","seq":1,"content":"hi"});\n')
    assert f.poll_body([a, b], True, "x.y") == (
        b'x.y([{"type":"data","cname":"a","seq":1,"content":"hi"},'
        b'{"type":"next_seq","cname":"a","seq":2,"content":""}]);\n')
    assert f.poll_body([a], True) == b'[{"type":"data","cname":"a","seq":1,"content":"hi"}]\n'


def test_iframe():
    assert f.IFRAME_HEADER.startswith(b"<html><head>") and f.IFRAME_HEADER.endswith(b"<body>\n")
    assert f.iframe_chunk(m()) == (
        b'<script>parent.icomet_cb({"type":"data","cname":"a","seq":1,"content":"hi"});'
        b'</script>\n')


@pytest.mark.parametrize("content", ['"', "\\", "\r\n", "\t\x00\x1f", "</script><script>alert(1)",
                                     "\u2028\u2029", "é中文😀", "a&b<c>d"])
def test_content_escaped_everywhere(content):
    msg = m(content=content)
    for out in (f.stream_chunk(msg), f.sse_event(msg)[6:], f.poll_body([msg], False)):
        assert orjson.loads(out)["content"] == content
    js = f.poll_body([msg], False, "cb")
    assert js.startswith(b"cb(") and js.endswith(b");\n")
    assert orjson.loads(js[3:-3])["content"] == content
    frame = f.iframe_chunk(msg)
    inner = frame[len(b"<script>parent.icomet_cb("):-len(b");</script>\n")]
    assert b"<" not in inner and b">" not in inner and "\u2028".encode() not in inner
    assert orjson.loads(inner)["content"] == content


def test_cname_injection_is_escaped():
    evil = 'a","type":"close'
    out = f.stream_chunk(m(cname=evil))
    obj = orjson.loads(out)
    assert obj["cname"] == evil and obj["type"] == "data"
    assert orjson.loads(f.check(evil, True)) == {evil: 1}
    assert orjson.loads(f.info({"cname": evil, "subscribers": 2})) == {"cname": evil,
                                                                       "subscribers": 2}


def test_message_encoded_once():
    msg = m()
    assert f.message_json(msg) is f.message_json(msg)
    assert f.message_js(msg) is f.message_js(msg)


@pytest.mark.parametrize("cb,ok", [("cb", True), ("icomet_cb_0", True), ("jQuery1124_15", True),
                                   ("a.b.$c", True), ("", False), ("a b", False),
                                   ("alert(1)//", False), ("a..b", False), (".a", False),
                                   ("a.", False), ("1a", False), ("a;b", False),
                                   ("x" * 129, False), ("a\n", False), ("é", False)])
def test_valid_callback(cb, ok):
    assert f.valid_callback(cb) is ok


def test_ping_pub_sign_admin_texts():
    assert f.ping(30) == b'icomet_cb({"type":"ping","sub_timeout":30});\n'
    assert f.ping(10, "cb") == b'cb({"type":"ping","sub_timeout":10});\n'
    assert f.pub_ok() == b'{"type":"ok"}\n'
    assert f.pub_ok("cb") == b'cb({"type":"ok"});\n'
    assert f.ok_seq(7) == b"ok 7\n"
    assert f.BROADCAST_OK == b"ok\n"
    assert f.not_connected("a") == b"channel[a] not connected\n"
    assert f.info({"channels": 2, "subscribers": 3}) == (
        b'{"version": "0.2.5", "channels": 2, "subscribers": 3}\n')
    assert f.info({"cname": "a", "subscribers": 1}) == b'{"cname": "a", "subscribers": 1}\n'
    assert f.check("a", True) == b'{"a": 1}\n' and f.check("a", False) == b"{}\n"
    assert f.presence_line(True, "a") == b"1 a\n" and f.presence_line(False, "a") == b"0 a\n"
    assert orjson.loads(f.admin_error("bad")) == {"error": "bad"}


def test_sign_object():
    r = Registry()
    ch, tok = r.sign("a")
    out = f.sign(ch, tok, 30, 30)
    assert out == (b'{"type":"sign","cname":"a","seq":1,"token":"%s","expires":30,'
                   b'"sub_timeout":30}\n' % tok.encode())
    assert f.sign(ch, tok, 30, 30, "cb").startswith(b'cb({"type":"sign"')


def test_error_message():
    e = f.error_message("a", "401", "Token error")
    assert f.stream_chunk(e) == b'{"type":"401","cname":"a","seq":0,"content":"Token error"}\n'


@pytest.mark.parametrize("raw,want", [('hello', 'hello'), ('{\\"a\\":1}', '{"a":1}'),
                                      ('line\\nnext', 'line\nnext'), ('\\u4e2d', '中'),
                                      ('bad"quote', 'bad"quote'), ('trail\\', 'trail\\'),
                                      ('\\x', '\\x'), ('tab\there', 'tab\there')])
def test_pub_content(raw, want):
    assert f.pub_content(raw) == want
