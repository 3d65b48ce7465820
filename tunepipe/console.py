"""What the CLI shows a person: library noise held back on normal runs (back with ``--debug``), metrics as a
table, where the run is, and a record of errors in the run's own directory.

Only the CLI uses this module: a Python caller keeps its own warning and logging configuration.
Other stages' modules are imported inside the functions that use them: this file is on the start-up
path of `tunepipe train`, where a specs typo is reported before they load (tests/test_import_placement.py).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

# Lines libraries log on every normal run that ask nothing of the user: logger name -> message fragments.
# transformers prints a LOAD REPORT table whenever a task head is new (every fine-tune of a base model);
# bitsandbytes asks for the `kernels` package, which fetches code from the hub (docs: don't install it).
NOISY_LOG_LINES = {
    "transformers.modeling_utils": ("LOAD REPORT",),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
}
# Warning categories from libraries (not tunepipe) hidden on normal runs, and single harmless messages.
NOISY_CATEGORIES = (FutureWarning, DeprecationWarning, PendingDeprecationWarning)
NOISY_MESSAGES = (r".*'pin_memory' argument is set as true but no accelerator is found",)
LOG_FILE = "tunepipe.log"


class _DropLines(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is not ours to judge
            return True
        return not any(f in message for f in self.fragments)


@contextlib.contextmanager
def quiet_libraries(debug: bool = False) -> Iterator[None]:
    """Hold back the library output listed above while a command runs; nothing is held back with ``debug``.
    Warnings the user asked for with ``python -W`` / ``PYTHONWARNINGS`` are left as they are."""
    if debug:
        yield
        return
    filters = [(logging.getLogger(name), _DropLines(fragments)) for name, fragments in NOISY_LOG_LINES.items()]
    for logger, f in filters:
        logger.addFilter(f)
    try:
        with warnings.catch_warnings():
            if not sys.warnoptions:
                for category in NOISY_CATEGORIES:
                    warnings.filterwarnings("ignore", category=category)
                    warnings.filterwarnings("default", category=category, module=r"tunepipe(\.|$)")
                for message in NOISY_MESSAGES:
                    warnings.filterwarnings("ignore", message=message, category=UserWarning)
            yield
    finally:
        for logger, f in filters:
            logger.removeFilter(f)


# ---- metrics ------------------------------------------------------------------------------------------------------
HIDDEN_METRICS = ("runtime", "steps_per_second")


def metric_rows(task, metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, shown value) of one split's metrics, in the task's order; supports and timings left out."""
    rows = []
    for key, value in task.metric_table(metrics):
        if key.endswith("_support") or key in HIDDEN_METRICS:
            continue
        rows.append((key, f"{value:.4f}" if isinstance(value, float) else str(value)))
    return rows


def print_metrics(task, metrics: dict[str, dict[str, Any]], file=None) -> None:
    """One aligned table per evaluated split (``<split> metrics``), with rich where it is installed."""
    file = file or sys.stdout
    for split, values in metrics.items():
        if split == "train" or not isinstance(values, dict):
            continue
        rows = metric_rows(task, values)
        print(f"\n{split} metrics", file=file)  # not a rich title: rich wraps a title to the table's width
        try:
            from rich import box
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            width = max([len(k) for k, _ in rows] + [6])
            print(f"  {'metric':<{width}}  {'value':>10}", file=file)
            for key, value in rows:
                print(f"  {key:<{width}}  {value:>10}", file=file)
            continue
        table = Table(box=box.SIMPLE_HEAD, show_edge=False)
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in rows:
            table.add_row(key, value)
        Console(file=file, highlight=False, markup=False, emoji=False, soft_wrap=False).print(table)


# ---- the last line of a run -----------------------------------------------------------------------------------
def run_summary(output_dir: Path, tracking=None, report_to: Any = None) -> str:
    """Where the run is and how to look at it: the model card, the curves, and the tracking UIs in use."""
    from .tracking.plots import CURVES_FILE
    files = [output_dir / "README.md"] + ([output_dir / CURVES_FILE] if (output_dir / CURVES_FILE).is_file() else [])
    text = f"run saved in {output_dir} — open {', '.join(str(f) for f in files)}"
    mlflow = getattr(tracking, "mlflow", None)
    if mlflow is not None:
        text += f"; MLflow: {mlflow.ui_hint()}"
    from .tracking.reporting import tensorboard_dir, wanted
    if "tensorboard" in wanted(report_to):
        text += f"; TensorBoard: tensorboard --logdir {tensorboard_dir(output_dir)}"
    return text


# ---- errors, also in the run's directory ------------------------------------------------------------------------
def log_error(output_dir: str | Path | None, argv: list[str], error, details: str = "") -> Path | None:
    """Append the error (time, command, ``error.render()``, optional traceback) to ``<output_dir>/tunepipe.log``,
    only when that directory already exists and holds tunepipe's marker: never a directory created for the log,
    never one tunepipe does not own. The file is opened without following a symlink. Never raises."""
    if output_dir is None:
        return None
    from .ownership import MARKER, expand
    try:
        directory = expand(output_dir)
        if not directory.is_dir() or directory.is_symlink() or not (directory / MARKER).is_file():
            return None
        import shlex
        path = directory / LOG_FILE
        entry = (f"{time.strftime('%Y-%m-%d %H:%M:%S')} tunepipe {shlex.join(argv)}\n"
                 f"error: {error.render()}\n" + (details.rstrip() + "\n" if details else "") + "\n")
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(path, flags, 0o666)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(entry)
        return path
    except Exception:  # noqa: BLE001 - the console message is what matters; a log that cannot be written is not
        return None
