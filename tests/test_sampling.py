"""The length-grouped training sampler: same padding savings as transformers', batches in random order."""
import random

from tunepipe.trainers.data import EpochSeededLengthGroupedSampler


def _batches(order, size):
    return [order[i:i + size] for i in range(0, len(order), size)]


def _lengths(n=1000, seed=0):
    rng = random.Random(seed)
    return [rng.randint(5, 300) for _ in range(n)]


def test_each_example_once_and_batches_hold_similar_lengths():
    lengths, size = _lengths(1003), 16
    order = EpochSeededLengthGroupedSampler(size, lengths, seed=1).indices(0)
    assert sorted(order) == list(range(len(lengths)))
    padded = sum(max(lengths[i] for i in b) * len(b) for b in _batches(order, size))
    rng = random.Random(1)
    shuffled = rng.sample(range(len(lengths)), len(lengths))
    padded_random = sum(max(lengths[i] for i in b) * len(b) for b in _batches(shuffled, size))
    assert padded < 1.1 * sum(lengths) < padded_random


def test_batches_are_not_swept_from_long_to_short():
    """transformers' sampler yields each mega-batch's batches sorted by length (a long -> short sweep); here the
    order of batches is random, so batch lengths barely correlate with position."""
    lengths, size = _lengths(3200), 16
    order = EpochSeededLengthGroupedSampler(size, lengths, seed=3).indices(0)
    maxima = [max(lengths[i] for i in b) for b in _batches(order, size)]
    descents = sum(a > b for a, b in zip(maxima[1:], maxima[2:]))  # the first batch is the longest on purpose
    assert maxima[0] == max(lengths)
    assert 0.3 < descents / (len(maxima) - 2) < 0.7


def test_short_last_batch_stays_last_and_epochs_differ_deterministically():
    lengths, size = _lengths(1003), 16
    sampler = EpochSeededLengthGroupedSampler(size, lengths, seed=5)
    first, second = list(sampler), list(sampler)  # iterating advances the epoch
    assert first == sampler.indices(0) and second == sampler.indices(1) and first != second
    assert first == EpochSeededLengthGroupedSampler(size, lengths, seed=5).indices(0)
    batches = _batches(first, size)
    assert len(batches[-1]) == len(lengths) % size
    assert all(len(b) == size for b in batches[:-1])
