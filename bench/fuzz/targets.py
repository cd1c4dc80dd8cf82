"""Fuzz targets: one function per parser, taking the fuzzer's bytes.

Each target splits its input into a payload and read boundaries (so that the
fuzzer explores how reads are cut as well as what they carry), feeds a fresh
parser, and checks the same invariants as tests/fuzz/: only the parser's
documented error escapes; feeding whole and in pieces agree; what the parser
buffers stays within its limit plus one read. Any other exception, or a
failed assertion, is a crash for the fuzzer. ``SEEDS[name]`` are valid inputs
to start the corpus from.

Imported by bench/fuzz/run.py inside ``atheris.instrument_imports()``; the
parser modules are imported lazily by ``load(name)`` so that a target whose
module is missing (comet/xmpp not merged) says so instead of failing others.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

MAX_FRAME = 256
MAX_MESSAGE = 512
MAX_BODY = 128


def pieces(data: bytes):
    """The first byte picks up to 7 cut positions from the next bytes; the rest is the
    payload: returns (payload, [chunks])."""
    if not data:
        return b"", [b""]
    ncut = data[0] & 7
    cuts_raw, payload = data[1:1 + ncut], data[1 + ncut:]
    n = len(payload)
    cuts = sorted({(b * max(n, 1)) // 255 for b in cuts_raw})
    out, prev = [], 0
    for c in cuts:
        out.append(payload[prev:c])
        prev = c
    out.append(payload[prev:])
    return payload, out


# -- raw-TCP frames --------------------------------------------------------------
def _frames(impl, chunks):
    dec = impl.FrameDecoder(MAX_FRAME)
    got = []
    for c in chunks:
        try:
            got += dec.feed(c)
        except impl.FrameError as e:
            assert e.code in (400, 413), e.code
            return got, e.code
        assert dec.pending < 4 + MAX_FRAME, dec.pending
    return got, None


def frames(data: bytes, impl_name: str = "_fastpath_py") -> None:
    impl = importlib.import_module("imd." + impl_name)
    payload, chunks = pieces(data)
    whole, split = _frames(impl, [payload]), _frames(impl, chunks)
    if whole[1] is None or split[1] is None:
        assert whole == split, (whole, split)
    else:
        # frames completed in the failing read are not returned: one list is a prefix
        a, b = sorted((whole[0], split[0]), key=len)
        assert whole[1] == split[1] and b[:len(a)] == a, (whole, split)


def frames_cython(data: bytes) -> None:
    frames(data, "_fastpath")


# -- envelopes ---------------------------------------------------------------------
def envelope(data: bytes) -> None:
    import orjson

    from imd import envelope as env_mod
    try:
        env = env_mod.parse(data, MAX_BODY)
    except env_mod.EnvelopeError as e:
        assert e.code in (400, 413), e.code
        orjson.dumps(e.envelope())
        return
    assert isinstance(env, dict)


# -- WebSocket ---------------------------------------------------------------------
def _ws(impl, chunks):
    dec = impl.WSDecoder(MAX_MESSAGE)
    got = []
    for c in chunks:
        try:
            got += [(op, bytes(p)) for op, p in dec.feed(c)]
        except impl.WSError as e:
            assert e.code in (1002, 1007, 1009), e.code
            return got, e.code
        assert dec.pending <= MAX_MESSAGE + 14 + 139, dec.pending
    for op, p in got:
        if op == 8:
            try:
                impl.ws_parse_close(p)
            except impl.WSError:
                pass
    return got, None


def ws(data: bytes, impl_name: str = "_fastpath_py") -> None:
    impl = importlib.import_module("imd." + impl_name)
    payload, chunks = pieces(data)
    whole, split = _ws(impl, [payload]), _ws(impl, chunks)
    if whole[1] is None or split[1] is None:
        assert whole == split, (whole, split)
    else:
        assert whole[1] == split[1]


def ws_cython(data: bytes) -> None:
    ws(data, "_fastpath")


# -- HTTP (comet and admin ports) --------------------------------------------------
def _http(chunks):
    http = importlib.import_module("imd.proto.comet.http")
    p = http.RequestParser(max_head=1024, max_headers=16, max_target=256, body_limit=lambda r: 256)
    got = []
    try:
        for c in chunks:
            for r in p.feed(c):
                got.append((r.method, r.target, r.headers, r.body))
                r.params()
            assert p._body_len <= 256 and p._head <= 1024 + 256
            if p.upgraded is not None:
                return got, "upgrade"
    except http.HTTPError as e:
        assert 400 <= e.status < 500, e.status
        return got, e.status
    finally:
        p.close()
    return got, None


def http(data: bytes) -> None:
    payload, chunks = pieces(data)
    whole, split = _http([payload]), _http(chunks)
    if whole != split:
        # a limit (414/431) can trip in one read order before a malformed byte is seen in
        # the other, so both may refuse with different statuses; one refusing alone must be 431
        a, b = sorted((whole[0], split[0]), key=len)
        assert b[:len(a)] == a, (whole, split)
        assert (whole[1] is not None and split[1] is not None) or 431 in (whole[1], split[1]), (whole, split)


# -- XMPP --------------------------------------------------------------------------
HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
          b"xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>")


def _xmpp(chunks, negotiating):
    parser = importlib.import_module("imd.proto.xmpp.parser")
    stanza = importlib.import_module("imd.proto.xmpp.stanza")
    got = []
    p = parser.StreamParser(SimpleNamespace(on_stream_start=lambda a: None,
                                        on_stanza=lambda el: got.append(stanza.tostring(el)),
                                        on_stream_end=lambda: None), max_stanza=1024)
    p.negotiating = negotiating
    for c in chunks:
        try:
            p.feed(c)
        except parser.StreamError as e:
            return got, e.condition
        assert p._fed - p._mark <= 1024
    return got, None


def xmpp(data: bytes) -> None:
    payload, chunks = pieces(data)
    negotiating = bool(data[:1]) and data[0] & 8 != 0
    if data[:1] and data[0] & 16:               # half the inputs get a valid stream header
        payload, chunks = HEADER + payload, [HEADER] + chunks
    whole, split = _xmpp([payload], negotiating), _xmpp(chunks, negotiating)
    if whole != split:
        # expat may report an error one read later (it holds an unfinished token back),
        # so the error can differ; the stanzas delivered may not
        a, b = sorted((whole[0], split[0]), key=len)
        assert b[:len(a)] == a and (whole[1] or split[1]), (whole, split)


TARGETS = {"frames": frames, "frames_cython": frames_cython, "envelope": envelope, "ws": ws,
           "ws_cython": ws_cython, "http": http, "xmpp": xmpp}

MODULES = {"frames": "imd._fastpath_py", "frames_cython": "imd._fastpath", "envelope": "imd.envelope",
           "ws": "imd._fastpath_py", "ws_cython": "imd._fastpath", "http": "imd.proto.comet.http",
           "xmpp": "imd.proto.xmpp.parser"}


def _ws_frame(op, payload, fin=True):
    mask = b"\x11\x22\x33\x44"
    n = len(payload)
    head = bytes(((0x80 if fin else 0) | op, 0x80 | n)) if n < 126 else bytes(((0x80 if fin else 0) | op, 0xFE)) + n.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


SEEDS = {
    "frames": [b"\x03\x10\x80\xf0" + b"\x00\x00\x00\x05hello\x00\x00\x00\x02{}", b"\x00\x00\x00\x00\x00"],
    "envelope": [b'{"type":"msg","id":"c1","to":"u1","body":"hi","ctx":{"listing":"L1"}}',
                 b'{"type":"auth","token":"t","platform":"ios","device":"d1","since":3}',
                 b'{"type":"sync","since":0,"limit":10}', b'{"type":"read","peer":"p","seq":2}',
                 b'{"type":"ping"}', b'{"type":"presence","status":"away"}', b'{"type":"ack","seq":1}'],
    "ws": [b"\x02\x40\xc0" + _ws_frame(1, b"hello") + _ws_frame(9, b"p") + _ws_frame(2, b"ab", False)
           + _ws_frame(0, b"cd") + _ws_frame(8, b"\x03\xe8bye")],
    "http": [b"\x02\x30\xa0GET /sub?cname=a&seq=1&cb=f HTTP/1.1\r\nHost: x\r\n\r\n"
             b"POST /im/send?token=t HTTP/1.1\r\nContent-Length: 5\r\nContent-Type: application/json\r\n\r\n{\"a\"}",
             b"\x00GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x80",
             b"\x00POST /pub HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"],
    "xmpp": [b"\x12\x40<message to='a@localhost' type='chat'><body>hi &amp; bye</body></message>"
             b"<iq type='get' id='1'><query xmlns='jabber:iq:roster'/></iq></stream:stream>",
             b"\x1a\x20<presence><show>away</show></presence>",
             b"\x00<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
             b"xmlns:stream='http://etherx.jabber.org/streams'><auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' "
             b"mechanism='PLAIN'>AGEAYg==</auth>"],
}
SEEDS["frames_cython"] = SEEDS["frames"]
SEEDS["ws_cython"] = SEEDS["ws"]
