"""Data as the Trainer feeds it: sampling per ``train_sampling_strategy``, token-weighted loss, model columns,
and where a loop is in the data (checkpoints' data_state.json)."""
from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch

from ..specs.schema import LENGTH_GROUP_BATCHES
from .settings import Schedule


class EpochSeededLengthGroupedSampler:
    """Length-grouped batches in shuffled order, re-seeded with ``seed + epoch`` at every pass.

    As in transformers' LengthGroupedSampler, the shuffled examples are cut into mega-batches, each sorted by
    length and cut into batches. Two changes. (1) A mega-batch holds ``group_batches`` batches
    (``training.length_group_batches``: up to 50 as in transformers, 8 for token classification, where sorting 50
    batches' examples together put near-identical sentences in every batch and cost F1; docs/backends.md,
    "Sampling"). (2) The batches come in random
    order, the longest first so an out-of-memory error shows at step one: transformers yields each mega-batch from
    its longest to its shortest batch, a sweep repeated all epoch long. The Trainer's sampler draws from the
    global RNG, which dropout advances differently on each rank; the epoch seed gives every rank the same order in
    every epoch."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int, group_batches: int = LENGTH_GROUP_BATCHES):
        self.batch_size, self.lengths = batch_size, list(lengths)
        self.seed, self.epoch, self.group_batches = seed, 0, group_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        yield from self.indices(self.epoch)
        self.epoch += 1

    def indices(self, epoch: int) -> list[int]:
        from transformers.trainer_pt_utils import get_length_grouped_indices
        generator = torch.Generator().manual_seed(self.seed + epoch)
        # transformers' rule for small data (a quarter of the batches at most) still applies
        mult = max(1, min(self.group_batches, len(self.lengths) // (4 * self.batch_size)))
        grouped = get_length_grouped_indices(self.lengths, self.batch_size, mega_batch_mult=mult, generator=generator)
        batches = [grouped[i:i + self.batch_size] for i in range(0, len(grouped), self.batch_size)]
        # the first batch holds the longest example; a short final batch stays last so that every batch the
        # DataLoader cuts from this stream is one of these groups
        middle_end = len(batches) - (1 if len(batches) > 1 and len(batches[-1]) < self.batch_size else 0)
        middle = batches[1:middle_end]
        order = torch.randperm(len(middle), generator=generator).tolist()
        batches = batches[:1] + [middle[i] for i in order] + batches[middle_end:]
        return [i for batch in batches for i in batch]


class TokenWeightedLoss:
    """Scales a batch's mean loss by its label tokens over the expected count for a batch of its size.

    Length-grouped batches hold only short or only long examples, and a loss averaged inside each batch then
    weighs a token of a short-sentence batch several times more than one of a long-sentence batch (x8 on
    CoNLL-2003 NER). Weighting each batch by its token count gives back the
    token-mean objective of random batches and keeps grouping's padding savings."""

    def __init__(self, tokens_per_example: float):
        self.tokens_per_example = tokens_per_example

    def __call__(self, loss, batch: dict[str, Any]):
        labels = batch.get("labels") if isinstance(batch, dict) else None
        if labels is None or labels.dim() < 2:
            return loss
        return loss * ((labels != -100).sum() / (self.tokens_per_example * labels.shape[0]))


def token_weighted_loss(specs, dataset, sample_size: int = 10_000) -> TokenWeightedLoss | None:
    """The weighting for this run: on under ``token_weighted_loss: auto`` when batches are length-grouped and
    the labels are per token (tagging, seq2seq targets); None otherwise (one label per example needs none)."""
    setting = specs.training.token_weighted_loss
    if setting is False or dataset is None or "labels" not in getattr(dataset, "column_names", ()):
        return None
    if setting == "auto" and specs.training.train_sampling_strategy != "group_by_length":
        return None
    if is_stream(dataset):  # the stream's first features
        rows = [f["labels"] for f in dataset.head(min(sample_size, 500))]
    else:
        rows = list(dataset.select(range(min(len(dataset), sample_size)))["labels"])  # datasets 5: a Column
    if not rows or not isinstance(rows[0], (list, tuple)):
        return None
    mean = sum(sum(1 for v in row if v != -100) for row in rows) / len(rows)
    return TokenWeightedLoss(mean) if mean > 0 else None


def is_stream(dataset) -> bool:
    """data.streaming's train split (data/stream.py): batches come from the stream, not from a sampler."""
    return bool(getattr(dataset, "streaming", False))


def num_examples(dataset) -> int:
    """Examples in the train split; -1 for a stream (recorded in checkpoints' data state)."""
    return -1 if is_stream(dataset) else len(dataset)


def keep_train_columns(dataset, model):
    keep = model_columns(model)
    return dataset.with_columns(keep) if is_stream(dataset) else keep_model_columns(dataset, model)


def train_sampler(dataset, args, tokenizer=None, group_batches: int = LENGTH_GROUP_BATCHES):
    """Sampler per ``training.train_sampling_strategy`` (group_by_length | random | sequential), seeded from
    ``data_seed`` or ``seed`` like the Trainer's; ``group_batches``: ``training.length_group_batches``.
    Iterated identically on every rank; sharding happens after."""
    from accelerate.data_loader import SeedableRandomSampler
    from torch.utils.data import SequentialSampler
    seed = args.data_seed if args.data_seed is not None else args.seed
    strategy = args.train_sampling_strategy
    if strategy == "sequential":
        return SequentialSampler(dataset)
    if strategy == "group_by_length":
        column = args.length_column_name
        if column in dataset.column_names:
            lengths = list(dataset[column])
        else:
            name = tokenizer.model_input_names[0] if tokenizer is not None else "input_ids"
            lengths = [len(x) for x in dataset[name]]
        # groups of one optimizer step's examples across all ranks: the ranks' batches of a step are then the
        # halves (thirds, ...) of the batch one process with the same global batch would train on
        step_examples = args.train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
        return EpochSeededLengthGroupedSampler(step_examples, lengths, seed, group_batches)
    if strategy not in ("random",):
        warnings.warn(f"train_sampling_strategy '{strategy}' is not supported by this backend: random is used",
                      stacklevel=2)
    return SeedableRandomSampler(data_source=dataset, data_seed=seed)


def eval_order(dataset) -> list[int]:
    """Longest first (less padding, early OOM), stable; predictions are put back in dataset order afterwards."""
    if "length" in dataset.column_names:
        lengths = dataset["length"]
        return sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return list(range(len(dataset)))


def model_columns(model) -> list[str]:
    """Columns the model's forward accepts (the Trainer drops the others, e.g. ``length``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = list(inspect.signature(base.forward).parameters)
    return names + ["label", "label_ids"] + label_names(model)


def keep_model_columns(dataset, model):
    keep = set(model_columns(model))
    unused = [c for c in dataset.column_names if c not in keep]
    return dataset.remove_columns(unused) if unused else dataset


def label_names(model) -> list[str]:
    from transformers.utils import find_labels
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return find_labels(base.__class__)


class DictCollator:
    """The task's collator, returning a plain dict (Lightning rebuilds Mapping types when moving batches)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        return dict(self.collator(features))



def data_state(args, schedule: Schedule, num_examples: int, world_size: int, global_step: int) -> dict[str, Any]:
    """Where the loop is in the data after ``global_step`` optimizer steps: the epoch, the batches of it already
    consumed, and what must match for that position to mean the same on resume."""
    epoch, done = divmod(global_step, schedule.updates_per_epoch)
    return {"global_step": global_step, "epoch": epoch,
            "batches_consumed_in_epoch": done * args.gradient_accumulation_steps,
            "steps_in_epoch": schedule.steps_in_epoch, "updates_per_epoch": schedule.updates_per_epoch,
            "num_examples": num_examples, "world_size": world_size,
            "train_sampling_strategy": args.train_sampling_strategy,
            "sampler_seed": args.data_seed if args.data_seed is not None else args.seed}


class IndexedDataset(torch.utils.data.Dataset):
    """Evaluation rows carry their dataset index, so predictions gathered from all ranks go back in order."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return {**self.dataset[i], "__index__": i}


class IndexedCollator:
    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        index = torch.tensor([f.pop("__index__") for f in features])
        return {**self.collator(features), "__index__": index}
