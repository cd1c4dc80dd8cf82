"""Fixtures of the fault tests."""

import itertools
import os

import psycopg
import pytest

PG = "host=127.0.0.1 port=5432 user=postgres"
_names = itertools.count()


@pytest.fixture
def database():
    """A fresh PostgreSQL database on 127.0.0.1:5432 (its name), dropped after the test;
    the test is skipped when there is no PostgreSQL."""
    name = "imd_fault_%d_%d" % (os.getpid(), next(_names))
    try:
        with psycopg.connect(PG + " dbname=test", autocommit=True, connect_timeout=5) as con:
            con.execute("DROP DATABASE IF EXISTS %s WITH (FORCE)" % name)
            con.execute("CREATE DATABASE %s" % name)
    except psycopg.OperationalError as e:
        pytest.skip(f"no PostgreSQL at 127.0.0.1:5432: {e}")
    yield name
    with psycopg.connect(PG + " dbname=test", autocommit=True) as con:
        con.execute("DROP DATABASE IF EXISTS %s WITH (FORCE)" % name)
