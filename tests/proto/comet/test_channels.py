"""The iComet channel model, driven by a fake clock and recording subscribers."""

import pytest

from imd.proto.comet.channels import Refused, Registry, Subscriber, seq_gt, valid_cname


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Rec(Subscriber):
    __slots__ = ("got", "ended")

    def __init__(self, seq=0, noop=0, oneshot=False):
        super().__init__(seq, noop)
        self.got = []
        self.ended = False
        if oneshot:
            self.__class__ = RecPoll

    def push(self, msgs, array=False):
        self.got.append(([(m.type, m.seq, m.content) for m in msgs], array))

    def end(self):
        self.ended = True


class RecPoll(Rec):
    __slots__ = ()
    oneshot = True


class Listener:
    def __init__(self):
        self.lines = []

    def presence(self, online, cname):
        self.lines.append((int(online), cname))


@pytest.fixture
def clock():
    return Clock()


def reg(clock, **kw):
    kw.setdefault("presence_grace", 5)
    return Registry(clock=clock, **kw)


def test_seq_zero_gets_next_seq_and_streams(clock):
    r = reg(clock)
    s = Rec()
    r.subscribe("a", s)
    assert s.got == [([("next_seq", 1, "")], False)]
    r.publish("a", "hi")
    assert s.got[-1] == ([("data", 1, "hi")], False)
    assert s.seq_next == 2 and not s.ended


def test_future_seq_gets_next_seq(clock):
    r = reg(clock)
    r.publish("a", "x")
    s = Rec(seq=50)
    r.subscribe("a", s)
    assert s.got == [([("next_seq", 2, "")], False)]


def test_backlog_for_poll_is_one_array_then_ends(clock):
    r = reg(clock)
    for i in range(3):
        r.publish("a", "m%d" % i)
    r.broadcast("b")
    s = Rec(seq=2, oneshot=True)
    r.subscribe("a", s)
    assert s.got == [([("data", 2, "m1"), ("data", 3, "m2"), ("broadcast", 4, "b"),
                       ("next_seq", 5, "")], True)]
    assert s.ended and r.info("a")["subscribers"] == 0


def test_backlog_for_stream_is_one_push_per_message(clock):
    r = reg(clock)
    r.publish("a", "m1")
    r.broadcast("b")
    s = Rec(seq=1)
    r.subscribe("a", s)
    assert s.got == [([("data", 1, "m1")], False),
                     ([("broadcast", 2, "b"), ("next_seq", 3, "")], True)]
    assert not s.ended


def test_seq_equal_to_next_waits(clock):
    r = reg(clock)
    r.publish("a", "m1")
    s = Rec(seq=2, oneshot=True)
    r.subscribe("a", s)
    assert s.got == [] and not s.ended
    r.publish("a", "m2")
    assert s.got == [([("data", 2, "m2")], False)] and s.ended


def test_poll_broadcast_is_array_with_next_seq(clock):
    r = reg(clock)
    s = Rec(seq=0, oneshot=True)
    r.subscribe("a", s)          # next_seq ends it
    assert s.ended
    s = Rec(seq=1, oneshot=True)
    r.subscribe("a", s)
    r.broadcast("all")
    assert s.got == [([("broadcast", 1, "all"), ("next_seq", 2, "")], True)]


def test_buffer_trimmed_at_one_and_a_half(clock):
    r = reg(clock, channel_buffer_size=10)
    for i in range(14):
        r.publish("a", str(i))
    assert len(r.get("a").buffer) == 14
    r.publish("a", "14")
    buf = r.get("a").buffer
    assert len(buf) == 10 and buf[0].seq == 6 and buf[-1].seq == 15


def test_old_seq_gets_whole_buffer(clock):
    r = reg(clock, channel_buffer_size=2)
    for i in range(5):
        r.publish("a", str(i))
    s = Rec(seq=1, oneshot=True)
    r.subscribe("a", s)
    assert [m[1] for m in s.got[0][0]] == [4, 5]


def test_max_channels_and_subscribers(clock):
    r = reg(clock, max_channels=1, max_subscribers_per_channel=1)
    r.subscribe("a", Rec(seq=1))
    with pytest.raises(Refused) as e:
        r.subscribe("a", Rec(seq=1))
    assert (e.value.kind, e.value.reason) == ("429", "Too many subscribers")
    with pytest.raises(Refused) as e:
        r.subscribe("b", Rec())
    assert (e.value.kind, e.value.reason) == ("429", "Too many channels")
    with pytest.raises(Refused):
        r.publish("c", "x")


def test_noop_after_polling_timeout_with_own_counter(clock):
    r = reg(clock, polling_timeout=10)
    s = Rec(seq=1, noop=7)
    r.subscribe("a", s)
    clock.now += 5
    r.sweep()
    r.publish("a", "x")          # resets idleness
    clock.now += 9
    r.sweep()
    assert [g[0][0][0] for g in s.got] == ["data"]
    clock.now += 2
    r.sweep()
    assert s.got[-1] == ([("noop", 7, "")], False)
    clock.now += 11
    r.sweep()
    assert s.got[-1] == ([("noop", 8, "")], False)


def test_noop_ends_long_poll(clock):
    r = reg(clock, polling_timeout=3)
    s = Rec(seq=1, oneshot=True)
    r.subscribe("a", s)
    clock.now += 4
    r.sweep()
    assert s.got == [([("noop", 0, "")], False)] and s.ended


def test_channel_expires_after_timeout_when_vacant(clock):
    r = reg(clock, channel_timeout=30)
    s = Rec(seq=1)
    r.subscribe("a", s)
    clock.now += 100
    r.sweep()
    assert r.check("a")          # has a subscriber: never expires
    r.unsubscribe(s)
    clock.now += 29
    r.sweep()
    assert r.check("a")
    clock.now += 2
    r.sweep()
    assert not r.check("a")
    assert r.info() == {"channels": 0, "subscribers": 0}


def test_presence_first_arrives_last_leaves_with_grace(clock):
    r = reg(clock, presence_grace=5, channel_timeout=60)
    lis = Listener()
    assert r.add_listener(lis) == []
    r.publish("a", "x")                      # pub does not make anyone online
    r.sign("b")
    assert lis.lines == []
    s1, s2 = Rec(seq=1), Rec(seq=1)
    r.subscribe("a", s1)
    r.subscribe("a", s2)
    assert lis.lines == [(1, "a")]
    assert r.add_listener(Listener()) == ["a"]
    r.unsubscribe(s1)
    r.unsubscribe(s2)
    clock.now += 2
    r.sweep()
    r.subscribe("a", Rec(seq=1, oneshot=True))   # long-poll comes back in time
    assert lis.lines == [(1, "a")]
    r.unsubscribe(s1)
    clock.now += 1
    # the long-poll is still attached: nothing
    r.sweep()
    assert lis.lines == [(1, "a")]
    r.publish("a", "y")                      # answers the poll; channel vacant
    clock.now += 6
    r.sweep()
    assert lis.lines == [(1, "a"), (0, "a")]


def test_close_sends_close_and_frees(clock):
    r = reg(clock)
    lis = Listener()
    r.add_listener(lis)
    s = Rec(seq=1)
    r.subscribe("a", s)
    r.publish("a", "x")
    assert r.close("a") == 2
    assert s.got[-1] == ([("close", 2, "")], False) and s.ended
    assert not r.check("a") and lis.lines == [(1, "a"), (0, "a")]
    assert r.close("a") is None and r.clear("a") is None


def test_clear_keeps_seq(clock):
    r = reg(clock)
    r.publish("a", "x")
    assert r.clear("a") == 2
    s = Rec(seq=1)
    r.subscribe("a", s)
    assert s.got == []
    r.publish("a", "y")
    assert s.got == [([("data", 2, "y")], False)]


def test_info_and_check(clock):
    r = reg(clock)
    r.subscribe("a", Rec(seq=1))
    assert r.info() == {"channels": 1, "subscribers": 1}
    assert r.info("a") == {"cname": "a", "subscribers": 1}
    assert r.info("zz") == {"cname": "zz", "subscribers": 0}
    assert r.check("a") and not r.check("zz")


def test_token_auth(clock):
    r = reg(clock, auth="token", channel_timeout=30)
    with pytest.raises(Refused) as e:
        r.subscribe("a", Rec())              # no channel
    assert e.value.kind == "401"
    ch, tok = r.sign("a", expires=10)
    assert len(tok) == 32 and int(tok, 16) >= 0
    assert r.sign("a")[1] == tok          # re-sign: same token
    for bad in ("", "0" * 32, tok[:-1], tok + "x", "é" * 32):
        with pytest.raises(Refused):
            r.subscribe("a", Rec(), bad)
    s = Rec()
    r.subscribe("a", s, tok)
    assert s.got[0][0][0][0] == "next_seq"


def test_token_expires_and_is_replaced(clock):
    r = reg(clock, auth="token", channel_timeout=30)
    r.publish("a", "keep the channel alive")
    tok = r.sign("a", expires=5)[1]
    clock.now += 6
    with pytest.raises(Refused):
        r.subscribe("a", Rec(), tok)
    new = r.sign("a", expires=5)[1]
    assert new != tok
    r.subscribe("a", Rec(), new)


def test_token_kept_alive_by_use(clock):
    r = reg(clock, auth="token", channel_timeout=30)
    tok = r.sign("a", expires=5)[1]
    s = Rec()
    r.subscribe("a", s, tok)
    clock.now += 20
    r.subscribe("a", Rec(), tok)             # long-poll reconnects keep working


def test_tokens_are_unpredictable(clock):
    r = reg(clock)
    toks = {r.sign("c%d" % i)[1] for i in range(200)}
    assert len(toks) == 200


def test_sign_seq_is_oldest_buffered(clock):
    r = reg(clock, channel_buffer_size=3)
    assert r.sign("a")[0].seq_min() == 1
    for i in range(5):
        r.publish("a", str(i))
    assert r.sign("a")[0].seq_min() == r.get("a").buffer[0].seq


def test_token_from_another_node_is_valid_too(clock):
    r = reg(clock, auth="token")
    _, mine = r.sign("a")
    _, theirs = r.sign("a", token="f" * 32)      # replicated from another node's /sign
    assert theirs == "f" * 32
    r.subscribe("a", Rec(), mine)
    r.subscribe("a", Rec(), theirs)
    assert r.sign("a")[1] in (mine, theirs)


def test_keep_and_occupied(clock):
    r = reg(clock, channel_timeout=10)
    r.publish("a", "x")
    r.subscribe("b", Rec(seq=1))
    assert r.occupied() == ["b"]
    clock.now += 8
    r.keep(["a", "zz"])
    clock.now += 8
    r.sweep()
    assert r.check("a")
    clock.now += 3
    r.sweep()
    assert not r.check("a") and r.check("b")


def test_sign_keeps_channel_for_expires(clock):
    r = reg(clock, channel_timeout=30)
    r.sign("a", expires=100)
    clock.now += 90
    r.sweep()
    assert r.check("a")
    clock.now += 11
    r.sweep()
    assert not r.check("a")


def test_broadcast_reaches_every_channel(clock):
    r = reg(clock)
    subs = [Rec(seq=1) for _ in range(3)]
    for i, s in enumerate(subs):
        r.subscribe("c%d" % i, s)
    assert r.broadcast("hello") == 3
    for s in subs:
        assert s.got[-1] == ([("broadcast", 1, "hello"), ("next_seq", 2, "")], True)


def test_seq_wraps(clock):
    assert seq_gt(1, 0xFFFFFFFF) and not seq_gt(0xFFFFFFFF, 1)
    r = reg(clock)
    r.publish("a", "x")
    r.get("a").seq_next = 0xFFFFFFFF
    s = Rec(seq=0xFFFFFFFF)
    r.subscribe("a", s)
    r.publish("a", "y")
    assert s.got == [([("data", 0xFFFFFFFF, "y")], False)] and s.seq_next == 0


def test_unsubscribe_is_idempotent_and_shutdown_ends_all(clock):
    r = reg(clock)
    s, t = Rec(seq=1), Rec(seq=1)
    r.subscribe("a", s)
    r.subscribe("b", t)
    r.unsubscribe(s)
    r.unsubscribe(s)
    r.shutdown()
    assert t.ended and not s.ended and r.info() == {"channels": 0, "subscribers": 0}


@pytest.mark.parametrize("name,ok", [("a", True), ("user_1.room-2:x", True), ("", False),
                                     ("a b", False), ("a\n1 b", False), ("x" * 129, False),
                                     ("\x00", False), ("é", True)])
def test_valid_cname(name, ok):
    assert valid_cname(name) is ok
