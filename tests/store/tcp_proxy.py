"""A cuttable TCP forwarder for outage tests: 127.0.0.1:<port> → a real server.

``cut()`` closes every forwarded connection and stops listening (clients see the
server vanish, new connections are refused); ``restore()`` listens again on the
same port. Runs in greenlets of the calling process.
"""

import gevent
from gevent import socket
from gevent.server import StreamServer


class TcpProxy:
    def __init__(self, upstream: tuple) -> None:
        self.upstream = upstream
        self.port = 0
        self._server = None
        self._socks: set = set()
        self._pipes: set = set()

    @property
    def server(self) -> str:
        return "host=127.0.0.1 port=%d" % self.port

    def start(self) -> "TcpProxy":
        self._server = StreamServer(("127.0.0.1", self.port), self._handle)
        self._server.start()
        self.port = self._server.address[1]
        return self

    def _handle(self, client, _address) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        self._socks.update((client, upstream))
        pipes = [gevent.spawn(self._pipe, client, upstream), gevent.spawn(self._pipe, upstream, client)]
        self._pipes.update(pipes)
        gevent.joinall(pipes)
        self._pipes.difference_update(pipes)
        for s in (client, upstream):
            self._socks.discard(s)
            s.close()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def cut(self) -> None:
        self._server.stop(timeout=0)
        for pipe in list(self._pipes):
            pipe.kill(block=False)
        for s in list(self._socks):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._socks.clear()

    def restore(self) -> None:
        self.start()

    def stop(self) -> None:
        self.cut()


def spawn(upstream_port: int = 5432):
    """Run the proxy in a subprocess (for tests whose daemon is another process);
    ``proc.port`` is where it listens. SIGUSR1 cuts, SIGUSR2 restores."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-m", "tests.store.tcp_proxy", str(upstream_port)], cwd=root,
                            stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=root))
    proc.port = int(proc.stdout.readline())
    return proc


def main() -> None:
    """``python -m tests.store.tcp_proxy UPSTREAM_PORT``: print the port, then forward;
    SIGUSR1 cuts, SIGUSR2 restores, SIGTERM ends."""
    import os
    import signal
    import sys

    proxy = TcpProxy(("127.0.0.1", int(sys.argv[1]))).start()
    gevent.signal_handler(signal.SIGUSR1, lambda: gevent.spawn(proxy.cut))
    gevent.signal_handler(signal.SIGUSR2, lambda: gevent.spawn(proxy.restore))
    os.write(1, b"%d\n" % proxy.port)
    while True:                    # keeps the loop alive while the proxy is cut
        gevent.sleep(1)


if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()
    main()
