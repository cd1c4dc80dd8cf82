"""Subprocess of the kill -9 test: stores messages without end, printing each ack.

Usage: python -m tests.store.ack_writer SPEC. Each ack is one line
"mid sender_seq recipient_seq", written with os.write as soon as it arrives.
"""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402

from imd.store.base import StoreFull  # noqa: E402
from tests.store.backends import store_from_spec  # noqa: E402


def main() -> None:
    store = store_from_spec(sys.argv[1], batch_max=50)
    store.open()

    def acked(result, error):
        if error is None:
            os.write(1, b"%s %d %d\n" % (result.mid.encode(), result.sender_seq,
                                          result.recipient_seq))

    i = 0
    while True:
        try:
            store.send_message("ka", "kb", "c%d" % i, {"i": i}, None, "m%d" % i, i, acked)
            i += 1
        except StoreFull:
            gevent.sleep(0.01)
        if i % 20 == 0:
            gevent.sleep(0.001)


if __name__ == "__main__":
    main()
