"""Fixtures: one imd daemon with the XMPP listener per test module (users differ per test).

``IMD_XMPP_SERVER=prosody`` runs the same tests against Debian's prosody instead
(tests/proto/xmpp/prosody.py); tests marked ``imd_only`` are skipped there.
"""

import os

import pytest

from . import harness
from .harness import Imd
from .prosody import Prosody

SERVER = os.environ.get("IMD_XMPP_SERVER", "imd")


def pytest_configure(config):
    config.addinivalue_line("markers", "imd_only(reason): relies on imd's own behaviour, not run on prosody")


def pytest_collection_modifyitems(config, items):
    if SERVER != "prosody":
        return
    for item in items:
        mark = item.get_closest_marker("imd_only")
        if mark is not None:
            item.add_marker(pytest.mark.skip(reason="imd only: " + (mark.args[0] if mark.args else "")))

SEED = {
    "passwords": {"sam": "sam-pass", "pat": "pat pass \u00e9"},
    "roles": {"sam": "host", "pat": "guest"},
    "contacts": [["alice", "bob"], ["alice", "carol"], ["hana", "gus"], ["ivy", "jon"], ["kim", "lee"]],
}


@pytest.fixture(scope="module")
def imd(tmp_path_factory):
    server = Prosody if SERVER == "prosody" else Imd
    d = server(tmp_path_factory.mktemp("imd"), seed=SEED, limits={"auth_timeout": 3})
    harness.ACTIVE = d
    d.start()
    yield d
    d.stop()
    harness.ACTIVE = None
    assert not d.errors(), "\n".join(d.errors())
