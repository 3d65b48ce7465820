"""DatasetModules: read every split into an Arrow table on disk, checking each record as it goes by, then tokenize
through the Task. Both steps are cached (data/cache.py), so a second run on the same data starts at once."""
from __future__ import annotations

import logging
import math
import os
import random
from pathlib import Path
from typing import Any, Iterator

from ..errors import ConfigError, DatasetLoadError, ErrorHandler
from ..modeling.limits import check_sequences
from . import cache
from .checks import COLUMN_SAMPLE, RecordChecker
from .records import ArrowRecords, ArrowWriter
from .sources import Source, iter_source, resolve, source_key

log = logging.getLogger("tunepipe")

SPLITS = ("train", "validation", "test")
# DataSpec fields that only change tokenizing, not which records are read or how they are checked
TOKENIZING_ONLY = {"max_length", "stride", "chunk_size", "mlm_probability", "packing", "whole_word_mask",
                   "label_all_tokens", "max_target_length", "source_prefix", "source_suffix", "n_best_size",
                   "max_answer_length", "null_score_diff_threshold", "validation_split", "shuffle_buffer", "cache"}
UNSEEN = ("train", "validation", "test")


class DatasetModules:
    """Loads, checks and tokenizes the splits named in ``specs.data`` for one Task."""

    def __init__(self, specs, task):
        self.specs = specs
        self.task = task
        self.records: dict[str, ArrowRecords] = {}
        self.sources: dict[str, list[Source]] = {}
        self.skipped: dict[str, int] = {}
        self.cache_hits: dict[str, bool] = {}  # "records" / "tokens:<split>" -> whether the cache held it
        self._scratch = None
        self.loaded: tuple[str, ...] | None = None  # the splits load() read

    # ---- reading -----------------------------------------------------------------------------------------
    def load(self, splits: tuple[str, ...] | None = None) -> dict[str, ArrowRecords]:
        """Read and check ``splits`` (all by default; train too where the labels or data.validation_split need
        it), settle the label set, carve validation_split."""
        data = self.specs.data
        wanted = set(SPLITS if splits is None else splits)
        if (self.task.labels is None and getattr(self.task, "uses_labels", False)) or (
                "validation" in wanted and data.validation is None and data.validation_split):
            wanted.add("train")
        splits = tuple(s for s in SPLITS if s in wanted)
        if data.train is None and "train" in splits:
            raise DatasetLoadError("No training data given", field="data.train",
                                   suggestions=["set data.train to a file (jsonl, csv, tsv, parquet, txt, conll), a "
                                                "glob or a folder of such files"])
        for split in SPLITS:
            self.sources[split] = resolve(getattr(data, split), split, data.format, self.task.text_file_format)
        self._warn_shared_files()
        key = self._records_key(splits)
        entry = cache.lookup("records", key) if key else None
        self.cache_hits["records"] = entry is not None
        if entry is None:
            if key:
                entry = cache.store("records", key, lambda tmp: self._read_splits(splits, tmp))
            else:
                entry = self._scratch_path() / "records"
                entry.mkdir(exist_ok=True)
                cache.write_info(entry, self._read_splits(splits, entry))
        self._open_entry(entry, splits, key)
        if "train" in splits and not self.records.get("validation"):
            self._split_validation()
        self._limit()
        self.loaded = tuple(splits)
        return self.records

    def _read_splits(self, splits, folder: Path) -> dict[str, Any]:
        info: dict[str, Any] = {"rows": {}, "skipped": {}}
        for split in SPLITS:
            if split not in splits or not self.sources[split]:
                continue
            count, skipped = self._read_split(split, folder / f"{split}.arrow")
            info["rows"][split], info["skipped"][split] = count, skipped
            if split == "train" and self.task.labels is None:
                import datasets
                path = folder / "train.arrow"
                train = ArrowRecords(datasets.Dataset.from_file(str(path)), set(), path=path)
                self.task.labels = self.task.infer_labels(
                    {self.task.column("label"): v} for v in train.column(self._label_column()))
        info["labels"] = self.task.labels
        return info

    def _label_column(self) -> str:
        try:
            return self.task.column("label")
        except Exception:  # noqa: BLE001 - a task without labels
            return "label"

    def _rows(self, split: str, sources: list[Source] | None = None, streaming: bool = False
              ) -> Iterator[tuple[dict[str, Any], tuple[str, int]]]:
        data = self.specs.data
        preprocess = self._user_preprocess()
        for source in self.sources[split] if sources is None else sources:
            for row, origin in iter_source(source, split, self.task.column("text"), self._label_column(),
                                           data.hub_config, streaming=streaming):
                if data.columns:
                    row = {data.columns.get(k, k): v for k, v in row.items()}
                if preprocess is not None:  # data.preprocess: before the checks, the raw record's file and line
                    row = _preprocessed(preprocess, data.preprocess, row, origin, split)
                    if row is None:
                        continue
                yield row, origin

    def _user_preprocess(self):
        """The data.preprocess function (your specs' code: extensions.py), or None."""
        if not self.specs.data.preprocess:
            return None
        from ..extensions import resolve_callable
        return resolve_callable(self.specs.data.preprocess, "data.preprocess")

    def checked_rows(self, split: str, sources: list[Source] | None = None, cap: int | None = None,
                     streaming: bool = False) -> Iterator[tuple[dict[str, Any], tuple[str, int]]]:
        """The split's records (of ``sources``, default all) that pass the checks, as they are read (a bad one
        stops or is skipped)."""
        checker = RecordChecker(self.task, split, skip_bad=self.specs.data.on_bad_record == "skip")
        head: list = []
        for row, origin in self._rows(split, sources, streaming):
            if not checker.columns_checked:
                head.append((row, origin))
                if len(head) < min(COLUMN_SAMPLE, cap or COLUMN_SAMPLE):  # never read beyond the cap
                    continue
                checker.check_columns([r for r, _ in head], head[0][1])
            pending, head = (head or [(row, origin)]), []
            for r, o in pending:
                if checker.accept(r, o):
                    yield r, o
        if head:
            checker.check_columns([r for r, _ in head], head[0][1])
            for r, o in head:
                if checker.accept(r, o):
                    yield r, o
        checker.finish()
        self.skipped[split] = checker.skipped

    def _read_split(self, split: str, path: Path) -> tuple[int, int]:
        cap = self._read_cap(split)
        writer = ArrowWriter(path)
        rows = self.checked_rows(split, cap=cap)
        try:
            for row, origin in rows:
                writer.add(row, origin)
                if cap and writer.count >= cap:
                    break
            rows.close()
            writer.close()
        except BaseException:
            writer.abort()
            raise
        if writer.count == 0:
            value = getattr(self.specs.data, split)
            raise DatasetLoadError(f"The {split} data holds no records" + (
                " that pass the checks" if self.skipped.get(split) else ""), field=f"data.{split}",
                file=str(value) if not isinstance(value, list) else None,
                suggestions=["check that the file is not empty"])
        return writer.count, self.skipped.get(split, 0)

    def _read_cap(self, split: str) -> int | None:
        """Records worth reading: max_*_samples, unless validation is carved out of train first."""
        data = self.specs.data
        if split == "validation":
            return data.max_eval_samples
        if split == "train" and (data.validation is not None or not data.validation_split):
            return data.max_train_samples
        return None

    def _open_entry(self, entry: Path, splits, key: str | None) -> None:
        import datasets
        info = cache.read_info(entry)
        if self.task.labels is None and info.get("labels") is not None:
            self.task.labels = info["labels"]
        self.skipped.update(info.get("skipped", {}))
        for split in SPLITS:
            path = entry / f"{split}.arrow"
            if split in splits and path.is_file():
                files = {s.name for s in self.sources[split] if s.kind in ("file", "saved")}
                split_key = cache.fingerprint(key, split) if key else None
                self.records[split] = ArrowRecords(datasets.Dataset.from_file(str(path)), files, split_key, path)

    def _records_key(self, splits) -> str | None:
        data = self.specs.data
        if not data.cache:
            return None
        stamps = {}
        for split in splits:
            stamps[split] = [s.stamp() for s in self.sources.get(split, [])]
            if any(stamp is None for stamp in stamps[split]):
                return None
        settings = data.model_dump(mode="json", exclude=TOKENIZING_ONLY | set(SPLITS))
        from ..extensions import callable_fingerprint, class_code_fingerprint
        preprocess = self._user_preprocess()  # its name and code: an edited function rebuilds the entry
        return cache.fingerprint("records", stamps, settings, self.task.name, type(self.task).__qualname__,
                                 self.task.required_columns(), cache.code_version(),
                                 class_code_fingerprint(type(self.task)),
                                 callable_fingerprint(preprocess) if preprocess is not None else None)

    def _scratch_path(self) -> Path:
        if self._scratch is None:
            self._scratch = cache.scratch_dir()
        return Path(self._scratch.name)

    def _warn_shared_files(self) -> None:
        """The same file in train and in validation/test: the scores measure memory, not generalisation."""
        train = {source_key(s.name) for s in self.sources.get("train", []) if s.kind == "file"}
        for split in ("validation", "test"):
            shared = sorted(s.name for s in self.sources.get(split, []) if s.kind == "file"
                            and source_key(s.name) in train)
            if shared:
                log.warning("data.%s reads %s, which data.train reads too: its metrics score training data",
                            split, ", ".join(shared))

    def _split_validation(self) -> None:
        fraction = self.specs.data.validation_split
        if not fraction or "train" not in self.records:
            return
        train = self.records["train"]
        order = list(range(len(train)))
        random.Random(self.specs.training.seed).shuffle(order)
        n_val = max(1, int(len(order) * fraction))
        self.records["validation"] = _derived(train, sorted(order[:n_val]), "validation", fraction,
                                              self.specs.training.seed)
        self.records["train"] = _derived(train, sorted(order[n_val:]), "train", fraction, self.specs.training.seed)

    def _limit(self) -> None:
        caps = {"train": self.specs.data.max_train_samples, "validation": self.specs.data.max_eval_samples}
        for split, cap in caps.items():
            if cap and split in self.records and len(self.records[split]) > cap:
                self.records[split] = _derived(self.records[split], range(cap), "cap", cap)

    def stream(self, tokenizer):
        """The train split as a stream (data.streaming); validation and test stay map-style (prepare)."""
        from .stream import StreamingTrain
        self.task.bind_tokenizer(tokenizer)
        if not self.sources:
            self.sources = {split: resolve(getattr(self.specs.data, split), split, self.specs.data.format,
                                           self.task.text_file_format) for split in SPLITS}
        return StreamingTrain(self, tokenizer)

    # ---- tokenizing --------------------------------------------------------------------------------------
    def prepare(self, tokenizer, splits: tuple[str, ...] | None = None) -> dict[str, Any]:
        """Records -> tokenized ``datasets.Dataset`` per split (or only ``splits``), memory-mapped from the cache."""
        import datasets
        if self.loaded is None:
            self.load(splits)
        self.task.bind_tokenizer(tokenizer)
        prepared, token_key = {}, None
        for split, records in self.records.items():
            if not len(records) or (splits is not None and split not in splits):
                continue
            key = None
            if records.key and self.specs.data.cache:
                token_key = token_key or cache.fingerprint(cache.tokenizer_fingerprint(tokenizer),
                                                           self._preprocessing_state())
                key = cache.fingerprint("tokens", records.key, token_key)
            entry = cache.lookup("tokens", key) if key else None
            self.cache_hits[f"tokens:{split}"] = entry is not None
            if entry is None:
                def build(tmp: Path, records=records, split=split) -> dict[str, Any]:
                    self._tokenize(records, split, tokenizer, tmp / "data.arrow", key)
                    return {"split": split}
                if key:
                    entry = cache.store("tokens", key, build)
                else:
                    entry = self._scratch_path() / f"tokens-{split}-{len(prepared)}"
                    entry.mkdir(exist_ok=True)
                    build(entry)
            prepared[split] = datasets.Dataset.from_file(str(entry / "data.arrow"))
            check_sequences(self.task, prepared[split], split, records.origins)  # within the model's positions
            if split != "train":
                self.task.bind_eval_data(split, records.rows, prepared[split])
        if "train" in prepared:
            self._check_accumulation(len(prepared["train"]))
        return prepared

    def _tokenize(self, records, split: str, tokenizer, path: Path, key: str | None) -> None:
        """Batches of 1,000 records through the task's preprocess into an Arrow file, written by datasets' own
        writer (its compact integer types). The records are read with plain reads (ArrowRecords.batches), so
        tokenizing millions of them leaves no mapped pages behind in this process."""
        from datasets.arrow_writer import ArrowWriter as FeatureWriter
        from tqdm.auto import tqdm
        fn = self.task.preprocess if split == "train" else self.task.preprocess_eval
        writer = FeatureWriter(path=str(path), writer_batch_size=1000)
        with ErrorHandler.guard(f"tokenizing the {split} data"), tqdm(
                total=len(records), desc=f"tokenizing {split}", unit=" examples",
                disable=not _progress_bars()) as bar:
            try:
                for batch in records.batches(1000):
                    out = fn(batch, tokenizer)
                    writer.write_batch({k: list(v) for k, v in out.items()})
                    bar.update(len(next(iter(batch.values()))) if batch else 0)
                writer.finalize()
            finally:
                writer.close()
        if not path.exists():  # no features at all (texts shorter than one packed block, say): an empty table
            import pyarrow as pa
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, pa.schema([])):
                pass

    def _preprocessing_state(self) -> str:
        """The task's settings that shape its features (the specs' data section, labels, the attributes a task
        sets from the model's config, e.g. whether a seq2seq model is decoder-only)."""
        simple = (str, int, float, bool, type(None), list, tuple, dict)
        state = {k: v for k, v in vars(self.task).items() if isinstance(v, simple)
                 and k not in ("eval_data", "eval_split")}
        from ..extensions import class_code_fingerprint  # a task from a plugin package: its own code
        return cache.fingerprint(self.task.name, type(self.task).__qualname__, state, cache.code_version(),
                                 self.specs.data.model_dump(mode="json", exclude=set(SPLITS)),
                                 class_code_fingerprint(type(self.task)))

    def _check_accumulation(self, examples: int) -> None:
        """gradient_accumulation_steps larger than the batches in an epoch: every optimizer step would take the
        whole (smaller) epoch instead of the effective batch the specs promise."""
        t = self.specs.training
        world = max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
        batches = math.ceil(examples / (t.per_device_train_batch_size * world))
        if t.gradient_accumulation_steps > batches:
            raise ConfigError(
                f"training.gradient_accumulation_steps is {t.gradient_accumulation_steps}, but the training data "
                f"({examples} examples) makes only {batches} batch(es) of {t.per_device_train_batch_size}"
                + (f" per process ({world} processes)" if world > 1 else "") + " per epoch",
                field="training.gradient_accumulation_steps",
                suggestions=[f"set training.gradient_accumulation_steps: {batches} (or less)",
                             "or lower training.per_device_train_batch_size, or add training data"])


def _preprocessed(fn, reference: str, row: dict[str, Any], origin: tuple[str, int], split: str):
    """``fn(row)``: a dict, or None to drop the record; anything else (or an exception) names the record."""
    where = f"{origin[0]}:{origin[1]}"
    try:
        out = fn(row)
    except Exception as e:  # noqa: BLE001 - the user's function failed on this record
        raise DatasetLoadError(f"data.preprocess '{reference}' failed on a {split} record: {type(e).__name__}: {e}",
                               field="data.preprocess", file=origin[0], line=origin[1],
                               suggestions=[f"the record is at {where}; fix the function (return None to drop a "
                                            "record)"]) from e
    if out is not None and not isinstance(out, dict):
        raise DatasetLoadError(f"data.preprocess '{reference}' returned a {type(out).__name__} for a {split} record, "
                               "not a dict (or None to drop it)", field="data.preprocess", file=origin[0],
                               line=origin[1], suggestions=["return the record as a dict of column: value"])
    return out


def _progress_bars() -> bool:
    import datasets
    return datasets.is_progress_bar_enabled()


def _derived(records: ArrowRecords, indices, *how) -> ArrowRecords:
    """A deterministic selection of a split's records, cacheable when its parent is."""
    out = records.take(indices)
    out.key = cache.fingerprint(records.key, *how) if records.key else None
    return out
