"""The one training loop of the non-hf backends, written once over an engine (trainers/engines/).

It does what transformers' Trainer does, in the Trainer's order, so that every engine gives the hf backend's
per-step loss, gradient norm and learning rate: epochs and optimizer steps from the Trainer's formulas, gradient
accumulation (the loss divided by ``gradient_accumulation_steps``, no gradient sync on accumulating
micro-batches), token-weighted loss, clipping and the NaN / inf guard before every optimizer step, the scheduler,
transformers' callback protocol (DefaultFlowCallback decides when to log, evaluate and save), evaluation,
checkpoints through CheckpointManager (exact resume: weights, optimizer, scheduler, scaler, RNG, data position),
SIGTERM/SIGINT (finish the step, save, stop) and the final train metrics. The engine decides where and how:
processes, devices, wrapping, autocast, backward, gradient sync and the reductions over ranks.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerControl, TrainerState, set_seed
from transformers.trainer_utils import speed_metrics

from ..data.stream import stream_loader
from .checkpoints import CheckpointManager
from .common import (
    EvalCollector,
    FinalEvaluation,
    FlopCounter,
    JsonlLogWriter,
    TrainerBookkeeping,
    callback_handler,
    collator_callbacks,
    evaluation_metrics,
    new_state,
    prediction_step,
)
from .data import (
    DictCollator,
    IndexedCollator,
    IndexedDataset,
    eval_order,
    is_stream,
    keep_model_columns,
    keep_train_columns,
    label_names,
    token_weighted_loss,
    train_sampler,
)
from .distributed import check_launch
from .engines.base import gather_objects, sharded_loader
from .finite import NonFiniteGuard, flag_non_finite_metrics
from .run_state import load_model_weights, load_rng, restore_rng_state
from .settings import (
    TrainResult,
    create_optimizer,
    create_scheduler,
    prepare_model_for_training,
    training_schedule,
    training_settings,
)


class LoopTrainer(TrainerBookkeeping):
    """A task's model trained by the one loop on ``engine_class`` (set by each backend's classes)."""

    engine_class: Any = None

    def __init__(self, task, specs, model, tokenizer, datasets: dict[str, Any], output_dir: str | Path,
                 callbacks: list | None = None):
        self.task, self.specs, self.tokenizer, self.model = task, specs, tokenizer, model
        self.output_dir = Path(output_dir)
        self.train_dataset, self.eval_dataset = datasets.get("train"), datasets.get("validation")
        self.args = training_settings(specs, self.output_dir / "checkpoints", has_eval=self.eval_dataset is not None)
        set_seed(self.args.seed)  # where transformers' Trainer seeds: at construction
        check_launch(specs.backend, specs.distributed)
        self.engine = self.engine_class(self.args, specs)
        self.collator = DictCollator(task.collator(tokenizer))
        self.label_names = label_names(model)
        self.handler = callback_handler(self.args, model, tokenizer,
                                        collator_callbacks(self.collator.collator) + list(callbacks or []),
                                        JsonlLogWriter(self.train_dataset and self.output_dir / "train_log.jsonl"))
        self.state, self.control = TrainerState(), TrainerControl()
        self.finite_guard = NonFiniteGuard(self.args)
        self.manager = CheckpointManager.for_specs(specs, Path(self.args.output_dir))
        self.schedule = self.optimizer = self.lr_scheduler = None
        self.autocast_in_step = self.batch_device = None  # what the first training step ran under (for tests)

    # ---- the backend contract ----------------------------------------------------------------------------
    @property
    def is_main_process(self) -> bool:
        return self.engine.is_main_process

    def trained_model(self):
        return self.engine.unwrap(self.model)

    def run_training(self) -> TrainResult:
        engine, args = self.engine, self.args
        engine.launch()
        self.args.device, self.args.process_index, self.args.world_size = engine.device, engine.rank, engine.world_size
        streaming = is_stream(self.train_dataset)
        self.sampler = None if streaming else train_sampler(self.train_dataset, args, self.tokenizer,
                                                             self.specs.training.length_group_batches)
        weighting = token_weighted_loss(self.specs, self.train_dataset)
        dataset = keep_train_columns(self.train_dataset, self.model)
        schedule = self.schedule = training_schedule(len(self._train_loader(dataset, 0)), args)
        prepare_model_for_training(self.model, args)
        optimizer = create_optimizer(self.model, args)
        scheduler = create_scheduler(optimizer, args, schedule.max_steps)
        model, optimizer = self.model, self.optimizer = engine.setup(self.model, optimizer)
        self.lr_scheduler = scheduler
        state = self.state = new_state(args, schedule, engine.is_main_process, engine.is_local_main_process)
        for name, value in (("model", self.trained_model()), ("optimizer", optimizer), ("lr_scheduler", scheduler)):
            setattr(self.handler, name, value)
        first_epoch, skip, pending_rng = self._resume(state, schedule)
        self.evaluations = FinalEvaluation()
        if first_epoch is None:
            return self._result({"epoch": state.epoch}, already_trained=True)
        ga = args.gradient_accumulation_steps
        tr_loss = torch.zeros((), device=engine.device)
        total_loss, self.last_logged, flops = 0.0, state.global_step, FlopCounter(self.trained_model())
        start_step, start = state.global_step, time.time()
        with self._stopping_on_signals():
            self.control = self.handler.on_train_begin(args, state, self.control)
            grad_norm = learning_rate = None
            for epoch in range(first_epoch, schedule.num_epochs):
                if hasattr(self.sampler, "set_epoch"):  # seeded samplers reshuffle per epoch; sequential has none
                    self.sampler.set_epoch(epoch)
                self.control = self.handler.on_epoch_begin(args, state, self.control)
                for step, batch in enumerate(self._train_loader(dataset, skip), start=skip):
                    if pending_rng is not None:  # mid-epoch resume: after the epoch's iterator started
                        restore_rng_state(pending_rng)
                        pending_rng = None
                    batch = engine.to_device(batch)
                    sync = (step + 1) % ga == 0 or step + 1 == schedule.steps_in_epoch
                    if step % ga == 0:
                        self.control = self.handler.on_step_begin(args, state, self.control)
                    # train mode at every step, as the Trainer's training_step: from_pretrained returns eval mode
                    model.train()
                    with engine.no_sync(model, skip=not sync):
                        with engine.autocast():
                            if self.autocast_in_step is None:
                                kind = engine.device.type
                                self.autocast_in_step = (torch.is_autocast_enabled(kind),
                                                         torch.get_autocast_dtype(kind))
                                self.batch_device = next(v.device for v in batch.values() if hasattr(v, "device"))
                            loss = model(**batch)["loss"]
                        if weighting is not None:
                            loss = weighting(loss, batch)
                        self.finite_guard.observe_loss(loss)
                        engine.backward(loss / ga)
                    step_loss = loss.detach() / ga
                    tr_loss += step_loss if torch.isfinite(step_loss) else tr_loss / max(
                        1, state.global_step - self.last_logged + 1)
                    flops.add(batch)
                    if not sync:
                        self.control = self.handler.on_substep_end(args, state, self.control)
                        continue
                    max_norm = args.max_grad_norm
                    grad_norm = engine.clip_grad_norm(model, optimizer, max_norm) if max_norm and max_norm > 0 \
                        else None
                    self._check_finite(grad_norm, model.parameters(), engine.scaler)  # before optimizer.step()
                    self.control = self.handler.on_pre_optimizer_step(args, state, self.control)
                    learning_rate = scheduler.get_last_lr()[0]  # the rate this step uses, as the Trainer logs
                    stepped = engine.optimizer_step(optimizer)
                    self.control = self.handler.on_optimizer_step(args, state, self.control)
                    if stepped:
                        scheduler.step()
                    optimizer.zero_grad()
                    state.global_step += 1
                    state.epoch = epoch + (step + 1) / schedule.steps_in_epoch
                    self.control = self.handler.on_step_end(args, state, self.control)
                    # an epoch's last step logs, evaluates and saves once, after the epoch's end (below): its
                    # checkpoint then holds the epoch's evaluation and the RNG after it, and resumes exactly
                    if step + 1 < schedule.steps_in_epoch:
                        total_loss = self._maybe_log_save_evaluate(tr_loss, grad_norm, learning_rate, total_loss)
                    if self.control.should_epoch_stop or self.control.should_training_stop:
                        break
                skip = 0
                if self.stopped_by_signal:
                    break
                self.control = self.handler.on_epoch_end(args, state, self.control)
                total_loss = self._maybe_log_save_evaluate(tr_loss, grad_norm, learning_rate, total_loss)
                if self.control.should_training_stop:
                    break
            if self.stopped_by_signal:
                engine.barrier()
        return self._finish(tr_loss, total_loss, flops, start, start_step)

    def _train_loader(self, dataset, skip: int):
        args, engine = self.args, self.engine
        if is_stream(dataset):  # this rank's share of the stream, max_steps worth of batches
            return stream_loader(dataset.shard(engine.rank, engine.world_size), args.train_batch_size, self.collator,
                                 skip, total=args.max_steps * args.gradient_accumulation_steps)
        return sharded_loader(dataset, self.sampler, args.train_batch_size, self.collator, args, engine.world_size,
                              engine.rank, drop_last=args.dataloader_drop_last, skip=skip)

    def _resume(self, state, schedule):
        """(first epoch, batches of it to skip, RNG to restore once its iterator started); (None, ...) when the
        checkpoint already holds every step."""
        path = self._resume_point()
        if path is None:
            return 0, 0, None
        loaded, _ = self.manager.load_loop_state(
            path, model=self.trained_model(), optimizer=self.engine.raw_optimizer(self.optimizer),
            scheduler=self.lr_scheduler, scaler=self.engine.scaler, restore_rng=False, verify=False)
        state.global_step, state.log_history = loaded.global_step, loaded.log_history
        state.best_metric, state.best_model_checkpoint = loaded.best_metric, loaded.best_model_checkpoint
        state.epoch, state.total_flos = loaded.epoch, loaded.total_flos
        if not self._steps_left(path, loaded.global_step):
            return None, 0, None
        epoch, done = divmod(loaded.global_step, schedule.updates_per_epoch)
        # The RNG goes back where it was saved: after the epoch's iterator started (mid-epoch), else before it
        rng = load_rng(path, self.engine.rank)
        if done == 0:
            restore_rng_state(rng)
            rng = None
        return epoch, done * self.args.gradient_accumulation_steps, rng

    def _finish(self, tr_loss, total_loss: float, flops, start: float, start_step: int) -> TrainResult:
        """The Trainer's final train metrics, while every rank still holds the process group."""
        args, state, schedule, engine = self.args, self.state, self.schedule, self.engine
        total_loss += engine.reduce(tr_loss, "mean")
        steps = state.global_step - start_step
        state.total_flos = engine.reduce(torch.tensor(flops.total, dtype=torch.float64), "sum")
        samples = (schedule.max_steps * args.train_batch_size * args.gradient_accumulation_steps * engine.world_size
                   if args.max_steps > 0 else len(self.train_dataset) * args.num_train_epochs)
        metrics = speed_metrics("train", start, num_samples=samples * steps / max(schedule.max_steps, 1),
                                num_steps=steps)
        metrics.update(total_flos=state.total_flos, train_loss=total_loss / max(steps, 0.001))
        self.log(dict(metrics))
        if args.load_best_model_at_end and state.best_model_checkpoint:
            load_model_weights(Path(state.best_model_checkpoint), self.trained_model())
            self.evaluations.reloaded(state.best_model_checkpoint)
        self.control = self.handler.on_train_end(args, state, self.control)
        engine.barrier()
        return self._result({**metrics, "epoch": state.epoch})

    # ---- after each optimizer step: log, evaluate, keep the best, save, stop on a signal ------------------
    def log(self, logs: dict[str, float]) -> None:
        """The Trainer's ``log``: add epoch, append to log_history, call on_log."""
        if self.state.epoch is not None:
            logs = {**logs, "epoch": self.state.epoch}
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.control = self.handler.on_log(self.args, self.state, self.control, logs)

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, learning_rate, total_loss: float) -> float:
        args, state = self.args, self.state
        if self.control.should_log and state.global_step > self.last_logged:
            loss = self.engine.reduce(tr_loss, "mean")  # as the Trainer's nested_gather(...).mean()
            tr_loss -= tr_loss
            logs = {"loss": loss / (state.global_step - self.last_logged)}
            if grad_norm is not None:
                logs["grad_norm"] = grad_norm.item() if hasattr(grad_norm, "item") else float(grad_norm)
            if learning_rate is not None:
                logs["learning_rate"] = learning_rate
            total_loss += loss
            self.last_logged = state.global_step
            self.log(logs)
        metrics = self._evaluate(self.eval_dataset, "eval") if self.control.should_evaluate else None
        self.evaluations.record(state.global_step, metrics)  # the validation split is scored once at the end
        new_best = metrics is not None and self._is_new_best(metrics)
        if args.save_strategy == "best":
            self.control.should_save = new_best
        saved = bool(self.control.should_save)
        if saved:
            self._save(new_best)
            self.control = self.handler.on_save(args, state, self.control)
        self._stop_if_signalled(saved)
        return total_loss

    def _is_new_best(self, metrics: dict[str, float]) -> bool:
        name = self.args.metric_for_best_model
        if not name:
            return False
        value = metrics.get(name if name.startswith("eval_") else f"eval_{name}")
        best = self.state.best_metric
        if value is None or not math.isfinite(value):  # a NaN metric is never the best (as in the Trainer)
            return False
        if not (best is None or (value > best if self.args.greater_is_better else value < best)):
            return False
        self.state.best_metric = value
        return True

    def _save(self, new_best: bool) -> None:
        manager, engine, step = self.manager, self.engine, self.state.global_step
        if new_best:
            self.state.best_model_checkpoint = str(manager.path(step))
        manager.save_loop_state(step, model=self.trained_model(), optimizer=engine.raw_optimizer(self.optimizer),
                                scheduler=self.lr_scheduler, state=self.state, tokenizer=self.tokenizer,
                                scaler=engine.scaler, data_state=self._data_state() if engine.is_main_process else None,
                                rank=engine.rank, barrier=engine.barrier)
        if engine.is_main_process:
            manager.rotate(self.state.best_model_checkpoint)
        self.last_checkpoint = manager.path(step)

    def _save_now(self) -> None:
        self._save(False)

    def _schedule(self):
        return self.schedule

    def _rank_max(self, tensor) -> float:
        return self.engine.reduce(tensor, "max")

    # ---- evaluation: every rank predicts its shard; rows are gathered back by dataset index ----------------
    def run_evaluation(self, dataset=None, split: str = "validation") -> dict[str, Any]:
        self.engine.launch()
        if self.model is not None and next(self.model.parameters()).device != self.engine.device:
            self.model.to(self.engine.device)  # evaluation without training: no setup() placed it
        metrics = self._evaluate(dataset if dataset is not None else self.eval_dataset, split, prefixed=False)
        return flag_non_finite_metrics(metrics, split)

    def _pred_pad(self) -> int:
        if not self.task.generative:
            return -100
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return pad if pad is not None else getattr(self.trained_model().config, "pad_token_id", 0) or 0

    def _evaluate(self, dataset, split: str, prefixed: bool = True) -> dict[str, Any]:
        """Reduce logits per batch, gather (index, loss, predictions, labels) from every rank, drop the rows
        repeated to even out the last batches, restore dataset order, then ``task.compute_metrics``."""
        engine, model, unwrapped = self.engine, self.model, self.trained_model()
        order = eval_order(dataset)
        loader = sharded_loader(IndexedDataset(keep_model_columns(dataset, unwrapped)), order,
                                self.args.eval_batch_size, IndexedCollator(self.collator), self.args,
                                engine.world_size, engine.rank)
        was_training = model.training
        model.eval()
        start, results = time.time(), []
        with engine.autocast():
            for batch in loader:
                index = batch.pop("__index__")
                batch = engine.to_device(batch)
                loss, preds, labels = prediction_step(model, batch, self.task, self.label_names, generator=unwrapped)
                size = len(index)
                results.append((index.numpy(), None if loss is None else _to_cpu(loss.reshape(1).repeat(size)),
                                _to_cpu(preds), _to_cpu(labels)))
                self.control = self.handler.on_prediction_step(self.args, self.state, self.control)
        model.train(was_training)
        batches = [b for rank_results in gather_objects(results) for b in rank_results]
        collector, indices = EvalCollector(pred_pad=self._pred_pad()), []
        for index, losses, preds, labels in batches:
            indices.append(index)
            collector.add(losses, preds, labels)
        losses, preds, labels = collector.arrays()
        _, first = np.unique(np.concatenate(indices) if indices else np.zeros(0, np.int64), return_index=True)
        metrics = evaluation_metrics(self.task, _pick(losses, first), _pick(preds, first), _pick(labels, first),
                                     time.time() - start, len(dataset), len(batches))
        prefix = "eval" if split == "eval" else split
        logged = {f"{prefix}_{k}": v for k, v in metrics.items()}
        self.state.is_world_process_zero = engine.is_main_process
        self.log(dict(logged))
        self.control = self.handler.on_evaluate(self.args, self.state, self.control, metrics=logged)
        if self.state.epoch is not None:  # the Trainer's evaluate() returns the epoch too
            metrics["epoch"] = logged["epoch"] = self.state.epoch
        return logged if prefixed else metrics


def _to_cpu(x):
    """CPU tensors (picklable for all_gather_object; EvalLoopContainer concatenates tensors)."""
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    return x.detach().float().cpu() if x.is_floating_point() else x.detach().cpu()


def _pick(arrays, rows):
    """The first occurrence of each dataset index, in dataset order (nested tuples allowed)."""
    if arrays is None:
        return None
    if isinstance(arrays, (list, tuple)):
        return type(arrays)(_pick(a, rows) for a in arrays)
    return arrays[rows]
