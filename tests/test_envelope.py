"""Envelope validation (DESIGN.md §3): every field's type, size and syntax."""

import orjson
import pytest

from imd import envelope
from imd.envelope import EnvelopeError, Out

MAX_BODY = 1000


def parse(obj):
    return envelope.parse(orjson.dumps(obj), MAX_BODY)


GOOD = [
    {"type": "auth", "token": "t", "platform": "ios", "device": "iphone-1"},
    {"type": "auth", "token": "t", "platform": "h5", "device": "d:1", "since": 0},
    {"type": "msg", "id": "c.1", "to": "guest_9", "body": "hi"},
    {"type": "msg", "id": "c-2", "to": "g", "body": {"text": "hi", "img": None}, "ctx": {"listing": "L1", "n": 2}},
    {"type": "ack", "seq": 0},
    {"type": "read", "peer": "bob", "seq": 12},
    {"type": "sync", "since": 5},
    {"type": "sync", "since": 5, "limit": 500},
    {"type": "ping"}, {"type": "pong"}, {"type": "close"},
    {"type": "presence", "status": "away"},
    {"type": "ping", "unknown": "fields are ignored"},
]


@pytest.mark.parametrize("env", GOOD, ids=lambda e: e["type"])
def test_valid(env):
    assert parse(env) == env


BAD = [
    ("not an object", [1], 400),
    ("no type", {"seq": 1}, 400),
    ("type not str", {"type": 5}, 400),
    ("unknown type", {"type": "hack"}, 400),
    ("auth no token", {"type": "auth", "platform": "ios", "device": "d"}, 400),
    ("auth long token", {"type": "auth", "token": "t" * 5000, "platform": "ios", "device": "d"}, 400),
    ("auth bad platform", {"type": "auth", "token": "t", "platform": "symbian", "device": "d"}, 400),
    ("auth bad device", {"type": "auth", "token": "t", "platform": "ios", "device": "a b"}, 400),
    ("auth since str", {"type": "auth", "token": "t", "platform": "ios", "device": "d", "since": "1"}, 400),
    ("msg no id", {"type": "msg", "to": "b", "body": "x"}, 400),
    ("msg id too long", {"type": "msg", "id": "x" * 65, "to": "b", "body": "x"}, 400),
    ("msg bad to", {"type": "msg", "id": "1", "to": "b@c", "body": "x"}, 400),
    ("msg to too long", {"type": "msg", "id": "1", "to": "b" * 65, "body": "x"}, 400),
    ("msg empty body", {"type": "msg", "id": "1", "to": "b", "body": ""}, 400),
    ("msg list body", {"type": "msg", "id": "1", "to": "b", "body": [1]}, 400),
    ("msg number body", {"type": "msg", "id": "1", "to": "b", "body": 7}, 400),
    ("msg big body", {"type": "msg", "id": "1", "to": "b", "body": "é" * 501}, 413),
    ("msg big object body", {"type": "msg", "id": "1", "to": "b", "body": {"t": "x" * 1000}}, 413),
    ("msg ctx list", {"type": "msg", "id": "1", "to": "b", "body": "x", "ctx": []}, 400),
    ("msg ctx nested", {"type": "msg", "id": "1", "to": "b", "body": "x", "ctx": {"a": {"b": 1}}}, 400),
    ("msg ctx bad key", {"type": "msg", "id": "1", "to": "b", "body": "x", "ctx": {"a b": 1}}, 400),
    ("msg ctx many keys", {"type": "msg", "id": "1", "to": "b", "body": "x",
                           "ctx": {f"k{i}": i for i in range(17)}}, 400),
    ("ack bool", {"type": "ack", "seq": True}, 400),
    ("ack negative", {"type": "ack", "seq": -1}, 400),
    ("ack float", {"type": "ack", "seq": 1.5}, 400),
    ("ack huge", {"type": "ack", "seq": 2 ** 60}, 400),
    ("read bad peer", {"type": "read", "peer": "", "seq": 1}, 400),
    ("sync limit 0", {"type": "sync", "since": 1, "limit": 0}, 400),
    ("sync limit big", {"type": "sync", "since": 1, "limit": 501}, 400),
    ("presence offline", {"type": "presence", "status": "offline"}, 400),
]


@pytest.mark.parametrize("name,env,code", BAD, ids=[b[0] for b in BAD])
def test_invalid(name, env, code):
    with pytest.raises(EnvelopeError) as e:
        parse(env)
    assert e.value.code == code and e.value.reason
    assert e.value.envelope()["type"] == "error"


def test_error_echoes_a_sane_client_id_only():
    with pytest.raises(EnvelopeError) as e:
        parse({"type": "msg", "id": "ok-1", "to": "b", "body": 5})
    assert e.value.envelope()["id"] == "ok-1"
    with pytest.raises(EnvelopeError) as e:
        parse({"type": "msg", "id": "<script>", "to": "b", "body": 5})
    assert "id" not in e.value.envelope()


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe", b'{"type":"ping"}garbage', b"nan", b"[" * 5000])
def test_malformed_json(raw):
    with pytest.raises(EnvelopeError) as e:
        envelope.parse(raw, MAX_BODY)
    assert e.value.code == 400 and e.value.fatal


def test_oversized_body_is_not_fatal():
    with pytest.raises(EnvelopeError) as e:
        parse({"type": "msg", "id": "1", "to": "b", "body": "x" * 2000})
    assert not e.value.fatal


def test_out_encodes_once_and_frames_once_per_codec():
    calls = []

    def codec(j):
        calls.append(j)
        return b"<" + j + b">"

    o = Out({"type": "pong"})
    assert o.json() is o.json()
    assert o.frame(codec) == b'<{"type":"pong"}>' and o.frame(codec) == b'<{"type":"pong"}>'
    assert len(calls) == 1


def test_out_framed_first_keeps_only_the_frames():
    """The first codec gets orjson's bytes as they are (a codec copies them): nothing of
    that 4 KiB buffer stays on the Out; a second codec and json() get the same JSON."""
    import tracemalloc
    def angle(j):
        return b"<" + j + b">"

    outs = [Out({"type": "msg", "from": "a", "to": "b", "body": f"hello {i}"}) for i in range(2000)]
    tracemalloc.start()
    try:
        frames = [o.frame(angle) for o in outs]
        per_item = tracemalloc.get_traced_memory()[0] / len(outs)
    finally:
        tracemalloc.stop()
    assert per_item < 1000, per_item
    o = outs[7]
    assert frames[7] == b"<" + orjson.dumps(o.env) + b">"
    assert o.frame(lambda j: b"[" + j + b"]") == b"[" + orjson.dumps(o.env) + b"]"
    assert o.json() == orjson.dumps(o.env) and o.frame(angle) is frames[7]


def test_out_makes_a_deferred_envelope_once_and_only_when_used():
    made = []

    def make():
        made.append(1)
        return {"type": "msg", "seq": 3}

    unused = Out(None, 3, "n.1", 0, make=make)
    assert (unused.seq, unused.origin) == (3, "n.1") and made == []
    o = Out(None, 3, make=make)
    assert o.type == "msg" and o.env is o.env and o.json() == b'{"type":"msg","seq":3}'
    assert made == [1]


@pytest.mark.parametrize("size,ok", [(1000, True), (1001, False)])
def test_body_size_limit_counts_utf8_bytes(size, ok):
    """The short-body shortcut (≤ max_body / 4 characters) never lets a long one through."""
    for body in ("x" * size, "é" * (size // 2) + "x" * (size % 2), "✓" * (size // 3) + "x" * (size % 3)):
        if ok:
            envelope.check_body(body, 1000)
        else:
            with pytest.raises(EnvelopeError):
                envelope.check_body(body, 1000)
    envelope.check_body("𝄞" * 250, 1000)
    with pytest.raises(EnvelopeError):
        envelope.check_body("𝄞" * 250 + "x", 1000)


def test_kept_json_is_right_sized():
    """orjson's own bytes keep a 4 KiB buffer; what an Out or a comet message caches
    must not (it waits in histories and queues)."""
    import tracemalloc
    from imd.proto.comet.channels import Message
    from imd.proto.comet.formats import message_json
    envs = [{"type": "msg", "from": "a", "to": "b", "body": f"hello {i}"} for i in range(2000)]
    tracemalloc.start()
    try:
        kept = [envelope.dumps_kept(e) for e in envs]
        outs = [Out(e) for e in envs]
        for o in outs:
            o.json()
        per_item = tracemalloc.get_traced_memory()[0] / len(envs)
    finally:
        tracemalloc.stop()
    assert kept[7] == orjson.dumps(envs[7]) and outs[7].json() == kept[7]
    assert per_item < 1500, per_item       # 2 × ~4.1 KB each without the copy
    msg = Message("data", "c1", 3, "hi")
    assert orjson.loads(message_json(msg)) == {"type": "data", "cname": "c1", "seq": 3, "content": "hi"}
