"""Fixtures of the engine contract suite: every contract test runs once per engine.

The Redis engine runs against the real Redis at 127.0.0.1:6379 (db 15), with a
key and channel prefix unique to the test; the test's keys are deleted after it.
"""

from gevent import monkey

monkey.patch_all()

import uuid  # noqa: E402

import gevent  # noqa: E402
import pytest  # noqa: E402
import redis  # noqa: E402

from imd.engine.memory import MemoryEngine  # noqa: E402
from imd.engine.redis import RedisEngine  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/15"


class Recorder:
    """An engine handler that records (channel, event) pairs; ``resync`` events
    (made by the engine itself whenever it connects with subscriptions) apart."""

    def __init__(self) -> None:
        self.got = []
        self.resyncs = 0

    def __call__(self, channel, event) -> None:
        if event.kind == "resync":
            self.resyncs += 1
        else:
            self.got.append((channel, event))

    def kinds(self, kind):
        return [(c, e) for c, e in self.got if e.kind == kind]

    def wait(self, pred, timeout=5.0):
        """Wait until ``pred(self.got)`` holds; return whether it did."""
        with gevent.Timeout(timeout, False):
            while not pred(self.got):
                gevent.sleep(0.01)
            return True
        return False


class RedisFactory:
    def __init__(self) -> None:
        self.prefix = f"imdtest:{uuid.uuid4().hex[:10]}:"
        self.engines = []

    def make(self, node_id, presence_ttl=30):
        e = RedisEngine(REDIS_URL, presence_ttl=presence_ttl, prefix=self.prefix)
        rec = Recorder()
        e.start(node_id, rec)
        self.engines.append(e)
        return e, rec

    def ready(self, engine, timeout=5.0):
        """Wait until the engine is connected and every subscription was sent."""
        with gevent.Timeout(timeout, False):
            while not (engine.connected and not engine._sub_dirty and engine._first_tick_done.is_set()):
                gevent.sleep(0.01)
            gevent.sleep(0.05)      # the SUBSCRIBE reached Redis
            return True
        return False

    def cleanup(self):
        for e in self.engines:
            if e._running:
                e.stop()
        r = redis.Redis.from_url(REDIS_URL)
        keys = list(r.scan_iter(match=self.prefix + "*", count=1000))
        if keys:
            r.delete(*keys)
        r.close()


class MemoryFactory:
    def __init__(self) -> None:
        self.engines = []

    def make(self, node_id, presence_ttl=30):
        e = MemoryEngine()
        rec = Recorder()
        e.start(node_id, rec)
        self.engines.append(e)
        return e, rec

    def ready(self, engine, timeout=5.0):
        return True

    def cleanup(self):
        for e in self.engines:
            e.stop()


@pytest.fixture(params=["memory", "redis"])
def factory(request):
    f = MemoryFactory() if request.param == "memory" else RedisFactory()
    yield f
    f.cleanup()


@pytest.fixture
def redis_factory():
    f = RedisFactory()
    yield f
    f.cleanup()
