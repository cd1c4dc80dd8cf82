"""Envelope → stanza rendering (pure)."""

import pytest

from imd.proto.xmpp import render
from imd.proto.xmpp.stanza import Element, tostring


def test_chat_message_with_ctx_and_delay():
    env = {"type": "msg", "mid": "m1", "seq": 3, "from": "host1", "to": "guest2", "body": "hi <3",
           "ctx": {"listing": "L1", "paid": True, "n": 2}, "ts": 1764806400123}
    el = render.message(env, "localhost", "guest2@localhost", True)
    assert tostring(el) == (
        "<message type='chat' from='host1@localhost' to='guest2@localhost' id='m1'><body>hi &lt;3</body>"
        "<ctx xmlns='urn:imd:ctx' listing='L1' paid='true' n='2'/>"
        "<delay xmlns='urn:xmpp:delay' from='localhost' stamp='2025-12-04T00:00:00.123Z'/></message>")


def test_message_id_is_the_senders_client_id_and_asks_for_a_receipt_only_when_told():
    env = {"type": "msg", "mid": "m1", "seq": 3, "from": "host1", "to": "guest2", "body": "hi",
           "ts": 0, "id": "client-7"}
    el = render.message(env, "localhost", "guest2@localhost", False, receipt=True)
    assert tostring(el) == ("<message type='chat' from='host1@localhost' to='guest2@localhost' id='client-7'>"
                            "<body>hi</body><request xmlns='urn:xmpp:receipts'/></message>")
    assert render.message(env, "localhost", "guest2@localhost", False).find("request", render.RECEIPTS_NS) is None
    assert b"urn:xmpp:receipts" not in render.message_bytes(env, "localhost", "guest2@localhost", False, 0)
    del env["id"]
    assert render.message(env, "localhost", "guest2@localhost", False).attrs["id"] == "m1"
    notice = {"type": "notice", "mid": "n1", "seq": 9, "kind": "k", "body": "b", "ts": 0}
    assert render.message(notice, "localhost", "guest2@localhost", False, receipt=True).find(
        "request", render.RECEIPTS_NS) is None


def test_notice_is_a_headline_from_the_domain():
    env = {"type": "notice", "mid": "n1", "seq": 9, "kind": "booking.confirmed",
           "body": {"text": "Booking B9 confirmed", "booking": "B9"}, "ts": 0}
    el = render.message(env, "localhost", "guest2@localhost", False)
    assert el.attrs == {"type": "headline", "from": "localhost", "to": "guest2@localhost", "id": "n1"}
    assert el.findtext("subject") == "booking.confirmed"
    assert el.findtext("body") == "Booking B9 confirmed"
    assert el.find("json", render.JSON_NS).text == '{"text":"Booking B9 confirmed","booking":"B9"}'


def test_object_body_without_text_is_json():
    assert render.body_text({"a": [1, 2]}) == '{"a":[1,2]}'


def test_presence_states():
    base = {"user": "bob", "platforms": ["ios", "web"], "last_seen": None}
    online = render.presence(dict(base, status="online"), "localhost", "a@localhost/r")
    assert tostring(online) == ("<presence from='bob@localhost/imd' to='a@localhost/r'>"
                                "<status>ios,web</status></presence>")
    away = render.presence(dict(base, status="away"), "localhost", "a@localhost/r")
    assert away.findtext("show") == "away"
    off = render.presence(dict(base, status="offline", platforms=[], last_seen=1000), "localhost", "a@localhost/r")
    assert off.get("type") == "unavailable" and off.find("delay", render.DELAY_NS) is not None


def test_show_status_and_message_parts():
    pres = Element("presence")
    assert render.show_status(pres) == "online"
    pres.add("show", text="xa")
    assert render.show_status(pres) == "away"
    msg = Element("message")
    assert render.message_parts(msg) == (None, None, False)
    msg.add("body", text="")
    msg.append(Element("ctx", render.CTX_NS))                       # the first ctx, without attributes
    msg.append(Element("ctx", render.CTX_NS, {"booking": "B9"}))
    msg.add("body", text="second")
    assert render.message_parts(msg) == ("", None, False)
    msg.children = [Element("body", "urn:other", text="not this one"), Element("thread", text="t"),
                    Element("body", text="hi"), Element("ctx", render.CTX_NS, {"booking": "B9"}),
                    Element("request", render.RECEIPTS_NS), Element("body", text="ignored")]
    assert render.message_parts(msg) == ("hi", {"booking": "B9"}, True)
    assert msg.children[3].attrs is not render.message_parts(msg)[1]      # a copy: the env owns it


def test_sent_carbon_wraps_the_original():
    env = {"type": "msg", "mid": "m2", "seq": 4, "from": "alice", "to": "bob", "body": "x", "ts": 0}
    el = render.sent_carbon(env, "localhost", "alice@localhost/r2")
    inner = el.children[0].children[0].children[0]
    assert (el.get("from"), el.get("to")) == ("alice@localhost", "alice@localhost/r2")
    assert (inner.get("from"), inner.get("to"), inner.findtext("body")) == ("alice@localhost", "bob@localhost", "x")


MESSAGE_ENVS = [
    {"type": "msg", "mid": "m1", "from": "u1", "to": "u2", "body": "hi", "ts": 0},
    {"type": "msg", "mid": "m1", "from": "u1", "to": "u2", "body": "", "ts": 0, "id": "c-1"},
    {"type": "msg", "mid": "m'1", "from": "u1", "to": "u2", "body": "a & b < c > d 'q' \"dq\"", "ts": 0},
    {"type": "msg", "mid": "m1", "from": "u1", "to": "u2", "body": "line\r\nnext\ttab\x00\x01 é ☺ \ud800", "ts": 0,
     "id": "id\twith\nspace&<"},
    {"type": "msg", "mid": "m1", "from": "u1", "to": "u2", "body": {"text": "json"}, "ts": 0},
    {"type": "msg", "mid": "m1", "from": "u1", "to": "u2", "body": "ctx", "ctx": {"listing": "L1"}, "ts": 0},
    {"type": "notice", "mid": "n1", "kind": "k", "body": "b", "ts": 0},
    {"type": "msg", "mid": "m1", "from": "u&<'\"1", "to": "u2", "body": "from", "ts": 0},
    {"type": "msg", "mid": "m1", "from": "u\t\x01\ud8001", "to": "u2", "body": "from", "ts": 0, "id": "c\r"},
]


@pytest.mark.parametrize("env", MESSAGE_ENVS)
@pytest.mark.parametrize("delayed, receipt", [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("to", ["u2@localhost", "u2@localhost/r'1", "u2@localhost/r\n\x02\"&"])
def test_message_bytes_equals_the_serialized_element(env, delayed, receipt, to):
    """The direct rendering escapes sender, recipient and id exactly as the element
    serializer does, whichever of them needs it."""
    assert render.message_bytes(env, "localhost", to, delayed, receipt) == \
        tostring(render.message(env, "localhost", to, delayed, receipt)).encode()
