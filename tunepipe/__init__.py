"""tunepipe: fine-tune Hugging Face NLP models end to end from one specs file.

Public names are imported lazily so that ``tunepipe --help`` and ``import tunepipe`` stay instant.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "FineTunePipeLine": "pipeline",
    "Specs": "specs", "load_specs": "specs",
    "DatasetModules": "data",
    "ModelModules": "modeling.models", "TokenizerModules": "modeling.models",
    "NLPTrainer": "trainers.hf", "NLPSeq2SeqTrainer": "trainers.hf",
    "AcceleratedNLPTrainer": "trainers.accelerated", "AcceleratedNLPSeq2SeqTrainer": "trainers.accelerated",
    "NLPTrainerWithLightning": "trainers.lightning", "NLPSeq2SeqTrainerWithLightning": "trainers.lightning",
    "ErrorHandler": "errors", "TunepipeError": "errors",
    "get_task": "tasks",
    "QuantizationManager": "modeling.quantization", "TypeUtils": "modeling.type_utils",
    "merge_and_unload": "serving.merge",
    "InferencePipeLine": "serving.inference", "MultiAdapterManager": "serving.adapters",
    "CheckpointManager": "trainers.checkpoints",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tunepipe' has no attribute '{name}'")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__():
    return sorted(list(globals()) + __all__)
