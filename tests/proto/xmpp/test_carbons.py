"""XEP-0280 carbons with slixmpp's xep_0280 plugin, including a copy of what the
user sent from a raw-TCP device (one inbox for every protocol)."""

import asyncio

import pytest

from .harness import barrier, client, login, logout, next_message, run
from .test_cross import tcp_login

PLUGINS = ("xep_0030", "xep_0199", "xep_0203", "xep_0280")

pytestmark = pytest.mark.imd_only("carbons of raw-TCP devices are imd's")


def test_sent_carbons_and_received_copies(imd):
    async def scenario():
        r1 = client("u_cb", resource="r1", plugins=PLUGINS)
        await login(r1, imd)
        r2 = client("u_cb", resource="r2", plugins=PLUGINS)
        await login(r2, imd)
        sent = asyncio.Queue()
        r2.add_event_handler("carbon_sent", sent.put_nowait)
        await r2.plugin["xep_0280"].enable()
        peer = client("u_cb_peer")
        await login(peer, imd)
        r1.send_message(mto="u_cb_peer@localhost", mbody="from r1", mtype="chat")
        assert (await next_message(peer))["body"] == "from r1"
        carbon = await asyncio.wait_for(sent.get(), 10)
        fwd = carbon["carbon_sent"]
        assert (fwd["to"].bare, fwd["body"]) == ("u_cb_peer@localhost", "from r1")
        # a message to the bare JID reaches both resources directly (no <received/> wrapper needed)
        peer.send_message(mto="u_cb@localhost", mbody="to both", mtype="chat")
        assert (await next_message(r1))["body"] == "to both"
        assert (await next_message(r2))["body"] == "to both"
        # the same user on the raw-TCP protocol: r2 gets a sent carbon of it
        t = await asyncio.to_thread(tcp_login, imd, "u_cb", "android", "app")
        await asyncio.to_thread(t.msg, "u_cb_peer", "from the app")
        carbon = await asyncio.wait_for(sent.get(), 10)
        assert carbon["carbon_sent"]["body"] == "from the app"
        await barrier(r1)
        assert r1.inbox.empty()                       # r1 did not enable carbons
        t.close()
        await logout(r1, r2, peer)
    run(scenario())
