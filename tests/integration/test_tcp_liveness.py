"""Heartbeats and slow consumers on the raw-TCP listener."""

import socket
import struct

import orjson


from tests.daemon import Imd, token


def test_server_pings_a_silent_client_then_closes_it(tmp_path):
    d = Imd(tmp_path, {"limits": {"heartbeat": 1, "idle_timeout": 3}}).start()
    try:
        c = d.login("quiet")
        assert c.hello["heartbeat"] == 1
        assert c.wait_for(lambda e: e["type"] == "ping", timeout=5) == {"type": "ping"}
        c.send({"type": "pong"})          # counts as traffic: the deadline moves
        env = c.wait_for(lambda e: e["type"] == "close", timeout=10)
        assert env["code"] == 408 and env["reconnect"] is True
        assert all(e["type"] == "ping" for e in c.drain(3))    # then EOF
        c.sock.settimeout(5)
        assert c.sock.recv(1) == b""
    finally:
        d.stop()


def test_slow_consumer_is_cut_off_others_unaffected(tmp_path):
    d = Imd(tmp_path, {"limits": {"send_buffer": 65536}}).start()
    try:
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(d.addr["tcp"])
        data = orjson.dumps({"type": "auth", "token": token("slow"), "platform": "ios", "device": "d"})
        slow.sendall(struct.pack(">I", len(data)) + data)
        fast = d.login("fast")
        sender = d.login("loud", "host")
        big = "x" * 15000
        for i in range(800):                 # 12 MB towards a reader that never reads: more
                                             # than the kernel's socket buffers hold
            sender.msg("slow", big)
            sender.msg("fast", "tick")
        fast_msgs = 0
        while fast_msgs < 800:
            if fast.recv(10)["type"] == "msg":
                fast_msgs += 1
        # the slow connection was closed by the server: reading ends in EOF/reset
        slow.settimeout(10)
        total = 0
        try:
            while True:
                chunk = slow.recv(1 << 20)
                if not chunk:
                    break
                total += len(chunk)
        except ConnectionResetError:
            pass
        assert total < 12_000_000
        assert "slow consumer" in d.log_text()
        assert sender.ping() == {"type": "pong"}
    finally:
        d.stop()
