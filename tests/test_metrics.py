"""The metrics of DESIGN.md / issue 3: connections by protocol and source, envelopes
in and out by type, store queue, ack and delivery latency histograms."""

import re

import pytest

from imd.client import Client
from tests import inproc
from tests.daemon import token


@pytest.fixture
def node(tmp_path):
    d = inproc.start(tmp_path)
    yield d
    d.stop(reconnect=False, timeout=5)


def value(text, name):
    m = re.search(r"^" + re.escape(name) + r" (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_metrics_after_a_chat(node):
    a = Client(*inproc.addr(node))
    a.auth(token("mh", "host"), "ios", "d1")
    b = Client(*inproc.addr(node))
    b.auth(token("mg", "guest"), "android", "d2")
    a.msg("mg", "hello")
    b.wait_for(lambda e: e["type"] == "msg")
    text = node.metrics.render()
    assert 'imd_connections{protocol="tcp",source="ios-host"} 1' in text
    assert 'imd_connections{protocol="tcp",source="android-guest"} 1' in text
    assert value(text, 'imd_messages_in_total{type="msg"}') == 1
    assert value(text, 'imd_messages_out_total{type="ack"}') == 1
    assert value(text, "imd_ack_latency_seconds_count") == 1
    # one delivery: the guest's copy (the host's own copy goes to no session of theirs)
    assert value(text, "imd_delivery_latency_seconds_count") == 1
    assert value(text, "imd_store_queue") is not None
