"""Backend selection. Backends never look at the task's name: the Task object carries what differs."""
from __future__ import annotations

import importlib

from ..errors import BackendNotAvailableError

AVAILABLE = ("hf", "accelerate", "lightning", "lightning+accelerate")

# backend -> (module, class for encoder tasks, class for generative tasks)
_BACKENDS = {
    "hf": ("hf", "NLPTrainer", "NLPSeq2SeqTrainer"),
    "accelerate": ("accelerated", "AcceleratedNLPTrainer", "AcceleratedNLPSeq2SeqTrainer"),
    "lightning": ("lightning", "NLPTrainerWithLightning", "NLPSeq2SeqTrainerWithLightning"),
    # combined mode: the Lightning classes pick the Fabric + Accelerate engine from specs.backend
    "lightning+accelerate": ("lightning", "NLPTrainerWithLightning", "NLPSeq2SeqTrainerWithLightning"),
}
_CLASSES = {cls: module for module, *classes in _BACKENDS.values() for cls in classes}


def select_trainer(task, backend: str):
    """Return the trainer class for ``backend`` ('hf' | 'accelerate' | 'lightning' | 'lightning+accelerate')."""
    if backend not in _BACKENDS:
        raise BackendNotAvailableError(f"Unknown backend '{backend}'", field="backend",
                                       suggestions=[f"use one of: {', '.join(AVAILABLE)}"])
    module, encoder_cls, generative_cls = _BACKENDS[backend]
    try:
        mod = importlib.import_module(f"{__name__}.{module}")
    except ImportError as e:
        missing = getattr(e, "name", None) or str(e)
        raise BackendNotAvailableError(
            f"The '{backend}' backend needs a package that is not installed ({missing})", field="backend",
            suggestions=["pip install 'tunepipe[lightning]'" if "lightning" in backend else f"pip install {missing}",
                         "or use backend: hf (the transformers Trainer)"]) from None
    return getattr(mod, generative_cls if task.generative else encoder_cls)


def __getattr__(name):
    if name in _CLASSES:
        return getattr(importlib.import_module(f"{__name__}.{_CLASSES[name]}"), name)
    raise AttributeError(name)
