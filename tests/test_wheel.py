"""Wheel (imd/net/wheel.py): due objects are called back and re-filed; the after-tick hook runs
after each tick's handlers, and a failing hook does not stop the wheel. memtrim.trim works here."""

import time

import gevent

from imd import memtrim
from imd.net.wheel import Wheel


class Due:
    def __init__(self, again: int) -> None:
        self.calls = 0
        self.again = again

    def on_check(self, now: float):
        self.calls += 1
        return now if self.calls <= self.again else None


def test_due_objects_and_the_after_hook():
    order = []
    w = Wheel("on_check", tick=0.05, after=lambda: order.append("after"))
    obj = Due(again=1)
    w.add(obj, time.monotonic() - 2)
    w.start()
    try:
        deadline = time.monotonic() + 10
        while obj.calls < 2 and time.monotonic() < deadline:
            gevent.sleep(0.05)
    finally:
        w.stop()
    assert obj.calls == 2 and "after" in order


def test_a_failing_after_hook_does_not_stop_the_wheel():
    def boom():
        raise RuntimeError("hook")
    w = Wheel("on_check", tick=0.05, after=boom)
    obj = Due(again=0)
    w.add(obj, time.monotonic() - 2)
    w.start()
    try:
        deadline = time.monotonic() + 10
        while obj.calls < 1 and time.monotonic() < deadline:
            gevent.sleep(0.05)
    finally:
        w.stop()
    assert obj.calls == 1


def test_memtrim_on_glibc():
    assert memtrim.trim() is True
