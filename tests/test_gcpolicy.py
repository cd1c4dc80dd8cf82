"""imd.gcpolicy: the collector settings a node's process runs with, and the timing
of its collections (checked in a child process: they are process-wide)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import gc, json
from imd import gcpolicy
before = gc.get_threshold()
gcpolicy.apply()
print(json.dumps({"before": before, "after": gc.get_threshold(), "frozen": gc.get_freeze_count()}))
"""


def probe(code: str) -> dict:
    """What ``code``, run in a child process with this tree on its path, prints as JSON."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True, timeout=60).stdout
    return json.loads(out)


def test_apply_freezes_boot_objects_and_raises_the_young_threshold():
    r = probe(PROBE)
    from imd.gcpolicy import GEN0
    assert r["after"] == [GEN0, r["before"][1], r["before"][2]]
    assert r["frozen"] > 1000          # the modules imported so far, at least


PAUSES_PROBE = """
import gc, json
from imd import gcpolicy
gcpolicy.apply()
gcpolicy.apply()                      # twice: still one callback
before = list(gcpolicy.PAUSES.collections)
gc.collect(0)
gc.collect(2)
h = gcpolicy.PAUSES.histogram
print(json.dumps({"before": before, "after": gcpolicy.PAUSES.collections, "observed": h.count,
                  "sum": h.sum, "callbacks": gc.callbacks.count(gcpolicy.PAUSES)}))
"""


def test_collections_are_counted_and_timed_once_applied():
    r = probe(PAUSES_PROBE)
    assert r["callbacks"] == 1
    assert r["after"][0] == r["before"][0] + 1 and r["after"][2] == r["before"][2] + 1
    assert r["observed"] == sum(r["after"]) and r["sum"] > 0
