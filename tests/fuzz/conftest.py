"""Fixtures of the fuzz tests."""

# ``fp``: the pure-Python twin, then the Cython build, as in the parity tests
from tests.test_fastpath import fp  # noqa: F401
