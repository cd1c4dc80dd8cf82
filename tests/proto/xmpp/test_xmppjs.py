"""A second client implementation: xmpp.js 0.14 (npm) under Node, against the same daemon.

Needs ``node`` and @xmpp/client in tests/proto/xmpp/js/node_modules (scripts/test runs
``npm install --prefix tests/proto/xmpp/js``; or point $IMD_XMPPJS_MODULES at another
node_modules); skipped otherwise.
Over plaintext xmpp.js refuses PLAIN, so this exercises SCRAM-SHA-1 with a set password.
"""

import asyncio
import os
import shutil
import subprocess

import orjson
import pytest

from .harness import HERE, barrier, client, login, logout, next_message, run

MODULES = os.environ.get("IMD_XMPPJS_MODULES", os.path.join(HERE, "js", "node_modules"))
pytestmark = pytest.mark.skipif(not (shutil.which("node") and os.path.isdir(os.path.join(MODULES, "@xmpp"))),
                                reason="node or @xmpp/client not installed")


def xmppjs(imd, user, password, to="-", body="-", expect=0) -> list:
    script = os.path.join(HERE, "js", "client.mjs")
    # ESM ignores NODE_PATH: resolve the package from a symlinked node_modules next to the script
    link = os.path.join(HERE, "js", "node_modules")
    if not os.path.exists(link):            # $IMD_XMPPJS_MODULES elsewhere
        os.symlink(MODULES, link)
    proc = subprocess.run(["node", script, str(imd.port), user, password, to, body, str(expect)],
                          capture_output=True, text=True, timeout=30)
    events = [orjson.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, (proc.returncode, events, proc.stderr[-2000:])
    return events


def test_xmppjs_login_roster_chat_and_offline(imd):
    async def scenario():
        # offline first: a slixmpp user writes to pat while no client of pat is connected
        s = client("sam", "sam-pass", resource="desk")
        await login(s, imd)
        s.send_message(mto="pat@localhost", mbody="offline for pat", mtype="chat")
        await barrier(s)
        await asyncio.sleep(0.3)
        events = await asyncio.to_thread(xmppjs, imd, "pat", "pat pass \u00e9", "sam@localhost", "hello sam", 1)
        kinds = [e["event"] for e in events]
        assert kinds[:3] == ["online", "roster", "sent"] or kinds[:2] == ["online", "roster"]
        assert events[0]["jid"] == "pat@localhost/js"
        msg = next(e for e in events if e["event"] == "message")
        assert msg["body"] == "offline for pat" and msg["from"].split("/")[0] == "sam@localhost" and msg["delay"]
        m = await next_message(s)
        assert (m["from"].bare, m["body"]) == ("pat@localhost", "hello sam")
        await logout(s)
    run(scenario())
