"""Every record checked as it is read, in constant memory: the task's own rules (empty text, unknown label,
tokens and tags of different lengths...), then one kind of value per column. Each bad record is reported with
its file and line; ``data.on_bad_record: skip`` drops and counts them instead (useful on streams)."""
from __future__ import annotations

import difflib
import logging
from typing import Any

from ..errors import DatasetLoadError, ValidationError

log = logging.getLogger("tunepipe")
MAX_REPORTED = 5
COLUMN_SAMPLE = 100  # records whose keys tell which columns a split has


class RecordChecker:
    """``accept(row, origin)`` says whether to keep a record; ``finish()`` raises what was found."""

    def __init__(self, task, split: str, skip_bad: bool = False):
        self.task, self.split, self.skip_bad = task, split, skip_bad
        self.bad: list[tuple[tuple[str, int], str]] = []
        self.kinds: dict[tuple[str, bool], tuple[str, tuple[str, int]]] = {}
        self.kind_error: ValidationError | None = None
        self.skipped = 0
        self.columns_checked = False

    @property
    def failed(self) -> bool:
        return not self.skip_bad and (bool(self.bad) or self.kind_error is not None)

    def check_columns(self, rows: list[dict[str, Any]], origin: tuple[str, int]) -> None:
        """The task's required columns among the first records' keys (a misnamed column fails here, once,
        instead of as every record being 'empty')."""
        self.columns_checked = True
        present = set().union(*(row.keys() for row in rows)) if rows else set()
        required = self.task.required_columns()
        if self.split in ("test", "input"):
            required = [c for c in required if c != self.task.column("label")]
        for col in required:
            if col in present:
                continue
            role = next((r for r in ("text", "text_pair", "label") if self.task.column(r) == col), None)
            close = difflib.get_close_matches(col, sorted(present), n=1, cutoff=0.5)
            hints = [f"did you mean '{close[0]}'? set data.{role}_column: {close[0]}" if close and role else ""]
            hints.append(f"columns present: {', '.join(sorted(present))}")
            if role:
                hints.append(f"set data.{role}_column to the right column, or rename it with data.columns")
            raise DatasetLoadError(f"Column '{col}' not found in the {self.split} data", file=origin[0],
                                   field=f"data.{role}_column" if role else None, suggestions=hints)

    def accept(self, row: dict[str, Any], origin: tuple[str, int]) -> bool:
        problem = self.task.validate_record(row, self.split)
        if problem is None and self.kind_error is None:
            problem = self._kind_problem(row, origin)
            if problem is not None and not self.skip_bad:
                return False  # reported by finish(), after the task's own (more specific) findings
        if problem is None:
            return not self.failed
        if self.skip_bad:
            self.skipped += 1
            if self.skipped <= MAX_REPORTED:
                log.warning("skipped a bad record in the %s data, %s:%s: %s", self.split, origin[0], origin[1],
                            problem)
            return False
        self.bad.append((origin, problem))
        if len(self.bad) > MAX_REPORTED:
            self.finish()
        return False

    def _kind_problem(self, row: dict[str, Any], origin: tuple[str, int]) -> str | None:
        """One kind of value per column (text, number, true/false, list, mapping), and one kind inside list
        values: Arrow needs it to store the split, and labels given sometimes as ids and sometimes as names (1
        and 'pos') are ambiguous."""
        for column, value in row.items():
            kinds = [(False, value_kind(value))]
            if isinstance(value, list):
                kinds += [(True, value_kind(v)) for v in value]
            for inner, kind in kinds:
                if kind is None:
                    continue
                seen = self.kinds.setdefault((column, inner), (kind, origin))
                if seen[0] == kind:
                    continue
                where = f"items of column '{column}'" if inner else f"column '{column}'"
                (file0, line0) = seen[1]
                message = (f"{where} mixes {seen[0]} ({file0}:{line0}) and {kind} values"
                           f"{' (ids and names?)' if {seen[0], kind} == {'number', 'text'} else ''}")
                if not self.skip_bad:
                    self.kind_error = ValidationError(
                        f"Bad record in the {self.split} data: {message}", file=origin[0], line=origin[1],
                        field=column_field(self.task, column),
                        suggestions=[f"write every value of {where} the same way (e.g. all label names as text)",
                                     "fix or remove that record"])
                return message
        return None

    def finish(self) -> None:
        if self.bad:
            (file, line), first = self.bad[0]
            listing = "; ".join(f"{f}:{n}: {p}" for (f, n), p in self.bad[:MAX_REPORTED])
            more = " (and more)" if len(self.bad) > MAX_REPORTED else ""
            hints = ["fix or remove the records listed"]
            if "unknown label" in first:
                hints.insert(0, "labels come from the training data unless data.labels lists them all (in id "
                                "order): add the label there, or fix the record")
            if not self.skip_bad:
                hints.append("or set data.on_bad_record: skip to drop bad records and count them")
            raise ValidationError(f"Bad record in the {self.split} data: {first}. All found: {listing}{more}",
                                  file=file, line=line, suggestions=hints)
        if self.kind_error is not None:
            raise self.kind_error
        if self.skipped:
            log.warning("%d bad record(s) skipped in the %s data (data.on_bad_record: skip)", self.skipped,
                        self.split)


def value_kind(value: Any) -> str | None:
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


def column_field(task, column: str) -> str | None:
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
