"""Lightning backends: the one loop (trainers/loop.py) on ``lightning.Fabric`` (trainers/engines/fabric.py).

``backend: lightning`` runs on :class:`FabricEngine` (Fabric launches, applies the strategy, places and autocasts);
``backend: lightning+accelerate`` on :class:`FabricAccelerateEngine` (Fabric launches, applies the strategy and
places the model; an Accelerator places batches, autocasts, runs backward and scales fp16 gradients).
"""
from __future__ import annotations

from .engines.fabric import FabricAccelerateEngine, FabricEngine
from .loop import LoopTrainer


class NLPTrainerWithLightning(LoopTrainer):
    """The loop on Lightning Fabric for encoder tasks; the engine follows ``specs.backend``."""

    def __init__(self, task, specs, *args, **kwargs):
        self.engine_class = FabricAccelerateEngine if specs.backend == "lightning+accelerate" else FabricEngine
        super().__init__(task, specs, *args, **kwargs)


class NLPSeq2SeqTrainerWithLightning(NLPTrainerWithLightning):
    """The same for generative tasks; the loop's evaluation decodes with ``generate(**task.generation_kwargs())``
    because the Task says it is generative, so this class differs only by name (kept for the public API)."""
