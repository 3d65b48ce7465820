"""Progress of generation evaluations (translation, summarization, text generation, decoder-only seq2seq).

Generating is the slow part of evaluating these tasks: a batch of 32 summaries can take minutes on a CPU, and the
Trainer's bar then sits at ``0/1`` the whole time (the accelerate and lightning loops showed none). One bar per
evaluation, on every backend, advanced per generated batch and showing the decoding steps done in the current
batch. It needs no change to the loops: they all drive ``on_prediction_step`` once per batch and ``on_evaluate`` at
the end (transformers' callback protocol), and decoding steps are counted by a forward hook on the model, which
``generate`` calls once per new token. The bar is armed only around evaluations (during training, and while the
pipeline evaluates), so predictions made afterwards stay quiet.
"""
from __future__ import annotations

import math
import os
import sys
import time

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback


class TrainingProgress(ProgressCallback):
    """transformers' training bar without its evaluation bar: GenerationProgress shows that one."""

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        return None


class GenerationProgress(TrainerCallback):
    """The generation bar: ``generating validation: 3/12 batches [01:10<03:20], decoding step 37/128``."""

    REFRESH_S = 0.5  # the decoding-step count is redrawn at most this often

    def __init__(self, max_new_tokens: int | None = None, eval_batch_size: int = 1, enabled: bool = True):
        self.max_new_tokens = max_new_tokens
        self.eval_batch_size = max(int(eval_batch_size or 1), 1)
        self.enabled = enabled
        self.armed = False
        self.bar = None
        self.split = "validation"
        self.expected: int | None = None  # batches, when the loop does not hand over its dataloader
        self.eval_dataset = None  # what evaluations during training run on (Tracking.attach sets it)
        self.training = False
        self.steps = 0
        self._shown = 0.0
        self._hook = None

    def __getstate__(self):  # spawned worker processes: no bar, no hook
        return {**self.__dict__, "bar": None, "_hook": None}

    # ---- arming --------------------------------------------------------------------------------------------
    def watch(self, model) -> None:
        """Count decoding steps: a forward hook on the transformers model (under a PEFT wrapper, its base), which
        ``generate`` calls once per new token; in training mode the hook returns at once."""
        if model is None or self._hook is not None:
            return
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._hook = base.register_forward_hook(self._on_forward)

    def arm(self, split: str, dataset=None) -> None:
        self.armed, self.split, self.expected = self.enabled, split, None
        if dataset is not None:
            world = max(int(os.environ.get("WORLD_SIZE", "1") or 1), 1)
            self.expected = math.ceil(math.ceil(len(dataset) / self.eval_batch_size) / world)

    def disarm(self) -> None:
        self.armed = False
        self._close()

    # ---- the bar -------------------------------------------------------------------------------------------
    def _open(self, total: int | None) -> None:
        from tqdm.auto import tqdm
        self.bar = tqdm(total=total, desc=f"generating {self.split}", unit="batch", dynamic_ncols=True,
                        leave=not self.training, file=sys.stderr)
        self.steps, self._shown = 0, time.monotonic()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = None

    def _on_forward(self, module, args, output) -> None:
        if not self.armed or module.training:
            return
        if self.bar is None:
            self._open(self.expected)
        self.steps += 1
        now = time.monotonic()
        if now - self._shown >= self.REFRESH_S:
            self._shown = now
            limit = f"/{self.max_new_tokens}" if self.max_new_tokens else ""
            self.bar.set_postfix_str(f"decoding step {min(self.steps, self.max_new_tokens or self.steps)}{limit}")

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True
        if state.is_world_process_zero and not getattr(args, "disable_tqdm", False):
            self.arm("validation", self.eval_dataset)
        if kwargs.get("model") is not None:
            self.watch(kwargs["model"])

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False
        self.disarm()

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not self.armed:
            return
        if self.bar is None:
            self._open(self.expected)
        if eval_dataloader is not None and self.bar.total is None:
            try:
                self.bar.total = len(eval_dataloader)
            except TypeError:
                pass
        self.steps = 0
        self.bar.set_postfix_str("", refresh=False)  # the next batch's steps, not the last one's
        self.bar.update(1)

    def on_evaluate(self, args, state, control, **kwargs):
        self._close()

    on_predict = on_evaluate
