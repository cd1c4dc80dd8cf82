"""``python -m imd`` with the comet and admin listeners added to the daemon's
protocols, for as long as imd/daemon.py does not create them itself."""

import sys

from gevent import monkey

monkey.patch_all()

from imd import daemon  # noqa: E402
from imd.cli import main  # noqa: E402


_protocols = daemon.Daemon.protocols


def protocols(self) -> dict:
    out = _protocols(self)
    if "comet" not in out:
        from imd.proto.admin import AdminProtocol
        from imd.proto.comet.front import CometProtocol
        front = CometProtocol(self.router, self.cfg.node.id)
        out["comet"] = front
        out["admin"] = AdminProtocol(self.router, self.node, front)
    return out


daemon.Daemon.protocols = protocols

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
