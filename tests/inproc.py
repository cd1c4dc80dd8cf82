"""An imd node inside the (gevent-patched) test process, for tests that need
its Python API (notices, contacts) next to real raw-TCP clients."""

from __future__ import annotations

from imd.config import load_dict
from imd.daemon import Daemon
from tests.daemon import SECRET


def start(tmp_path, overrides: dict | None = None) -> Daemon:
    data = {
        "node": {"id": "p1", "data_dir": str(tmp_path / "var")},
        "auth": {"secret": SECRET},
        "listen": {"tcp": "127.0.0.1:0", "comet": "", "xmpp": "", "admin": "", "control": ""},
        "presence": {"grace": 0.3},
        "limits": {"msg_rate": 0},
    }
    for sec, vals in (overrides or {}).items():
        data.setdefault(sec, {}).update(vals)
    d = Daemon(load_dict(data))
    d.start()
    return d


def addr(d: Daemon, name: str = "tcp"):
    return next(l.address for l in d.listeners if l.name == name)
