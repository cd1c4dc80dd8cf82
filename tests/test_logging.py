"""Log lines: text and JSON formats, conn= on lines about a connection, no bodies at info."""

from __future__ import annotations

import json
import logging

from imd import log as log_mod
from tests.daemon import start_daemon

BODY = "PRIVATE-BODY-7f3a"


def test_json_format_and_no_bodies_at_info(tmp_path):
    d = start_daemon(tmp_path, {"log": {"format": "json"}})
    try:
        a = d.login("alice", role="host")
        b = d.login("bob")
        a.msg("bob", BODY, ctx={"listing": "L1"})
        assert b.wait_for(lambda e: e["type"] == "msg")["body"] == BODY
        d.admin("kick", "bob")
        a.close()
        b.close()
    finally:
        assert d.stop() == 0
        d.cleanup()
    lines = [json.loads(line) for line in d.log().splitlines()]
    assert all({"ts", "level", "logger", "msg"} <= set(obj) for obj in lines)
    listening = [o for o in lines if o["msg"].startswith("listening name=tcp")][0]
    assert listening["name"] == "tcp" and listening["addr"].startswith("127.0.0.1:")
    assert listening["ts"].endswith("Z") and listening["level"] == "info"
    kicked = [o for o in lines if o["msg"].startswith("kicked ")][0]
    assert kicked["user"] == "bob" and kicked["sessions"] == "1"
    assert BODY not in d.log()


def test_debug_lines_about_a_connection_carry_conn(tmp_path):
    d = start_daemon(tmp_path, {"log": {"level": "debug"}})
    try:
        c = d.login("carol")
        sid = c.hello["session"]
        c.msg("dave", BODY)
        c.close()
        d.wait_log(r"session closed conn=" + sid.replace(".", r"\.") + " user=carol reason=eof")
    finally:
        d.stop()
        d.cleanup()
    about = [l for l in d.log().splitlines() if "user=carol" in l]
    assert about and all(f"conn={sid}" in l for l in about)
    assert any("session opened" in l for l in about)


def test_formatters_in_process():
    rec = logging.LogRecord("imd.x", logging.INFO, __file__, 1, "event conn=%s reason=%s n=%d",
                            ("n1.2a", '"a b"', 3), None)
    text = log_mod.TextFormatter().format(rec)
    assert text.endswith(' info imd.x event conn=n1.2a reason="a b" n=3')
    obj = json.loads(log_mod.JsonFormatter().format(rec))
    assert obj["msg"] == 'event conn=n1.2a reason="a b" n=3'
    assert (obj["conn"], obj["reason"], obj["n"]) == ("n1.2a", "a b", "3")
    hostile = logging.LogRecord("imd.x", logging.INFO, __file__, 1, "x level=forged ts=1 msg=hi", (), None)
    obj = json.loads(log_mod.JsonFormatter().format(hostile))
    assert obj["level"] == "info" and obj["msg"] == "x level=forged ts=1 msg=hi"     # no field overwritten
