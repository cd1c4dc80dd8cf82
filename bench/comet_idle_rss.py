"""Server RSS per idle comet-port connection, measured on a real imd subprocess.

    PYTHONPATH=. python bench/comet_idle_rss.py [N] [kind ...]

kinds: stream (iComet /stream, one channel each, as iComet's own benchmark),
sse (/im/events user sessions), ws (/ws user sessions), tcp (the raw-TCP
port's sessions, for comparison). Prints the daemon's
VmRSS growth divided by N (kernel socket memory is not in RSS).
"""

import base64
import os
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.proto.comet.live import Imd, token  # noqa: E402


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def request_for(kind: str, i: int) -> bytes:
    if kind == "tcp":
        body = ('{"type":"auth","token":"%s","platform":"ios","device":"d"}' % token(f"u{i}")).encode()
        return len(body).to_bytes(4, "big") + body
    if kind == "stream":
        return f"GET /stream?cname=c{i}&seq=1 HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    if kind == "sse":
        return f"GET /im/events?token={token(f'u{i}')}&device=d HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET /ws?token={token(f'u{i}')}&device=d HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


def measure(kind: str, n: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        d = Imd(tmp, {"comet": {"max_channels": n + 10, "polling_timeout": 600},
                      "limits": {"heartbeat": 600, "idle_timeout": 1200},
                      }).start()
        try:
            pid = d.proc.pid
            port = d.addr["tcp" if kind == "tcp" else "comet"]
            warm = [socket.create_connection(port) for _ in range(200)]
            for i, s in enumerate(warm):
                s.sendall(request_for(kind, n + i))
            time.sleep(2)
            before = rss_kb(pid)
            socks = []
            for i in range(n):
                s = socket.create_connection(port)
                s.sendall(request_for(kind, i))
                socks.append(s)
                if i % 500 == 499:
                    time.sleep(0.2)
            time.sleep(12)                  # past auth_timeout: handshake leftovers freed
            after = rss_kb(pid)
            for s in socks + warm:
                s.close()
            return (after - before) * 1024 / n
        finally:
            d.stop()


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    for kind in sys.argv[2:] or ["stream", "sse", "ws", "tcp"]:
        print(f"{kind}: {measure(kind, n):.0f} bytes of server RSS per idle connection (N={n})")
