"""JID parsing and formatting with imd's user id rules."""

import pytest

from imd.proto.xmpp import jid


def test_parse_full_bare_and_domain():
    j = jid.parse("alice_1.x-y@LocalHost/phone one")
    assert j == ("alice_1.x-y", "localhost", "phone one")
    assert j.bare == "alice_1.x-y@localhost" and j.full == "alice_1.x-y@localhost/phone one"
    assert jid.parse("localhost") == ("", "localhost", "")
    assert jid.parse("localhost").bare == "localhost"
    assert jid.parse("bob@localhost").full == "bob@localhost"
    assert jid.parse("bob@localhost/a/b@c").resource == "a/b@c"


@pytest.mark.parametrize("text", [
    "", "@localhost", "al ice@localhost", "a&b@localhost", "x" * 65 + "@localhost", "bob@", "bob@-x.com",
    "bob@localhost/", "bob@localhost/a\x00b", "bob@localhost/" + "é" * 600, "bob@local_host", "a@b@c",
])
def test_malformed(text):
    with pytest.raises(jid.JIDError):
        jid.parse(text)


def test_resource_limit_is_bytes():
    assert jid.parse("bob@localhost/" + "x" * 1023).resource
    assert jid.valid_resource("é" * 511) and not jid.valid_resource("é" * 512)


def test_local_user_only_on_our_domain():
    assert jid.local_user(jid.parse("bob@localhost/r"), "localhost") == "bob"
    assert jid.local_user(jid.parse("bob@example.org"), "localhost") is None
    assert jid.local_user(jid.parse("localhost"), "localhost") is None
    assert jid.make("bob", "localhost") == "bob@localhost"
    assert jid.make("bob", "localhost", "web-1") == "bob@localhost/web-1"
