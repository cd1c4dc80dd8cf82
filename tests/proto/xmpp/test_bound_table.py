"""XmppProtocol's table of resources bound on this node: one session per user
is kept without an inner dict, several in a dict, and the table shrinks back."""

from types import SimpleNamespace

from imd.proto.xmpp.listener import XmppProtocol


def sess(user, resource):
    return SimpleNamespace(user=user, resource=resource)


def test_one_then_several_resources_then_one_again():
    t = SimpleNamespace(_bound={})
    a, b = sess("u", "a"), sess("u", "b")
    assert XmppProtocol.bound(t, "u", "a", a) is None
    assert t._bound["u"] is a                           # a single resource: no inner dict
    assert XmppProtocol.bound(t, "u", "b", b) is None
    assert t._bound["u"] == {"a": a, "b": b}
    assert XmppProtocol.bound_here(t, "u", "a") and XmppProtocol.bound_here(t, "u", "b")
    XmppProtocol.unbound(t, a)
    assert t._bound["u"] is b
    assert not XmppProtocol.bound_here(t, "u", "a")
    XmppProtocol.unbound(t, b)
    assert t._bound == {}
    assert not XmppProtocol.bound_here(t, "u", "b")


def test_rebinding_a_resource_returns_the_session_it_replaces():
    t2 = SimpleNamespace(_bound={})
    old, new, other = sess("u", "a"), sess("u", "a"), sess("u", "c")
    XmppProtocol.bound(t2, "u", "a", old)
    assert XmppProtocol.bound(t2, "u", "a", new) is old
    assert t2._bound["u"] is new
    XmppProtocol.unbound(t2, old)                      # the replaced session leaving changes nothing
    assert t2._bound["u"] is new
    XmppProtocol.bound(t2, "u", "c", other)
    newer = sess("u", "a")
    assert XmppProtocol.bound(t2, "u", "a", newer) is new
    assert t2._bound["u"] == {"a": newer, "c": other}
    XmppProtocol.unbound(t2, new)
    assert t2._bound["u"] == {"a": newer, "c": other}
