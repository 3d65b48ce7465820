"""Backend selection. Backends never look at the task's name: the Task object carries what differs."""
from __future__ import annotations

from ..errors import BackendNotAvailableError

AVAILABLE = ("hf",)


def select_trainer(task, backend: str):
    """Return the trainer class for ``backend`` ('hf' | 'accelerate' | 'lightning' | 'lightning+accelerate')."""
    if backend == "hf":
        from .hf import NLPSeq2SeqTrainer, NLPTrainer
        return NLPSeq2SeqTrainer if task.generative else NLPTrainer
    raise BackendNotAvailableError(
        f"The '{backend}' backend is part of the design but has not landed in this version of tunepipe",
        field="backend", suggestions=["use backend: hf (the transformers Trainer), the default",
                                      "remove use_accelerate / use_lightning from the specs"])


def __getattr__(name):
    if name in ("NLPTrainer", "NLPSeq2SeqTrainer"):
        from . import hf
        return getattr(hf, name)
    raise AttributeError(name)
