"""Device prefetch: batches placed ahead of the step, the checkpointed state that of the consumed batches."""
import jax
import numpy as np
import pytest

from beitv2_jax.data import pipeline
from beitv2_jax.train import prefetch, sharding


def _stream():
    source = [{'index': np.int64(i)} for i in range(40)]
    return pipeline.make_dataset(source, transform=lambda r: {'index': r['index']}, global_batch_size=4,
                                 process_index=0, process_count=1, seed=5)


def test_state_is_that_of_the_consumed_batches_and_close_rewinds():
    mesh = sharding.make_mesh({'data': -1}, devices=jax.devices()[:1])
    reference = [b['index'] for b, _ in zip(iter(_stream()), range(7))]
    iterator = iter(_stream())
    placed = []

    def place(batch, index):
        placed.append(index)
        return sharding.to_global_batch(batch, mesh)

    feed = prefetch.DevicePrefetch(iterator, place, size=3, limit=6)
    assert feed.get_state() == {'next_batch': 0}
    for k in range(4):
        batch = next(feed)
        assert isinstance(batch['index'], jax.Array)
        np.testing.assert_array_equal(np.asarray(batch['index']), reference[k])
        read = min(k + 3, 6)  # the batch handed out and up to 2 more are read and placed
        assert feed.get_state() == {'next_batch': k + 1}  # consumed, not read
        assert iterator.get_state() == {'next_batch': read} and feed.queued == read - (k + 1)
    feed.close()  # the read-ahead batches are given back: the wrapped iterator continues at batch 4
    assert iterator.get_state() == {'next_batch': 4}
    np.testing.assert_array_equal(next(iterator)['index'], reference[4])
    assert placed == list(range(6))  # never past the limit


def test_limit_size_zero_and_finite_iterators():
    feed = prefetch.DevicePrefetch(iter(range(5)), lambda x, i: (x, i), size=0, limit=3)
    assert list(feed) == [(0, 0), (1, 1), (2, 2)]
    assert list(prefetch.DevicePrefetch(iter(range(3)), lambda x, i: x, size=8)) == [0, 1, 2]
    with pytest.raises(AttributeError, match='no get_state'):
        prefetch.DevicePrefetch(iter(range(3)), lambda x, i: x).get_state()
    with pytest.raises(ValueError, match='>= 0'):
        prefetch.DevicePrefetch(iter(()), lambda x, i: x, size=-1)
