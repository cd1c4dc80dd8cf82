"""``python tests/proto/xmpp/run_imd.py -c FILE``: imd with the XMPP listener registered.

imd.daemon.Daemon.protocols() does not list "xmpp" yet; this runner adds it
(if absent), and the comet and admin listeners through the comet tests' runner
(if present), then runs the ordinary ``imd`` entry point.
"""

import sys

from gevent import monkey

monkey.patch_all()

from imd import daemon  # noqa: E402

try:
    import tests.proto.comet.run_imd  # noqa: E402,F401  (adds comet and admin)
except ImportError:
    pass
from imd.cli import main  # noqa: E402
from imd.proto.xmpp.listener import XmppProtocol  # noqa: E402

_protocols = daemon.Daemon.protocols


def protocols(self):
    found = _protocols(self)
    if "xmpp" not in found:
        found["xmpp"] = XmppProtocol(self.router, self.cfg)
    return found


daemon.Daemon.protocols = protocols

if __name__ == "__main__":
    sys.exit(main())
