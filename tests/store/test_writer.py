"""The backend-neutral Writer: gathering small batches (``batch_wait``), tested on a fake backend."""

import gevent

from imd.store.writer import Writer


class Op:
    def __init__(self, acks):
        self.callback = lambda result, error: acks.append((result, error))


def make(batch_wait):
    batches = []

    def apply_batch(lane, ops, pending):
        batches.append(len(ops))
        return [None] * len(ops)
    writer = Writer(apply_batch, lambda exc: False, batch_wait=batch_wait)
    writer.start()
    return writer, batches


def test_a_lone_op_is_not_held():
    """Writes arriving slower than one per batch_wait (three ops in a row count as at most
    30/s over the rate's 0.1 s span; 30/s × 0.01 s < 1): every op goes at once, no gathering."""
    writer, batches = make(batch_wait=0.01)
    acks = []
    try:
        for _ in range(3):
            writer.submit(Op(acks), "k")
            assert writer.flush(10)
        assert batches == [1, 1, 1] and len(acks) == 3
        assert writer.stats()["gathers"] == 0
    finally:
        writer.stop()


def test_a_small_batch_waits_for_ops_that_keep_arriving():
    """20 ops at once: the lane waits (once) and the 10 submitted meanwhile join the batch."""
    writer, batches = make(batch_wait=0.05)
    acks = []
    try:
        for _ in range(20):
            writer.submit(Op(acks), "k")
        more = gevent.spawn(lambda: [writer.submit(Op(acks), "k") for _ in range(10)])
        assert writer.flush(10)
        more.join()
        assert writer.flush(10)
        assert batches == [30] and len(acks) == 30
        assert writer.stats()["gathers"] == 1
    finally:
        writer.stop()


def test_no_gathering_when_off_and_stop_during_a_wait_delivers_everything():
    writer, batches = make(batch_wait=0)
    acks = []
    for _ in range(20):
        writer.submit(Op(acks), "k")
    assert writer.flush(10)
    assert batches == [20] and writer.stats()["gathers"] == 0
    writer.stop()
    writer, batches = make(batch_wait=0.05)
    for _ in range(20):
        writer.submit(Op(acks), "k")
    assert writer.stop(10)              # flushes through the wait
    assert batches == [20] and len(acks) == 40 and all(e is None for _, e in acks)
