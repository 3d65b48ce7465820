"""Accelerate backend: an explicit training loop on ``accelerate.Accelerator``, readable top to bottom.

Accelerate does device placement, DDP/DeepSpeed/FSDP wrapping, autocast (bf16/fp16), gradient accumulation
(``accelerator.accumulate``) and the per-rank data sharding; this file owns the loop. Everything that must match
the HF backend step for step comes from trainers/common.py: settings, optimizer/scheduler factory, sampler,
schedule, evaluation collection, the callback protocol (DefaultFlowCallback decides when to log/evaluate/save),
and the checkpoint layout.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..checkpoints import StopOnSignal, load_model_weights, load_rng, restore_rng_state, resume_setting
from .common import (DictCollator, EvalCollector, FlopCounter, JsonlLogWriter, LoopBookkeeping, TrainResult,
                     callback_handler, create_optimizer, create_scheduler, data_state, eval_order, evaluation_metrics,
                     keep_model_columns, label_names, log_metrics, new_state, prediction_step,
                     prepare_model_for_training, reorder, speed_metrics, train_sampler, training_schedule,
                     token_weighted_loss, training_settings, truncate_log_after)
from .finite import flag_non_finite_metrics


def make_accelerator(args, specs):
    """One Accelerator configured from the specs: precision from resolve_precision (bf16 autocast on CPUs that
    run it), accumulation steps, the Trainer's seeded sampling, and the ``distributed`` pass-through."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration

    from .common import _has_gpu
    from .distributed import accelerator_kwargs
    # Like TrainingArguments does: a previous Accelerator in this process (another run, a test) must not pin
    # its mixed-precision setting on this one.
    AcceleratorState._reset_state(reset_partial_state=False)
    seed = args.data_seed if args.data_seed is not None else args.seed
    mixed = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
    # cpu=True also when there is no GPU: Accelerate only recognises a CPU multi-process launch (MULTI_CPU, gloo)
    # when told it runs on CPU; otherwise each launched process would train alone on the whole data.
    return Accelerator(mixed_precision=mixed, cpu=bool(args.use_cpu) or not _has_gpu(),
                       gradient_accumulation_steps=args.gradient_accumulation_steps,
                       dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
                       step_scheduler_with_optimizer=False, **accelerator_kwargs(specs.distributed))


class _AcceleratedTrainer(LoopBookkeeping):
    def __init__(self, task, specs, model, tokenizer, datasets: dict[str, Any], output_dir: str | Path,
                 callbacks: list | None = None):
        from transformers import TrainerControl, TrainerState, set_seed

        from .distributed import check_launch
        self.task, self.specs, self.tokenizer = task, specs, tokenizer
        self.output_dir = Path(output_dir)
        self.train_dataset, self.eval_dataset = datasets.get("train"), datasets.get("validation")
        self.args = training_settings(specs, self.output_dir / "checkpoints", has_eval=self.eval_dataset is not None)
        set_seed(self.args.seed)  # where transformers' Trainer seeds: at construction
        check_launch(specs.backend, specs.distributed)
        self.accelerator = make_accelerator(self.args, specs)
        self.args.device = self.accelerator.device
        self.args.process_index = self.accelerator.process_index
        self.args.world_size = self.accelerator.num_processes
        self.model = model  # the prepared (possibly DDP-wrapped) module after run_training
        self.collator = DictCollator(task.collator(tokenizer))
        self.label_names = label_names(model)
        self.handler = callback_handler(self.args, model, tokenizer, callbacks,
                                        JsonlLogWriter(self.output_dir / "train_log.jsonl"))
        self.state = TrainerState(is_world_process_zero=self.is_main_process,
                                  is_local_process_zero=self.accelerator.is_local_main_process)
        self.control = TrainerControl()
        self._eval_loaders: dict[int, tuple[Any, list[int]]] = {}

    # ---- the backend contract ----------------------------------------------------------------------------
    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def trained_model(self):
        return self.accelerator.unwrap_model(self.model)

    def run_training(self) -> TrainResult:
        import torch
        from torch.utils.data import DataLoader

        args, acc = self.args, self.accelerator
        sampler = train_sampler(self.train_dataset, args, self.tokenizer)
        weighting = token_weighted_loss(self.specs, self.train_dataset)
        dataset = keep_model_columns(self.train_dataset, self.trained_model())
        loader = DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler, collate_fn=self.collator,
                            drop_last=args.dataloader_drop_last, num_workers=args.dataloader_num_workers,
                            pin_memory=args.dataloader_pin_memory)
        prepare_model_for_training(self.model, args)
        optimizer = create_optimizer(self.model, args)
        model, optimizer, loader = acc.prepare(self.model, optimizer, loader)
        self.model = model
        schedule = training_schedule(len(loader), args)
        scheduler = create_scheduler(optimizer, args, schedule.max_steps)
        self.optimizer, self.lr_scheduler = optimizer, scheduler

        state = self.state = new_state(args, schedule, acc.is_main_process, acc.is_local_main_process)
        for name, value in (("model", self.trained_model()), ("optimizer", optimizer), ("lr_scheduler", scheduler),
                            ("train_dataloader", loader)):
            setattr(self.handler, name, value)
        self.schedule = schedule
        first_epoch, skip_batches, pending_rng = 0, 0, None
        resume = self.checkpoint_manager().resolve(resume_setting(self.specs))
        if resume is not None:
            loaded, _ = self.checkpoint_manager().load_loop_state(
                resume, model=self.trained_model(), optimizer=optimizer.optimizer, scheduler=scheduler,
                scaler=acc.scaler, data_state=self._data_state(), restore_rng=False)
            state.global_step, state.log_history = loaded.global_step, loaded.log_history
            state.best_metric, state.best_model_checkpoint = loaded.best_metric, loaded.best_model_checkpoint
            state.epoch, state.total_flos = loaded.epoch, loaded.total_flos
            if self.is_main_process:
                truncate_log_after(self.output_dir / "train_log.jsonl", loaded.global_step)
            if loaded.global_step >= schedule.max_steps:
                return self._already_trained(resume)
            first_epoch, done = divmod(loaded.global_step, schedule.updates_per_epoch)
            skip_batches = done * args.gradient_accumulation_steps
            # The RNG is put back where it was saved: after the epoch's data iterator was started (mid-epoch),
            # or before it (at an epoch boundary); starting an iterator draws from the global RNG.
            pending_rng = load_rng(resume, acc.process_index)
            if skip_batches == 0:
                restore_rng_state(pending_rng)
                pending_rng = None

        tr_loss = torch.zeros((), device=acc.device)
        total_loss, last_logged, flops = 0.0, state.global_step, FlopCounter(self.trained_model())
        start_step, start = state.global_step, time.time()
        with StopOnSignal() as guard:
            self.stop_guard = guard
            self.control = self.handler.on_train_begin(args, state, self.control)
            for epoch in range(first_epoch, schedule.num_epochs):
                loader.set_epoch(epoch)
                batches = acc.skip_first_batches(loader, skip_batches) if skip_batches else loader
                self.control = self.handler.on_epoch_begin(args, state, self.control)
                step = skip_batches - 1
                grad_norm = learning_rate = None
                for step, batch in enumerate(batches, start=skip_batches):
                    if pending_rng is not None:
                        restore_rng_state(pending_rng)
                        pending_rng = None
                    model.train()
                    with acc.accumulate(model):
                        if step % args.gradient_accumulation_steps == 0:
                            self.control = self.handler.on_step_begin(args, state, self.control)
                        loss = model(**batch)["loss"]
                        if weighting is not None:
                            loss = weighting(loss, batch)
                        self.finite_guard.observe_loss(loss)
                        acc.backward(loss)
                        step_loss = loss.detach() / args.gradient_accumulation_steps
                        tr_loss += step_loss if torch.isfinite(step_loss) else tr_loss / max(
                            1, state.global_step - last_logged + 1)
                        flops.add(batch)
                        if acc.sync_gradients:
                            grad_norm = acc.clip_grad_norm_(model.parameters(), args.max_grad_norm) \
                                if args.max_grad_norm and args.max_grad_norm > 0 else None
                            # NaN / inf stops here, before optimizer.step(): the weights stay finite
                            self._check_finite(grad_norm, model.parameters(), acc.scaler)
                            self.control = self.handler.on_pre_optimizer_step(args, state, self.control)
                        optimizer.step()
                        if acc.sync_gradients:
                            self.control = self.handler.on_optimizer_step(args, state, self.control)
                            learning_rate = scheduler.get_last_lr()[0]  # the rate this step used, as the Trainer logs
                            if not acc.optimizer_step_was_skipped:
                                scheduler.step()
                        optimizer.zero_grad()
                    if not acc.sync_gradients:
                        self.control = self.handler.on_substep_end(args, state, self.control)
                        continue
                    state.global_step += 1
                    state.epoch = epoch + (step + 1) / schedule.steps_in_epoch
                    self.control = self.handler.on_step_end(args, state, self.control)
                    total_loss, last_logged = self._maybe_log_save_evaluate(tr_loss, grad_norm, learning_rate,
                                                                            total_loss, last_logged)
                    if self.control.should_epoch_stop or self.control.should_training_stop:
                        break
                skip_batches = 0
                if self.stopped_by_signal:
                    break
                self.control = self.handler.on_epoch_end(args, state, self.control)
                total_loss, last_logged = self._maybe_log_save_evaluate(tr_loss, grad_norm, learning_rate,
                                                                        total_loss, last_logged)
                if self.control.should_training_stop:
                    break
        self.stop_guard = None
        if self.stopped_by_signal:
            acc.wait_for_everyone()
            raise guard.interrupted(state.global_step, self.last_checkpoint)

        total_loss += acc.gather(tr_loss).mean().item()
        steps_run = state.global_step - start_step
        state.total_flos = acc.gather(torch.tensor(flops.total, device=acc.device)).sum().item()
        metrics = speed_metrics("train", start, self._num_train_samples(schedule) * steps_run
                                / max(schedule.max_steps, 1), steps_run)
        metrics.update(total_flos=state.total_flos, train_loss=total_loss / max(steps_run, 0.001))
        self.control = log_metrics(self.handler, args, state, self.control, dict(metrics))
        if args.load_best_model_at_end and state.best_model_checkpoint:
            load_model_weights(Path(state.best_model_checkpoint), self.trained_model())
        self.control = self.handler.on_train_end(args, state, self.control)
        acc.wait_for_everyone()
        return TrainResult(global_step=state.global_step, train_metrics={**metrics, "epoch": state.epoch},
                           log_history=list(state.log_history))

    def _already_trained(self, path: Path) -> TrainResult:
        from ..checkpoints import log
        log.warning("%s already holds all %d training steps: nothing left to train", path, self.state.global_step)
        return TrainResult(global_step=self.state.global_step, train_metrics={"epoch": self.state.epoch},
                           log_history=list(self.state.log_history))

    def _num_train_samples(self, schedule) -> float:
        args = self.args
        if args.max_steps > 0:
            return schedule.max_steps * args.train_batch_size * args.gradient_accumulation_steps * args.world_size
        return len(self.train_dataset) * args.num_train_epochs

    def _mean_over_ranks(self, tensor) -> float:
        return self.accelerator.gather(tensor).mean().item()  # as the Trainer's nested_gather(...).mean()

    def _max_over_ranks(self, tensor) -> float:
        return self.accelerator.gather(tensor.reshape(1)).max().item()

    def _barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def _checkpoint_objects(self):
        return self.trained_model(), self.optimizer.optimizer, self.lr_scheduler

    def _grad_scaler(self):
        return self.accelerator.scaler

    def _data_state(self) -> dict[str, Any]:
        return data_state(self.args, self.schedule, len(self.train_dataset), self.accelerator.num_processes,
                          self.state.global_step)

    # ---- evaluation ----------------------------------------------------------------------------------------
    def run_evaluation(self, dataset=None, split: str = "validation") -> dict[str, Any]:
        metrics = self._evaluate(dataset if dataset is not None else self.eval_dataset, split, prefixed=False)
        return flag_non_finite_metrics(metrics, split)

    def _eval_loader(self, dataset):
        from torch.utils.data import DataLoader
        key = id(dataset)
        if key not in self._eval_loaders:
            order = eval_order(dataset)
            loader = DataLoader(keep_model_columns(dataset, self.trained_model()), sampler=order,
                                batch_size=self.args.eval_batch_size, collate_fn=self.collator,
                                num_workers=self.args.dataloader_num_workers,
                                pin_memory=self.args.dataloader_pin_memory)
            self._eval_loaders[key] = (self.accelerator.prepare(loader), order)
        return self._eval_loaders[key]

    def _pred_pad(self) -> int:
        if not self.task.generative:
            return -100
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return pad if pad is not None else getattr(self.trained_model().config, "pad_token_id", 0) or 0

    def _evaluate(self, dataset, split: str, prefixed: bool = True) -> dict[str, Any]:
        """Evaluate on every rank: reduce logits per batch, pad across ranks, gather_for_metrics (drops the
        duplicates added to even out the last batch), put rows back in dataset order, task.compute_metrics."""
        acc, model = self.accelerator, self.model
        loader, order = self._eval_loader(dataset)
        pad = self._pred_pad()
        collector = EvalCollector(pred_pad=pad)
        model.eval()
        start, steps = time.time(), 0
        unwrapped = self.trained_model()
        for batch in loader:
            loss, preds, labels = prediction_step(model, batch, self.task, self.label_names, generator=unwrapped)
            size = len(next(iter(batch.values())))
            if loss is not None:
                loss = acc.gather_for_metrics(loss.reshape(1).repeat(size))
            if preds is not None:
                preds = acc.gather_for_metrics(acc.pad_across_processes(preds, dim=1, pad_index=pad))
            if labels is not None:
                labels = acc.gather_for_metrics(acc.pad_across_processes(labels, dim=1, pad_index=-100))
            collector.add(loss, preds, labels)
            steps += 1
            self.control = self.handler.on_prediction_step(self.args, self.state, self.control)
        losses, preds, labels = collector.arrays()
        preds, labels = reorder(preds, order), reorder(labels, order)
        metrics = evaluation_metrics(self.task, losses, preds, labels, time.time() - start, len(dataset), steps)
        prefix = "eval" if split == "eval" else split
        logged = {f"{prefix}_{k}": v for k, v in metrics.items()}
        self.control = log_metrics(self.handler, self.args, self.state, self.control, dict(logged))
        self.control = self.handler.on_evaluate(self.args, self.state, self.control, metrics=logged)
        if self.state.epoch is not None:  # the Trainer's evaluate() returns the epoch too
            metrics["epoch"] = logged["epoch"] = self.state.epoch
        return logged if prefixed else metrics


class AcceleratedNLPTrainer(_AcceleratedTrainer):
    """Accelerate loop for encoder tasks (classification, tagging, QA, MLM, causal LM)."""


class AcceleratedNLPSeq2SeqTrainer(_AcceleratedTrainer):
    """Accelerate loop for generative tasks: evaluation decodes with ``generate(**task.generation_kwargs())``
    (the specs' generation settings, never the library's 20-token default)."""
