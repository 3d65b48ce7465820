"""``data.streaming: true``: the train split read while training runs, in constant memory.

Records are read and checked as they come (a bad one stops the run with its file and line, or is skipped and
counted), dealt to the ranks by ``datasets.distributed.split_dataset_by_node`` (whole files when they divide
evenly, else every world-size-th record), shuffled in a buffer (``data.shuffle_buffer``), tokenized by the task
in batches of records (QA windows and LM packing work as on map-style data), grouped by length inside a buffer of
``training.length_group_batches`` batches when the run groups by length, and cut into batches. Nothing is read before the first step.

A stream has no length, so ``training.max_steps`` says how long to train; when the files end, the next pass
starts, reshuffled. The order is a function of (seed, pass, rank), so resuming replays the stream and drops the
batches already trained on (read and tokenized again, but not collated or trained): exact, at the cost of
re-reading what was consumed.
"""
from __future__ import annotations

import logging
import random
from typing import Any, Iterator

import torch

from ..errors import ConfigError, DatasetLoadError

log = logging.getLogger("tunepipe")
TOKENIZE_BATCH = 1000


def check_streaming_specs(specs, task) -> None:
    """What a stream cannot do, said before anything is read."""
    data, t = specs.data, specs.training
    if t.max_steps is None or t.max_steps <= 0:
        raise ConfigError("data.streaming needs training.max_steps: a stream has no length, so epochs cannot say "
                          "how long to train", field="training.max_steps",
                          suggestions=["set training.max_steps (optimizer steps); the stream starts over, "
                                       "reshuffled, when its files end",
                                       "records seen = max_steps x per_device_train_batch_size x "
                                       "gradient_accumulation_steps x processes"])
    if data.validation_split:
        raise ConfigError("data.validation_split cannot carve validation data out of a stream",
                          field="data.validation_split",
                          suggestions=["give data.validation a file (it is read map-style, not streamed)"])
    if task.uses_labels and not data.labels:
        raise ConfigError("data.streaming needs data.labels: the label set cannot be read from a stream before "
                          "training", field="data.labels",
                          suggestions=["list the label names in id order, e.g. data.labels: [O, B-PER, I-PER]",
                                       "`tunepipe check` on a sample of the data lists the labels it finds"])


class StreamingTrain(torch.utils.data.IterableDataset):
    """This rank's tokenized training features, in stream order (see the module docstring)."""

    streaming = True

    def __init__(self, modules, tokenizer):
        self.modules, self.tokenizer = modules, tokenizer
        self.specs, self.task = modules.specs, modules.task
        self.seed = self.specs.training.data_seed if getattr(self.specs.training, "data_seed", None) is not None \
            else self.specs.training.seed
        self.rank, self.world = 0, 1
        self.keep: set[str] | None = None
        self._head: list[dict[str, Any]] | None = None

    def shard(self, rank: int, world: int) -> "StreamingTrain":
        self.rank, self.world = rank, world
        return self

    def with_columns(self, keep) -> "StreamingTrain":
        self.keep = set(keep)
        return self

    @property
    def column_names(self) -> list[str]:
        head = self.head(1)
        return list(head[0]) if head else []

    def head(self, n: int) -> list[dict[str, Any]]:
        """The first ``n`` features of the first pass on rank 0 (for settings measured on a sample)."""
        if self._head is None or len(self._head) < n:
            rank, world, keep = self.rank, self.world, self.keep
            self.rank, self.world, self.keep = 0, 1, None
            try:
                out = []
                for feature in self.features(0):
                    out.append(feature)
                    if len(out) >= n:
                        break
            finally:
                self.rank, self.world, self.keep = rank, world, keep
            self._head = out
        return self._head[:n]

    def _records(self, epoch: int):
        import datasets
        from datasets.distributed import split_dataset_by_node
        sources = self.modules.sources["train"]

        def generate(shards):
            yield from (row for row, _ in self.modules.checked_rows("train", sources=[sources[i] for i in shards],
                                                                         streaming=True))

        ds = datasets.IterableDataset.from_generator(generate, gen_kwargs={"shards": list(range(len(sources)))})
        if self.world > 1:
            ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world)
        if self.specs.training.train_sampling_strategy != "sequential":
            ds = ds.shuffle(seed=self.seed, buffer_size=self.specs.data.shuffle_buffer)
            ds.set_epoch(epoch)
        return ds

    def features(self, epoch: int) -> Iterator[dict[str, Any]]:
        cap = self.specs.data.max_train_samples
        cap = cap // self.world + (self.rank < cap % self.world) if cap else None
        batch: list[dict[str, Any]] = []
        for n, row in enumerate(self._records(epoch), start=1):
            batch.append(row)
            if len(batch) == TOKENIZE_BATCH:
                yield from self._tokenize(batch)
                batch = []
            if cap and n >= cap:
                break
        if batch:
            yield from self._tokenize(batch)

    def _tokenize(self, rows: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        keys = list(dict.fromkeys(k for row in rows for k in row))
        out = self.task.preprocess({k: [row.get(k) for row in rows] for k in keys}, self.tokenizer)
        columns = [k for k in out if self.keep is None or k in self.keep]
        for i in range(len(out[columns[0]]) if columns else 0):
            yield {k: out[k][i] for k in columns}

    def batches(self, batch_size: int, epoch: int) -> Iterator[list[dict[str, Any]]]:
        """Lists of features, length-grouped inside a buffer when the run groups by length."""
        grouped = self.specs.training.train_sampling_strategy == "group_by_length"
        size = batch_size * (self.specs.training.length_group_batches if grouped else 1)
        rng = random.Random(f"{self.seed}-{epoch}-{self.rank}")
        buffer: list[dict[str, Any]] = []
        for feature in self.features(epoch):
            buffer.append(feature)
            if len(buffer) == size:
                yield from _cut(buffer, batch_size, rng if grouped else None)
                buffer = []
        if buffer:
            yield from _cut(buffer, batch_size, rng if grouped else None)

    def __iter__(self):
        raise TypeError("iterate StreamingTrain through loader(...): it yields batches, not features")


def _cut(features: list[dict[str, Any]], batch_size: int, rng: random.Random | None):
    if rng is not None:
        features = sorted(features, key=lambda f: -len(f.get("input_ids") or ()))
    batches = [features[i:i + batch_size] for i in range(0, len(features), batch_size)]
    if rng is not None and len(batches) > 2:
        middle = batches[1:-1]  # the longest first (an OOM shows at once), a short last batch stays last
        rng.shuffle(middle)
        batches = batches[:1] + middle + batches[-1:]
    yield from batches


class StreamBatches(torch.utils.data.IterableDataset):
    """Collated batches of one rank's stream, pass after pass; the first ``skip`` are formed but neither
    collated nor yielded (resume). ``total``: batches to give in all (a length for the loop's schedule)."""

    def __init__(self, stream: StreamingTrain, batch_size: int, collator, skip: int = 0, total: int | None = None):
        self.stream, self.batch_size, self.collator = stream, batch_size, collator
        self.skip, self.total = skip, total

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError("an endless stream has no length")
        return self.total - self.skip

    def __iter__(self):
        n, epoch = 0, 0
        while True:
            empty = True
            for batch in self.stream.batches(self.batch_size, epoch):
                empty = False
                n += 1
                if n <= self.skip:
                    continue
                if self.total is not None and n > self.total:
                    return
                yield self.collator(batch)
            if empty:
                raise DatasetLoadError("The training stream holds no records" + (
                    f" for process {self.stream.rank} of {self.stream.world}" if self.stream.world > 1 else ""),
                    field="data.train", suggestions=["check data.train; with several processes, give at least as "
                                                     "many records as processes"])
            epoch += 1
            log.info("training stream: pass %d starts (the files ended; reshuffled)", epoch + 1)


def stream_loader(stream: StreamingTrain, batch_size: int, collator, skip: int = 0, total: int | None = None):
    from torch.utils.data import DataLoader
    return DataLoader(StreamBatches(stream, batch_size, collator, skip, total), batch_size=None)
