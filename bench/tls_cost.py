"""The cost of TLS on the raw-TCP listener: server memory per idle connection and
full handshakes per server CPU-second.

    flock /tmp/imd-bench.lock python bench/tls_cost.py [--conns 3000] [--handshakes 2000] [--key ec|rsa]

Makes a throwaway CA and certificate (openssl CLI; EC P-256 or RSA 2048), then runs
one imd node (SQLite store, memory engine) twice, once with ``tls.tcp = false`` and
once with ``tls.tcp = true``, and for each:

* memory: opens ``--conns`` connections from this process, authenticates each as
  its own user, waits until the node's RSS is steady, and reports the RSS growth
  (``/proc/PID/status`` VmRSS) per connection — idle authenticated sessions, the
  state a phone keeps all day;
* handshakes (TLS run only): ``--handshakes`` fresh connections (no session
  resumption), each a full TLS handshake then closed, from two client processes;
  the node's CPU time (utime + stime from ``/proc/PID/stat``) over that span gives
  handshakes per server CPU-second.

Prints one JSON object. Loopback only; everything it starts ends with it.
"""

import argparse
import multiprocessing
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time

import orjson

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from imd.auth import issue  # noqa: E402
from imd.client import Client  # noqa: E402
from tests.tlsca import TestCA  # noqa: E402
from bench.peers import rss_bytes  # noqa: E402

SECRET = "bench-secret-bench-secret-bench-secret!"



def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def steady_rss(pid: int) -> int:
    last = rss_bytes([pid])
    for _ in range(20):
        time.sleep(0.5)
        now = rss_bytes([pid])
        if abs(now - last) < 64 * 1024:
            return now
        last = now
    return last


def start(tmp: str, tls: bool, cert: str, key: str):
    cfg = os.path.join(tmp, f"imd-{int(tls)}.toml")
    with open(cfg, "w") as f:
        f.write(f'[node]\nid = "tc"\ndata_dir = "{tmp}/var{int(tls)}"\n[auth]\nsecret = "{SECRET}"\n'
                f'[listen]\nxmpp = ""\ncomet = ""\nadmin = ""\ncontrol = ""\ntcp = "127.0.0.1:0"\n'
                f'[tls]\ncert = "{cert}"\nkey = "{key}"\ntcp = {"true" if tls else "false"}\n'
                f'[limits]\nheartbeat = 300\nidle_timeout = 900\nauth_timeout = 300\nmsg_rate = 0\n'
                f'[presence]\ngrace = 0\n')
    log_path = os.path.join(tmp, f"imd-{int(tls)}.log")
    logf = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "imd", "-c", cfg], cwd=tmp, stdout=logf,
                            stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=ROOT))
    logf.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = open(log_path).read()
        if "ready node=" in text:
            import re
            port = int(re.search(r"listening name=tcp addr=[\d.]+:(\d+)", text).group(1))
            return proc, port
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("imd did not start:\n" + open(log_path).read())


def handshakes(args) -> int:
    port, ca, n = args
    ctx = ssl.create_default_context(cafile=ca)
    done = 0
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost"):
                done += 1
    return done


def run(tmp: str, tls: bool, ca: TestCA, cert: str, key: str, conns: int, n_handshakes: int) -> dict:
    proc, port = start(tmp, tls, cert, key)
    out = {"tls": tls}
    try:
        ctx = ca.client_context() if tls else False
        base = steady_rss(proc.pid)
        clients = []
        for i in range(conns):
            c = Client("127.0.0.1", port, tls=ctx, server_hostname="localhost")
            c.auth(issue(SECRET, f"tc{i}", "guest", 3600), device="d1")
            clients.append(c)
        loaded = steady_rss(proc.pid)
        out.update(conns=conns, rss_before_kib=base // 1024, rss_after_kib=loaded // 1024,
                   bytes_per_conn=round((loaded - base) / conns))
        if tls:
            out["version"] = clients[0].sock.version()
            out["cipher"] = clients[0].sock.cipher()[0]
        for c in clients:
            c.close()
        if tls and n_handshakes:
            time.sleep(1)
            cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
            with multiprocessing.Pool(2) as pool:
                done = sum(pool.map(handshakes, [(port, ca.cert, n_handshakes // 2)] * 2))
            cpu1, t1 = cpu_seconds(proc.pid), time.monotonic()
            out.update(handshakes=done, server_cpu_s=round(cpu1 - cpu0, 2), wall_s=round(t1 - t0, 2),
                       handshakes_per_server_cpu_s=round(done / max(cpu1 - cpu0, 1e-6)),
                       handshakes_per_wall_s=round(done / (t1 - t0)))
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conns", type=int, default=3000)
    ap.add_argument("--handshakes", type=int, default=2000)
    ap.add_argument("--key", choices=("ec", "rsa"), default="ec")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="imd-tls-cost-")
    ca = TestCA(os.path.join(tmp, "ca"))
    cert, key = ca.issue("srv", rsa=a.key == "rsa")
    plain = run(tmp, False, ca, cert, key, a.conns, 0)
    tls = run(tmp, True, ca, cert, key, a.conns, a.handshakes)
    print(orjson.dumps({"key": a.key, "plain": plain, "tls": tls,
                        "tls_extra_bytes_per_conn": tls["bytes_per_conn"] - plain["bytes_per_conn"],
                        "loadavg": open("/proc/loadavg").read().split()[:3]}, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
