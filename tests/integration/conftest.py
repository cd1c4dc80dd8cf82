"""Fixtures of the cluster integration tests (real PostgreSQL, real Redis, real processes)."""

import importlib.util
import uuid

import pytest
import redis

from .cluster import Database, Node, RedisServer

SYSTEM_REDIS = "redis://127.0.0.1:6379/13"

if importlib.util.find_spec("imd.store.postgresql") is None:
    pytest.skip("the PostgreSQL store (imd/store/postgresql.py) is not on this branch yet",
                allow_module_level=True)


@pytest.fixture
def db():
    d = Database()
    yield d
    d.drop()


class Cluster:
    """Nodes sharing one database and one Redis; everything stopped at the end."""

    def __init__(self, tmp_path, db, redis_url) -> None:
        self.tmp = str(tmp_path)
        self.db = db
        self.redis_url = redis_url
        self.prefix = f"imdit:{uuid.uuid4().hex[:8]}:"
        self.nodes = {}

    def node(self, node_id: str, **kw) -> Node:
        n = Node(self.tmp, node_id, self.db.dsn, self.redis_url, self.prefix, **kw)
        self.nodes[node_id] = n
        return n.start()

    def start(self, *ids, **kw):
        return [self.node(i, **kw) for i in ids]

    def stop(self) -> None:
        for n in self.nodes.values():
            n.stop()
        try:
            r = redis.Redis.from_url(self.redis_url)
            keys = list(r.scan_iter(match=self.prefix + "*", count=1000))
            if keys:
                r.delete(*keys)
            r.close()
        except redis.ConnectionError:
            pass


@pytest.fixture
def cluster(tmp_path, db):
    c = Cluster(tmp_path, db, SYSTEM_REDIS)
    yield c
    c.stop()


@pytest.fixture
def private_redis(tmp_path):
    r = RedisServer(str(tmp_path))
    yield r
    r.stop()
