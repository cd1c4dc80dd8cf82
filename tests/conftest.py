"""Session set-up shared by all tests: the test process runs gevent-patched, like
the daemon, and the Cython fast path is built in place first."""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    """Build the Cython extension imd._fastpath in place before any test module is
    imported, so that no test runs against a stale build. A failed build is not an
    error: imd.fastpath then uses the pure-Python twin and tests/test_fastpath.py
    skips its cython cases, citing this output (kept as ``config.imd_fastpath_build``)."""
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=ROOT,
                          capture_output=True, text=True)
    config.imd_fastpath_build = proc.stderr[-2000:]


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _no_leftover_daemons():
    """A test that fails half-way must not leave an imd process behind (checked
    per module, so that module-scoped daemons live as long as their module)."""
    yield
    from tests.daemon import kill_leftovers
    kill_leftovers()
