"""Property tests of the WebSocket frame decoder (client → server frames), on both
implementations.

Properties: only WSError (close code 1002, 1007 or 1009) escapes ``feed``;
whole and split feeding agree (same messages, same error code); both
implementations agree; ``pending`` stays within max_message + one frame header
(14 bytes) + one control frame; a dead decoder stays dead; valid client
streams (fragmented messages, interleaved control frames, any masks) decode
to exactly the messages sent; ``ws_parse_close`` on any payload returns or
raises WSError.
"""


import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.strategies import FUZZ, mutate, split
from tests.test_fastpath import both

MAX = 300
BOUND = MAX + 14 + 125 + 14


def run(fp, pieces, max_message=MAX):
    dec = fp.WSDecoder(max_message)
    out = []
    for piece in pieces:
        try:
            out += dec.feed(piece)
        except fp.WSError as e:
            assert e.code in (1002, 1007, 1009)
            with pytest.raises(fp.WSError):
                dec.feed(b"\x81\x80\x00\x00\x00\x00")
            return [(op, bytes(p)) for op, p in out], e.code
        assert dec.pending <= BOUND
    return [(op, bytes(p)) for op, p in out], None


def client_frame(opcode, payload, fin=True, mask=b"\x01\x02\x03\x04"):
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((b0, 0x80 | n))
    elif n < 65536:
        head = bytes((b0, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, 0x80 | 127)) + n.to_bytes(8, "big")
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


@st.composite
def conversation(draw):
    """(stream bytes, expected [(opcode, payload)]): messages, some fragmented, with
    control frames between fragments."""
    stream, expected = [], []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            op = draw(st.sampled_from((9, 10)))
            payload = draw(st.binary(max_size=125))
            stream.append(client_frame(op, payload, mask=draw(st.binary(min_size=4, max_size=4))))
            expected.append((op, payload))
            continue
        op = draw(st.sampled_from((1, 2)))
        payload = (draw(st.text(max_size=MAX // 4)).encode() if op == 1 else draw(st.binary(max_size=MAX)))
        cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=3)))
        parts = [payload[a:b] for a, b in zip([0] + cuts, cuts + [len(payload)])]
        for i, part in enumerate(parts):
            stream.append(client_frame(op if i == 0 else 0, part, fin=i == len(parts) - 1,
                                       mask=draw(st.binary(min_size=4, max_size=4))))
            if i < len(parts) - 1 and draw(st.booleans()):
                stream.append(client_frame(9, b"p"))
                expected.append((9, b"p"))
        expected.append((op, payload))
    return b"".join(stream), expected


def same(a, b):
    """Whole vs split: equal results; when an error ends the stream, the messages
    before it may be fewer (a failing feed returns none of its own) but a prefix."""
    if a[1] is None and b[1] is None:
        return a == b
    return a[1] == b[1] and (a[0][:len(b[0])] == b[0] or b[0][:len(a[0])] == a[0])


@FUZZ
@given(data=st.binary(max_size=400), draw=st.data())
def test_arbitrary_bytes_in_any_split(fp, data, draw):
    assert same(run(fp, [data]), run(fp, split(data, draw.draw)))


@FUZZ
@given(conv=conversation(), draw=st.data())
def test_valid_client_streams_round_trip(fp, conv, draw):
    stream, expected = conv
    assert run(fp, split(stream, draw.draw)) == (expected, None)


@FUZZ
@given(conv=conversation(), draw=st.data())
def test_mutated_streams(fp, conv, draw):
    data = mutate(conv[0], draw.draw)
    assert same(run(fp, [data]), run(fp, split(data, draw.draw)))


@FUZZ
@given(data=st.binary(max_size=300), draw=st.data(), max_message=st.integers(0, 400))
def test_both_implementations_agree(data, draw, max_message):
    pieces = split(data, draw.draw)
    py, cy = both()
    assert run(py, pieces, max_message) == run(cy, pieces, max_message)


@FUZZ
@given(size=st.integers(MAX + 1, 2 ** 63 - 1), ext=st.sampled_from((126, 127)))
def test_oversized_declared_length_is_refused_before_the_payload(fp, size, ext):
    if ext == 126 and size >= 65536:
        size = 65535
    head = bytes((0x82, 0x80 | ext)) + size.to_bytes(2 if ext == 126 else 8, "big") + b"mask"
    got = run(fp, [head])
    assert got == ([], 1009) or (ext == 126 and size <= MAX)


@FUZZ
@given(st.binary(max_size=130))
def test_parse_close_payload(fp, payload):
    try:
        code, reason = fp.ws_parse_close(payload)
    except fp.WSError as e:
        assert e.code in (1002, 1007)
    else:
        assert isinstance(code, int) and isinstance(reason, str)


@FUZZ
@given(st.integers(0, 70000), st.text(max_size=200))
def test_close_payload_round_trip(fp, code, reason):
    code = 1000 + code % 4000
    payload = fp.ws_close_payload(code, reason)
    assert len(payload) <= 125
    try:
        c, r = fp.ws_parse_close(payload)
    except fp.WSError as e:
        assert e.code == 1002                   # a code a peer may not send
    else:
        assert c == code and reason.startswith(r)
