"""iComet's own browser client (demo/web/js/icomet.js of ideawu/icomet) against imd, in Chromium.

icomet.js is not part of imd: give its path in ``$ICOMET_JS`` (the test is
skipped otherwise). It needs jQuery only for ``$.ajax`` JSONP calls; a
minimal stand-in that loads the URL as a script is injected instead. Both of
its transports run unchanged: SSE (Chromium has EventSource) and JSONP
long-polling (EventSource removed from the page), the latter through noops
and reconnects, and the token flow through ``/sign`` on the admin port.
"""

import os
import shutil
import time
import urllib.parse

import pytest

from tests.proto.comet.live import Imd, request

ICOMET_JS = os.environ.get("ICOMET_JS", "")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not (CHROMIUM and os.path.isfile(ICOMET_JS)),
                                reason="needs chromium and $ICOMET_JS (iComet's demo client)")

JQUERY_STANDIN = """
window.$ = function (sel) { return {remove: function () {
  document.querySelectorAll(sel).forEach(function (e) { e.remove(); }); }}; };
$.ajax = function (o) { var s = document.createElement('script');
  s.className = o.jsonpCallback; s.src = o.url; document.head.appendChild(s); };
"""


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def url(d, port, path):
    host, p = d.addr[port]
    return f"http://{host}:{p}{path}"


def start_client(browser, d, cname, long_poll: bool, sign: bool = False):
    page = browser.new_page()
    page.set_content("<html><head></head><body></body></html>")
    if long_poll:
        page.evaluate("delete window.EventSource")
    page.add_script_tag(content=JQUERY_STANDIN)
    page.add_script_tag(content=open(ICOMET_JS).read())
    cfg = {"channel": cname, "subUrl": url(d, "comet", "/sub")}
    if sign:
        cfg["signUrl"] = url(d, "admin", "/sign")
    page.evaluate("cfg => { window.got = []; cfg.callback = function (c, t) { got.push([t, c]); };"
                  " window.comet = new iComet(cfg); }", cfg)
    return page


def push(d, cname, content):
    q = urllib.parse.urlencode({"cname": cname, "content": content})
    assert request(d.addr["admin"], "GET", "/push?" + q)[0] == 200


def wait_got(page, n):
    page.wait_for_function(f"window.got.length >= {n}", timeout=15000)
    return page.evaluate("window.got")


@pytest.fixture(scope="module")
def imd(tmp_path_factory):
    d = Imd(tmp_path_factory.mktemp("icomet-js"), {"comet": {"polling_timeout": 2}}).start()
    yield d
    d.stop()


def test_icomet_js_sse(imd, browser):
    page = start_client(browser, imd, "js_sse", long_poll=False)
    time.sleep(0.5)
    push(imd, "js_sse", "first")
    push(imd, "js_sse", 'with "quotes" and </script>')
    assert wait_got(page, 2) == [["data", "first"], ["data", 'with "quotes" and </script>']]
    time.sleep(4.5)                                   # two noops (polling_timeout = 2)
    push(imd, "js_sse", "after noops")
    request(imd.addr["admin"], "GET", "/broadcast?content=all")
    assert wait_got(page, 4)[2:] == [["data", "after noops"], ["broadcast", "all"]]
    time.sleep(0.5)
    assert len(page.evaluate("window.got")) == 4      # nothing twice
    page.close()


def test_icomet_js_long_poll(imd, browser):
    """One message per poll: icomet.js's long-poll mode stops polling after any
    batch (array) answer — its ``long_polling_pause`` is never cleared — and
    iComet answers backlogs and broadcasts as arrays, so does imd (docs/icomet.md)."""
    page = start_client(browser, imd, "js_lp", long_poll=True)
    time.sleep(0.5)
    push(imd, "js_lp", "first")
    assert wait_got(page, 1) == [["data", "first"]]
    time.sleep(0.5)
    push(imd, "js_lp", 'with "quotes" and </script>')
    assert wait_got(page, 2)[1] == ["data", 'with "quotes" and </script>']
    time.sleep(4.5)                                   # noops end polls; it comes back each time
    push(imd, "js_lp", "after noops")
    assert wait_got(page, 3)[2] == ["data", "after noops"]
    time.sleep(0.5)
    assert len(page.evaluate("window.got")) == 3
    page.close()


def test_icomet_js_token_flow(tmp_path, browser):
    d = Imd(tmp_path, {"comet": {"auth": "token", "polling_timeout": 2}}).start()
    try:
        page = start_client(browser, d, "js_tok", long_poll=True, sign=True)
        page.wait_for_function("window.comet.token.length == 32", timeout=15000)
        time.sleep(0.5)
        push(d, "js_tok", "signed")
        assert wait_got(page, 1) == [["data", "signed"]]
        page.close()
    finally:
        d.stop()
