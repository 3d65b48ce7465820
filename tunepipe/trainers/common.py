"""Logging and evaluation every backend shares: train_log.jsonl, transformers' callback protocol, per-batch
prediction with the Trainer's padding and metric names, the Trainer's flop estimate, and the bookkeeping around
training that both trainer families keep the same way (resume, SIGTERM / SIGINT, the final evaluation)."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..output import atomic_text
from .checkpoints import CheckpointManager
from .data import data_state, num_examples
from .finite import flag_non_finite_metrics
from .run_state import StopOnSignal, resume_setting
from .settings import Schedule, TrainResult  # noqa: F401  (TrainResult: the backends' result type)

log = logging.getLogger("tunepipe")


class JsonlLogWriter:
    """Appends one JSON object per logging step to train_log.jsonl (rank 0 only). ``path`` None: a trainer with
    no training data (`tunepipe evaluate`) writes nothing there, the run's log stays the training's."""

    def __init__(self, path: Path | None):
        self.path = path
        self.start = time.time()

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"time": round(time.time() - self.start, 3), **record}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")


def truncate_log_after(path: Path, step: int) -> None:
    """Resuming from step N: drop the records an interrupted run wrote after its checkpoint, so each step is
    logged once."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) > step:
                continue
        except ValueError:
            continue  # a line cut short by the interruption
        kept.append(line + "\n")
    atomic_text(path, "".join(kept))


def strip_prefix(metrics: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in metrics.items()}



class _JsonlLogCallback(TrainerCallback):
    def __init__(self, writer: JsonlLogWriter):
        self.writer = writer

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.writer.write({"step": state.global_step, "epoch": state.epoch, **logs})


class CollatorEpoch(TrainerCallback):
    """Tells a collator that draws randomness per batch (masked LM's masks) which epoch it collates, at every
    epoch's start, resumed or not: its draws then depend on the seed, the epoch and the batch alone."""

    def __init__(self, collator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.set_epoch(math.floor((state.epoch or 0) + 1e-9))


def collator_callbacks(collator) -> list:
    return [CollatorEpoch(collator)] if hasattr(collator, "set_epoch") else []


class FlopCounter:
    """The Trainer's estimate: 6 x input tokens x non-embedding parameters per forward+backward."""

    def __init__(self, model):
        self.name = getattr(model, "main_input_name", "input_ids")
        self.params = model.num_parameters(exclude_embeddings=True) if hasattr(model, "num_parameters") else 0
        self.total = 0.0

    def add(self, batch: dict[str, Any]) -> None:
        if self.name in batch:
            self.total += 6 * batch[self.name].numel() * self.params


# ---- evaluation: per-batch reduction, Trainer-style padding/concatenation ----------------------------------------
def prediction_step(model, batch: dict[str, Any], task, names: list[str], generator=None):
    """(loss, predictions, labels) of one evaluation batch. Predictions are reduced per batch
    (``task.preprocess_logits_for_metrics``, tuples allowed) or, for generative tasks, the ids from
    ``generate(**task.generation_kwargs())``."""
    has_labels = bool(names) and all(batch.get(k) is not None for k in names)
    labels = None
    if has_labels:
        labels = tuple(batch[k] for k in names)
        labels = labels[0] if len(labels) == 1 else labels
    with torch.no_grad():
        outputs = model(**batch)
        loss = outputs["loss"].detach().float() if has_labels and "loss" in outputs else None
        if task.generative:
            preds = generate_batch(generator or model, batch, task)
        else:
            config = getattr(generator or model, "config", None)
            ignore = set(getattr(config, "keys_to_ignore_at_inference", []) or []) | {"loss"}
            logits = tuple(v for k, v in outputs.items() if k not in ignore)
            logits = logits[0] if len(logits) == 1 else logits
            preds = task.preprocess_logits_for_metrics(logits, labels)
    return loss, preds, labels


def generate_batch(model, batch: dict[str, Any], task):
    """The new token ids ``generate(**task.generation_kwargs())`` writes for an evaluation batch; the task says
    what generation starts from (the source, or a decoder-only model's prompt) and which ids are new."""
    inputs = task.generation_inputs(batch)
    return task.generated_part(model.generate(**inputs, **task.generation_kwargs()), inputs)


class EvalCollector:
    """Collects per-batch (loss, predictions, labels) like the Trainer's evaluation loop: nested tuples padded and
    concatenated (predictions with ``pred_pad``, labels with -100), then ``task.compute_metrics``."""

    def __init__(self, pred_pad: int = -100):
        from transformers.trainer_pt_utils import EvalLoopContainer
        self.losses = EvalLoopContainer(padding_index=-100)
        self.preds = EvalLoopContainer(padding_index=pred_pad)
        self.labels = EvalLoopContainer(padding_index=-100)

    def add(self, losses=None, preds=None, labels=None) -> None:
        """``losses``: one value per example (the batch loss repeated, as the Trainer does)."""
        if losses is not None:
            self.losses.add(losses)
        if preds is not None:
            self.preds.add(preds)
        if labels is not None:
            self.labels.add(labels)
        for c in (self.losses, self.preds, self.labels):
            c.to_cpu_and_numpy()  # keep device memory flat

    def arrays(self):
        return self.losses.get_arrays(), self.preds.get_arrays(), self.labels.get_arrays()


def evaluation_metrics(task, losses, preds, labels, runtime: float, num_samples: int, num_steps: int) -> dict:
    """The Trainer's metric set, without the split prefix: loss, task metrics, runtime, throughput."""
    from transformers import EvalPrediction
    metrics: dict[str, Any] = {}
    if preds is not None and labels is not None:  # the Trainer's condition for compute_metrics
        metrics.update(task.compute_metrics(EvalPrediction(predictions=preds, label_ids=labels)) or {})
    if losses is not None and len(losses):
        metrics["loss"] = float(losses.mean())
    metrics["runtime"] = round(runtime, 4)
    metrics["samples_per_second"] = round(num_samples / runtime, 3) if runtime else 0.0
    metrics["steps_per_second"] = round(num_steps / runtime, 3) if runtime else 0.0
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}


# ---- callbacks and logs: transformers' callback protocol, driven by every backend --------------------------------
def callback_handler(args, model, tokenizer, callbacks, writer: JsonlLogWriter):
    """transformers' CallbackHandler with the Trainer's default callbacks (flow, progress/printer) and the
    train_log.jsonl writer: one implementation of 'when to log/evaluate/save' and of the log format."""
    from transformers.trainer_callback import (
        CallbackHandler,
        DefaultFlowCallback,
        PrinterCallback,
        ProgressCallback,
    )

    progress = PrinterCallback if args.disable_tqdm else ProgressCallback
    return CallbackHandler([DefaultFlowCallback, progress, _JsonlLogCallback(writer)] + list(callbacks or []),
                           model, tokenizer, None, None)


def new_state(args, schedule: Schedule, is_world_zero: bool, is_local_zero: bool):
    from transformers import TrainerState
    state = TrainerState(max_steps=schedule.max_steps, num_train_epochs=schedule.num_epochs,
                         train_batch_size=args.train_batch_size, is_world_process_zero=is_world_zero,
                         is_local_process_zero=is_local_zero)
    state.compute_steps(args, schedule.max_steps)
    return state


# ---- the validation evaluation of the final weights, done once ---------------------------------------------------
class FinalEvaluation:
    """The validation metrics a trainer computed during training, by the step of the weights it scored. Once
    training ends, the pipeline's "validation metrics" reuse the evaluation of the final weights instead of
    scoring the split a second time: the one of the last step, or, after ``load_best_model_at_end`` reloaded a
    checkpoint, the one of that checkpoint's step. Reused once; any other weights (a reload from elsewhere, a
    resumed run's earlier evaluations) are scored anew."""

    def __init__(self):
        self.by_step: dict[int, dict[str, Any]] = {}
        self.weights_step: int | None = None

    def record(self, step: int, metrics: dict[str, Any] | None, prefix: str = "eval_") -> None:
        if metrics is not None:
            self.by_step[step] = strip_prefix(dict(metrics), prefix)

    def reloaded(self, checkpoint) -> None:
        """The weights were replaced by those of ``checkpoint`` (best model at end)."""
        step = CheckpointManager.step_of(Path(str(checkpoint))) if checkpoint else None
        self.weights_step = -1 if step is None else step

    def take(self, global_step: int) -> dict[str, Any] | None:
        step = self.weights_step if self.weights_step is not None else global_step
        metrics = self.by_step.get(step)
        self.by_step.clear()
        return metrics


# ---- what both trainer families keep the same way around training ----------------------------------------------
class TrainerBookkeeping:
    """Resume, the data position, SIGTERM / SIGINT, the NaN / inf check of every process and the final evaluation,
    written once for hf.py's Trainer subclasses and loop.py's LoopTrainer. Each provides ``manager`` (its
    CheckpointManager), ``finite_guard``, ``is_main_process``, ``log(logs)``, ``_schedule()``, ``_save_now()``
    (a checkpoint at this step) and ``_rank_max(tensor)`` (the maximum over the processes)."""

    stop_guard: StopOnSignal | None = None
    stopped_by_signal = False
    last_checkpoint: Path | None = None
    evaluations: FinalEvaluation | None = None

    def _result(self, metrics: dict[str, float], already_trained: bool = False) -> TrainResult:
        """What run_training returns, the same on every backend."""
        return TrainResult(global_step=self.state.global_step, train_metrics=metrics,
                           log_history=list(self.state.log_history), already_trained=already_trained)

    def _data_state(self) -> dict[str, Any]:
        return data_state(self.args, self._schedule(), num_examples(self.train_dataset), self.args.world_size,
                          self.state.global_step)

    # ---- resume: auto | <path> ------------------------------------------------------------------------------
    def _resume_point(self) -> Path | None:
        """``training.resume``, verified before anything is loaded from it: manifest, file hashes, specs, data
        layout, this backend's checkpoint layout, and the optimizer state when steps are left to train
        (``keep_optimizer_state``). None: start fresh."""
        path = self.manager.resolve(resume_setting(self.specs))
        if path is not None:
            manifest = self.manager.verify(path, data_state=self._data_state())
            self.manager.check_resumable(path, manifest, self._schedule().max_steps)
        return path

    def _steps_left(self, path: Path, step: int) -> bool:
        """Resuming from ``path``, saved after ``step`` optimizer steps: train_log.jsonl drops what the interrupted
        run logged after it. False when the checkpoint already holds every step."""
        if self.is_main_process:
            truncate_log_after(Path(self.args.output_dir).parent / "train_log.jsonl", step)
        if step < self._schedule().max_steps:
            return True
        log.warning("%s already holds all %d training steps: nothing left to train", path, step)
        return False

    # ---- SIGTERM / SIGINT: finish the step, save, stop ----------------------------------------------------------
    @contextlib.contextmanager
    def _stopping_on_signals(self):
        """Training inside: a signal stops it after the step (:meth:`_stop_if_signalled`), with a checkpoint, and
        then raises TRAINING_INTERRUPTED."""
        with StopOnSignal() as guard:
            self.stop_guard = guard
            try:
                yield
            finally:
                self.stop_guard = None
        if self.stopped_by_signal:
            raise guard.interrupted(self.state.global_step, self.last_checkpoint)

    def _stop_if_signalled(self, saved: bool) -> None:
        """After each optimizer step's logging, evaluation and saving: on a signal (to any process), save a
        checkpoint at this step unless ``saved``, and stop training."""
        if self.stop_guard is None or self.stopped_by_signal or not self.stop_guard.synced(self._any_rank()):
            return
        if not saved:
            self._save_now()
        self.stopped_by_signal = True
        self.control.should_training_stop = True

    def _any_rank(self):
        """With several processes, a function saying whether a flag is set on any of them (every rank then
        decides the same); None with one."""
        if self.args.world_size <= 1:
            return None
        return lambda flag: int(self._rank_max(torch.tensor(float(flag))) > 0)

    def _check_finite(self, grad_norm, parameters=None, scaler=None) -> None:
        """Before optimizer step N+1: stop with NON_FINITE_LOSS (every process at the same step) if its loss or,
        without an active gradient scaler, its gradients are NaN / inf (trainers/finite.py)."""
        self.finite_guard.check(self.state.global_step + 1, grad_norm=grad_norm, parameters=parameters,
                                scaler=scaler, reduce_max=self._rank_max if self.args.world_size > 1 else None,
                                last_checkpoint=self.manager.latest)

    # ---- the validation evaluation of the final weights, done once --------------------------------------------
    def final_evaluation(self, dataset, split: str = "validation") -> dict[str, Any] | None:
        """The metrics of the evaluation of ``dataset`` (the validation split) that training ran on the final
        weights, taken once; None when there was none (then the caller evaluates)."""
        if self.evaluations is None or dataset is None or dataset is not self.eval_dataset:
            return None
        metrics = self.evaluations.take(self.state.global_step)
        if metrics is None:
            return None
        # logged as the evaluation it replaces would have logged it (train_log.jsonl's final point, MLflow)
        self.log({f"{split}_{k}": v for k, v in metrics.items() if k != "epoch"})
        if self.state.epoch is not None:
            metrics["epoch"] = self.state.epoch
        return flag_non_finite_metrics(metrics, split)
