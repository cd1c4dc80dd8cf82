"""XEP-0313 over the inbox with slixmpp's xep_0313 (paging with RSM, 'with' filter, reverse)."""


import pytest
from slixmpp.exceptions import IqError

from .harness import barrier, client, login, logout, next_message, run

PLUGINS = ("xep_0030", "xep_0199", "xep_0203", "xep_0059", "xep_0313")


def test_archive_paging_filter_and_reverse(imd):
    async def scenario():
        a = client("u_mam", plugins=PLUGINS)
        await login(a, imd)
        b = client("u_mam_b")
        await login(b, imd)
        c = client("u_mam_c")
        await login(c, imd)
        for i in range(12):
            a.send_message(mto="u_mam_b@localhost", mbody=f"a{i}", mtype="chat")
            b.send_message(mto="u_mam@localhost", mbody=f"b{i}", mtype="chat")
        c.send_message(mto="u_mam@localhost", mbody="from c", mtype="chat")
        for _ in range(13):
            await next_message(a)
        await barrier(b)
        info = await a.plugin["xep_0030"].get_info(jid="u_mam@localhost")
        assert "urn:xmpp:mam:2" in info["disco_info"]["features"]
        bodies = [m["mam_result"]["forwarded"]["stanza"]["body"]
                  async for m in a.plugin["xep_0313"].iterate(with_jid="u_mam_b@localhost", rsm={"max": 5})]
        assert sorted(bodies) == sorted([f"a{i}" for i in range(12)] + [f"b{i}" for i in range(12)])
        assert [x for x in bodies if x.startswith("b")] == [f"b{i}" for i in range(12)]
        everything = [m async for m in a.plugin["xep_0313"].iterate(rsm={"max": 7})]
        assert len(everything) == 25
        first = everything[0]["mam_result"]["forwarded"]
        assert first["delay"]["stamp"] is not None
        last_two = [m["mam_result"]["forwarded"]["stanza"]["body"]
                    async for m in a.plugin["xep_0313"].iterate(rsm={"max": 2}, reverse=True, total=2)]
        newest = [m["mam_result"]["forwarded"]["stanza"]["body"] for m in everything[-2:]]
        assert last_two == newest[::-1]                   # the last page, newest first
        await logout(a, b, c)
    run(scenario())


def test_bad_queries(imd):
    async def scenario():
        a = client("u_mam2", plugins=PLUGINS)
        await login(a, imd)
        iq = a.make_iq_set(ito=None)
        iq["mam"]["queryid"] = "q"
        iq["mam"]["rsm"]["after"] = "not-a-number"
        with pytest.raises(IqError) as info:
            await iq.send()
        assert info.value.iq["error"]["condition"] == "item-not-found"      # XEP-0059 §2.6
        await logout(a)
    run(scenario())
