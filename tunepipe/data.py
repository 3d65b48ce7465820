"""DatasetModules: load records from files / hub / memory, validate every record, then tokenize through the Task.

Records are read by our own small readers (not ``datasets.load_dataset``) for local files because a bad record must
be reported with its file and line, and datasets' Arrow readers only say "failed to parse".
"""
from __future__ import annotations

import csv
import difflib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import ConfigError, DatasetLoadError, ErrorHandler, ValidationError

log = logging.getLogger("tunepipe")

SPLITS = ("train", "validation", "test")
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
              ".parquet": "parquet", ".txt": "text", ".text": "text", ".conll": "conll", ".iob": "conll",
              ".bio": "conll"}
MAX_REPORTED = 5


@dataclass
class Records:
    """Rows of one split plus where each row came from, for error messages."""
    rows: list[dict[str, Any]] = field(default_factory=list)
    origins: list[tuple[str, int]] = field(default_factory=list)  # (file or source name, line or row number)

    def add(self, row: dict[str, Any], origin: tuple[str, int]) -> None:
        self.rows.append(row)
        self.origins.append(origin)

    def take(self, indices: list[int]) -> "Records":
        return Records([self.rows[i] for i in indices], [self.origins[i] for i in indices])


def _looks_like_path(source: str) -> bool:
    return (source.startswith((".", "/", "~")) or Path(source).suffix.lower() in EXTENSIONS
            or "\\" in source or source.count("/") > 1)


def _source_key(source: str) -> str:
    """The same file however it is spelt (./a.jsonl, a.jsonl, a symlink to it); hub ids as written."""
    path = Path(source).expanduser()
    try:
        return str(path.resolve()) if path.exists() else source
    except (OSError, RuntimeError):  # a symlink loop: reported as a missing file when it is read
        return source


def _missing_file_error(path: Path, split: str | None = None) -> DatasetLoadError:
    field = f"data.{split}" if split else None
    if path.is_dir():
        inside = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
        return DatasetLoadError(f"{path} is a directory, not a data file", file=str(path), field=field,
                                suggestions=[f"did you mean '{p}'?" for p in inside[:3]]
                                + ["point the split at one file, or a list of files"])
    suggestions = []
    if path.parent.is_dir():
        close = difflib.get_close_matches(path.name, [p.name for p in path.parent.iterdir()], n=2)
        suggestions += [f"did you mean '{path.parent / c}'?" for c in close]
    suggestions.append("paths are relative to the directory you run tunepipe from")
    return DatasetLoadError(f"Data file not found: {path}", file=str(path), field=field, suggestions=suggestions)


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DatasetLoadError(f"File is not valid UTF-8 (byte {e.start})", file=str(path), line=line,
                               suggestions=["re-encode it: iconv -f latin1 -t utf-8 IN > OUT"]) from None
    for number, line in enumerate(text.splitlines(), start=1):
        yield number, line


def read_jsonl(path: Path, out: Records) -> None:
    for number, line in _read_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetLoadError(f"Malformed JSON line: {e.msg} at column {e.colno}", file=str(path), line=number,
                                   suggestions=["fix or delete that line; each line must be one JSON object"]) from None
        if not isinstance(row, dict):
            raise DatasetLoadError(f"Line holds a JSON {type(row).__name__}, not an object", file=str(path),
                                   line=number, suggestions=['each line must look like {"text": ..., "label": ...}'])
        out.add(row, (str(path), number))


def read_json(path: Path, out: Records) -> None:
    text = "\n".join(line for _, line in _read_lines(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return read_jsonl(path, out)  # many .json files are JSON Lines
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if isinstance(data, list) and data and all(isinstance(a, dict) and "paragraphs" in a for a in data):
        data = list(_flatten_squad(data))
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        keys = list(data)
        data = [dict(zip(keys, values)) for values in zip(*data.values())]
    if not isinstance(data, list):
        raise DatasetLoadError("JSON file must hold a list of records", file=str(path),
                               suggestions=["use JSON Lines: one object per line"])
    for i, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise DatasetLoadError(f"Record {i} is not an object", file=str(path), line=i)
        out.add(row, (str(path), i))


def _flatten_squad(articles: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The official SQuAD JSON nests questions in paragraphs in articles: one record per question, in the
    Hugging Face `squad` layout (answers as {text: [...], answer_start: [...]})."""
    for article in articles:
        for paragraph in article.get("paragraphs") or []:
            for qa in paragraph.get("qas") or []:
                answers = [a for a in qa.get("answers") or [] if isinstance(a, dict)]
                row = {"id": qa.get("id"), "title": article.get("title", ""), "context": paragraph.get("context"),
                       "question": qa.get("question"),
                       "answers": {"text": [a.get("text") for a in answers],
                                   "answer_start": [a.get("answer_start") for a in answers]}}
                if "is_impossible" in qa:
                    row["is_impossible"] = qa["is_impossible"]
                yield row


def read_delimited(path: Path, out: Records, delimiter: str) -> None:
    lines = [line for _, line in _read_lines(path)]
    reader = csv.DictReader(lines, delimiter=delimiter)
    for row in reader:
        if None in row:
            raise DatasetLoadError(f"Row has more fields than the header ({len(reader.fieldnames)})", file=str(path),
                                   line=reader.line_num, suggestions=["quote fields that contain the delimiter"])
        out.add(dict(row), (str(path), reader.line_num))


def read_text(path: Path, out: Records, column: str) -> None:
    for number, line in _read_lines(path):
        if line.strip():
            out.add({column: line}, (str(path), number))


def read_conll(path: Path, out: Records, words_col: str, tags_col: str) -> None:
    """Column format: one 'word ... tag' per line, blank line between sentences; -DOCSTART- lines skipped."""
    words: list[str] = []
    tags: list[str] = []
    start = 0
    for number, line in list(_read_lines(path)) + [(-1, "")]:
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            if words:
                out.add({words_col: words, tags_col: tags}, (str(path), start))
            words, tags = [], []
            continue
        if len(parts) < 2:
            raise DatasetLoadError("CoNLL line needs at least two columns (word and tag)", file=str(path),
                                   line=number, suggestions=["separate word and tag with a space or tab"])
        if not words:
            start = number
        words.append(parts[0])
        tags.append(parts[-1])


def _read_parquet(path: Path, split: str):
    import pandas as pd
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DatasetLoadError(f"Cannot read the parquet file: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                               file=str(path), field=f"data.{split}",
                               suggestions=["check that it is a complete parquet file (re-export it with "
                                            "pandas.DataFrame.to_parquet), or convert it to JSON Lines"]) from None


def _file_format(path: Path, declared: str, text_format: str, split: str | None = None) -> str:
    if declared not in ("auto", "hub"):
        return declared
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise DatasetLoadError(f"Cannot tell the format of {path.name}", file=str(path),
                               field=f"data.{split}" if split else None,
                               suggestions=[f"set data.format to one of: {', '.join(sorted(set(EXTENSIONS.values())))}"])
    return text_format if fmt == "text" else fmt  # a .txt file: what the task reads as text (CoNLL for tags)


def read_file(path: Path, fmt: str, out: Records, text_column: str, label_column: str | None, split: str) -> None:
    """One local data file of a known format into ``out``, each record with its (file, line) origin: the same
    reader for training splits and prediction inputs."""
    if fmt == "jsonl":
        read_jsonl(path, out)
    elif fmt == "json":
        read_json(path, out)
    elif fmt in ("csv", "tsv"):
        read_delimited(path, out, "," if fmt == "csv" else "\t")
    elif fmt == "text":
        read_text(path, out, text_column)
    elif fmt == "conll":
        read_conll(path, out, text_column, label_column)
    elif fmt == "parquet":
        for i, row in enumerate(_read_parquet(path, split).to_dict(orient="records"), start=1):
            out.add({k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in row.items()}, (str(path), i))


class DatasetModules:
    """Loads, validates and tokenizes the splits named in ``specs.data`` for one Task."""

    def __init__(self, specs, task):
        self.specs = specs
        self.task = task
        self.records: dict[str, Records] = {}

    # ---- loading -----------------------------------------------------------------------------------------
    def load_source(self, source: Any, split: str) -> Records:
        out = Records()
        if source is None:
            return out
        if type(source).__name__ == "DataFrame":
            source = source.to_dict(orient="records")
        if isinstance(source, list) and all(isinstance(r, dict) for r in source):
            for i, row in enumerate(source, start=1):
                out.add(dict(row), (f"<{split} records>", i))
            return out
        sources = source if isinstance(source, list) else [source]
        listed: dict[str, str] = {}
        for item in sources:
            if not isinstance(item, (str, Path)):
                raise DatasetLoadError(f"data.{split} must be a path, a list of paths, a hub id, a DataFrame or a "
                                       f"list of dicts; got {type(item).__name__}", field=f"data.{split}",
                                       suggestions=[f"e.g. data.{split}: data/{split}.jsonl (a path, in quotes if "
                                                    "it looks like a number)"])
            key = _source_key(str(item))
            if key in listed:
                raise DatasetLoadError(f"data.{split} lists the same file twice ('{listed[key]}' and '{item}'): "
                                       "its records would silently count twice", field=f"data.{split}",
                                       file=str(item), suggestions=["list each file once",
                                                                    "to weight a file up, copy its records "
                                                                    "into a file of their own"])
            listed[key] = str(item)
            self._load_one(str(item), split, out)
        return out

    def _load_one(self, source: str, split: str, out: Records) -> None:
        path = Path(source).expanduser()
        fmt = self.specs.data.format
        if fmt == "hub" or (not path.exists() and not _looks_like_path(source)):
            return self._load_hub(source, split, out)
        if not path.is_file():
            raise _missing_file_error(path, split)
        fmt = _file_format(path, fmt, self.task.text_file_format, split)
        with ErrorHandler.guard(f"reading {path}"):
            read_file(path, fmt, out, self.task.column("text"), self.task.column("label"), split)

    def _load_hub(self, name: str, split: str, out: Records) -> None:
        import datasets
        hub_split = "validation" if split == "validation" else split
        try:
            ds = datasets.load_dataset(name, self.specs.data.hub_config, split=hub_split)
        except Exception as e:  # noqa: BLE001 - datasets raises many types for "not reachable / not found"
            raise DatasetLoadError(f"Could not load dataset '{name}' (split {hub_split}) from the hub: "
                                   f"{str(e).splitlines()[0] if str(e) else type(e).__name__}", field=f"data.{split}",
                                   suggestions=["if it is a local file, check the path",
                                                "offline? point data.train/validation at local files"]) from None
        features = _class_label_names(ds)
        for i, row in enumerate(ds.to_list(), start=1):
            out.add(_ids_to_names(row, features), (f"<hub:{name}:{hub_split}>", i))

    def load(self, splits=None) -> dict[str, Records]:
        """Read every split (or only ``splits``, and the training data where the labels or data.validation_split
        need it), rename columns, validate records, and settle the label set."""
        data = self.specs.data
        if data.train is None:
            raise DatasetLoadError("No training data given", field="data.train",
                                   suggestions=["set data.train to a file (jsonl, csv, tsv, parquet, txt, conll)"])
        wanted = set(SPLITS if splits is None else splits)
        if (self.task.labels is None and getattr(self.task, "uses_labels", False)) or (
                "validation" in wanted and data.validation is None and data.validation_split):
            wanted.add("train")
        for split in (s for s in SPLITS if s in wanted):
            records = self.load_source(getattr(data, split), split)
            if data.columns:
                records.rows = [{data.columns.get(k, k): v for k, v in row.items()} for row in records.rows]
            if getattr(data, split) is not None and not records.rows:
                raise DatasetLoadError(f"The {split} data holds no records", field=f"data.{split}",
                                       file=str(getattr(data, split)), suggestions=["check that the file is not empty"])
            if records.rows:
                self._check_columns(records, split)
            self.records[split] = records
        if "validation" in wanted and not self.records["validation"].rows:
            self._split_validation()
        self._warn_shared_files()
        self._validate("train")
        if self.task.labels is None and "train" in self.records:
            self.task.labels = self.task.infer_labels(self.records["train"].rows)
        for split in ("validation", "test"):
            self._validate(split)
        for split in SPLITS:  # after the task's own checks, whose messages are more specific
            self._check_value_kinds(split)
        self._limit()
        return self.records

    def _warn_shared_files(self) -> None:
        """The same file in train and in validation/test: the scores measure memory, not generalisation."""
        train = {_source_key(f) for f, _ in self.records.get("train", Records()).origins}
        for split in ("validation", "test"):
            if getattr(self.specs.data, split) is None:  # carved out of train (validation_split): disjoint records
                continue
            shared = sorted({f for f, _ in self.records.get(split, Records()).origins if _source_key(f) in train})
            if shared:
                log.warning("data.%s reads %s, which data.train reads too: its metrics score training data",
                            split, ", ".join(shared))

    def _check_value_kinds(self, split: str) -> None:
        """One kind of value per column (text, number, true/false, list, mapping), and one kind inside list
        values: Arrow needs it to build the dataset ("ArrowInvalid: Could not convert 'pos' with type str"), and
        labels given sometimes as ids and sometimes as names (1 and 'pos') are ambiguous. The first record that
        differs is reported, with its file and line."""
        records = self.records.get(split)
        if not records or not records.rows:
            return
        first: dict[tuple[str, bool], tuple[str, tuple[str, int]]] = {}
        for row, origin in zip(records.rows, records.origins):
            for column, value in row.items():
                kinds = [(False, _kind(value))]
                if isinstance(value, list):
                    kinds += [(True, _kind(v)) for v in value]
                for inner, kind in kinds:
                    if kind is None:
                        continue
                    seen = first.setdefault((column, inner), (kind, origin))
                    if seen[0] == kind:
                        continue
                    where = f"items of column '{column}'" if inner else f"column '{column}'"
                    (file0, line0) = seen[1]
                    raise ValidationError(
                        f"Bad record in the {split} data: {where} mixes {seen[0]} ({file0}:{line0}) and {kind} "
                        f"values{' (ids and names?)' if {seen[0], kind} == {'number', 'text'} else ''}",
                        file=origin[0], line=origin[1], field=_column_field(self.task, column),
                        suggestions=[f"write every value of {where} the same way (e.g. all label names as text)",
                                     "fix or remove that record"])

    def _check_columns(self, records: Records, split: str) -> None:
        present = set().union(*(row.keys() for row in records.rows[:100]))
        required = self.task.required_columns()
        if split == "test":
            required = [c for c in required if c != self.task.column("label")]
        for col in required:
            if col not in present:
                role = next((r for r in ("text", "text_pair", "label") if self.task.column(r) == col), None)
                close = difflib.get_close_matches(col, sorted(present), n=1, cutoff=0.5)
                hints = [f"did you mean '{close[0]}'? set data.{role}_column: {close[0]}" if close and role else ""]
                hints.append(f"columns present: {', '.join(sorted(present))}")
                if role:
                    hints.append(f"set data.{role}_column to the right column, or rename it with data.columns")
                raise DatasetLoadError(f"Column '{col}' not found in the {split} data", file=records.origins[0][0],
                                       field=f"data.{role}_column" if role else None, suggestions=hints)

    def _validate(self, split: str) -> None:
        records = self.records.get(split)
        if not records:
            return
        bad = []
        for row, origin in zip(records.rows, records.origins):
            problem = self.task.validate_record(row, split)
            if problem:
                bad.append((origin, problem))
                if len(bad) > MAX_REPORTED:
                    break
        if bad:
            (file, line), first = bad[0]
            listing = "; ".join(f"{f}:{n}: {p}" for (f, n), p in bad[:MAX_REPORTED])
            more = " (and more)" if len(bad) > MAX_REPORTED else ""
            hints = ["fix or remove the records listed"]
            if "unknown label" in first:
                hints.insert(0, "labels come from the training data unless data.labels lists them all (in id "
                                "order): add the label there, or fix the record")
            raise ValidationError(f"Bad record in the {split} data: {first}. All found: {listing}{more}",
                                  file=file, line=line, suggestions=hints)

    def _split_validation(self) -> None:
        fraction = self.specs.data.validation_split
        if not fraction:
            self.records["validation"] = Records()
            return
        train = self.records["train"]
        order = list(range(len(train.rows)))
        random.Random(self.specs.training.seed).shuffle(order)
        n_val = max(1, int(len(order) * fraction))
        self.records["validation"] = train.take(sorted(order[:n_val]))
        self.records["train"] = train.take(sorted(order[n_val:]))

    def _limit(self) -> None:
        caps = {"train": self.specs.data.max_train_samples, "validation": self.specs.data.max_eval_samples}
        for split, cap in caps.items():
            if cap and split in self.records and len(self.records[split].rows) > cap:
                self.records[split] = self.records[split].take(list(range(cap)))

    # ---- tokenizing --------------------------------------------------------------------------------------
    def prepare(self, tokenizer, splits=None) -> dict[str, Any]:
        """Records -> tokenized ``datasets.Dataset`` per split (or only ``splits``; batched, single process)."""
        import datasets
        if not self.records:
            self.load(splits)
        prepared = {}
        for split, records in self.records.items():
            if not records.rows or (splits is not None and split not in splits):
                continue
            with ErrorHandler.guard(f"building the {split} dataset"):
                ds = datasets.Dataset.from_list(_with_all_keys(records.rows))
            fn = self.task.preprocess if split == "train" else self.task.preprocess_eval
            with ErrorHandler.guard(f"tokenizing the {split} data"):
                prepared[split] = ds.map(fn, batched=True, fn_kwargs={"tokenizer": tokenizer},
                                         remove_columns=ds.column_names, desc=f"tokenizing {split}")
            from .limits import check_sequences
            check_sequences(self.task, prepared[split], split, records.origins)  # within the model's positions
            if split != "train":
                self.task.bind_eval_data(split, records.rows, prepared[split])
        if "train" in prepared:
            self._check_accumulation(len(prepared["train"]))
        return prepared

    def _check_accumulation(self, examples: int) -> None:
        """gradient_accumulation_steps larger than the batches in an epoch: every optimizer step would take the
        whole (smaller) epoch instead of the effective batch the specs promise."""
        import math
        import os
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


def _kind(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


def _column_field(task, column: str) -> str | None:
    """The specs field that names ``column`` (data.label_column ...), when the task requires that column."""
    try:
        required = set(task.required_columns())
    except Exception:  # noqa: BLE001
        return None
    if column not in required:
        return None
    for role in ("source", "target", "text", "text_pair", "label"):
        try:
            if task.column(role) == column:
                return f"data.{role}_column"
        except Exception:  # noqa: BLE001 - a task without that role
            continue
    return None


PREDICT_INPUT_FORMATS = ("jsonl", "json", "csv", "tsv", "parquet", "text")


def looks_like_path(text: str) -> bool:
    """Whether a `predict --input` value is meant as a file: one line with a data-file extension, a leading
    ./ ../ ~/ or /, or a path separator inside one word (not a URL). Such a value that is not a readable file is
    an error: predicting on the path's own characters would be a silent wrong result."""
    value = text.strip()
    if not value or "\n" in value or len(value) > 4096:
        return False
    if Path(value).suffix.lower() in EXTENSIONS or value.startswith(("/", "./", "../", "~/", ".\\", "..\\", "~\\")):
        return True
    return not any(c.isspace() for c in value) and ("/" in value or "\\" in value) and "://" not in value


def read_predict_inputs(text: str) -> tuple[list[Any], bool]:
    """(inputs, whether they came from a file) for `tunepipe predict --input`: a file's records (jsonl / json /
    csv / tsv / parquet) or lines (txt), else the text itself. A value that looks like a path but is not a readable
    file, an unsupported file, and a file with no inputs are errors."""
    path = Path(text.strip()).expanduser()
    try:
        is_file, exists = path.is_file(), path.exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte: text
        is_file = exists = False
    if not is_file:
        if not looks_like_path(text):
            return [text], False
        if exists:
            raise DatasetLoadError(f"--input {text}: not a file" + (" (a directory)" if path.is_dir() else ""),
                                   field="--input", file=str(path),
                                   suggestions=["point --input at one file (.jsonl, .json, .csv, .tsv, .parquet, "
                                                ".txt)"])
        error = _missing_file_error(path)
        raise DatasetLoadError(f"--input {text}: no such file (it looks like a path, so it is not predicted on as "
                               "text)", field="--input", file=str(path),
                               suggestions=error.suggestions[:-1] + [
                                   "to predict on a text that looks like a path, put it in a .txt file (one input "
                                   "per line)"])
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt not in PREDICT_INPUT_FORMATS:
        raise DatasetLoadError(f"--input {text}: cannot read {path.suffix or 'a file without extension'} files for "
                               "prediction", field="--input", file=str(path),
                               suggestions=["use JSON Lines (one record per line), .json, .csv, .tsv, .parquet, "
                                            "or .txt (one input per line)"])
    records = Records()
    try:
        read_file(path, fmt, records, "text", None, "input")
    except OSError as e:
        raise DatasetLoadError(f"--input {text}: cannot read the file: {e.strerror or e}", field="--input",
                               file=str(path), suggestions=["check the file's permissions"]) from None
    if not records.rows:
        raise DatasetLoadError(f"--input {text}: the file holds no inputs", field="--input", file=str(path),
                               suggestions=["check that it is the right file and not empty"])
    if fmt == "text":
        return [r["text"] for r in records.rows], True
    return list(records.rows), True


def _class_label_names(ds) -> dict[str, Any]:
    """Hub datasets store labels as ClassLabel ids; tasks work with names (seqeval needs tag strings)."""
    import datasets
    found = {}
    for name, feature in ds.features.items():
        inner = getattr(feature, "feature", None)
        if isinstance(feature, datasets.ClassLabel):
            found[name] = feature
        elif isinstance(inner, datasets.ClassLabel):
            found[name] = inner
    return found


def _ids_to_names(row: dict[str, Any], features: dict[str, Any]) -> dict[str, Any]:
    for name, feature in features.items():
        value = row.get(name)
        if isinstance(value, list):
            row[name] = [feature.int2str(v) for v in value]
        elif isinstance(value, int) and value >= 0:
            row[name] = feature.int2str(value)
    return row


def _with_all_keys(rows: list[dict]) -> list[dict]:
    """Dataset.from_list takes its columns from the first record only; an optional field that first appears
    later (a 'references' list, a text_pair) would be dropped silently. Give every record every key."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    if all(len(row) == len(keys) for row in rows):
        return rows
    return [{k: row.get(k) for k in keys} for row in rows]
