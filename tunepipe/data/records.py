"""A split's records: an Arrow table on disk (memory-mapped, so memory does not grow with the data) with each
record's origin (file, line) carried in two columns, for error messages long after reading."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import DatasetLoadError

FILE_COLUMN, LINE_COLUMN = "_tunepipe_file", "_tunepipe_line"
ORIGIN_COLUMNS = (FILE_COLUMN, LINE_COLUMN)
WRITE_BATCH = 2000


class Records:
    """Records held in Python (prediction inputs, small in-memory data); the same views as ArrowRecords."""

    def __init__(self, rows: list[dict[str, Any]] | None = None, origins: list[tuple[str, int]] | None = None):
        self.rows = rows if rows is not None else []
        self.origins = origins if origins is not None else []
        self.files: set[str] = {f for f, _ in self.origins}
        self.key: str | None = None

    def add(self, row: dict[str, Any], origin: tuple[str, int]) -> None:
        self.rows.append(row)
        self.origins.append(origin)
        self.files.add(origin[0])

    def take(self, indices: list[int]) -> "Records":
        return Records([self.rows[i] for i in indices], [self.origins[i] for i in indices])

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def dataset(self):
        import datasets
        return datasets.Dataset.from_list(with_all_keys(self.rows))


class _View(Sequence):
    def __init__(self, dataset, convert):
        self._dataset, self._convert = dataset, convert

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._convert(self._dataset[i])

    def __iter__(self) -> Iterator:
        for batch in self._dataset.iter(batch_size=1000):
            keys = list(batch)
            for values in zip(*batch.values()):
                yield self._convert(dict(zip(keys, values)))

    def __eq__(self, other) -> bool:
        return isinstance(other, (list, tuple, Sequence)) and list(self) == list(other)

    def __bool__(self) -> bool:
        return len(self) > 0


class ArrowRecords:
    """``rows`` and ``origins`` read lazily from the Arrow table; ``dataset`` is what tokenizing maps over."""

    def __init__(self, table_dataset, files: set[str], key: str | None = None, path: Path | None = None):
        self._all = table_dataset
        self.files, self.key = set(files), key
        self.path = path  # the Arrow file itself, when these are all its rows in order (read_batches)
        self.dataset = table_dataset.remove_columns([c for c in ORIGIN_COLUMNS if c in table_dataset.column_names])
        self.rows = _View(self.dataset, lambda row: row)
        origins = table_dataset.select_columns(list(ORIGIN_COLUMNS))
        self.origins = _View(origins, lambda row: (row[FILE_COLUMN], row[LINE_COLUMN]))

    def take(self, indices: Iterable[int]) -> "ArrowRecords":
        return ArrowRecords(self._all.select(list(indices)), self.files)

    def __len__(self) -> int:
        return len(self._all)

    def column(self, name: str, batch_size: int = 10_000) -> Iterator[Any]:
        """One column's values, read in batches (label inference over millions of records)."""
        if name not in self.dataset.column_names:
            return
        if self.path is not None:
            for batch in read_batches(self.path, batch_size, columns=[name]):
                yield from batch[name]
            return
        for batch in self.dataset.select_columns([name]).iter(batch_size=batch_size):
            yield from batch[name]

    def batches(self, batch_size: int = 1000) -> Iterator[dict[str, list]]:
        """The records as column batches (what a batched preprocess takes), without the origin columns."""
        if self.path is not None:
            yield from read_batches(self.path, batch_size)
            return
        yield from self.dataset.iter(batch_size=batch_size)


def read_batches(path: Path, batch_size: int, columns: list[str] | None = None) -> Iterator[dict[str, list]]:
    """An Arrow stream file read with plain reads, not memory-mapped: a pass over millions of records then does
    not leave their pages in this process's resident memory (a mapping would, until it is closed)."""
    import pyarrow as pa
    with pa.OSFile(str(path)) as source:
        reader = pa.ipc.open_stream(source)
        keep = [n for n in reader.schema.names if n not in ORIGIN_COLUMNS and (columns is None or n in columns)]
        pending = None
        for batch in reader:
            table = pa.Table.from_batches([batch]).select(keep)
            pending = table if pending is None else pa.concat_tables([pending, table])
            while pending.num_rows >= batch_size:
                yield pending.slice(0, batch_size).to_pydict()
                pending = pending.slice(batch_size)
        if pending is not None and pending.num_rows:
            yield pending.to_pydict()


class ArrowWriter:
    """Rows to an Arrow stream file in batches. A batch whose types widen the schema (a column null so far, ints
    then floats, a key first seen late) starts a new part; parts are unified when the file is closed."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.parts: list[tuple[Path, Any]] = []
        self._rows: list[dict[str, Any]] = []
        self._sink = self._writer = self._schema = None
        self.count = 0

    def add(self, row: dict[str, Any], origin: tuple[str, int]) -> None:
        self._rows.append({**row, FILE_COLUMN: origin[0], LINE_COLUMN: origin[1]})
        self.count += 1
        if len(self._rows) >= WRITE_BATCH:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        keys = list(dict.fromkeys(k for row in rows for k in row))
        try:
            table = pa.Table.from_pydict({k: [row.get(k) for row in rows] for k in keys})
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise _mixed_values_error(rows, e) from None
        if self._schema is not None:
            table = self._fit(table)
        if self._schema is None or table.schema != self._schema:
            self._open(table.schema)
        self._writer.write_table(table)

    def _fit(self, table):
        """The batch in the open part's schema when it fits there; else as it is (a new part)."""
        import pyarrow as pa
        if set(table.column_names) - set(self._schema.names):
            return table
        try:
            columns = [table.column(n) if n in table.column_names else pa.nulls(len(table), type=f.type)
                       for n, f in zip(self._schema.names, self._schema)]
            return pa.Table.from_arrays(columns, schema=self._schema) if all(
                c.type == f.type for c, f in zip(columns, self._schema)) else \
                pa.Table.from_arrays(columns, names=self._schema.names).cast(self._schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            return table

    def _open(self, schema) -> None:
        import pyarrow as pa
        self._close_part()
        part = self.path.with_name(f"{self.path.name}.part{len(self.parts)}")
        self._sink = pa.OSFile(str(part), "wb")
        self._writer = pa.ipc.new_stream(self._sink, schema)
        self._schema = schema
        self.parts.append((part, schema))

    def _close_part(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None

    def close(self):
        """Finish the file; returns it as a memory-mapped ``datasets.Dataset`` (None when no row was added)."""
        import datasets
        import pyarrow as pa
        self._flush()
        self._close_part()
        if not self.parts:
            return None
        if len(self.parts) == 1:
            os.replace(self.parts[0][0], self.path)
        else:
            try:
                schema = pa.unify_schemas([s for _, s in self.parts], promote_options="permissive")
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                raise DatasetLoadError(f"Records of {self.path.stem} hold values of different kinds in one column: "
                                       f"{e}", suggestions=["write every value of a column the same way"]) from None
            with pa.OSFile(str(self.path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
                for part, _ in self.parts:
                    with pa.memory_map(str(part)) as source:
                        for batch in pa.ipc.open_stream(source):
                            writer.write_table(_conform(pa.Table.from_batches([batch]), schema))
                    part.unlink()
        return datasets.Dataset.from_file(str(self.path))

    def abort(self) -> None:
        self._close_part()
        for part, _ in self.parts:
            part.unlink(missing_ok=True)


def _conform(table, schema):
    import pyarrow as pa
    columns = [table.column(n) if n in table.column_names else pa.nulls(len(table), type=f.type)
               for n, f in zip(schema.names, schema)]
    return pa.Table.from_arrays(columns, names=schema.names).cast(schema)


def _mixed_values_error(rows: list[dict[str, Any]], error: Exception) -> DatasetLoadError:
    first, last = rows[0], rows[-1]
    return DatasetLoadError(f"Records hold values Arrow cannot store in one column ({str(error).splitlines()[0]})",
                            file=first.get(FILE_COLUMN), line=first.get(LINE_COLUMN),
                            suggestions=[f"check the records from line {first.get(LINE_COLUMN)} to "
                                         f"{last.get(LINE_COLUMN)}: write every value of a field the same way"])


def with_all_keys(rows: list[dict]) -> list[dict]:
    """Dataset.from_list takes its columns from the first record only; an optional field that first appears
    later (a 'references' list, a text_pair) would be dropped silently. Give every record every key."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    if all(len(row) == len(keys) for row in rows):
        return rows
    return [{k: row.get(k) for k in keys} for row in rows]
