"""Task registry. Adding a task = one module here + one line in ``_TASKS``."""
from __future__ import annotations

import importlib
import importlib.util

from ..errors import TaskTypeError

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


def task_names() -> list[str]:
    """Tasks shipped in this installation."""
    return [k for k in _TASKS if _available(k)]


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
        module, cls = _TASKS[key].split(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), cls)
    import difflib
    close = difflib.get_close_matches(key, list(_TASKS) + list(_ALIASES), n=2)
    raise TaskTypeError(f"Unknown task '{name}'", field="task",
                        suggestions=[f"did you mean '{c}'?" for c in close] + [f"available: {', '.join(task_names())}"])
