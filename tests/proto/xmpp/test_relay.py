"""The transient XMPP envelope (imd/proto/xmpp/relay.py): its form and the per-recipient ``to``."""

from imd.proto.xmpp import relay
from imd.proto.xmpp.stanza import Element, tostring


def test_with_to_inserts_after_the_tag_name():
    pres = Element("presence", attrs={"from": "a@localhost/r1"})
    assert relay._with_to(tostring(pres), "a@localhost/r'2") == \
        "<presence to='a@localhost/r&apos;2' from='a@localhost/r1'/>"
    assert relay._with_to("<presence/>", "x@y/z") == "<presence to='x@y/z'/>"
    assert relay._with_to("<presence><show>away</show></presence>", "x@y/z") == \
        "<presence to='x@y/z'><show>away</show></presence>"


def test_envelope_is_json_able_and_names_the_sender():
    env = relay.envelope("stanza", "n1.5", "phone", "<message/>")
    assert env == {"type": "xmpp", "op": "stanza", "sid": "n1.5", "res": "phone", "xml": "<message/>"}
