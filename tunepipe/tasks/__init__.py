"""Task registry. Adding a task = one module here + one line in ``_TASKS``; or, from outside the package, an entry
point in the ``tunepipe.tasks`` group naming a Task subclass (docs/extending.md)."""
from __future__ import annotations

import difflib
import importlib
import importlib.util
from importlib.metadata import entry_points

from ..errors import TaskTypeError
from .base import Task

ENTRY_POINT_GROUP = "tunepipe.tasks"


class TaskEntryPointError(TaskTypeError):
    """A task registered by another package (entry point group ``tunepipe.tasks``) that cannot be used."""

    def __init__(self, message: str, *, distribution: str, entry_point: str, **kwargs):
        self.distribution, self.entry_point = distribution, entry_point
        super().__init__(message, **kwargs)

# name -> "module:Class"; modules are imported only when the task is used (fast CLI start-up).
_TASKS = {
    "token_classification": "token_classification:TokenClassificationTask",
    "text_classification": "text_classification:TextClassificationTask",
    "question_answering": "question_answering:QuestionAnsweringTask",
    "translation": "seq2seq:TranslationTask",
    "summarization": "seq2seq:SummarizationTask",
    "text_generation": "seq2seq:TextGenerationTask",
    "masked_language_modeling": "masked_lm:MaskedLMTask",
    "causal_lm": "causal_lm:CausalLMTask",
}
_ALIASES = {"ner": "token_classification", "token-classification": "token_classification",
            "classification": "text_classification", "sequence_classification": "text_classification",
            "text-classification": "text_classification", "qa": "question_answering",
            "mlm": "masked_language_modeling", "masked_lm": "masked_language_modeling", "clm": "causal_lm"}


def _available(key: str) -> bool:
    return importlib.util.find_spec(f"{__name__}.{_TASKS[key].split(':')[0]}") is not None


def task_names(plugins: bool = False) -> list[str]:
    """Tasks shipped in this installation; with ``plugins``, then the usable tasks other packages register."""
    return [k for k in _TASKS if _available(k)] + (list(plugin_tasks()[0]) if plugins else [])


def _entry_points() -> list:
    return sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def _where(ep) -> str:
    name = getattr(getattr(ep, "dist", None), "name", None) or "<unknown>"
    return f"entry point '{ep.name} = {ep.value}' of the distribution '{name}'"


def _load_entry_point(ep):
    """The Task subclass an entry point names, or a TaskEntryPointError naming its distribution and entry point."""
    dist = getattr(getattr(ep, "dist", None), "name", None) or "<unknown>"

    def fail(why: str, hints: list[str]) -> TaskEntryPointError:
        return TaskEntryPointError(f"Task '{ep.name}' from the {_where(ep)} cannot be used: {why}", field="task",
                                   distribution=dist, entry_point=f"{ep.name} = {ep.value}", suggestions=hints)

    key = _ALIASES.get(ep.name, ep.name)
    if key in _TASKS:
        raise fail(f"'{ep.name}' is a built-in task name", [
            f"rename the entry point in {dist}'s packaging (e.g. '{dist.replace('-', '_')}_{key}'), or uninstall "
            f"{dist} (pip uninstall {dist})"])
    try:
        cls = ep.load()
    except Exception as e:  # noqa: BLE001 - whatever the package's import raises
        raise fail(f"importing it failed: {type(e).__name__}: {e}",
                   [f"fix or reinstall {dist}", f"or uninstall it (pip uninstall {dist})"]) from e
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise fail(f"'{ep.value}' is {cls!r}, not a subclass of tunepipe.tasks.base.Task",
                   ["the entry point must name a class deriving from tunepipe's Task"])
    if getattr(cls, "name", None) != ep.name:
        raise fail(f"the class's name attribute is {getattr(cls, 'name', None)!r}, not '{ep.name}'",
                   [f"set name = '{ep.name}' on the class (runs record it, and predict finds the task by it)"])
    return cls


def builtin_task(name: str):
    """The built-in Task class ``name`` (listing: a package claiming the same name is reported by plugin_tasks)."""
    module, cls = _TASKS[_ALIASES.get(name, name)].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def plugin_tasks() -> tuple[dict[str, type], list[str]]:
    """({name: Task subclass} of the usable tasks other packages register, [why each unusable one was skipped])."""
    found: dict[str, type] = {}
    skipped: list[str] = []
    for ep in _entry_points():
        try:
            cls = _load_entry_point(ep)
        except TaskEntryPointError as e:
            skipped.append(e.message)
            continue
        if ep.name in found:
            skipped.append(f"{_where(ep)} registers '{ep.name}' again: skipped")
            continue
        found[ep.name] = cls
    return found, skipped


def planned_task_names() -> list[str]:
    """Tasks of the design whose module is not in this version."""
    return [k for k in _TASKS if not _available(k)]


def get_task(name: str):
    """Return the Task class registered under ``name`` (or an alias)."""
    key = _ALIASES.get(name, name)
    if key in _TASKS:
        if not _available(key):
            raise TaskTypeError(f"Task '{name}' is part of the design but not available in this version",
                                field="task", suggestions=[f"available tasks: {', '.join(task_names())}"])
        for ep in _entry_points():  # another package claims a built-in name: which one was meant is unclear
            if _ALIASES.get(ep.name, ep.name) == key:
                _load_entry_point(ep)
        return builtin_task(key)
    registered = _entry_points()
    matches = [ep for ep in registered if ep.name == name]
    if len(matches) > 1:
        raise TaskEntryPointError(f"Task '{name}' is registered by several packages: "
                                  + "; ".join(_where(ep) for ep in matches), field="task",
                                  distribution=", ".join(str(getattr(ep.dist, "name", "?")) for ep in matches),
                                  entry_point=name, suggestions=["uninstall all but one of them"])
    if matches:
        return _load_entry_point(matches[0])
    plugins = [ep.name for ep in registered]
    close = difflib.get_close_matches(key, list(_TASKS) + list(_ALIASES) + plugins, n=2)
    raise TaskTypeError(f"Unknown task '{name}'", field="task",
                        suggestions=[f"did you mean '{c}'?" for c in close] + [
                            f"available: {', '.join(task_names() + [p for p in plugins if p not in _TASKS])}"])
