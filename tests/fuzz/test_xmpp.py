"""Property tests of the XMPP stream parser (imd/proto/xmpp/parser.py; skipped while
that module is not on this branch).

Properties: only StreamError escapes ``feed`` (and a dead parser stays dead);
whole and split feeding give the same stanzas, in negotiating mode (one tag at
a time) and in bulk mode (see ``agree`` for how errors may differ); a stanza under
construction never spans more than max_stanza bytes (``_fed - _mark``), and a
long token without ``>`` is refused within about two max_stanza of input;
valid stanzas (random element trees) come back exactly (compared serialized).
"""

from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.strategies import FUZZ, mutate, split

parser = pytest.importorskip("imd.proto.xmpp.parser")
stanza = pytest.importorskip("imd.proto.xmpp.stanza")

HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
          b"xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>")
MAX_STANZA = 2048


def run(pieces, negotiating: bool, max_stanza: int = MAX_STANZA, hibernate: bool = False):
    """(serialized stanzas, stream started, stream ended, error condition or None);
    ``hibernate``: try to free the expat parser after every piece."""
    got, state = [], {"start": 0, "end": 0}
    handler = SimpleNamespace(
        on_stream_start=lambda attrs: state.__setitem__("start", state["start"] + 1),
        on_stanza=lambda el: got.append(stanza.tostring(el)),
        on_stream_end=lambda: state.__setitem__("end", state["end"] + 1))
    p = parser.StreamParser(handler, max_stanza=max_stanza)
    p.negotiating = negotiating
    for piece in pieces:
        if isinstance(p, parser.Dormant):
            p = p.wake(handler)
        try:
            p.feed(piece)
        except parser.StreamError as e:
            assert isinstance(e.condition, str) and e.condition
            with pytest.raises(parser.StreamError):
                p.feed(b"<presence/>")
            return got, state["start"], state["end"], e.condition
        assert p._fed - p._mark <= max_stanza
        if hibernate:
            p = p.hibernate() or p         # as XmppSession keeps it: the Dormant, woken on the next piece
    return got, state["start"], state["end"], None


def agree(a, b):
    """Same stanzas, same error; except that an error may show one read later or
    earlier (expat holds an unfinished token back: b"e\x00\x00x" in one read
    passes, b"e" then b"\x00\x00x" fails at once) or with another condition
    (a token cut by the max_stanza split): then at least one side failed, and
    the stanzas delivered agree up to where the shorter list ends."""
    if a == b:
        return True
    short, long_ = sorted((a[0], b[0]), key=len)
    return (a[3] is not None or b[3] is not None) and long_[:len(short)] == short and a[1] == b[1]


name = st.from_regex(r"[a-z][a-z0-9\-]{0,8}", fullmatch=True)
xml_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\ufffe\uffff",
                                 min_codepoint=0x20) | st.sampled_from("\n\t\r"), max_size=30)
attr_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffe\uffff",
                                  min_codepoint=0x20) | st.sampled_from("\n\t\r"), max_size=20)


def element(children):
    return st.builds(lambda tag, attrs, text, kids: stanza.Element(tag, stanza.CLIENT_NS, attrs, kids, text),
                     name, st.dictionaries(name, attr_text, max_size=3), xml_text, children)


tree = st.recursive(element(st.just([])), lambda kids: element(st.lists(kids, max_size=3)), max_leaves=8)


def serialized(el):
    return stanza.tostring(el)


@FUZZ
@given(data=st.binary(max_size=400), draw=st.data(), negotiating=st.booleans())
def test_arbitrary_bytes_after_a_header(data, draw, negotiating):
    stream = HEADER + data
    assert agree(run([stream], negotiating), run(split(stream, draw.draw), negotiating))


@FUZZ
@given(data=st.binary(max_size=300), draw=st.data())
def test_arbitrary_bytes_as_a_stream(data, draw):
    assert agree(run([data], True), run(split(data, draw.draw), True))


@FUZZ
@given(els=st.lists(tree, max_size=5), draw=st.data(), negotiating=st.booleans(), close=st.booleans())
def test_valid_stanzas_round_trip(els, draw, negotiating, close):
    texts = [serialized(e) for e in els]
    stream = HEADER + "".join(texts).encode() + (b"</stream:stream>" if close else b"")
    got = run(split(stream, draw.draw), negotiating, max_stanza=1 << 20)
    assert got == (texts, 1, int(close), None)


@FUZZ
@given(els=st.lists(tree, max_size=5), gaps=st.lists(st.sampled_from(["", " ", "\n", "\r\n\t"]), min_size=5,
                                                     max_size=5), draw=st.data())
def test_stanzas_round_trip_through_parser_hibernation(els, gaps, draw):
    """Freeing the parser whenever hibernate() allows (after any piece) loses nothing."""
    texts = [serialized(e) for e in els]
    stream = HEADER + "".join(t + g for t, g in zip(texts, gaps)).encode() + b"</stream:stream>"
    got = run(split(stream, draw.draw), False, max_stanza=1 << 20, hibernate=True)
    assert got == (texts, 1, 1, None)


@FUZZ
@given(els=st.lists(tree, min_size=1, max_size=4), draw=st.data())
def test_mutated_streams_through_parser_hibernation(els, draw):
    stream = mutate(HEADER + "".join(serialized(e) for e in els).encode(), draw.draw)
    pieces = split(stream, draw.draw)
    assert agree(run(pieces, False), run(pieces, False, hibernate=True))


@FUZZ
@given(els=st.lists(tree, min_size=1, max_size=4), draw=st.data(), negotiating=st.booleans())
def test_mutated_streams(els, draw, negotiating):
    stream = mutate(HEADER + "".join(serialized(e) for e in els).encode(), draw.draw)
    assert agree(run([stream], negotiating), run(split(stream, draw.draw), negotiating))


@FUZZ
@given(n=st.integers(2 * MAX_STANZA + 256, 40000), tail=st.sampled_from((b"a", b" x='" + b"y", b">" + b"t")),
       draw=st.data(), negotiating=st.booleans())
def test_oversized_stanzas_are_refused_early(n, tail, draw, negotiating):
    """A big stanza, or a token that never ends, is refused with policy-violation
    (or not-well-formed) within max_stanza + one read of it (a stanza that begins in
    the read that carried the stream header is counted from that read's end)."""
    body = b"<message" + tail * (n // len(tail))
    p = parser.StreamParser(SimpleNamespace(on_stream_start=lambda attrs: None, on_stanza=lambda el: None,
                                        on_stream_end=lambda: None), max_stanza=MAX_STANZA)
    p.negotiating = negotiating
    fed = 0
    with pytest.raises(parser.StreamError) as err:
        for piece in split(HEADER + body, draw.draw):
            fed += len(piece)
            p.feed(piece)
    assert err.value.condition in ("policy-violation", "not-well-formed")
    assert fed - len(HEADER) - len(piece) <= 2 * MAX_STANZA     # refused during the read that crossed it


@FUZZ
@given(depth=st.integers(parser.MAX_DEPTH, 200), draw=st.data())
def test_deep_nesting_is_refused(depth, draw):
    body = b"<a>" * depth
    assert run(split(HEADER + body, draw.draw), True, max_stanza=1 << 20)[3] == "policy-violation"


@FUZZ
@given(which=st.sampled_from((b"<!DOCTYPE x [<!ENTITY e 'v'>]>", b"<!-- c -->", b"<?pi x?>",
                              b"<message>&e;</message>", b"<message>&#0;</message>")),
       draw=st.data(), negotiating=st.booleans())
def test_restricted_xml_is_refused(which, draw, negotiating):
    got = run(split(HEADER + which, draw.draw), negotiating)
    assert got[0] == [] and got[3] in ("restricted-xml", "not-well-formed")


def test_carriage_returns_and_attribute_whitespace_survive_a_round_trip():
    el = stanza.Element("message", stanza.CLIENT_NS, {"id": "a\tb\nc\rd"})
    el.add("body", text="line1\r\nline2\r")
    got = run([HEADER + serialized(el).encode()], False)[0]
    assert got == [serialized(el)]
    p = parser.StreamParser(SimpleNamespace(on_stream_start=lambda a: None, on_stanza=got.append,
                                        on_stream_end=lambda: None))
    p.feed(HEADER + serialized(el).encode())
    assert got[-1].attrs["id"] == "a\tb\nc\rd" and got[-1].children[0].text == "line1\r\nline2\r"


ns_uri = st.sampled_from(["jabber:client", "urn:a", "urn:b:0", "http://x/y?z=1&w"])
ns_attr_key = st.builds(lambda uri, local: "{" + uri + "}" + local,
                        st.sampled_from(["urn:a", "urn:c", stanza.XML_NS]), name)


def ns_element(children):
    return st.builds(lambda tag, ns, attrs, text, kids: stanza.Element(tag, ns, attrs, kids, text),
                     name, ns_uri, st.dictionaries(name | ns_attr_key, attr_text, max_size=3), xml_text, children)


ns_tree = st.recursive(ns_element(st.just([])), lambda kids: ns_element(st.lists(kids, max_size=3)), max_leaves=8)


@FUZZ
@given(els=st.lists(ns_tree, max_size=5), draw=st.data(), negotiating=st.booleans())
def test_namespaced_stanzas_round_trip(els, draw, negotiating):
    """Namespaced elements and attributes (the parser's split-name cache and its
    attribute-key rewrite) come back exactly, also across a name-cache flush."""
    texts = [serialized(e) for e in els]
    stream = HEADER + "".join(texts).encode()
    if draw.draw(st.booleans()):
        parser._NAMES.clear()
    got = run(split(stream, draw.draw), negotiating, max_stanza=1 << 20)
    assert got == (texts, 1, 0, None)


def test_the_name_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(parser, "MAX_NAMES", 4)
    parser._NAMES.clear()
    stanzas = "".join(f"<m{i} xmlns='urn:n{i}'><c{i}/></m{i}>" for i in range(20))
    got = run([HEADER + stanzas.encode()], False)
    assert got[0] == [f"<m{i} xmlns='urn:n{i}'><c{i}/></m{i}>" for i in range(20)]
    assert len(parser._NAMES) <= 4


def _escape_text_reference(s):
    s = stanza._FORBIDDEN.sub("", s)
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\r", "&#13;")


def _escape_attr_reference(s):
    s = _escape_text_reference(s).replace("'", "&apos;").replace('"', "&quot;")
    return s.replace("\t", "&#9;").replace("\n", "&#10;")


@FUZZ
@given(s=st.text(max_size=40) | st.text(st.sampled_from("ab&<>'\"\t\n\r\x00\x1f\ud800\ufffe é"), max_size=20))
def test_escaping_matches_the_plain_reference(s):
    """The no-special-character shortcut of escape_text/escape_attr changes nothing."""
    assert stanza.escape_text(s) == _escape_text_reference(s)
    assert stanza.escape_attr(s) == _escape_attr_reference(s)
