"""The fast path, run against BOTH implementations: imd._fastpath (Cython) and
imd._fastpath_py (its pure-Python twin), on shared inputs.

tests/conftest.py builds the Cython extension in place (``setup.py build_ext
--inplace``) at the start of the session; if that fails only the cython
parameter is skipped, with the reason.
"""

import errno
import importlib
import os
import random
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cython_module(config=None):
    """(imd._fastpath, None), or (None, why) when tests/conftest.py could not build it."""
    try:
        return importlib.import_module("imd._fastpath"), None
    except ImportError as e:
        why = f"imd._fastpath is not built ({e}); build output: {getattr(config, 'imd_fastpath_build', '?')}"
        print(why, file=sys.stderr)
        return None, why


def both():
    """(the pure-Python twin, the Cython build), for tests that compare them; skips the
    calling test when the build is missing."""
    cy, why = _cython_module()
    if cy is None:
        pytest.skip(why)
    return importlib.import_module("imd._fastpath_py"), cy


@pytest.fixture(params=["python", "cython"], scope="module")
def fp(request):
    if request.param == "python":
        return importlib.import_module("imd._fastpath_py")
    mod, why = _cython_module(request.config)
    if mod is None:
        pytest.skip(why)
    return mod


def test_selector_picks_an_implementation():
    import imd.fastpath
    assert imd.fastpath.IMPL in ("cython", "python")
    assert imd.fastpath.FrameDecoder.__module__.startswith(
        "imd._fastpath_py" if imd.fastpath.IMPL == "python" else "imd._fastpath")


def test_pure_python_env_forces_the_twin():
    out = subprocess.run([sys.executable, "-c", "import imd.fastpath as f; print(f.IMPL)"], cwd=ROOT,
                         env={**os.environ, "IMD_PURE_PYTHON": "1", "PYTHONPATH": ROOT},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "python"


# --------------------------------------------------------------- shared helpers

def feed_all(decoder, stream, chunking):
    """Feed ``stream`` whole, one byte at a time, or in random chunks; all results."""
    if chunking == "whole":
        return decoder.feed(stream)
    out = []
    if chunking == "bytes":
        for i in range(len(stream)):
            out += decoder.feed(stream[i:i + 1])
        return out
    rnd = random.Random(len(stream))
    pos = 0
    while pos < len(stream):
        step = rnd.randint(1, 300)
        out += decoder.feed(stream[pos:pos + step])
        pos += step
    return out


CHUNKINGS = ["whole", "bytes", "random"]


def frame(payload):
    return len(payload).to_bytes(4, "big") + payload


def client_frame(op, payload, fin=True, rsv=0, masked=True, mask=b"\x37\xfa\x21\x3d", length=None):
    """A client→server WebSocket frame; ``length`` forces the declared length."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | rsv | op])
    bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


# --------------------------------------------------------------- raw TCP frames

FRAME_STREAMS = [
    [b"x"],
    [b'{"type":"ping"}', b'{"type":"msg","to":"u2","body":"hi"}'],
    [bytes(range(256)) * 4, b"a", b"b" * 1000],
    [b"\x00" * 4096],                                   # exactly max_frame below
]


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("payloads", FRAME_STREAMS)
def test_frames_decode_whatever_the_chunking(fp, payloads, chunking):
    dec = fp.FrameDecoder(4096)
    assert feed_all(dec, b"".join(fp.encode_frame(p) for p in payloads), chunking) == payloads
    assert dec.pending == 0


def test_partial_frame_is_kept(fp):
    dec = fp.FrameDecoder(100)
    assert dec.pending == 0
    assert dec.feed(frame(b"one") + b"\x00\x00\x00\x05ab") == [b"one"]
    assert dec.pending == 6
    assert dec.feed(b"cde" + frame(b"two")[:2]) == [b"abcde"]
    assert dec.pending == 2
    assert dec.feed(frame(b"two")[2:]) == [b"two"]
    assert dec.pending == 0
    assert dec.feed(b"") == []


def test_caller_bytearray_is_not_kept_or_changed(fp):
    dec = fp.FrameDecoder(100)
    data = bytearray(frame(b"abc") + b"\x00\x00")
    assert dec.feed(data) == [b"abc"]
    assert data == bytearray(frame(b"abc") + b"\x00\x00")
    data[:] = b"zzzzzz"
    assert dec.feed(b"\x00\x01q") == [b"q"]


@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_zero_length_frame(fp, chunking):
    dec = fp.FrameDecoder(100)
    with pytest.raises(fp.FrameError) as e:
        feed_all(dec, frame(b"ok") + b"\x00\x00\x00\x00" + frame(b"after"), chunking)
    assert (e.value.code, e.value.reason) == (400, "zero-length frame")
    assert isinstance(e.value, ValueError)


def test_oversized_frame_raises_on_the_prefix_alone(fp):
    dec = fp.FrameDecoder(1000)
    assert dec.feed(b"\x00\x00") == []
    with pytest.raises(fp.FrameError) as e:
        dec.feed(b"\x03\xe9")                          # 1001: the body never arrives
    assert e.value.code == 413
    assert e.value.reason == "frame of 1001 bytes exceeds max_frame 1000"
    assert dec.pending == 0


def test_hostile_length_is_refused_not_buffered(fp):
    dec = fp.FrameDecoder(65536)
    with pytest.raises(fp.FrameError) as e:
        dec.feed(b"\xff\xff\xff\xff" + b"A" * 100)
    assert e.value.code == 413 and "4294967295" in e.value.reason
    assert dec.pending == 0


def test_decoder_stays_failed(fp):
    dec = fp.FrameDecoder(10)
    with pytest.raises(fp.FrameError):
        dec.feed(b"\x00\x00\x00\x0b")
    for data in (frame(b"fine"), b""):
        with pytest.raises(fp.FrameError) as e:
            dec.feed(data)
        assert e.value.code == 413


def test_frame_decoder_is_small(fp):
    dec = fp.FrameDecoder(65536)
    dec.feed(frame(b"x") + b"\x00")
    dec.feed(b"\x00\x00\x01y")
    assert dec.pending == 0
    assert sys.getsizeof(dec) <= 96


def test_encode_frame(fp):
    assert fp.encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert fp.encode_frame(b"x" * 70000)[:4] == (70000).to_bytes(4, "big")
    assert fp.encode_frame(b"") == b"\x00\x00\x00\x00"
    assert fp.encode_frame(bytearray(b"ab")) == b"\x00\x00\x00\x02ab"


# --------------------------------------------------------------- WebSocket

TEXT = "héllo wörld ✓".encode()
WS_STREAMS = [   # (frames to feed, expected messages)
    ([client_frame(1, TEXT)], [(1, TEXT)]),
    ([client_frame(2, b"")], [(2, b"")]),
    ([client_frame(2, bytes(range(256)) * 300)], [(2, bytes(range(256)) * 300)]),     # 64-bit length
    ([client_frame(1, b"a" * 126), client_frame(1, b"b" * 65535)], [(1, b"a" * 126), (1, b"b" * 65535)]),
    ([client_frame(1, TEXT[:3], fin=False), client_frame(9, b"ping!"),
      client_frame(0, TEXT[3:7], fin=False), client_frame(10, b""),
      client_frame(0, TEXT[7:])],
     [(9, b"ping!"), (10, b""), (1, TEXT)]),
    ([client_frame(2, b"\xff" * 10, fin=False), client_frame(0, b"\x00")], [(2, b"\xff" * 10 + b"\x00")]),
    ([client_frame(8, b"\x03\xe8bye")], [(8, b"\x03\xe8bye")]),
    ([client_frame(9, b"p" * 125)], [(9, b"p" * 125)]),
]


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("frames,expected", WS_STREAMS)
def test_ws_messages_decode_whatever_the_chunking(fp, frames, expected, chunking):
    dec = fp.WSDecoder(100000)
    assert feed_all(dec, b"".join(frames), chunking) == expected
    assert dec.pending == 0


def test_ws_frames_from_an_independent_client(fp):
    """Frames made by wsproto (a real client implementation) decode to what it sent."""
    from wsproto.frame_protocol import FrameProtocol
    client = FrameProtocol(client=True, extensions=[])
    stream = (client.send_data("first ✓", fin=True) + client.ping(b"hb") + client.send_data(b"\x00\x01", fin=False)
              + client.send_data(b"\x02", fin=True) + client.send_data("z" * 70000, fin=True)
              + client.close(1000, "bye"))
    dec = fp.WSDecoder(1 << 20)
    assert feed_all(dec, bytes(stream), "random") == [
        (1, "first ✓".encode()), (9, b"hb"), (2, b"\x00\x01\x02"), (1, b"z" * 70000),
        (8, b"\x03\xe8bye")]


WS_ERRORS = [   # (stream, close code, reason)
    (client_frame(1, b"hi", masked=False), 1002, "client frame not masked"),
    (client_frame(1, b"hi", rsv=0x40), 1002, "reserved bits set"),
    (client_frame(1, b"hi", rsv=0x10), 1002, "reserved bits set"),
    (client_frame(3, b"hi"), 1002, "unknown opcode 3"),
    (client_frame(11, b"hi"), 1002, "unknown opcode 11"),
    (client_frame(9, b"hi", fin=False), 1002, "fragmented control frame"),
    (client_frame(9, b"p" * 126), 1002, "control frame payload over 125 bytes"),
    (client_frame(0, b"hi"), 1002, "continuation frame without a message"),
    (client_frame(1, b"a", fin=False) + client_frame(2, b"b"), 1002,
     "new data frame inside a fragmented message"),
    (client_frame(1, b"x" * 1001), 1009, "message of 1001 bytes or more exceeds max_message 1000"),
    (client_frame(1, b"x" * 600, fin=False) + client_frame(0, b"y" * 401), 1009,
     "message of 1001 bytes or more exceeds max_message 1000"),
    (client_frame(1, b"\xc3\x28"), 1007, "text message is not valid UTF-8"),
    (client_frame(1, TEXT[:2], fin=False) + client_frame(0, b""), 1007, "text message is not valid UTF-8"),
    (b"\x82\xff" + b"\x80" + b"\x00" * 7 + b"mask", 1002, "64-bit length with the high bit set"),
]


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("stream,code,reason", WS_ERRORS)
def test_ws_violations(fp, stream, code, reason, chunking):
    dec = fp.WSDecoder(1000)
    with pytest.raises(fp.WSError) as e:
        feed_all(dec, stream, chunking)
    assert (e.value.code, e.value.reason) == (code, reason)
    with pytest.raises(fp.WSError) as again:          # stays failed
        dec.feed(client_frame(1, b"ok"))
    assert again.value.code == code


def test_ws_oversize_raises_on_the_header_alone(fp):
    dec = fp.WSDecoder(1 << 20)
    with pytest.raises(fp.WSError) as e:
        dec.feed(b"\x82\xff" + (1 << 40).to_bytes(8, "big"))     # no mask, no payload yet
    assert e.value.code == 1009
    dec = fp.WSDecoder(100)
    with pytest.raises(fp.WSError) as e:
        dec.feed(b"\x81\xfe\x00\x65")                             # 101 bytes declared
    assert e.value.code == 1009


def test_ws_control_frames_do_not_count_toward_message(fp):
    dec = fp.WSDecoder(10)
    assert dec.feed(client_frame(1, b"12345", fin=False) + client_frame(9, b"p" * 100)) == [(9, b"p" * 100)]
    assert dec.pending == 5
    assert dec.feed(client_frame(0, b"67890")) == [(1, b"1234567890")]
    assert dec.pending == 0


def test_ws_decoder_idle_only_between_messages(fp):
    dec = fp.WSDecoder(100)
    assert dec.idle
    assert dec.feed(client_frame(1, b"", fin=False)) == []      # an empty first fragment
    assert dec.pending == 0 and not dec.idle
    assert dec.feed(client_frame(0, b"ab")[:3]) == []
    assert not dec.idle
    assert dec.feed(client_frame(0, b"ab")[3:]) == [(1, b"ab")]
    assert dec.idle
    with pytest.raises(fp.WSError):
        dec.feed(client_frame(0, b"x"))                          # continuation without a start
    assert not dec.idle


def test_ws_encode_lengths(fp):
    assert fp.ws_encode(1, b"hi") == b"\x81\x02hi"
    assert fp.ws_encode(2, b"x" * 125)[:2] == b"\x82\x7d"
    assert fp.ws_encode(1, b"x" * 126)[:4] == b"\x81\x7e\x00\x7e"
    assert fp.ws_encode(1, b"x" * 65535)[:4] == b"\x81\x7e\xff\xff"
    assert fp.ws_encode(1, b"x" * 65536)[:10] == b"\x81\x7f" + (65536).to_bytes(8, "big")
    assert fp.ws_encode(10, b"") == b"\x8a\x00"
    for bad in ((9, b"p" * 126), (16, b""), (-1, b"")):
        with pytest.raises(ValueError):
            fp.ws_encode(*bad)


def test_ws_encode_read_by_an_independent_client(fp):
    from wsproto.frame_protocol import FrameProtocol, Opcode
    client = FrameProtocol(client=True, extensions=[])
    for size in (0, 5, 200, 70000):
        client.receive_bytes(fp.ws_encode(2, b"q" * size))
        frames = list(client.received_frames())
        assert frames[0].opcode == Opcode.BINARY and frames[0].payload == b"q" * size


def test_ws_close_payload(fp):
    assert fp.ws_close_payload(1000, "bye") == b"\x03\xe8bye"
    assert fp.ws_close_payload(1009) == b"\x03\xf1"
    long = fp.ws_close_payload(1008, "é" * 100)
    assert len(long) <= 125
    long[2:].decode("utf-8")
    assert len(fp.ws_encode(8, long)) <= 127


@pytest.mark.parametrize("payload,result", [
    (b"", (1005, "")), (b"\x03\xe8", (1000, "")), (b"\x03\xe9going away \xe2\x9c\x93", (1001, "going away ✓")),
    (b"\x0f\xa0", (4000, "")), (bytearray(b"\x03\xf1x"), (1009, "x")),
])
def test_ws_parse_close(fp, payload, result):
    assert fp.ws_parse_close(payload) == result
    if payload:
        assert fp.ws_parse_close(fp.ws_close_payload(*result)) == result


@pytest.mark.parametrize("payload,code", [
    (b"\x03", 1002), (b"\x03\xe7", 1002), (b"\x03\xec", 1002), (b"\x03\xed", 1002), (b"\x03\xee", 1002),
    (b"\x03\xf7", 1002), (b"\x07\xd0", 1002), (b"\x13\x88", 1002), (b"\x00\x00", 1002),
    (b"\x03\xe8\xff", 1007),
])
def test_ws_parse_close_violations(fp, payload, code):
    with pytest.raises(fp.WSError) as e:
        fp.ws_parse_close(payload)
    assert e.value.code == code


# --------------------------------------------------------------- send_many

def test_send_many_on_a_socketpair(fp):
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    try:
        a.setblocking(False)
        c.setblocking(False)
        assert fp.send_many([]) == []
        assert fp.send_many([(a.fileno(), b"hello"), (c.fileno(), b""), (c.fileno(), bytearray(b"xy"))]) == [5, 0, 2]
        assert b.recv(100) == b"hello" and d.recv(100) == b"xy"
        big = b"z" * (16 << 20)
        sent = fp.send_many([(a.fileno(), big), (a.fileno(), b"more")])
        assert 0 < sent[0] < len(big)                  # the kernel took part of it
        assert sent[1] == -errno.EAGAIN
        d.close()
        assert fp.send_many([(c.fileno(), b"to nobody")])[0] in (-errno.EPIPE, -errno.ECONNRESET)
        assert fp.send_many([(10 ** 6, b"x")]) == [-errno.EBADF]
    finally:
        for s in (a, b, c):
            s.close()


# --------------------------------------------------------------- random round trips

try:
    from hypothesis import given, settings, strategies as st
except ImportError:                                   # the test extra is not installed
    st = None


def _split(stream, points):
    points = sorted({p % (len(stream) + 1) for p in points})
    edges = [0] + points + [len(stream)]
    return [stream[a:b] for a, b in zip(edges, edges[1:])]


if st is None:
    def test_random_round_trips():
        pytest.skip("hypothesis is not installed")
else:
    payloads = st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=12)
    cuts = st.lists(st.integers(min_value=0, max_value=40000), max_size=20)

    @settings(max_examples=150, deadline=None)
    @given(payloads, cuts)
    def test_random_frame_round_trips(fp, items, points):
        stream = b"".join(fp.encode_frame(p) for p in items)
        dec = fp.FrameDecoder(4096)
        out = []
        for chunk in _split(stream, points):
            out += dec.feed(chunk)
        assert out == items and dec.pending == 0

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from([1, 2, 9]), st.text(max_size=125), st.binary(min_size=4, max_size=4)),
                    min_size=1, max_size=10), cuts)
    def test_random_ws_round_trips(fp, messages, points):
        expected, stream = [], b""
        for op, text, mask in messages:
            data = text.encode()[:125] if op == 9 else text.encode() * 7
            if op == 9:
                data = data.decode("utf-8", "ignore").encode()
            expected.append((op, data))
            stream += client_frame(op, data, mask=mask)
        dec = fp.WSDecoder(1 << 20)
        out = []
        for chunk in _split(stream, points):
            out += dec.feed(chunk)
        assert out == expected

    @settings(max_examples=100, deadline=None)
    @given(st.binary(max_size=70000), st.sampled_from([1, 2]))
    def test_ws_encode_then_mask_round_trip(fp, data, op):
        if op == 1:
            data = data.decode("utf-8", "ignore").encode()
        server = fp.ws_encode(op, data)
        head = 2 if len(data) < 126 else 4 if len(data) < 65536 else 10
        assert server[head:] == data
        dec = fp.WSDecoder(1 << 20)
        assert dec.feed(client_frame(op, data, mask=os.urandom(4))) == [(op, data)]

    def _outcome(decoder, chunks, error):
        out = []
        try:
            for chunk in chunks:
                out += decoder.feed(chunk)
        except error as e:
            return out, (e.code, e.reason), decoder.pending
        return out, None, decoder.pending

    def _both(config):
        cy, why = _cython_module(config)
        if cy is None:
            pytest.skip(why)
        return importlib.import_module("imd._fastpath_py"), cy

    hostile_frames = st.lists(st.tuples(
        st.integers(0, 15), st.binary(max_size=300), st.booleans(), st.sampled_from([0, 0, 0, 0x40]),
        st.sampled_from([True, True, True, False])), max_size=8)

    @settings(max_examples=300, deadline=None)
    @given(hostile_frames, st.binary(max_size=40), cuts)
    def test_twins_agree_on_hostile_ws_input(pytestconfig, frames, garbage, points):
        py, cy = _both(pytestconfig)
        stream = b"".join(client_frame(op, data, fin=fin, rsv=rsv, masked=masked)
                          for op, data, fin, rsv, masked in frames) + garbage
        chunks = _split(stream, points)
        assert _outcome(py.WSDecoder(400), chunks, py.WSError) == _outcome(cy.WSDecoder(400), chunks, cy.WSError)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.binary(max_size=300), max_size=8), st.binary(max_size=12), cuts)
    def test_twins_agree_on_hostile_frame_input(pytestconfig, items, garbage, points):
        py, cy = _both(pytestconfig)
        stream = b"".join(frame(p) for p in items) + garbage
        chunks = _split(stream, points)
        assert _outcome(py.FrameDecoder(200), chunks, py.FrameError) == \
            _outcome(cy.FrameDecoder(200), chunks, cy.FrameError)
