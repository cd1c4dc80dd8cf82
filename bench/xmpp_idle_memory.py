"""Server RSS per idle, bound XMPP connection (steady state, parsers hibernated).

    PYTHONPATH=. python bench/xmpp_idle_memory.py [N]     (needs ulimit -n > 2N + 500)

Starts imd (tests/proto/xmpp/harness.Imd; a stream silent for a second frees
its parser), opens 200 warm-up connections, then two batches of N
pipelined logins (SASL PLAIN with a token, bind, initial presence, each a
distinct user). The second batch's RSS growth, after its parsers hibernated,
is the steady-state cost (the first batch's peak memory is reused by then).
"""

import base64
import pathlib
import socket
import sys
import tempfile
import time

sys.path.insert(0, ".")
from tests.proto.xmpp.harness import HEADER, Imd, token  # noqa: E402


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024


def login(port: int, user: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(HEADER + b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
              + base64.b64encode(b"\0" + user.encode() + b"\0" + token(user).encode()) + b"</auth>" + HEADER
              + b"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq><presence/>")
    return s


def batch(d: Imd, start: int, n: int, socks: list) -> None:
    for i in range(start, start + n):
        socks.append(login(d.port, f"m{i}"))
        if i % 500 == 0:
            time.sleep(0.2)
    time.sleep(8)


def main(n: int) -> None:
    d = Imd(pathlib.Path(tempfile.mkdtemp()), limits={"idle_timeout": 1200})
    d.start()
    socks: list = []
    try:
        batch(d, 0, 200, socks)
        before = rss(d.proc.pid)
        batch(d, 200, n, socks)
        first = rss(d.proc.pid)
        batch(d, 200 + n, n, socks)
        second = rss(d.proc.pid)
        print(f"N={n} first batch (peak incl. live parsers) {(first - before) / n:.0f} B/conn; "
              f"steady state {(second - first) / n:.0f} B/conn")
    finally:
        d.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3000)
