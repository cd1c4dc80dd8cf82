"""The load generator's wire helpers: imd framing, tokens, marks, MQTT/WebSocket/XMPP bytes."""
import base64
import struct

import jwt
import orjson
import pytest

from bench import loadgen as lg


def test_frame_roundtrip_whole_and_byte_by_byte():
    envs = [{"type": "auth", "token": "t", "platform": "android", "device": "d1"},
            {"type": "msg", "id": "1", "to": "u2", "body": "héllo @@M"}]
    stream = b"".join(lg.encode_frame(e) for e in envs)
    assert [orjson.loads(f) for f in lg.FrameDecoder().feed(stream)] == envs
    dec = lg.FrameDecoder()
    got = []
    for i in range(len(stream)):
        got += dec.feed(stream[i:i + 1])
    assert [orjson.loads(f) for f in got] == envs
    assert not dec.buf


def test_frame_header_is_big_endian_length():
    frame = lg.encode_frame({"type": "ping"})
    assert struct.unpack(">I", frame[:4])[0] == len(frame) - 4


@pytest.mark.parametrize("length", [0, lg.MAX_FRAME + 1, 0xFFFFFFFF])
def test_frame_decoder_rejects_bad_lengths(length):
    with pytest.raises(lg.FrameError):
        lg.FrameDecoder().feed(struct.pack(">I", length) + b"{}")


def test_frame_decoder_keeps_partial_frame():
    dec = lg.FrameDecoder()
    frame = lg.encode_frame({"type": "pong"})
    assert dec.feed(frame[:3]) == []
    assert dec.feed(frame[3:-1]) == []
    assert dec.feed(frame[-1:]) == [b'{"type":"pong"}']


def test_token_claims_and_signature():
    token = lg.make_token("a-benchmark-secret-of-32-bytes!!", "u7", "host", ttl=60, now=1_000_000)
    claims = jwt.decode(token, "a-benchmark-secret-of-32-bytes!!", algorithms=["HS256"], options={"verify_exp": False})
    assert claims == {"sub": "u7", "role": "host", "exp": 1_000_060}
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, "another-benchmark-secret-32-bytes", algorithms=["HS256"], options={"verify_exp": False})


def test_count_marks_across_splits():
    stream = b"xx@@Myy@@M@@Mz" * 5
    for cut in range(1, 6):
        tail, total = b"", 0
        for i in range(0, len(stream), cut):
            n, tail = lg.count_marks(tail, stream[i:i + cut])
            total += n
        assert total == 15


def test_extract_timestamps_split_and_garbage():
    stream = b"<body>a @@T123; b @@T456;</body>@@Tzz;@@T7"
    out, rest = lg.extract_timestamps(stream)
    assert out == [123, 456] and rest == b"@@T7"
    out, rest = lg.extract_timestamps(rest + b"89;tail")
    assert out == [789]
    assert lg.extract_timestamps(b"@@T" + b"9" * 100)[0] == []


def test_mqtt_packets():
    assert lg.mqtt_connect("c1") == b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x00\x00\x02c1"
    assert lg.mqtt_subscribe(1, "t") == b"\x82\x06\x00\x01\x00\x01t\x00"
    pub = lg.mqtt_publish("t", b"x" * 200)
    assert pub[:3] == b"\x30\xcb\x01"       # remaining length 203 in two bytes
    assert len(pub) == 3 + 203
    assert lg.mqtt_publish("t", b"p", qos=1, packet_id=7) == b"\x32\x06\x00\x01t\x00\x07p"


def test_ws_frame_masks_payload():
    frame = lg.ws_frame(b"hi", mask_key=b"\x01\x02\x03\x04")
    assert frame == b"\x81\x82\x01\x02\x03\x04" + bytes([ord("h") ^ 1, ord("i") ^ 2])
    long = lg.ws_frame(b"a" * 300, mask_key=b"\0\0\0\0")
    assert long[:4] == b"\x81\xfe\x01\x2c" and long[8:] == b"a" * 300


def test_ws_handshake_and_xmpp_auth():
    req = lg.ws_handshake("h", "/ws?token=t", key="k==")
    assert req.startswith(b"GET /ws?token=t HTTP/1.1\r\nHost: h\r\n") and req.endswith(b"\r\n\r\n")
    assert b"Sec-WebSocket-Key: k==" in req
    auth = lg.xmpp_auth_plain("u1", "pw")
    cred = auth.split(b">")[1].split(b"<")[0]
    assert base64.b64decode(cred) == b"\0u1\0pw"


def _server_ws_frame(payload, opcode=0x1):
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 127]) + n.to_bytes(8, "big")
    return head + payload


def test_ws_reader_whole_and_byte_by_byte():
    frames = [(0x1, b'{"type":"ping"}'), (0x9, b""), (0x1, b"x" * 300), (0x2, b"y" * 70000)]
    stream = b"".join(_server_ws_frame(p, o) for o, p in frames)
    assert lg.WsReader().feed(stream) == frames
    reader, got = lg.WsReader(), []
    for i in range(0, len(stream), 7):
        got += reader.feed(stream[i:i + 7])
    assert got == frames and not reader.buf


@pytest.mark.parametrize("bad", [lg.ws_frame(b"masked"), _server_ws_frame(b"z" * 70000)[:2] + (1 << 40).to_bytes(8, "big")])
def test_ws_reader_rejects_masked_and_oversized(bad):
    with pytest.raises(lg.FrameError):
        lg.WsReader().feed(bad)


def test_xmpp_ping_answers_only_gets():
    data = (b"<iq from='localhost' type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>"
            b"<iq type=\"get\" id=\"p2\"><ping xmlns=\"urn:xmpp:ping\"/></iq>"
            b"<iq type='result' id='png'/>")
    assert lg.xmpp_ping_answers(data) == b"<iq type='result' id='p1'/><iq type='result' id='p2'/>"
    assert lg.xmpp_ping_answers(b"<message><body>urn:xmpp:ping</body></message>") == b""
