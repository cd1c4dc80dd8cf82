"""A PostgreSQL server of one test's own, to stop and start for real.

The machine's PostgreSQL (127.0.0.1:5432) is shared by every test; a test that
stops the server runs its own instead: ``initdb`` into a fresh directory (as the
``postgres`` user when the tests run as root, since PostgreSQL refuses to run as
root), trust authentication, listening on 127.0.0.1 on a free port and on a
socket in that directory. ``stop()`` is a fast shutdown (every connection is
dropped, as in a restart), ``start()`` brings it back on the same port and data.
"""

import glob
import os
import shutil
import socket
import subprocess
import tempfile


def _bindir() -> str:
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))
    if not dirs:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql")
    return dirs[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivatePostgres:
    def __init__(self):
        self.bin = _bindir()
        self.dir = tempfile.mkdtemp(prefix="imd-pg-")
        self.data = os.path.join(self.dir, "data")
        self.port = _free_port()
        self._as = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
        if self._as:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres connect_timeout=2"

    def _run(self, tool, *args):
        subprocess.run([*self._as, os.path.join(self.bin, tool), *args], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)

    def start(self) -> "PrivatePostgres":
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "-D", self.data, "-o", opts, "-l", os.path.join(self.dir, "log"), "-w", "start")
        return self

    def stop(self) -> None:
        self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass                        # already stopped
        shutil.rmtree(self.dir, ignore_errors=True)
