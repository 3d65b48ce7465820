"""Accelerate backend: the one loop (trainers/loop.py) on the Accelerate engine (trainers/engines/accelerate.py)."""
from __future__ import annotations

from .engines.accelerate import AccelerateEngine
from .loop import LoopTrainer


class AcceleratedNLPTrainer(LoopTrainer):
    """The loop on ``accelerate.Accelerator`` for encoder tasks (classification, tagging, QA, MLM, causal LM)."""

    engine_class = AccelerateEngine


class AcceleratedNLPSeq2SeqTrainer(AcceleratedNLPTrainer):
    """The same for generative tasks; the loop's evaluation decodes with ``generate(**task.generation_kwargs())``
    because the Task says it is generative, so this class differs only by name (kept for the public API)."""
