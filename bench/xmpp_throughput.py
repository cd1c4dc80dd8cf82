"""XMPP chat throughput through imd (stored messages, SQLite store, one node).

    PYTHONPATH=. python bench/xmpp_throughput.py [PAIRS] [MESSAGES_PER_PAIR]

PAIRS raw-socket senders each pipeline MESSAGES chat messages to their own
receiver (also raw, available); the run ends when every receiver has them all.
Prints messages/s end to end and the daemon's CPU seconds per 1000 messages.
"""

import base64
import pathlib
import socket
import sys
import tempfile
import threading
import time

sys.path.insert(0, ".")
from tests.proto.xmpp.harness import HEADER, Imd, token  # noqa: E402


def login(port: int, user: str, presence: bool) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(HEADER + b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
              + base64.b64encode(b"\0" + user.encode() + b"\0" + token(user).encode()) + b"</auth>" + HEADER
              + b"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"
              + (b"<presence/>" if presence else b"") + b"<iq type='get' id='sync'><ping xmlns='urn:xmpp:ping'/></iq>")
    buf = b""
    while b"id='sync'" not in buf:
        buf += s.recv(65536)
    return s


def cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def main(pairs: int, n: int) -> None:
    d = Imd(pathlib.Path(tempfile.mkdtemp()))
    d.start()
    try:
        receivers = [login(d.port, f"r{i}", True) for i in range(pairs)]
        senders = [login(d.port, f"s{i}", True) for i in range(pairs)]
        done = []

        def drain(sock):
            seen, tail = 0, b""
            while seen < n:
                data = tail + sock.recv(1 << 20)
                seen += data.count(b"<body>")
                tail = data[-6:]
                seen -= tail.count(b"<body>")
            done.append(time.monotonic())

        threads = [threading.Thread(target=drain, args=(r,)) for r in receivers]
        for t in threads:
            t.start()
        c0, t0 = cpu(d.proc.pid), time.monotonic()
        for i, s in enumerate(senders):
            batch = b"".join(b"<message type='chat' to='r%d@localhost' id='m%d'><body>hello %d</body></message>"
                             % (i, k, k) for k in range(n))
            threading.Thread(target=s.sendall, args=(batch,)).start()
        for t in threads:
            t.join(300)
        elapsed, used = max(done) - t0, cpu(d.proc.pid) - c0
        total = pairs * n
        print(f"pairs={pairs} messages={total} elapsed={elapsed:.2f}s rate={total / elapsed:.0f} msg/s "
              f"daemon_cpu={used:.2f}s ({used / total * 1000:.2f} s per 1000)")
    finally:
        d.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10, int(sys.argv[2]) if len(sys.argv) > 2 else 2000)
