"""Fixtures: one imd daemon with the XMPP listener per test module (users differ per test)."""

import pytest

from .harness import Imd

SEED = {
    "passwords": {"sam": "sam-pass", "pat": "pat pass \u00e9"},
    "roles": {"sam": "host", "pat": "guest"},
    "contacts": [["alice", "bob"], ["alice", "carol"], ["hana", "gus"], ["ivy", "jon"], ["kim", "lee"]],
}


@pytest.fixture(scope="module")
def imd(tmp_path_factory):
    d = Imd(tmp_path_factory.mktemp("imd"), seed=SEED, limits={"auth_timeout": 3})
    d.start()
    yield d
    d.stop()
    assert not d.errors(), "\n".join(d.errors())
