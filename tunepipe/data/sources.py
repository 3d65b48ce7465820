"""What a ``data.<split>`` value names, resolved to sources that yield records: files, globs and folders of
shards, ``Dataset.save_to_disk`` folders, hub datasets, and records given in memory."""
from __future__ import annotations

import difflib
import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import DatasetLoadError, ErrorHandler
from .readers import EXTENSIONS, Row, file_format, iter_file

SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")  # what Dataset(Dict).save_to_disk writes


@dataclass
class Source:
    kind: str  # "file" | "saved" | "hub" | "records"
    name: str  # path, hub id, or "<split records>"
    fmt: str | None = None
    rows: list[dict[str, Any]] | None = field(default=None, repr=False)

    def stamp(self) -> list | None:
        """What identifies this source's content for the tokenization cache; None: not cacheable (hub data can
        change under the same name, and records in memory are not worth a disk copy)."""
        if self.kind == "file":
            st = os.stat(self.name)
            return [self.name, self.fmt, st.st_size, st.st_mtime_ns]
        if self.kind == "saved":
            return [[str(p), p.stat().st_size, p.stat().st_mtime_ns]
                    for p in sorted(Path(self.name).rglob("*")) if p.is_file()]
        return None


def looks_like_path(source: str) -> bool:
    return (source.startswith((".", "/", "~")) or Path(source).suffix.lower() in EXTENSIONS
            or "\\" in source or source.count("/") > 1)


def source_key(source: str) -> str:
    """The same file however it is spelt (./a.jsonl, a.jsonl, a symlink to it); hub ids as written."""
    path = Path(source).expanduser()
    try:
        return str(path.resolve()) if path.exists() else source
    except (OSError, RuntimeError):  # a symlink loop: reported as a missing file when it is read
        return source


def missing_file_error(path: Path, split: str | None = None) -> DatasetLoadError:
    field_name = f"data.{split}" if split else None
    suggestions = []
    if path.parent.is_dir():
        close = difflib.get_close_matches(path.name, [p.name for p in path.parent.iterdir()], n=2)
        suggestions += [f"did you mean '{path.parent / c}'?" for c in close]
    suggestions.append("paths are relative to the directory you run tunepipe from")
    return DatasetLoadError(f"Data file not found: {path}", file=str(path), field=field_name, suggestions=suggestions)


def resolve(value: Any, split: str, declared_format: str, text_format: str) -> list[Source]:
    """The sources of one split, in reading order; the same file listed twice is an error (its records would
    silently count twice)."""
    if value is None:
        return []
    if type(value).__name__ == "DataFrame":
        value = value.to_dict(orient="records")
    if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
        return [Source("records", f"<{split} records>", rows=[dict(r) for r in value])]
    items = value if isinstance(value, (list, tuple)) else [value]
    sources: list[Source] = []
    listed: dict[str, str] = {}
    for item in items:
        if not isinstance(item, (str, Path)):
            raise DatasetLoadError(f"data.{split} must be a path, a glob, a folder, a list of paths, a hub id, a "
                                   f"DataFrame or a list of dicts; got {type(item).__name__}", field=f"data.{split}",
                                   suggestions=[f"e.g. data.{split}: data/{split}.jsonl (a path, in quotes if "
                                                "it looks like a number)"])
        for source in _resolve_one(str(item), split, declared_format, text_format):
            key = source_key(source.name) if source.kind != "hub" else source.name
            if key in listed:
                raise DatasetLoadError(f"data.{split} lists the same file twice ('{listed[key]}' and "
                                       f"'{source.name}'): its records would silently count twice",
                                       field=f"data.{split}", file=source.name,
                                       suggestions=["list each file once", "to weight a file up, copy its records "
                                                                           "into a file of their own"])
            listed[key] = source.name
            sources.append(source)
    return sources


def _resolve_one(item: str, split: str, declared_format: str, text_format: str) -> list[Source]:
    path = Path(item).expanduser()
    if declared_format == "hub":
        return [Source("hub", item)]
    if any(c in item for c in "*?[") and not path.exists():
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        files = [p for p in matches if p.is_file()]
        if not files:
            raise DatasetLoadError(f"No file matches data.{split}: {item}", field=f"data.{split}", file=item,
                                   suggestions=["check the pattern (paths are relative to the directory you run "
                                                "tunepipe from; ** matches folders at any depth)"])
        return [_file_source(p, declared_format, text_format, split) for p in files]
    if path.is_dir():
        return _folder_sources(path, split, declared_format, text_format)
    if path.is_file():
        return [_file_source(path, declared_format, text_format, split)]
    if not path.exists() and not looks_like_path(item):
        return [Source("hub", item)]
    raise missing_file_error(path, split)


def _file_source(path: Path, declared: str, text_format: str, split: str) -> Source:
    return Source("file", str(path), fmt=file_format(path, declared, text_format, split))


def _folder_sources(path: Path, split: str, declared: str, text_format: str) -> list[Source]:
    """A save_to_disk folder, or a folder of data-file shards (read in name order, sub-folders included)."""
    if any((path / marker).is_file() for marker in SAVED_DATASET_MARKERS):
        return [Source("saved", str(path))]
    shards = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS
                    and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not shards:
        raise DatasetLoadError(f"{path} is a folder without data files", file=str(path), field=f"data.{split}",
                               suggestions=["a folder must hold data files (.jsonl, .parquet, .csv, ...) or be a "
                                            "folder written by datasets' save_to_disk",
                                            "or point the split at one file, a glob or a list of files"])
    return [_file_source(p, declared, text_format, split) for p in shards]


def iter_source(source: Source, split: str, text_column: str, label_column: str | None,
                hub_config: str | None = None, streaming: bool = False) -> Iterator[Row]:
    """Records of one source with their origins."""
    if source.kind == "records":
        for i, row in enumerate(source.rows or [], start=1):
            yield dict(row), (source.name, i)
        return
    if source.kind == "file":
        with ErrorHandler.guard(f"reading {source.name}"):
            yield from iter_file(Path(source.name), source.fmt, text_column, label_column, split)
        return
    if source.kind == "saved":
        dataset = _load_saved(source.name, split)
        name = source.name
    else:
        dataset = _load_hub(source.name, split, hub_config, streaming)
        name = f"<hub:{source.name}:{split}>"
    names = class_label_names(dataset)
    number = 0
    for batch in dataset.iter(batch_size=1000):
        keys = list(batch)
        for values in zip(*batch.values()):
            number += 1
            yield ids_to_names(dict(zip(keys, values)), names), (name, number)


def _load_saved(path: str, split: str):
    import datasets
    with ErrorHandler.guard(f"reading the saved dataset {path}"):
        loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DatasetLoadError(f"{path} holds the splits {', '.join(loaded)}, not '{split}'", file=path,
                                   field=f"data.{split}",
                                   suggestions=[f"point data.{split} at {path}/<split name>, the split's own folder"])
        return loaded[split]
    return loaded


def _load_hub(name: str, split: str, config: str | None, streaming: bool):
    import datasets
    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as e:  # noqa: BLE001 - datasets raises many types for "not reachable / not found"
        raise DatasetLoadError(f"Could not load dataset '{name}' (split {split}) from the hub: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}", field=f"data.{split}",
                               suggestions=["if it is a local file, check the path",
                                            "offline? point data.train/validation at local files"]) from None


def class_label_names(ds) -> dict[str, Any]:
    """Hub datasets store labels as ClassLabel ids; tasks work with names (seqeval needs tag strings)."""
    import datasets
    found = {}
    for name, feature in (ds.features or {}).items():
        inner = getattr(feature, "feature", None)
        if isinstance(feature, datasets.ClassLabel):
            found[name] = feature
        elif isinstance(inner, datasets.ClassLabel):
            found[name] = inner
    return found


def ids_to_names(row: dict[str, Any], features: dict[str, Any]) -> dict[str, Any]:
    for name, feature in features.items():
        value = row.get(name)
        if isinstance(value, list):
            row[name] = [feature.int2str(v) for v in value]
        elif isinstance(value, int) and value >= 0:
            row[name] = feature.int2str(value)
    return row
