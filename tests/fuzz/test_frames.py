"""Property tests of the raw-TCP frame decoder, on both implementations
(imd._fastpath_py and the compiled imd._fastpath).

Properties: only FrameError (code 400 or 413) ever escapes ``feed``; feeding a
stream whole or in arbitrary pieces gives the same frames and the same error;
both implementations agree; ``pending`` never exceeds 4 + max_frame - 1 (a
partial frame is all a decoder keeps); a dead decoder stays dead; valid
streams round-trip exactly.
"""


import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.strategies import FUZZ, mutate, split
from tests.test_fastpath import both

MAX = 64


def run(fp, pieces, max_frame=MAX):
    """(frames, error code or None), checking the bound on ``pending`` after every feed."""
    dec = fp.FrameDecoder(max_frame)
    frames = []
    for piece in pieces:
        try:
            frames += dec.feed(piece)
        except fp.FrameError as e:
            assert e.code in (400, 413)
            with pytest.raises(fp.FrameError):           # dead for good
                dec.feed(b"\x00\x00\x00\x01x")
            return frames, e.code
        assert dec.pending < 4 + max_frame
    return frames, None


def reference(data, max_frame=MAX):
    """What the wire contract says: frames, then the first violation's code."""
    frames, pos = [], 0
    while len(data) - pos >= 4:
        n = int.from_bytes(data[pos:pos + 4], "big")
        if n == 0:
            return frames, 400
        if n > max_frame:
            return frames, 413
        if pos + 4 + n > len(data):
            break
        frames.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    return frames, None


def prefix_of(got, ref):
    """Frames returned before an error may be fewer (those of the failing feed are
    dropped) but are always a prefix of the reference."""
    return got[0] == ref[0][:len(got[0])] and got[1] == ref[1]


payloads = st.lists(st.binary(min_size=1, max_size=MAX), max_size=20)


@FUZZ
@given(data=st.binary(max_size=400), draw=st.data())
def test_arbitrary_bytes_in_any_split(fp, data, draw):
    whole = run(fp, [data])
    assert whole == reference(data)
    pieces = run(fp, split(data, draw.draw))
    if whole[1] is None:
        assert pieces == whole
    else:
        assert prefix_of(pieces, reference(data))


@FUZZ
@given(frames=payloads, draw=st.data())
def test_valid_streams_round_trip(fp, frames, draw):
    stream = b"".join(fp.encode_frame(f) for f in frames)
    assert run(fp, split(stream, draw.draw)) == (frames, None)
    assert run(fp, [bytes([b]) for b in stream]) == (frames, None)


@FUZZ
@given(frames=payloads, draw=st.data())
def test_mutated_streams(fp, frames, draw):
    stream = mutate(b"".join(fp.encode_frame(f) for f in frames), draw.draw)
    got = run(fp, split(stream, draw.draw))
    assert prefix_of(got, reference(stream))


@FUZZ
@given(data=st.binary(max_size=300), draw=st.data(), max_frame=st.integers(1, 300))
def test_both_implementations_agree(data, draw, max_frame):
    pieces = split(data, draw.draw)
    py, cy = both()
    a, b = run(py, pieces, max_frame), run(cy, pieces, max_frame)
    assert a == b


@FUZZ
@given(data=st.binary(min_size=1, max_size=MAX), pieces=st.integers(1, 8))
def test_reused_bytearray_input_is_not_kept(fp, data, pieces):
    """A caller's reusable receive buffer may be overwritten after feed returns."""
    stream = fp.encode_frame(data)
    dec = fp.FrameDecoder(MAX)
    out = []
    step = max(1, len(stream) // pieces)
    for i in range(0, len(stream), step):
        buf = bytearray(stream[i:i + step])
        out += dec.feed(buf)
        buf[:] = b"\xff" * len(buf)
    assert out == [data]
