"""The fault checker itself: each kind of delivery failure is reported, and only it."""

from tests.faults.checker import Checker


def msg(mid, seq):
    return {"type": "msg", "mid": mid, "seq": seq}


def setup(n=3):
    c = Checker()
    c.expect("bob", "phone")
    c.connected("bob", "phone")
    for i in range(1, n + 1):
        c.sent("alice", f"c{i}", "bob")
        c.acked("alice", f"c{i}", f"m{i}", i)
    return c


def test_clean_run():
    c = setup()
    for i in (1, 2, 3):
        c.received("bob", "phone", msg(f"m{i}", i), f"c{i}")
    rep = c.report()
    assert rep.ok and (rep.acked, rep.received, rep.redelivered) == (3, 3, 0)
    assert c.contiguous("bob", "phone") == 3


def test_lost():
    c = setup()
    c.received("bob", "phone", msg("m1", 1))
    c.received("bob", "phone", msg("m3", 3))
    rep = c.report()
    assert rep.lost == [("bob", "phone", "m2")] and not rep.reordered
    assert c.contiguous("bob", "phone") == 1


def test_redelivery_after_reconnect_is_allowed_but_not_within_a_connection():
    c = setup()
    for i in (1, 2, 3):
        c.received("bob", "phone", msg(f"m{i}", i))
    c.connected("bob", "phone")                  # reconnect with since=1: 2 and 3 again
    c.received("bob", "phone", msg("m2", 2))
    c.received("bob", "phone", msg("m3", 3))
    rep = c.report()
    assert rep.ok and rep.redelivered == 2
    c.received("bob", "phone", msg("m3", 3))     # a third copy in the same connection
    rep = c.report()
    assert rep.duplicated == [("bob", "phone", "m3", 3)] and not rep.reordered


def test_reordered():
    c = setup()
    c.received("bob", "phone", msg("m2", 2))
    c.received("bob", "phone", msg("m1", 1))
    c.received("bob", "phone", msg("m3", 3))
    rep = c.report()
    assert not rep.lost and rep.reordered == [("bob", "phone", 1, 2)] and not rep.ok


def test_a_replay_out_of_order_is_reordered():
    c = setup()
    for i in (1, 2, 3):
        c.received("bob", "phone", msg(f"m{i}", i))
    c.connected("bob", "phone")
    c.received("bob", "phone", msg("m3", 3))
    c.received("bob", "phone", msg("m2", 2))
    rep = c.report()
    assert rep.redelivered == 2 and rep.reordered == [("bob", "phone", 2, 3)]


def test_seq_reused_and_client_id_stored_twice():
    c = setup(1)
    c.received("bob", "phone", msg("m1", 1), "c1")
    c.received("bob", "phone", msg("m9", 1), "c1")
    rep = c.report()
    assert any("seq 1" in x for x in rep.conflicts)
    assert rep.stored_twice == [("c1", "m1", "m9")]
    c.acked("alice", "c1", "m9")
    assert any("acked as m1 and as m9" in x for x in c.report().conflicts)


def test_unacked_but_delivered_is_counted_not_an_error():
    c = setup(1)
    c.sent("alice", "c2", "bob")                  # the daemon died before the ack
    c.received("bob", "phone", msg("m1", 1))
    c.received("bob", "phone", msg("m2", 2))
    rep = c.report()
    assert rep.ok and rep.unacked_delivered == 1


def frm(mid, seq=None):
    return {"type": "msg", "mid": mid, "seq": seq, "from": "alice"}


def test_per_sender_order_without_seqs():
    """XMPP entries carry no seq: order is checked by the sender's send order."""
    c = setup()
    c.received("bob", "phone", frm("m1"), "c1")
    c.received("bob", "phone", frm("m3"), "c3")
    c.received("bob", "phone", frm("m2"), "c2")          # a first delivery after a later one
    rep = c.report()
    assert [r[2] for r in rep.reordered] == ["alice#1"] and not rep.lost and not rep.duplicated


def test_without_seqs_a_replay_after_reconnect_is_a_redelivery_a_repeat_is_a_duplicate():
    c = setup()
    for i in (1, 2):
        c.received("bob", "phone", frm(f"m{i}"), f"c{i}")
    c.connected("bob", "phone")                          # offline replay from m2 on
    for i in (2, 3):
        c.received("bob", "phone", frm(f"m{i}"), f"c{i}")
    rep = c.report()
    assert rep.ok and rep.redelivered == 1 and c.missing("bob", "phone", ["m1", "m2", "m3", "m4"]) == ["m4"]
    c.received("bob", "phone", frm("m3"), "c3")
    assert c.report().duplicated == [("bob", "phone", "m3", None)]
