"""User code named in the specs: ``metrics:`` (extra metric functions) and ``data.preprocess`` (a function applied
to each record as it is read). See docs/extending.md.

A reference is ``module:function`` (an importable module: installed, or on PYTHONPATH; ``function`` may be a dotted
attribute path, ``module:Class.method``) or ``path/to/file.py:function`` (a Python file, relative to the current
directory like the data paths). The specs only check the form (specs/schema.py, no import); the code is imported when a
run is built from *your* specs (FineTunePipeLine: train, evaluate, check). A finished run's specs.yaml read by
predict, serve or merge never gets here (load_policy.py: no code from folders), so these references are inert
there.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError, TrainingError
from .specs.references import FORM_HINT, REFERENCE, check_reference
from .tasks import get_task

# what the trainers add to every evaluation: a custom metric of the same name would be overwritten or overwrite it
RESERVED_METRICS = {"loss", "runtime", "samples_per_second", "steps_per_second", "epoch"}


def resolve_callable(reference: str, field_name: str) -> Callable:
    """Import ``reference`` and return the callable it names; a ConfigError naming ``field_name`` otherwise."""
    match = REFERENCE.match(check_reference(reference, field_name))
    module_name, attr = match.group("module"), match.group("attr")
    if module_name.endswith(".py"):
        module = _import_file(Path(module_name).expanduser(), reference, field_name)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is not None and module_name != e.name and not module_name.startswith(e.name + "."):
                raise _import_error(reference, field_name, e) from e  # the module itself imports something missing
            raise ConfigError(f"{field_name}: module '{module_name}' not found (from '{reference}')",
                              field=field_name, suggestions=[
                                  "install the package that holds it, or put its folder on PYTHONPATH "
                                  "(PYTHONPATH=path/to/folder tunepipe train ...)",
                                  f"or name the file: '{module_name.replace('.', '/')}.py:{attr}'"]) from None
        except Exception as e:  # noqa: BLE001 - any error raised while importing the user's module
            raise _import_error(reference, field_name, e) from e
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            names = [n for n in dir(target) if not n.startswith("_") and callable(getattr(target, n, None))]
            close = difflib.get_close_matches(part, names, n=2)
            raise ConfigError(f"{field_name}: '{reference}' does not exist: {getattr(target, '__name__', module_name)}"
                              f" has no attribute '{part}'", field=field_name,
                              suggestions=[f"did you mean '{c}'?" for c in close] + [
                                  f"callables there: {', '.join(names[:10]) or 'none'}"])
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{field_name}: '{reference}' is a {type(target).__name__}, not a function", field=field_name,
                          suggestions=["name a function (def ...) of that module"])
    return target


def _import_file(path: Path, reference: str, field_name: str):
    if not path.is_file():
        raise ConfigError(f"{field_name}: file '{path}' not found (from '{reference}')", field=field_name,
                          file=str(path), suggestions=["a relative path is read from the current directory, like the data paths",
                                       FORM_HINT])
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"tunepipe_user_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}_{digest}"
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path.resolve()):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path.resolve())
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # functions defined there can be pickled by reference (worker processes)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001
        del sys.modules[name]
        raise _import_error(reference, field_name, e) from e
    return module


def _import_error(reference: str, field_name: str, error: BaseException) -> ConfigError:
    return ConfigError(f"{field_name}: importing '{reference}' failed: {type(error).__name__}: {error}",
                       field=field_name, suggestions=["fix the module (the error is raised by its code), then rerun"])


def callable_fingerprint(fn: Callable) -> str:
    """What a cache entry built with ``fn`` depends on: its qualified name, its source, and its module file's bytes
    (a helper it calls in the same module counts too). Editing the function's module changes it."""
    target = inspect.unwrap(fn)
    parts = [getattr(target, "__module__", ""), getattr(target, "__qualname__", type(target).__qualname__)]
    try:
        parts.append(inspect.getsource(target))
    except (OSError, TypeError):
        pass
    parts.append(_module_bytes_hash(getattr(target, "__module__", None) or type(target).__module__))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _module_bytes_hash(module_name: str | None) -> str:
    module = sys.modules.get(module_name or "")
    path = getattr(module, "__file__", None)
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else ""
    except OSError:
        return ""


def class_code_fingerprint(cls: type) -> str:
    """The code of ``cls`` and its bases that lives outside tunepipe (a task from a plugin package): tunepipe's own
    code is covered by cache.code_version(). Empty for tunepipe's own tasks."""
    own = [c.__module__ for c in cls.__mro__ if c.__module__ != "builtins"
           and not c.__module__.startswith("tunepipe.")]
    return hashlib.sha256("\0".join(m + ":" + _module_bytes_hash(m) for m in own).encode()).hexdigest() if own else ""


# ---- metrics: ---------------------------------------------------------------------------------------------------
@dataclass
class MetricInputs:
    """What a custom metric function receives (one argument), after the task's own compute_metrics ran.

    ``predictions`` / ``label_ids``: numpy arrays exactly as the task's compute_metrics gets them (classification
    tasks: predicted ids after argmax, -100 in ``label_ids`` where no label counts; generative tasks: generated
    token ids). ``task``: the Task (``task.labels``, ``task.tokenizer`` for seq2seq, ``task.specs``). ``split``:
    'validation' or 'test'. ``metrics``: a copy of the task's own metrics for this evaluation."""

    predictions: Any
    label_ids: Any
    task: Any
    split: str
    metrics: dict[str, Any] = field(default_factory=dict)
    inputs: Any = None


class ExtendedMetrics:
    """``task.compute_metrics`` followed by the ``metrics:`` functions, their results merged in. A name the task
    (or the trainer: loss, runtime, ...) already reports is an error: no metric is silently renamed or replaced.
    Picklable (the functions are re-imported by reference in another process)."""

    def __init__(self, task, references: list[str]):
        self.task, self.references = task, list(references)
        self.functions = [resolve_callable(ref, _field(i, references)) for i, ref in enumerate(references)]

    def __getstate__(self) -> dict[str, Any]:
        return {"task": self.task, "references": self.references}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.task, self.references, self.functions = state["task"], state["references"], None

    def __call__(self, eval_pred) -> dict[str, Any]:
        if self.functions is None:
            self.functions = [resolve_callable(r, _field(i, self.references)) for i, r in enumerate(self.references)]
        metrics = dict(type(self.task).compute_metrics(self.task, eval_pred) or {})
        split = getattr(self.task, "eval_split", "validation")
        for i, (reference, fn) in enumerate(zip(self.references, self.functions)):
            inputs = MetricInputs(predictions=eval_pred.predictions, label_ids=eval_pred.label_ids, task=self.task,
                                  split=split, metrics=dict(metrics), inputs=getattr(eval_pred, "inputs", None))
            extra = fn(inputs)
            metrics.update(_checked(extra, reference, _field(i, self.references), metrics))
        return metrics


def _field(index: int, references: list[str]) -> str:
    return "metrics" if len(references) == 1 else f"metrics[{index}]"


def _checked(extra: Any, reference: str, field_name: str, existing: dict[str, Any]) -> dict[str, float]:
    if not isinstance(extra, dict):
        raise TrainingError(f"The metric function '{reference}' returned a {type(extra).__name__}, not a dict of "
                            "metric names to numbers", field=field_name,
                            suggestions=["return e.g. {'macro_f1': 0.83}"])
    out: dict[str, float] = {}
    for name, value in extra.items():
        key = name[len("eval_"):] if isinstance(name, str) and name.startswith("eval_") else name
        if not isinstance(key, str) or not key:
            raise TrainingError(f"The metric function '{reference}' returned the metric name {name!r}: names are "
                                "text", field=field_name)
        if key in existing or key in RESERVED_METRICS:
            raise TrainingError(f"The metric function '{reference}' returned '{key}', which the "
                                f"{'trainer' if key in RESERVED_METRICS else 'task (or an earlier metric function)'}"
                                " already reports", field=field_name,
                                suggestions=[f"give it a name of its own, e.g. 'my_{key}'",
                                             f"already reported: {', '.join(sorted(existing))}"])
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise TrainingError(f"The metric function '{reference}' returned {key}={value!r}, not a number",
                                field=field_name, suggestions=["metric values are numbers (int or float)"]) from None
        out[key] = int(value) if isinstance(value, int) and not isinstance(value, bool) else number
    return out


def build_task(specs):
    """The Task for ``specs`` (tasks registry), with the ``metrics:`` functions wrapped around its compute_metrics
    and ``data.preprocess`` imported once, so that a reference that does not resolve fails now, before any data is
    read. Every backend calls ``task.compute_metrics``: none of them needs to know."""
    task = get_task(specs.task)(specs)
    if specs.data.preprocess:
        resolve_callable(specs.data.preprocess, "data.preprocess")
    if specs.metrics:
        task.compute_metrics = ExtendedMetrics(task, specs.metrics)
    return task
