"""Local data files read one record at a time, each with its (file, line) origin.

Our own readers rather than ``datasets.load_dataset`` because a bad record must be reported with its file and
line (datasets' Arrow readers only say "failed to parse"); they are generators, so a file of any size is read in
constant memory (a whole-document .json file is the one exception: JSON has no record boundaries to stream on).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator

from ..errors import DatasetLoadError

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
              ".parquet": "parquet", ".txt": "text", ".text": "text", ".conll": "conll", ".iob": "conll",
              ".bio": "conll"}
Origin = tuple[str, int]  # (file or source name, line or row number)
Row = tuple[dict[str, Any], Origin]


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text without its line break), decoded line by line so a bad byte names its line."""
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DatasetLoadError(f"File is not valid UTF-8 (byte {offset + e.start})", file=str(path),
                                       line=number,
                                       suggestions=["re-encode it: iconv -f latin1 -t utf-8 IN > OUT"]) from None
            offset += len(raw)
            yield number, text.rstrip("\r\n")


def iter_jsonl(path: Path) -> Iterator[Row]:
    for number, line in read_lines(path):
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
        yield row, (str(path), number)


def iter_json(path: Path) -> Iterator[Row]:
    text = "\n".join(line for _, line in read_lines(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        yield from iter_jsonl(path)  # many .json files are JSON Lines
        return
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
        yield row, (str(path), i)


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


def iter_delimited(path: Path, delimiter: str) -> Iterator[Row]:
    lines = (line + "\n" for _, line in read_lines(path))  # line breaks kept: quoted fields may span lines
    reader = csv.DictReader(lines, delimiter=delimiter)
    for row in reader:
        if None in row:
            raise DatasetLoadError(f"Row has more fields than the header ({len(reader.fieldnames)})", file=str(path),
                                   line=reader.line_num, suggestions=["quote fields that contain the delimiter"])
        yield dict(row), (str(path), reader.line_num)


def iter_text(path: Path, column: str) -> Iterator[Row]:
    for number, line in read_lines(path):
        if line.strip():
            yield {column: line}, (str(path), number)


def iter_conll(path: Path, words_col: str, tags_col: str) -> Iterator[Row]:
    """Column format: one 'word ... tag' per line, blank line between sentences; -DOCSTART- lines skipped."""
    words: list[str] = []
    tags: list[str] = []
    start = 0

    def lines():
        yield from read_lines(path)
        yield -1, ""

    for number, line in lines():
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            if words:
                yield {words_col: words, tags_col: tags}, (str(path), start)
            words, tags = [], []
            continue
        if len(parts) < 2:
            raise DatasetLoadError("CoNLL line needs at least two columns (word and tag)", file=str(path),
                                   line=number, suggestions=["separate word and tag with a space or tab"])
        if not words:
            start = number
        words.append(parts[0])
        tags.append(parts[-1])


def iter_parquet(path: Path, split: str, batch_size: int = 1000) -> Iterator[Row]:
    import pyarrow.parquet as pq

    def unreadable(e: Exception) -> DatasetLoadError:
        return DatasetLoadError(f"Cannot read the parquet file: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                                file=str(path), field=f"data.{split}",
                                suggestions=["check that it is a complete parquet file (re-export it with "
                                             "pandas.DataFrame.to_parquet), or convert it to JSON Lines"])
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=batch_size)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise unreadable(e) from None
    number = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (OSError, ValueError) as e:
            raise unreadable(e) from None
        for row in batch.to_pylist():
            number += 1
            yield row, (str(path), number)


def file_format(path: Path, declared: str, text_format: str, split: str | None = None) -> str:
    if declared not in ("auto", "hub"):
        return declared
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise DatasetLoadError(f"Cannot tell the format of {path.name}", file=str(path),
                               field=f"data.{split}" if split else None,
                               suggestions=[f"set data.format to one of: {', '.join(sorted(set(EXTENSIONS.values())))}"])
    return text_format if fmt == "text" else fmt  # a .txt file: what the task reads as text (CoNLL for tags)


def iter_file(path: Path, fmt: str, text_column: str, label_column: str | None, split: str) -> Iterator[Row]:
    """One local data file of a known format, record by record: the same reader for training splits, streams and
    prediction inputs."""
    if fmt == "jsonl":
        return iter_jsonl(path)
    if fmt == "json":
        return iter_json(path)
    if fmt in ("csv", "tsv"):
        return iter_delimited(path, "," if fmt == "csv" else "\t")
    if fmt == "text":
        return iter_text(path, text_column)
    if fmt == "conll":
        return iter_conll(path, text_column, label_column)
    if fmt == "parquet":
        return iter_parquet(path, split)
    raise DatasetLoadError(f"Unknown data format {fmt!r}", file=str(path), field="data.format")
