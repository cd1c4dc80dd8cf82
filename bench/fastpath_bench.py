"""Time both fast-path implementations (imd._fastpath vs imd._fastpath_py).

    PYTHONPATH=. python bench/fastpath_bench.py [--seconds 1.0]

Build the extension first (python setup.py build_ext --inplace). Prints one
table: raw-TCP frame decoding and WebSocket decoding (mostly unmasking) in MB/s
of input, and send_many on socketpairs in sends per second (1 KB each; the
readers are drained outside the timed part).
"""

import argparse
import importlib
import os
import socket
import time


def rate(fn, seconds):
    """Calls per second of ``fn`` and the units it reports per call."""
    fn()
    calls, units, start = 0, 0, time.perf_counter()
    while True:
        units += fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return units / elapsed


def frame_decode(fp, size):
    payload = b"x" * size
    stream = fp.encode_frame(payload) * max(1, (4 << 20) // (size + 4))
    chunks = [stream[i:i + 65536] for i in range(0, len(stream), 65536)]

    def run():
        dec = fp.FrameDecoder(1 << 20)
        for c in chunks:
            dec.feed(c)
        return len(stream) / 1e6
    return run


def ws_decode(fp, size):
    mask = os.urandom(4)
    payload = os.urandom(size)
    n = len(payload)
    head = bytes([0x82, 0x80 | (n if n < 126 else 126 if n < 65536 else 127)])
    head += b"" if n < 126 else n.to_bytes(2 if n < 65536 else 8, "big")
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    stream = (head + mask + masked) * max(1, (4 << 20) // (size + 14))
    chunks = [stream[i:i + 65536] for i in range(0, len(stream), 65536)]

    def run():
        dec = fp.WSDecoder(1 << 20)
        for c in chunks:
            dec.feed(c)
        return len(stream) / 1e6
    return run


def send_many_bench(fp, pairs):
    items = [(a.fileno(), b"m" * 1024) for a, _ in pairs]

    def run():
        fp.send_many(items)
        for _, b in pairs:
            b.recv(65536)
        return len(items)
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args()
    impls = {"python": importlib.import_module("imd._fastpath_py")}
    try:
        impls["cython"] = importlib.import_module("imd._fastpath")
    except ImportError as e:
        print(f"(cython not built: {e})")
    pairs = [socket.socketpair() for _ in range(200)]
    for a, b in pairs:
        a.setblocking(False)
    cases = [
        ("frame decode, 200 B frames", "MB/s", lambda fp: frame_decode(fp, 200)),
        ("frame decode, 16 KB frames", "MB/s", lambda fp: frame_decode(fp, 16384)),
        ("ws decode+unmask, 200 B msgs", "MB/s", lambda fp: ws_decode(fp, 200)),
        ("ws decode+unmask, 64 KB msgs", "MB/s", lambda fp: ws_decode(fp, 65536)),
        ("send_many, 200 fds x 1 KB", "sends/s", lambda fp: send_many_bench(fp, pairs)),
    ]
    names = list(impls)
    print(f"{'case':32} {'unit':8} " + " ".join(f"{n:>12}" for n in names) + ("    ratio" if len(names) > 1 else ""))
    for title, unit, make in cases:
        results = [rate(make(impls[n]), args.seconds) for n in names]
        line = f"{title:32} {unit:8} " + " ".join(f"{r:12,.0f}" for r in results)
        if len(results) > 1:
            line += f"  {results[1] / results[0]:6.1f}x"
        print(line)


if __name__ == "__main__":
    main()
