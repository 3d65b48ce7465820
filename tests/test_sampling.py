"""The length-grouped training sampler: same padding savings as transformers', batches in random order."""
import random

import pytest

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
    assert padded < 1.15 * sum(lengths) < 1.5 * sum(lengths) < padded_random  # 8 batches per group by default


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


def _mean_spread(order, lengths, size):
    return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in _batches(order, size)) / (
        len(order) / size)


def test_fewer_group_batches_give_more_varied_batches_for_some_padding():
    """``training.length_group_batches``: lengths are sorted together in groups of that many batches. Fewer make
    batches of more varied lengths (what training quality needs) at a cost in padding, still far below random."""
    lengths, size = _lengths(3200), 16
    orders = {k: EpochSeededLengthGroupedSampler(size, lengths, seed=2, group_batches=k).indices(0) for k in (2, 8, 50)}
    spread = {k: _mean_spread(o, lengths, size) for k, o in orders.items()}
    padded = {k: sum(max(lengths[i] for i in b) * len(b) for b in _batches(o, size)) for k, o in orders.items()}
    shuffled = random.Random(2).sample(range(len(lengths)), len(lengths))
    assert spread[2] > spread[8] > spread[50]
    assert padded[50] < padded[8] < padded[2] < sum(max(lengths[i] for i in b) * len(b)
                                                    for b in _batches(shuffled, size))
    assert all(sorted(o) == list(range(len(lengths))) for o in orders.values())


def test_small_data_keeps_transformers_cap_of_a_quarter_of_the_batches():
    """200 examples in batches of 16: at most 200 // 64 = 3 batches are sorted together, whatever is asked."""
    lengths, size = _lengths(200), 16
    capped = EpochSeededLengthGroupedSampler(size, lengths, seed=4, group_batches=50).indices(0)
    assert capped == EpochSeededLengthGroupedSampler(size, lengths, seed=4, group_batches=3).indices(0)
    assert capped != EpochSeededLengthGroupedSampler(size, lengths, seed=4, group_batches=2).indices(0)


@pytest.mark.parametrize("backend", ["hf", "accelerate", "lightning"])
def test_length_group_batches_reaches_the_sampler_on_the_backends(tiny_specs, ner_data, backend, tmp_path,
                                                                  monkeypatch):
    from tunepipe import FineTunePipeLine
    from tunepipe.trainers import data as trainer_data
    seen = []
    original = trainer_data.EpochSeededLengthGroupedSampler.__init__

    def spy(self, batch_size, lengths, seed, group_batches=None):
        seen.append(group_batches)
        original(self, batch_size, lengths, seed, group_batches)

    monkeypatch.setattr(trainer_data.EpochSeededLengthGroupedSampler, "__init__", spy)
    specs = tiny_specs("token_classification", ner_data, backend=backend,
                       training={"max_steps": 1, "eval_strategy": "no", "save_strategy": "no",
                                 "length_group_batches": 3})
    pipe = FineTunePipeLine(specs)
    pipe.setup()
    pipe.train()
    assert seen and set(seen) == {3}


def test_length_group_batches_default_per_task():
    """Token classification sorts 8 batches together; the other tasks keep transformers' up-to-50 (question
    answering lost F1 with 8); a value the user sets wins over either."""
    from tunepipe.specs import load_specs
    from tunepipe.specs.schema import LENGTH_GROUP_BATCHES
    base = {"model": "minilm", "data": {"train": "train.jsonl"}}
    assert LENGTH_GROUP_BATCHES == 50
    assert load_specs({"task": "token_classification", **base}).training.length_group_batches == 8
    for task in ("question_answering", "text_classification", "translation"):
        assert load_specs({"task": task, **base}).training.length_group_batches == 50, task
    chosen = load_specs({"task": "token_classification", **base, "training": {"length_group_batches": 4}})
    assert chosen.training.length_group_batches == 4
