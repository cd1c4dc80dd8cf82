"""StreamParser: normal streams, restarts, and hostile input (RFC 6120 §11)."""

import pytest

from imd.proto.xmpp import parser as parsermod
from imd.proto.xmpp.parser import MAX_STANZA, Dormant, StreamError, StreamParser
from imd.proto.xmpp.stanza import CLIENT_NS, XML_LANG, tostring

HEADER = (b"<?xml version='1.0'?><stream:stream to='localhost' version='1.0' xml:lang='en' "
          b"xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>")


class Recorder:
    def __init__(self, **kw):
        self.events = []
        self.parser = StreamParser(self, **kw)
        self.on_stanza_hook = None

    def on_stream_start(self, attrs):
        self.events.append(("start", attrs))

    def on_stanza(self, el):
        self.events.append(("stanza", el))
        if self.on_stanza_hook:
            self.on_stanza_hook(el)

    def on_stream_end(self):
        self.events.append(("end",))

    def stanzas(self):
        return [e[1] for e in self.events if e[0] == "stanza"]

    def hibernate(self) -> bool:
        """What XmppSession does with an idle stream: keep the Dormant instead of the parser."""
        dormant = self.parser.hibernate()
        if dormant is not None:
            self.parser = dormant
        return dormant is not None

    def feed(self, data):
        """What XmppSession does with a read: wake a Dormant first."""
        if isinstance(self.parser, Dormant):
            self.parser = self.parser.wake(self)
        self.parser.feed(data)


def error_of(data, **kw):
    rec = Recorder(**kw)
    with pytest.raises(StreamError) as info:
        rec.parser.feed(data)
    return info.value


SESSION = HEADER + (
    b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGFsaWNlAHNlY3JldA==</auth>"
    b" \n <message to='bob@localhost' id='m1' type='chat'><body>a &amp; b &lt; &#x263A;</body>"
    b"<html xmlns='http://jabber.org/protocol/xhtml-im'><p>x <b>y</b> z</p></html></message>"
    b"<presence/><iq type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq></stream:stream>")


def check_session(rec):
    kinds = [e[0] for e in rec.events]
    assert kinds == ["start", "stanza", "stanza", "stanza", "stanza", "end"]
    attrs = rec.events[0][1]
    assert attrs["to"] == "localhost" and attrs["version"] == "1.0" and attrs[XML_LANG] == "en"
    auth, msg, pres, iq = rec.stanzas()
    assert (auth.tag, auth.ns, auth.text) == ("auth", "urn:ietf:params:xml:ns:xmpp-sasl", "AGFsaWNlAHNlY3JldA==")
    assert (msg.tag, msg.ns, msg.attrs) == ("message", CLIENT_NS, {"to": "bob@localhost", "id": "m1", "type": "chat"})
    assert msg.findtext("body") == "a & b < \u263a"
    assert tostring(msg.children[1]) == ("<html xmlns='http://jabber.org/protocol/xhtml-im'>"
                                         "<p>x <b>y</b> z</p></html>")
    assert pres.tag == "presence" and iq.children[0].ns == "urn:xmpp:ping"


@pytest.mark.parametrize("negotiating", [True, False])
def test_whole_session_at_once(negotiating):
    rec = Recorder()
    rec.parser.negotiating = negotiating
    rec.parser.feed(SESSION)
    check_session(rec)


@pytest.mark.parametrize("negotiating", [True, False])
def test_one_byte_at_a_time(negotiating):
    rec = Recorder()
    rec.parser.negotiating = negotiating
    for i in range(len(SESSION)):
        rec.parser.feed(SESSION[i:i + 1])
    check_session(rec)


def test_stanza_split_mid_tag_fires_when_complete():
    rec = Recorder()
    rec.parser.feed(HEADER + b"<presence ")
    assert rec.stanzas() == []
    rec.parser.feed(b"/>")
    assert [s.tag for s in rec.stanzas()] == ["presence"]


def test_restart_feeds_pipelined_bytes_to_new_stream():
    rec = Recorder()
    rec.on_stanza_hook = lambda el: el.tag == "auth" and rec.parser.restart()
    rec.parser.feed(HEADER + b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AA==</auth>"
                    + HEADER + b"<iq type='set' id='b'/>")
    kinds = [e[0] for e in rec.events]
    assert kinds == ["start", "stanza", "start", "stanza"]
    assert rec.stanzas()[1].tag == "iq"


def test_restart_drop_discards_bytes_after_starttls():
    rec = Recorder()
    rec.on_stanza_hook = lambda el: el.tag == "starttls" and rec.parser.restart(drop=True)
    rec.parser.feed(HEADER + b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><message><body>injected"
                    b"</body></message>")
    assert [e[0] for e in rec.events] == ["start", "stanza"]
    rec.parser.feed(HEADER + b"<presence/>")
    assert [s.tag for s in rec.stanzas()] == ["starttls", "presence"]


def test_restart_requires_negotiating_mode():
    rec = Recorder()
    rec.parser.negotiating = False
    with pytest.raises(RuntimeError):
        rec.parser.restart()


def test_whitespace_keepalives_are_ignored_and_never_hit_the_limit():
    rec = Recorder(max_stanza=1000)
    rec.parser.feed(HEADER)
    for _ in range(3000):
        rec.parser.feed(b" ")
    rec.parser.feed(b"<presence/>")
    assert len(rec.stanzas()) == 1


def test_text_between_stanzas_is_bad_format():
    assert error_of(HEADER + b"hello").condition == "bad-format"


def test_bytes_after_stream_end_are_ignored():
    rec = Recorder()
    rec.parser.feed(HEADER + b"</stream:stream><garbage")
    assert rec.events[-1] == ("end",)


# -- hostile input -------------------------------------------------------------
BILLION_LAUGHS = (b"<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'>"
                  + b"".join(b"<!ENTITY lol%d '%s'>" % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
                             for i in range(1, 10))
                  + b"]><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
                    b"<message><body>&lol9;</body></message>")


@pytest.mark.parametrize("data, condition", [
    (BILLION_LAUGHS, "restricted-xml"),
    (b"<!DOCTYPE x SYSTEM 'file:///etc/passwd'><x/>", "restricted-xml"),
    (HEADER + b"<message><body>&xxe;</body></message>", "restricted-xml"),
    (HEADER + b"<message><body>&foo;</body></message>", "restricted-xml"),
    (HEADER + b"<!-- comment -->", "restricted-xml"),
    (HEADER + b"<message><!-- c --></message>", "restricted-xml"),
    (HEADER + b"<?pi x?>", "restricted-xml"),
    (b"<?xml version='1.0' encoding='ISO-8859-1'?><stream:stream xmlns='jabber:client' "
     b"xmlns:stream='http://etherx.jabber.org/streams'>", "unsupported-encoding"),
    (b"<?xml version='1.0' encoding='UTF-16'?><a/>", "unsupported-encoding"),
    (HEADER + b"<message><body>\xff\xfe caf\xe9</body></message>", "not-well-formed"),
    (HEADER + b"<message><body>\xed\xa0\x80</body></message>", "not-well-formed"),   # a UTF-8 surrogate
    (HEADER + b"<message></presence>", "not-well-formed"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "not-well-formed"),             # a TLS ClientHello
    (b"<stream:stream xmlns='jabber:client' xmlns:stream='urn:wrong'>", "invalid-namespace"),
    (b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'>",
     "invalid-namespace"),
    (b"<html><body>", "invalid-namespace"),
])
def test_hostile_input_is_refused(data, condition):
    err = error_of(data)
    assert err.condition == condition


def test_hostile_input_byte_at_a_time_is_refused_too():
    rec = Recorder()
    with pytest.raises(StreamError) as info:
        for i in range(len(BILLION_LAUGHS)):
            rec.parser.feed(BILLION_LAUGHS[i:i + 1])
    assert info.value.condition == "restricted-xml"
    assert rec.stanzas() == []


def test_dead_parser_keeps_raising():
    rec = Recorder()
    with pytest.raises(StreamError):
        rec.parser.feed(HEADER + b"<!-- x -->")
    with pytest.raises(StreamError):
        rec.parser.feed(b"<presence/>")


def test_300_kib_stanza_is_policy_violation():
    rec = Recorder(max_stanza=MAX_STANZA)
    rec.parser.negotiating = False
    rec.parser.feed(HEADER)
    body = b"<message><body>" + b"x" * (300 * 1024) + b"</body></message>"
    with pytest.raises(StreamError) as info:
        for i in range(0, len(body), 4096):
            rec.parser.feed(body[i:i + 4096])
    assert info.value.condition == "policy-violation"
    assert rec.stanzas() == []


def test_stanza_just_under_the_limit_passes():
    rec = Recorder(max_stanza=MAX_STANZA)
    rec.parser.negotiating = False
    rec.parser.feed(HEADER)
    for _ in range(3):
        rec.parser.feed(b"<message><body>" + b"x" * (MAX_STANZA - 100) + b"</body></message>")
    assert len(rec.stanzas()) == 3


def test_10_mib_without_gt_stops_after_the_limit():
    rec = Recorder()                     # pre-auth limit, negotiating mode
    rec.parser.feed(HEADER)
    chunk = b"<message a='" + b"y" * 65536
    fed = 0
    with pytest.raises(StreamError) as info:
        while fed < 10 * 1024 * 1024:
            rec.parser.feed(chunk)
            fed += len(chunk)
            chunk = b"y" * 65536
    assert info.value.condition == "policy-violation"
    assert fed <= 65536                  # refused at the first read past the limit


def test_10_mib_single_feed_is_refused():
    err = error_of(HEADER + b"<message a='" + b"y" * (10 * 1024 * 1024))
    assert err.condition == "policy-violation"


def test_pre_auth_header_limit():
    err = error_of(b"<stream:stream " + b"a" * 20000, max_stanza=16384)
    assert err.condition == "policy-violation"


def test_100_deep_nesting_is_policy_violation():
    err = error_of(HEADER + b"<message>" + b"<a>" * 100)
    assert err.condition == "policy-violation"


def test_nesting_at_the_limit_passes():
    rec = Recorder(max_depth=32)
    rec.parser.feed(HEADER + b"<message>" + b"<a>" * 30 + b"</a>" * 30 + b"</message>")
    assert len(rec.stanzas()) == 1


def test_callback_error_propagates():
    rec = Recorder()

    def refuse(attrs):
        raise StreamError("host-unknown", "no such domain")
    rec.on_stream_start = refuse
    with pytest.raises(StreamError) as info:
        rec.parser.feed(HEADER)
    assert info.value.condition == "host-unknown"


def test_pause_keeps_the_rest_until_resume_then_restart():
    rec = Recorder()

    def on(el):
        if el.tag == "auth":
            rec.parser.pause()
    rec.on_stanza_hook = on
    rec.parser.feed(HEADER + b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>AA==</auth>" + HEADER)
    rec.parser.feed(b"<iq type='set' id='b'/>")
    assert [e[0] for e in rec.events] == ["start", "stanza"]
    rec.parser.restart()                  # SASL success decided later, in a greenlet
    rec.parser.resume()
    assert [e[0] for e in rec.events] == ["start", "stanza", "start", "stanza"]


def test_pause_then_restart_drop():
    rec = Recorder()
    rec.on_stanza_hook = lambda el: rec.parser.pause()
    rec.parser.feed(HEADER + b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><presence/>")
    rec.parser.restart(drop=True)
    rec.parser.resume()
    assert [e[0] for e in rec.events] == ["start", "stanza"]


def test_data_while_paused_is_bounded():
    rec = Recorder(max_stanza=1000)
    rec.on_stanza_hook = lambda el: rec.parser.pause()
    rec.parser.feed(HEADER + b"<presence/>")
    with pytest.raises(StreamError) as info:
        rec.parser.feed(b" " * 2000)
    assert info.value.condition == "policy-violation"


@pytest.mark.parametrize("spares", [0, 8])       # 0: every wake replays the header into a new parser
@pytest.mark.parametrize("header, close", [
    (HEADER, b"</stream:stream>"),
    (b"<s:stream xmlns='jabber:client' xmlns:s='http://etherx.jabber.org/streams' xmlns:x='urn:x' to='l'>",
     b"</s:stream>"),
])
def test_hibernate_and_wake_replays_the_header(monkeypatch, spares, header, close):
    monkeypatch.setattr(parsermod, "MAX_SPARES", spares)
    rec = Recorder()
    rec.parser.negotiating = False
    rec.feed(header + b"<presence/>  ")
    assert rec.hibernate()
    dormant = rec.parser
    assert isinstance(dormant, Dormant)
    rec.feed(b"<message><x:y xmlns:x='urn:x'>a&amp;b</x:y></message>")
    assert rec.hibernate()
    assert rec.parser is dormant                       # the same header: the same shared Dormant
    rec.feed(b"<iq type='get' id='1'/>" + close)
    kinds = [e[0] for e in rec.events]
    assert kinds == ["start", "stanza", "stanza", "stanza", "end"]      # no second stream start
    msg = rec.stanzas()[1]
    assert msg.children[0].ns == "urn:x" and msg.children[0].text == "a&b"


def test_no_hibernation_mid_stanza_or_while_negotiating():
    rec = Recorder()
    rec.feed(HEADER)
    assert not rec.hibernate()                  # negotiating
    rec.parser.negotiating = False
    rec.feed(b"<message><body>par")
    assert not rec.hibernate()
    rec.feed(b"tial</body></message><pres")
    assert not rec.hibernate()                  # a partial tag is buffered
    rec.feed(b"ence/>")
    assert rec.hibernate()
    assert [s.findtext("body") for s in rec.stanzas()] == ["partial", None]


@pytest.mark.parametrize("pending", [
    b"<message to='a>",                  # a '>' inside the value of an unfinished start tag
    b"<presence to='a>b'",               # the same, after the '>'
    b"<",
    b"</stream:str",
])
def test_no_hibernation_with_a_partial_tag_after_a_stanza(pending):
    rec = Recorder()
    rec.parser.negotiating = False
    rec.feed(HEADER + b"<presence/>")
    rec.feed(b"<message><body>x</body></message> \n" + pending)
    assert not rec.hibernate()


@pytest.mark.parametrize("stanza", [
    b"<message to='a>b'><body>x</body></message >",
    b"<presence to='a>b'/>",
    b"<iq type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq>",
])
def test_hibernation_after_each_byte_of_a_complete_stanza(stanza):
    """Fed one byte at a time, the parser may sleep exactly when a stanza (and only
    whitespace after it) is complete, and sleeping there loses nothing."""
    rec = Recorder()
    rec.parser.negotiating = False
    rec.feed(HEADER)
    data = stanza + b" " + stanza
    for i in range(len(data)):
        rec.feed(data[i:i + 1])
        complete = data[:i + 1].rstrip() in (stanza, stanza + b" " + stanza)
        assert rec.hibernate() == complete
    assert [tostring(s) for s in rec.stanzas()] == [tostring(rec.stanzas()[0])] * 2


@pytest.mark.parametrize("spares", [0, 8])
def test_hostile_input_after_wake_is_still_refused(monkeypatch, spares):
    monkeypatch.setattr(parsermod, "MAX_SPARES", spares)
    rec = Recorder()
    rec.parser.negotiating = False
    rec.feed(HEADER + b"<presence/>")
    rec.hibernate()
    with pytest.raises(StreamError) as info:
        rec.feed(b"<message><body>&xxe;</body></message>")
    assert info.value.condition == "restricted-xml"


def test_many_entities_in_one_text_node():
    rec = Recorder(max_stanza=MAX_STANZA)
    rec.parser.negotiating = False
    rec.parser.feed(HEADER + b"<message><body>" + b"&amp;x" * 40000 + b"</body></message>")
    assert rec.stanzas()[0].findtext("body") == "&x" * 40000


def test_a_parser_that_gave_way_to_a_dormant_is_not_fed_again():
    rec = Recorder()
    rec.parser.negotiating = False
    parser = rec.parser
    rec.feed(HEADER + b"<presence/>")
    assert rec.hibernate()
    with pytest.raises(RuntimeError):
        parser.feed(b"<presence/>")


@pytest.mark.parametrize("spares", [0, 8])
def test_a_dormant_serves_every_stream_with_that_header_and_keeps_the_limits(monkeypatch, spares):
    monkeypatch.setattr(parsermod, "MAX_SPARES", spares)
    a, b = Recorder(max_stanza=2000), Recorder(max_stanza=2000)
    for rec in (a, b):
        rec.parser.negotiating = False
        rec.feed(HEADER + b"<presence/>")
        assert rec.hibernate()
    assert a.parser is b.parser                     # no handler inside: shared
    a.feed(b"<message><body>to a</body></message>")
    assert [s.findtext("body") for s in a.stanzas()] == [None, "to a"] and len(b.stanzas()) == 1
    with pytest.raises(StreamError) as info:
        b.feed(b"<message><body>" + b"x" * 5000 + b"</body></message>")
    assert info.value.condition == "policy-violation"
    c = Recorder(max_stanza=2000)
    c.parser.negotiating = False
    c.feed(HEADER.replace(b"stream:stream", b"s:stream").replace(b"xmlns:stream", b"xmlns:s") + b"<presence/>")
    assert c.hibernate() and c.parser is not a.parser          # another prefix: another Dormant


def test_the_shared_tables_stay_bounded(monkeypatch):
    monkeypatch.setattr(parsermod, "MAX_INTERNED", 50)
    monkeypatch.setattr(parsermod, "MAX_DORMANT", 4)
    rec = Recorder()
    rec.parser.negotiating = False
    rec.feed(HEADER)
    for i in range(20):
        rec.feed(b"".join(b"<x%d a%d='1'/>" % (i * 10 + k, k) for k in range(10)))
        assert len(parsermod._INTERNED) <= 50 + 2 * 10 + 1
    dormants = []
    for i in range(10):
        r = Recorder()
        r.parser.negotiating = False
        r.feed(HEADER[:-1] + b" xmlns:p%d='urn:p'><presence/>" % i)
        assert r.hibernate()
        dormants.append(r.parser)
        assert len(parsermod._DORMANT) <= 4
    assert len({id(d) for d in dormants}) == 10


def test_spare_parsers_serve_any_stream_of_their_dormant_and_are_bounded(monkeypatch):
    """A parser given up between stanzas is kept (up to MAX_SPARES) and woken for
    whichever stream of that header reads next; stanzas reach that stream's handler."""
    monkeypatch.setattr(parsermod, "MAX_SPARES", 1)
    a, b = Recorder(), Recorder()
    for rec in (a, b):
        rec.parser.negotiating = False
        rec.feed(HEADER + b"<presence/>\n")
    pa, pb = a.parser, b.parser
    assert a.hibernate() and b.hibernate()
    dormant = a.parser
    assert dormant.spares == [pa]                  # one spare: b's expat parser was freed
    with pytest.raises(RuntimeError):
        pb.feed(b"<presence/>")
    b.feed(b"<message><body>for b</body></message>")
    assert b.parser is pa and pa.handler is b and dormant.spares == []
    a.feed(b"<message><body>for a</body></message>")
    assert a.parser is not pa
    assert [s.findtext("body") for s in a.stanzas()] == [None, "for a"]
    assert [s.findtext("body") for s in b.stanzas()] == [None, "for b"]
    assert b.hibernate() and a.hibernate() and dormant.spares == [pa]
