"""`tunepipe predict --input`: a file of inputs or the text itself, read by the same readers as training data.
Each input from a file keeps where it came from (file, line), so that its prediction, and any error about it, can
name that line."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DatasetLoadError
from .readers import EXTENSIONS, iter_file
from .sources import missing_file_error

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


@dataclass
class PredictInputs:
    """What `predict --input` names. ``origins``: (file, line) of each input: the line number in a .txt, .jsonl,
    .csv or .tsv file, the record number in a .json or .parquet file. ``blank_lines``: blank lines of a .txt or
    .jsonl file before its last input, skipped (they hold nothing to predict), which shift later inputs against
    the file's lines."""
    items: list[Any]
    from_file: bool
    origins: list[tuple[str, int] | None] = field(default_factory=list)
    blank_lines: list[int] = field(default_factory=list)


def read_predict_inputs(text: str) -> tuple[list[Any], bool]:
    """(inputs, whether they came from a file) for `tunepipe predict --input` (see ``read_predict_records``)."""
    found = read_predict_records(text)
    return found.items, found.from_file


def read_predict_records(text: str) -> PredictInputs:
    """The inputs of `tunepipe predict --input`: a file's records (jsonl / json / csv / tsv / parquet) or lines
    (txt), else the text itself. A value that looks like a path but is not a readable file, an unsupported file,
    and a file with no inputs are errors."""
    path = Path(text.strip()).expanduser()
    try:
        is_file, exists = path.is_file(), path.exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte: text
        is_file = exists = False
    if not is_file:
        if not looks_like_path(text):
            return PredictInputs([text], False, [None])
        if exists:
            raise DatasetLoadError(f"--input {text}: not a file" + (" (a directory)" if path.is_dir() else ""),
                                   field="--input", file=str(path),
                                   suggestions=["point --input at one file (.jsonl, .json, .csv, .tsv, .parquet, "
                                                ".txt)"])
        error = missing_file_error(path)
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
    try:
        rows, origins = [], []
        for row, origin in iter_file(path, fmt, "text", None, "input"):
            rows.append(row)
            origins.append(origin)
    except OSError as e:
        raise DatasetLoadError(f"--input {text}: cannot read the file: {e.strerror or e}", field="--input",
                               file=str(path), suggestions=["check the file's permissions"]) from None
    if not rows:
        raise DatasetLoadError(f"--input {text}: the file holds no inputs", field="--input", file=str(path),
                               suggestions=["check that it is the right file and not empty"])
    blank: list[int] = []
    if fmt in ("text", "jsonl"):  # one input per line: a line that is not an input is blank
        numbers = {line for _, line in origins}
        blank = [n for n in range(1, max(numbers)) if n not in numbers]
    items = [r["text"] for r in rows] if fmt == "text" else rows
    return PredictInputs(items, True, origins, blank)
