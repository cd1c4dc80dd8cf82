"""Test-wide setup: the whole test process runs gevent-patched, like the daemon."""

from gevent import monkey

monkey.patch_all()
