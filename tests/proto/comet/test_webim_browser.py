"""The WebIM page and imd.js in headless Chromium (Debian's, driven by Playwright).

A host and a guest sign in from two browser contexts, see each other's
presence, chat, see read receipts; the guest goes away and gets what it
missed on return; a raw-TCP app user takes part in the same conversation;
the SSE and long-poll fallbacks carry the same chat; the page served over
HTTPS (``tls.comet``) chats over WSS, SSE and long-poll with a test CA's
certificate (Chromium told to ignore certificate errors: the CA is not in its
store).
"""

import json
import shutil

import pytest

from imd.client import Client
from tests.proto.comet.live import Imd, token

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium")
WAIT = 10000


@pytest.fixture(scope="module")
def imd(tmp_path_factory):
    d = Imd(tmp_path_factory.mktemp("webim"), {"admin": {"dev_tokens": True}}).start()
    yield d
    d.stop()
    assert "Traceback" not in d.log_text(), d.log_text()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def base(d):
    host, port = d.addr["comet"]
    return f"{getattr(d, 'scheme', 'http')}://{host}:{port}"


def sign_in(page, d, user, role, peer, transport=""):
    page.goto(base(d) + "/" + (f"#transport={transport}" if transport else ""))
    page.fill("#user", user)
    page.select_option("#role", role)
    page.fill("#peer", peer)
    page.click("#signinBtn")
    page.wait_for_selector("#conn.live", timeout=WAIT)


def say(page, text):
    page.fill("#text", text)
    page.click("#sendBtn")


def bubble(page, text, mine=False):
    cls = ".b.mine" if mine else ".b:not(.mine)"
    page.wait_for_selector(f"#msgs {cls}:text-is({json.dumps(text)})", timeout=WAIT)


def test_host_and_guest_chat(imd, browser):
    host_ctx, guest_ctx = browser.new_context(), browser.new_context()
    host, guest = host_ctx.new_page(), guest_ctx.new_page()
    sign_in(host, imd, "anna_host", "host", "ben_guest")
    sign_in(guest, imd, "ben_guest", "guest", "anna_host")
    assert "connected · ws" in host.inner_text("#conn")
    # presence: each sees the other online
    host.wait_for_selector(".conv[data-peer=ben_guest] .dot.online", timeout=WAIT)
    guest.wait_for_selector("#peerDot.online", timeout=WAIT)
    # chat both ways
    say(host, "Hi Ben, the flat is free on Friday")
    bubble(guest, "Hi Ben, the flat is free on Friday")
    say(guest, "Great, I'll book it")
    bubble(host, "Great, I'll book it")
    # read receipt: the guest has the chat open, so the host's message shows Read
    host.wait_for_selector(".meta.mine.status:has-text('Read')", timeout=WAIT)
    # the guest goes away; messages sent meanwhile arrive when it comes back
    guest.close()
    host.wait_for_selector(".conv[data-peer=ben_guest] .dot.offline", timeout=WAIT)
    say(host, "Check-in is at 3pm")
    say(host, "Door code 4711")
    host.wait_for_function("document.querySelectorAll('.meta.mine').length >= 3 && "
                           "!document.body.innerText.includes('Sending')", timeout=WAIT)
    guest = guest_ctx.new_page()
    sign_in(guest, imd, "ben_guest", "guest", "anna_host")
    bubble(guest, "Check-in is at 3pm")
    bubble(guest, "Door code 4711")
    host_ctx.close()
    guest_ctx.close()


def test_tcp_app_user_joins_the_conversation(imd, browser):
    ctx = browser.new_context()
    host = ctx.new_page()
    sign_in(host, imd, "carla_host", "host", "dan_app")
    app = Client(*imd.addr["tcp"])
    app.auth(token("dan_app", "guest"), "android", "phone-1")
    ack = app.msg("carla_host", "Hello from the Android app")
    assert ack["type"] == "ack"
    host.click(".conv[data-peer=dan_app]")
    bubble(host, "Hello from the Android app")
    say(host, "Welcome, Dan!")
    env = app.wait_for(lambda e: e.get("type") == "msg")
    assert env["body"] == "Welcome, Dan!" and env["from"] == "carla_host"
    app.close()
    ctx.close()


@pytest.mark.parametrize("transport", ["sse", "poll"])
def test_fallback_transports(imd, browser, transport):
    a_ctx, b_ctx = browser.new_context(), browser.new_context()
    a, b = a_ctx.new_page(), b_ctx.new_page()
    sign_in(a, imd, f"eva_{transport}", "host", f"finn_{transport}", transport=transport)
    assert f"connected · {transport}" in a.inner_text("#conn")
    sign_in(b, imd, f"finn_{transport}", "guest", f"eva_{transport}")
    say(b, f"ping over {transport}")
    bubble(a, f"ping over {transport}")
    say(a, f"pong over {transport}")
    bubble(b, f"pong over {transport}")
    b.wait_for_selector(".meta.mine.status:has-text('Read')", timeout=WAIT)
    a_ctx.close()
    b_ctx.close()


def free_port() -> int:
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_reconnect_resume_and_resend_across_a_restart(tmp_path, browser):
    listen = {name: f"127.0.0.1:{free_port()}" for name in ("comet", "admin", "tcp")}
    cfg = {"admin": {"dev_tokens": True}, "listen": listen}
    d = Imd(tmp_path, cfg).start()
    ctx = browser.new_context()
    page = ctx.new_page()
    try:
        sign_in(page, d, "gus_guest", "guest", "hal_host")
        app = Client(*d.addr["tcp"])
        app.auth(token("hal_host", "host"), "ios", "ipad")
        app.msg("gus_guest", "before the restart")
        bubble(page, "before the restart")
        app.close()
        d.stop()
        page.wait_for_selector("#conn.down", timeout=WAIT)
        say(page, "typed while the server was down")          # held by imd.js, re-sent later
        d = Imd(tmp_path, cfg).start()
        page.wait_for_selector("#conn.live", timeout=30000)    # reconnected by itself
        app = Client(*d.addr["tcp"])
        app.auth(token("hal_host", "host"), "ios", "ipad")
        got = app.wait_for(lambda e: e.get("type") == "msg" and e.get("from") == "gus_guest")
        assert got["body"] == "typed while the server was down"
        app.msg("gus_guest", "after the restart")
        bubble(page, "after the restart")
        page.wait_for_function("!document.body.innerText.includes('Sending')", timeout=WAIT)
        texts = page.eval_on_selector_all("#msgs .b", "els => els.map(e => e.textContent)")
        assert texts.count("before the restart") == 1 and texts.count("after the restart") == 1
        assert texts.count("typed while the server was down") == 1
        app.close()
    finally:
        ctx.close()
        d.stop()


@pytest.fixture(scope="module")
def https_imd(tmp_path_factory):
    from tests.tlsca import TestCA
    ca = TestCA(tmp_path_factory.mktemp("ca"))
    cert, key = ca.issue("web")
    d = Imd(tmp_path_factory.mktemp("webim-tls"), {"admin": {"dev_tokens": True},
                                                   "tls": {"cert": cert, "key": key, "comet": True}}).start()
    d.scheme = "https"
    yield d
    d.stop()
    assert "Traceback" not in d.log_text(), d.log_text()


@pytest.mark.parametrize("transport", ["ws", "sse", "poll"])
def test_webim_over_https(https_imd, browser, transport):
    a_ctx = browser.new_context(ignore_https_errors=True)
    b_ctx = browser.new_context(ignore_https_errors=True)
    a, b = a_ctx.new_page(), b_ctx.new_page()
    sign_in(a, https_imd, f"ivo_{transport}", "host", f"jo_{transport}", transport=transport)
    assert a.evaluate("location.protocol") == "https:"
    assert f"connected · {transport}" in a.inner_text("#conn")
    sign_in(b, https_imd, f"jo_{transport}", "guest", f"ivo_{transport}")
    say(b, f"secure hello over {transport}")
    bubble(a, f"secure hello over {transport}")
    say(a, f"secure answer over {transport}")
    bubble(b, f"secure answer over {transport}")
    a_ctx.close()
    b_ctx.close()
