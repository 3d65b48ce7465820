"""Task registry. Adding a task = one module here + one line in ``_TASKS``."""
from __future__ import annotations

import importlib

from ..errors import TaskTypeError

# name -> "module:Class"; modules are imported only when the task is used (fast CLI start-up).
_TASKS = {
    "token_classification": "token_classification:TokenClassificationTask",
    "text_classification": "text_classification:TextClassificationTask",
}
_ALIASES = {"ner": "token_classification", "token-classification": "token_classification",
            "classification": "text_classification", "sequence_classification": "text_classification",
            "text-classification": "text_classification"}
# Tasks of the design that this version does not ship yet: asking for one says so instead of "unknown".
PLANNED = ("masked_language_modeling", "question_answering", "translation", "summarization",
           "text_generation", "causal_lm")


def task_names() -> list[str]:
    return list(_TASKS)


def get_task(name: str):
    """Return the Task class registered under ``name`` (or an alias)."""
    key = _ALIASES.get(name, name)
    if key in _TASKS:
        module, cls = _TASKS[key].split(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), cls)
    if key in PLANNED:
        raise TaskTypeError(f"Task '{name}' is part of the design but not available in this version",
                            field="task", suggestions=[f"available tasks: {', '.join(_TASKS)}"])
    import difflib
    close = difflib.get_close_matches(key, list(_TASKS) + list(_ALIASES) + list(PLANNED), n=2)
    raise TaskTypeError(f"Unknown task '{name}'", field="task",
                        suggestions=[f"did you mean '{c}'?" for c in close] + [f"available: {', '.join(_TASKS)}"])
