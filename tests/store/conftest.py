"""Fixtures of the store contract suite: every test runs once per backend in BACKENDS."""

from gevent import monkey

monkey.patch_all()

import pytest  # noqa: E402

from .backends import BACKENDS, PostgresBackend  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _drop_test_database():
    yield
    PostgresBackend.drop_database()


@pytest.fixture(params=sorted(BACKENDS))
def backend(request, tmp_path):
    """A backend factory with empty data (the one parametrization of the suite)."""
    factory = BACKENDS[request.param](tmp_path)
    yield factory
    factory.cleanup()


@pytest.fixture
def store(backend):
    """An opened store of ``backend``, closed after the test."""
    s = backend.make()
    s.open()
    yield s
    s.close()
