"""Fan-out through the comet port: deliveries per second to iComet /stream subscribers.

    PYTHONPATH=. python bench/comet_fanout.py [subscribers] [broadcasts]

Opens N /stream subscribers (one channel each) on a real imd, then sends K
/broadcast requests (each one message into every channel) and reads every
subscriber's chunks with one selector loop until N*K messages arrived.
Prints deliveries/s (client and server share this machine's 2 cores).
"""

import os
import selectors
import socket
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.proto.comet.live import Imd  # noqa: E402


def run(n: int, k: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Imd(tmp, {"comet": {"max_channels": n + 10, "polling_timeout": 600,
                                "channel_buffer_size": 4}}).start()
        try:
            sel = selectors.DefaultSelector()
            socks = []
            for i in range(n):
                s = socket.create_connection(d.addr["comet"])
                s.sendall(f"GET /stream?cname=f{i}&seq=1 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ)
                socks.append(s)
            time.sleep(1 + n / 2000)
            host, port = d.addr["admin"]
            want = n * k
            got = 0
            t0 = time.perf_counter()
            for j in range(k):
                urllib.request.urlopen(f"http://{host}:{port}/broadcast?content=m{j}").read()
            while got < want:
                for key, _ in sel.select(timeout=10):
                    data = key.fileobj.recv(262144)
                    got += data.count(b'"type":"broadcast"')
            dt = time.perf_counter() - t0
            print(f"{n} subscribers x {k} broadcasts = {want} deliveries in {dt:.2f}s: "
                  f"{want / dt:,.0f} deliveries/s ({d.log_text().split('fastpath=')[1].split()[0]})")
            for s in socks:
                s.close()
        finally:
            d.stop()


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 2000, int(sys.argv[2]) if len(sys.argv) > 2 else 50)
