"""Wheel (imd/net/wheel.py): due objects are called back and re-filed; a failing handler does
not stop the wheel; discarded objects are forgotten."""

import time

import gevent

from imd.net.wheel import Wheel


class Due:
    def __init__(self, again: int) -> None:
        self.calls = 0
        self.again = again

    def on_check(self, now: float):
        self.calls += 1
        return now if self.calls <= self.again else None


def test_due_objects_are_called_and_refiled():
    w = Wheel("on_check", tick=0.05)
    obj = Due(again=1)
    w.add(obj, time.monotonic() - 2)
    w.start()
    try:
        deadline = time.monotonic() + 10
        while obj.calls < 2 and time.monotonic() < deadline:
            gevent.sleep(0.05)
    finally:
        w.stop()
    assert obj.calls == 2


class Boom(Due):
    def on_check(self, now: float):
        self.calls += 1
        raise RuntimeError("handler")


def test_a_failing_handler_does_not_stop_the_wheel():
    w = Wheel("on_check", tick=0.05)
    bad, good = Boom(again=0), Due(again=0)
    w.add(bad, time.monotonic() - 2)
    w.add(good, time.monotonic() - 2)
    w.start()
    try:
        deadline = time.monotonic() + 10
        while good.calls < 1 and time.monotonic() < deadline:
            gevent.sleep(0.05)
    finally:
        w.stop()
    assert (bad.calls, good.calls) == (1, 1)


def test_discarded_objects_are_forgotten_in_bulk_and_never_called(monkeypatch):
    """A discarded object's handler is not called when its bucket comes due; once the
    discarded ones are half of what the wheel holds, the buckets drop them (a reconnect
    storm does not keep closed sessions until their deadline); live ones stay filed."""
    import imd.net.wheel as wheel_mod
    monkeypatch.setattr(wheel_mod, "COMPACT_MIN", 4)
    w = Wheel("on_check")
    now = time.monotonic()
    live = [Due(again=0) for _ in range(3)]
    dead = [Due(again=0) for _ in range(3)]
    for i, obj in enumerate(live + dead):
        w.add(obj, now - 2 + i % 2)
    for obj in dead:
        w.discard(obj)                       # 3 < COMPACT_MIN: still filed, skipped when due
    assert sum(map(len, w._buckets.values())) == 6
    w._run()
    assert [o.calls for o in live] == [1, 1, 1] and [o.calls for o in dead] == [0, 0, 0]
    assert not w._buckets and not w._gone

    later = [Due(again=0) for _ in range(8)]
    for obj in later:
        w.add(obj, now + 60)
    for obj in later[:4]:
        w.discard(obj)                       # 4 of 8: the buckets are filtered
    assert [o for b in w._buckets.values() for o in b] == later[4:] and not w._gone
    w.add(later[0], now - 5)
    w.discard(later[0])
    w._run()                                 # its bucket comes due: skipped, and forgotten
    assert later[0].calls == 0 and later[0] not in w._gone


def test_an_object_that_closes_in_its_own_handler_is_not_kept():
    """A session timed out by the wheel closes inside its handler, and closing discards it:
    it is not filed any more, so it must not stay among the discarded ones (with a large
    wheel the bulk filter would be far away and would keep every such session alive)."""
    w = Wheel("on_check")

    class ClosesItself:
        def on_check(self, now):
            w.discard(self)                  # Session.closed → Router.detach → discard
            return None

    objs = [ClosesItself() for _ in range(3)]
    for obj in objs:
        w.add(obj, time.monotonic() - 1)
    w._run()
    assert not w._gone and not w._buckets and w._size == 0
