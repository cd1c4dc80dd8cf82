"""Property tests of imd.envelope.parse (client envelopes from frame payloads).

Properties: for any bytes, any JSON value and any mutation of a valid envelope,
``parse`` returns a dict or raises EnvelopeError (code 400 or 413) — nothing
else; the error answer (``EnvelopeError.envelope()``) always encodes; valid
envelopes come back exactly as sent.
"""

import orjson
from hypothesis import given
from hypothesis import strategies as st

from imd import envelope
from imd.envelope import EnvelopeError
from tests.fuzz.strategies import FUZZ, mutate

MAX_BODY = 256

ident = st.text("abcXYZ019_.-", min_size=1, max_size=64)
cid = st.text("abcXYZ019_.:-", min_size=1, max_size=64)
seq = st.integers(0, 2 ** 53)
json_scalar = st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64 - 1) | st.floats(allow_nan=False,
                                                                                      allow_infinity=False) | st.text(max_size=20)
json_value = st.recursive(json_scalar, lambda kids: st.lists(kids, max_size=4)
                          | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)
ctx = st.dictionaries(st.text("abcXYZ019_.-", min_size=1, max_size=32),
                      st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=40), max_size=16)
body = st.text(min_size=1, max_size=60) | st.dictionaries(st.text(max_size=8), json_scalar, max_size=4)

valid = st.one_of(
    st.fixed_dictionaries({"type": st.just("auth"), "token": st.text(min_size=1, max_size=100),
                           "platform": st.sampled_from(envelope.PLATFORMS), "device": cid},
                          optional={"since": seq}),
    st.fixed_dictionaries({"type": st.just("msg"), "id": cid, "to": ident, "body": body}, optional={"ctx": ctx}),
    st.fixed_dictionaries({"type": st.just("ack"), "seq": seq}),
    st.fixed_dictionaries({"type": st.just("read"), "peer": ident, "seq": seq}),
    st.fixed_dictionaries({"type": st.just("sync"), "since": seq},
                          optional={"limit": st.integers(1, envelope.SYNC_LIMIT)}),
    st.fixed_dictionaries({"type": st.sampled_from(("ping", "pong", "close"))}),
    st.fixed_dictionaries({"type": st.just("presence"), "status": st.sampled_from(envelope.STATUSES)}),
)


def check(data: bytes):
    try:
        env = envelope.parse(data, MAX_BODY)
    except EnvelopeError as e:
        assert e.code in (400, 413)
        answer = orjson.loads(orjson.dumps(e.envelope()))
        assert answer["type"] == "error" and answer["code"] == e.code
        return None
    assert isinstance(env, dict) and isinstance(env["type"], str)
    return env


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes(data):
    check(data)


@FUZZ
@given(json_value)
def test_arbitrary_json(value):
    check(orjson.dumps(value))


@FUZZ
@given(st.dictionaries(st.sampled_from(("type", "id", "to", "body", "ctx", "token", "platform", "device",
                                        "since", "seq", "peer", "limit", "status")),
                       json_value, max_size=8),
       st.sampled_from(sorted(envelope.VALIDATORS)))
def test_arbitrary_fields_of_every_type(fields, kind):
    check(orjson.dumps({**fields, "type": kind}))


@FUZZ
@given(valid)
def test_valid_envelopes_round_trip(env):
    assert check(orjson.dumps(env)) == env


@FUZZ
@given(valid, st.data())
def test_mutated_envelopes(env, draw):
    check(mutate(orjson.dumps(env), draw.draw))


@FUZZ
@given(valid, st.sampled_from(("id", "to", "body", "ctx", "token", "platform", "device", "since", "seq",
                               "peer", "limit", "status")), json_value)
def test_a_field_of_the_wrong_type(env, key, value):
    check(orjson.dumps({**env, key: value}))


@FUZZ
@given(st.text(min_size=MAX_BODY + 1, max_size=MAX_BODY * 2))
def test_oversized_body_is_413_and_not_fatal(text):
    env = {"type": "msg", "id": "c1", "to": "u1", "body": text}
    try:
        envelope.parse(orjson.dumps(env), MAX_BODY)
    except EnvelopeError as e:
        assert (e.code, e.fatal, e.id) == (413, False, "c1")
    else:
        raise AssertionError("an oversized body was accepted")
