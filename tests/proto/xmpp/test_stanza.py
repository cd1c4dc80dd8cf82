"""Element serializer: no prefixes for jabber:client, escaping, xml:lang, errors."""

from types import SimpleNamespace

from imd.proto.xmpp.parser import StreamParser
from imd.proto.xmpp.stanza import (STREAM_NS, XML_LANG, Element, error_reply, iq_result,
                                   stream_error, stream_header, tostring)


def reparse(data: bytes):
    out = []
    p = StreamParser(SimpleNamespace(on_stream_start=lambda a: None, on_stanza=out.append, on_stream_end=lambda: None))
    p.feed(stream_header("localhost", "id1") + data)
    return out


def test_no_prefixes_for_client_namespace():
    msg = Element("message", attrs={"to": "bob@localhost", "type": "chat"})
    msg.add("body", text="hi")
    msg.add("request", "urn:xmpp:receipts")
    assert tostring(msg) == ("<message to='bob@localhost' type='chat'><body>hi</body>"
                             "<request xmlns='urn:xmpp:receipts'/></message>")
    assert "ns0" not in tostring(msg)


def test_foreign_namespace_declares_default_and_children_inherit():
    success = Element("success", "urn:ietf:params:xml:ns:xmpp-sasl", text="dj1hYmM=")
    assert tostring(success) == "<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>dj1hYmM=</success>"
    q = Element("query", "jabber:iq:roster", {"ver": "1"})
    q.add("item", attrs={"jid": "a@b"}).add("group", text="G")
    assert tostring(q) == "<query xmlns='jabber:iq:roster' ver='1'><item jid='a@b'><group>G</group></item></query>"


def test_stream_namespace_uses_stream_prefix():
    feats = Element("features", STREAM_NS)
    feats.add("bind", "urn:ietf:params:xml:ns:xmpp-bind")
    assert tostring(feats) == ("<stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>"
                               "</stream:features>")


def test_escaping_and_forbidden_characters_round_trip():
    msg = Element("message", attrs={"id": "a'b\"c<&>"})
    msg.add("body", text="1 < 2 & 3 > 2 ]]> \x00\x07bell\ud800 ok \u263a")
    msg.children[0].attrs[XML_LANG] = "fr"
    data = tostring(msg)
    assert "xml:lang='fr'" in data and "\x00" not in data and "\x07" not in data
    (back,) = reparse(data.encode())
    assert back.attrs["id"] == "a'b\"c<&>"
    assert back.findtext("body") == "1 < 2 & 3 > 2 ]]> bell ok \u263a"
    assert back.children[0].attrs[XML_LANG] == "fr"


def test_line_breaks_and_tabs_survive_byte_exact():
    msg = Element("message", attrs={"id": "a\tb\nc\rd"})
    msg.add("body", text="line1\r\nline2\r\tend\n")
    data = tostring(msg)
    assert data == "<message id='a&#9;b&#10;c&#13;d'><body>line1&#13;\nline2&#13;\tend\n</body></message>"
    (back,) = reparse(data.encode())
    assert back.attrs["id"] == "a\tb\nc\rd" and back.findtext("body") == "line1\r\nline2\r\tend\n"


def test_mixed_content_round_trip():
    data = b"<message><html xmlns='http://jabber.org/protocol/xhtml-im'><p>a <b>b</b> c <i>d</i></p></html></message>"
    (back,) = reparse(data)
    assert tostring(back).encode() == data


def test_other_namespaced_attribute_gets_a_declared_prefix():
    el = Element("x", "urn:a", {"{urn:b}attr": "v"})
    (back,) = reparse(tostring(el).encode())
    assert back.attrs == {"{urn:b}attr": "v"}


def test_error_reply_swaps_addresses_and_keeps_id():
    iq = Element("iq", attrs={"type": "get", "id": "x7", "from": "alice@localhost/phone", "to": "localhost"})
    iq.add("query", "urn:unknown")
    err = error_reply(iq, "service-unavailable")
    assert tostring(err) == ("<iq type='error' id='x7' from='localhost' to='alice@localhost/phone'>"
                             "<error type='cancel'><service-unavailable "
                             "xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>")


def test_error_reply_without_to_uses_by_and_can_keep_payload():
    msg = Element("message", attrs={"type": "groupchat", "from": "a@l/r"})
    msg.add("body", text="x")
    err = error_reply(msg, "bad-request", "no", by="l", keep_payload=True)
    assert err.attrs == {"type": "error", "from": "l", "to": "a@l/r"}
    assert err.children[0].tag == "body" and err.children[1].attrs == {"type": "modify"}
    assert err.children[1].children[1].text == "no"


def test_iq_result():
    iq = Element("iq", attrs={"type": "get", "id": "p1", "from": "a@l/r"})
    assert tostring(iq_result(iq, by="l")) == "<iq type='result' id='p1' from='l' to='a@l/r'/>"


def test_stream_error_and_header():
    err = stream_error("host-unknown", "who?")
    assert tostring(err) == ("<stream:error><host-unknown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
                             "<text xmlns='urn:ietf:params:xml:ns:xmpp-streams' xml:lang='en'>who?</text>"
                             "</stream:error>")
    hdr = stream_header("localhost", "abc", "de")
    assert b"from='localhost'" in hdr and b"id='abc'" in hdr and b"xml:lang='de'" in hdr
    assert hdr.startswith(b"<?xml version='1.0'?><stream:stream ")


def test_copy_is_deep():
    a = Element("message")
    a.add("body", text="x")
    b = a.copy()
    b.children[0].text = "y"
    b.attrs["to"] = "z"
    assert a.findtext("body") == "x" and "to" not in a.attrs
