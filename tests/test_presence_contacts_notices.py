"""Presence over sessions (contacts only, debounced), contacts, reminders — through
a node in this process with real raw-TCP clients (issue 2, DESIGN.md §5)."""


import pytest

from imd.client import Client
from tests import inproc
from tests.daemon import token


@pytest.fixture
def node(tmp_path):
    d = inproc.start(tmp_path)
    yield d
    d.stop(reconnect=False, timeout=5)


def login(d, user, role="guest", platform="android", device="d1", since=None):
    c = Client(*inproc.addr(d))
    c.auth(token(user, role), platform, device, since)
    return c


def presences(c, timeout=0.6):
    return [e for e in c.drain(timeout) if e["type"] == "presence"]


def test_presence_goes_to_contacts_only(node):
    node.router.add_contact("host1", "guest1")
    host = login(node, "host1", "host", "ios")
    stranger = login(node, "stranger")
    guest = login(node, "guest1")
    p = host.wait_for(lambda e: e["type"] == "presence" and e["user"] == "guest1" and e["status"] == "online")
    assert p["platforms"] == ["android"]
    assert presences(stranger) == []
    # the guest learned the host's presence at login
    p = guest.wait_for(lambda e: e["type"] == "presence" and e["user"] == "host1")
    assert p["status"] == "online" and p["platforms"] == ["ios"]


def test_away_needs_every_session_away(node):
    node.router.add_contact("h2", "g2")
    host = login(node, "h2", "host")
    g_phone = login(node, "g2", platform="ios", device="phone")
    g_web = login(node, "g2", platform="web", device="browser")
    presences(host)
    g_phone.send({"type": "presence", "status": "away"})
    assert [p["status"] for p in presences(host)] in ([], ["online"])
    g_web.send({"type": "presence", "status": "away"})
    p = host.wait_for(lambda e: e["type"] == "presence" and e["status"] == "away")
    assert p["platforms"] == ["ios", "web"]


def test_offline_is_debounced(node):
    node.router.add_contact("h3", "g3")
    host = login(node, "h3", "host")
    g = login(node, "g3")
    host.wait_for(lambda e: e["type"] == "presence" and e["status"] == "online")
    host.drain(0.2)                # earlier "offline" states from before g3 logged in
    g.close()
    g = login(node, "g3")          # back within presence.grace (0.3 s)
    assert [p for p in presences(host, 0.8) if p["status"] == "offline"] == []
    g.close()
    p = host.wait_for(lambda e: e["type"] == "presence" and e["status"] == "offline", timeout=5)
    assert p["user"] == "g3" and p["last_seen"] > 0


def test_contacts_api_and_push(node):
    a = login(node, "ca", "host")
    node.router.add_contact("ca", "cb")
    env = a.wait_for(lambda e: e["type"] == "contacts")
    assert env == {"type": "contacts", "op": "add", "contact": "cb"}
    p = a.wait_for(lambda e: e["type"] == "presence")
    assert p["user"] == "cb" and p["status"] == "offline"
    assert node.node.contacts.get("cb") == {"ca"}
    node.router.remove_contact("cb", "ca")
    assert a.wait_for(lambda e: e["type"] == "contacts")["op"] == "remove"
    assert node.store.flush(5)
    assert node.store.contacts("ca") == set() and node.store.contacts("cb") == set()


def test_contacts_only_policy(tmp_path):
    d = inproc.start(tmp_path, {"policy": {"contacts_only": True}})
    try:
        d.router.add_contact("p1h", "p1g")
        g = login(d, "p1g")
        assert g.msg("p1h", "hello host")["type"] == "ack"
        from imd.client import ClientError
        with pytest.raises(ClientError) as e:
            g.msg("someone-else", "spam")
        assert e.value.env["code"] == 403
    finally:
        d.stop(reconnect=False, timeout=5)


def test_reminders_to_users_role_and_all(node):
    h = login(node, "rh", "host")
    g = login(node, "rg")
    entries = node.router.post_notices(["rh"], None, "booking.confirmed", {"booking": "B9"})
    n = h.wait_for(lambda e: e["type"] == "notice")
    assert n["kind"] == "booking.confirmed" and n["body"] == {"booking": "B9"} and n["mid"] == entries[0].mid
    node.router.post_notices(None, "guest", "checkin.tomorrow", "Check-in tomorrow at 15:00")
    assert g.wait_for(lambda e: e["type"] == "notice")["kind"] == "checkin.tomorrow"
    assert [e for e in h.drain(0.3) if e["type"] == "notice"] == []
    entries = node.router.post_notices(None, None, "maintenance", "Down at 03:00")
    assert {e.user for e in entries} >= {"rh", "rg"}
    assert h.wait_for(lambda e: e["type"] == "notice")["kind"] == "maintenance"
    assert g.wait_for(lambda e: e["type"] == "notice")["kind"] == "maintenance"


def test_reminder_reaches_offline_user_on_login(node):
    node.router.post_notices(["later"], None, "booking.confirmed", "Booking B1 confirmed")
    c = login(node, "later")
    n = c.wait_for(lambda e: e["type"] == "notice")
    assert n["seq"] == 1 and n["body"] == "Booking B1 confirmed"


def test_kick_closes_every_session_of_the_user(node):
    a = login(node, "kicked", device="a")
    b = login(node, "kicked", device="b")
    other = login(node, "calm")
    assert node.router.kick("kicked") == 2
    for c in (a, b):
        env = c.wait_for(lambda e: e["type"] == "close")
        assert env["reconnect"] is False
    assert other.ping() == {"type": "pong"}


def test_web_tier_message(node):
    g = login(node, "wg")
    r = node.router.post_message("wh", "wg", "Your host wrote via the website", {"listing": "L7"})
    m = g.wait_for(lambda e: e["type"] == "msg")
    assert m["from"] == "wh" and m["mid"] == r["mid"] and m["ctx"] == {"listing": "L7"}


def test_transient_envelopes_filtered_by_device_and_protocol(node):
    """Node.publish_transient reaches the user's sessions on the node, all or those of one
    device and/or protocol; presence records list the devices (XMPP routes IQs by them)."""
    phone = login(node, "u_tr", device="phone")
    tab = login(node, "u_tr", device="tab")
    node.router.publish_transient("u_tr", {"type": "pong"}, device="tab")
    node.router.publish_transient("u_tr", {"type": "pong", "n": 2}, protocol="xmpp")
    node.router.publish_transient("u_tr", {"type": "pong", "n": 3}, protocol="tcp")
    assert [e.get("n") for e in tab.drain() if e["type"] == "pong"] == [None, 3]
    assert [e.get("n") for e in phone.drain() if e["type"] == "pong"] == [3]
    records = node.node.engine.presence_get(["u_tr"])["u_tr"]
    assert records[0]["devices"] == ["phone", "tab"]
    assert not node.router.device_elsewhere("u_tr", "phone")        # this node's own record


def test_first_logins_read_contacts_in_batches_not_one_by_one(node, monkeypatch):
    """Users whose contact lists are not in memory yet: the presence worker loads
    them with the batched login read (Contacts.preload), never one store read per
    user, and their contacts still hear of them."""
    guests = [f"fg{i}" for i in range(8)]
    for g in guests:
        node.router.add_contact("fh", g)
    assert node.store.flush(5)
    single = []
    real = node.store.contacts
    monkeypatch.setattr(node.store, "contacts", lambda user: single.append(user) or real(user))
    host = login(node, "fh", "host")
    clients = [login(node, g) for g in guests]
    seen = set()
    while seen != set(guests):
        p = host.wait_for(lambda e: e["type"] == "presence" and e["status"] == "online")
        seen.add(p["user"])
    assert single == []
    for c in clients:
        c.close()
