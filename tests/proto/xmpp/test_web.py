"""XMPP next to the comet port and the admin API: a WebSocket user and an XMPP user
chat both ways; the web tier sets a password (SCRAM/PLAIN logins), adds contacts
(roster pushes) and sends reminders (headlines) over HTTP."""

import asyncio
import urllib.request

import orjson
import pytest
import websocket

from .harness import barrier, client, login, logout, next_message, run, token

pytestmark = pytest.mark.imd_only("the comet port and the admin API are imd's")


def api(d, method: str, path: str, body=None) -> dict:
    host, port = d.addr["admin"]
    req = urllib.request.Request(f"http://{host}:{port}{path}", method=method,
                                 data=orjson.dumps(body) if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return orjson.loads(resp.read())


def ws_login(d, user: str):
    host, port = d.addr["comet"]
    ws = websocket.create_connection(f"ws://{host}:{port}/ws?token={token(user)}&platform=web&device=tab",
                                     timeout=10)
    hello = orjson.loads(ws.recv())
    assert hello["type"] == "auth" and hello["ok"]
    return ws


def ws_wait(ws, pred):
    while True:
        env = orjson.loads(ws.recv())
        if pred(env):
            return env


def test_password_set_by_the_web_tier(imd):
    async def scenario():
        assert await asyncio.to_thread(api, imd, "PUT", "/api/v1/users/u_web_pw/password",
                                       {"password": "s3cret"}) == {"ok": True}
        await asyncio.sleep(0.3)                        # the store writes passwords in a batch
        for mech in ("SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"):
            c = client("u_web_pw", "s3cret", mech=mech)
            await login(c, imd)
            await logout(c)
    run(scenario())


def test_websocket_and_xmpp_users_chat(imd):
    async def scenario():
        x = client("u_x_side", resource="phone")
        await login(x, imd)
        ws = await asyncio.to_thread(ws_login, imd, "u_w_side")
        ws.send(orjson.dumps({"type": "msg", "id": "w1", "to": "u_x_side", "body": "from the browser"}).decode())
        m = await next_message(x)
        assert (m["from"].bare, m["body"]) == ("u_w_side@localhost", "from the browser")
        x.send_message(mto="u_w_side@localhost", mbody="from the phone", mtype="chat")
        env = await asyncio.to_thread(ws_wait, ws, lambda e: e.get("type") == "msg" and e.get("from") == "u_x_side")
        assert env["body"] == "from the phone"
        ws.close()
        await logout(x)
    run(scenario())


def test_contacts_and_notices_over_http(imd):
    async def scenario():
        x = client("u_api_host")
        await login(x, imd)
        await asyncio.to_thread(api, imd, "POST", "/api/v1/contacts", {"user": "u_api_host", "contact": "u_api_guest"})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while "u_api_guest@localhost" not in x.client_roster:
            assert loop.time() < deadline, "no roster push"
            await asyncio.sleep(0.05)
        res = await asyncio.to_thread(api, imd, "POST", "/api/v1/notices",
                                      {"to": ["u_api_host"], "kind": "booking.confirmed", "body": "B9 is confirmed"})
        assert res["count"] == 1
        m = await asyncio.wait_for(x.raw_messages.get(), 10)
        while m["type"] != "headline":
            m = await asyncio.wait_for(x.raw_messages.get(), 10)
        assert (m["subject"], m["body"], m["id"]) == ("booking.confirmed", "B9 is confirmed", res["mids"][0])
        await barrier(x)
        await logout(x)
    run(scenario())
