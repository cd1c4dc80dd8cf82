"""The load generator against a real peer (a private mosquitto started by bench/peers.py)."""
import shutil
import socket
import time

import pytest

from bench import loadgen as lg
from bench import peers

pytestmark = pytest.mark.skipif(shutil.which("mosquitto") is None, reason="run bench/setup.sh")


def test_fleet_connects_subscribes_and_counts_deliveries():
    with peers.Mosquitto() as broker, lg.Fleet({"kind": "mqtt", "port": broker.port, "topic": "t"},
                                               processes=2, deadline=60) as fleet:
        ok, failed, _ = fleet.connect(200)
        assert (ok, failed) == (200, 0)
        with socket.create_connection(("127.0.0.1", broker.port)) as pub:
            pub.sendall(lg.mqtt_connect("pub"))
            assert pub.recv(4) == lg.MQTT_CONNACK_OK
            for _ in range(5):
                pub.sendall(lg.mqtt_publish("t", b"payload " + lg.MARK))
            deadline = time.monotonic() + 10
            while fleet.count()[0] < 1000 and time.monotonic() < deadline:
                time.sleep(0.02)
        assert fleet.count() == (1000, 200, 0)


def test_fleet_reports_refused_connections():
    port = peers.free_port()
    with lg.Fleet({"kind": "mqtt", "port": port}, deadline=30) as fleet:
        ok, failed, _ = fleet.connect(10, timeout=5)
        assert (ok, failed) == (0, 10)
        assert "connect failed" in fleet.errors()[0]
