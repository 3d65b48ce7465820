"""HF backend: thin subclasses of transformers' Trainer / Seq2SeqTrainer, wired to a Task."""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer

from ..data.stream import stream_loader
from .checkpoints import CheckpointManager
from .common import (
    FinalEvaluation,
    JsonlLogWriter,
    TrainerBookkeeping,
    _JsonlLogCallback,
    collator_callbacks,
    prediction_step,
    strip_prefix,
)
from .data import is_stream, keep_train_columns, token_weighted_loss, train_sampler
from .finite import NonFiniteGuard, flag_non_finite_metrics
from .settings import TrainResult, training_arguments, training_schedule


class _TaskTrainerMixin(TrainerBookkeeping):
    """Everything the two HF trainer classes add to transformers' own: construction from (task, specs)."""

    args_class: Any = None

    def __init__(self, task, specs, model, tokenizer, datasets: dict[str, Any], output_dir: str | Path,
                 callbacks: list | None = None):
        output_dir = Path(output_dir)
        self.task, self.specs = task, specs
        eval_ds = datasets.get("validation")
        # save_total_limit None: transformers' own rotation (which at the end of training keeps only the best
        # checkpoint when the limit is 1) is off; CheckpointManager.rotate keeps the newest and the best
        args = training_arguments(specs, output_dir / "checkpoints", has_eval=eval_ds is not None,
                                  cls=self.args_class, **{"save_total_limit": None, **self.extra_arguments(specs)})
        collator = task.collator(tokenizer)
        super().__init__(model=model, args=args, data_collator=collator,
                         train_dataset=datasets.get("train"), eval_dataset=eval_ds, processing_class=tokenizer,
                         compute_metrics=task.compute_metrics,
                         preprocess_logits_for_metrics=self.logits_reducer(task),
                         callbacks=[_JsonlLogCallback(JsonlLogWriter(
                             output_dir / "train_log.jsonl" if datasets.get("train") is not None else None))]
                         + collator_callbacks(collator) + list(callbacks or []))
        self.loss_weighting = token_weighted_loss(specs, datasets.get("train"))
        self.finite_guard = NonFiniteGuard(self.args)
        self.evaluations = FinalEvaluation()
        self.manager = CheckpointManager.for_specs(specs, Path(self.args.output_dir), prefix="checkpoint")

    # ---- the validation split is scored once at the end (common.FinalEvaluation) ------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval", **gen_kwargs):
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix,
                                   **gen_kwargs)
        if self.is_in_train and (eval_dataset is None or eval_dataset is self.eval_dataset):
            self.evaluations.record(self.state.global_step, metrics, f"{metric_key_prefix}_")
        return metrics

    def _load_best_model(self) -> None:
        super()._load_best_model()
        self.evaluations.reloaded(self.state.best_model_checkpoint)

    # ---- NaN / inf: the shared rule (trainers/finite.py) replaces the Trainer's "log nan and keep going" --------
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.finite_guard.observe_loss(loss)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        """The Trainer calls this once per optimizer step, after clipping and before ``optimizer.step()``: the
        pre-clipping norm, then the non-finite check, so a NaN step never reaches the weights."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._check_finite(grad_norm, scaler=self.accelerator.scaler)
        return grad_norm

    def _rank_max(self, tensor) -> float:
        return self.accelerator.gather(tensor.reshape(1).to(self.args.device)).max().item()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = {"labels": inputs.get("labels")}  # kept: a label smoother pops them from inputs
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if self.loss_weighting is None or not model.training:  # evaluation losses stay plain means
            return result
        if return_outputs:
            return self.loss_weighting(result[0], labels), result[1]
        return self.loss_weighting(result, labels)

    def extra_arguments(self, specs) -> dict[str, Any]:
        return {}

    def logits_reducer(self, task):
        return task.preprocess_logits_for_metrics

    def _get_eval_sampler(self, eval_dataset):
        # transformers 5 length-groups (and shuffles) evaluation under group_by_length; tasks whose metrics map
        # predictions back to features by position (Task.ordered_eval) need the dataset order.
        if getattr(self.task, "ordered_eval", False) and eval_dataset is not None:
            from torch.utils.data import SequentialSampler
            return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None
        return super()._get_eval_sampler(eval_dataset)

    def get_train_dataloader(self):
        """data.streaming: this rank's share of the stream, length-grouped as the run asks; the Trainer stops it
        at max_steps and, on resume, drops the batches already trained on."""
        if not is_stream(self.train_dataset):
            return super().get_train_dataloader()
        stream = keep_train_columns(self.train_dataset, self.accelerator.unwrap_model(self.model))
        return stream_loader(stream.shard(self.args.process_index, self.args.world_size),
                             self.args.per_device_train_batch_size, self.data_collator)

    def _get_train_sampler(self, train_dataset=None):
        # transformers' group_by_length sampler draws its order from the global RNG, which dropout advances
        # differently on each rank (different padded shapes) and which a resumed run has not replayed: the ranks'
        # orders then differ (examples skipped or repeated) and a resumed epoch is not the interrupted one. The
        # sampler shared with the other backends is re-seeded with seed + epoch instead.
        import datasets
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and isinstance(dataset, datasets.Dataset):
            return train_sampler(dataset, self.args, self.processing_class,
                                 self.specs.training.length_group_batches)
        return super()._get_train_sampler(train_dataset)

    # ---- checkpoints: the Trainer's own files, written atomically, with tunepipe's manifest ------------------
    _staging_root: Path | None = None

    def _get_output_dir(self, trial) -> str:
        return str(self._staging_root) if self._staging_root is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer writes checkpoint-N into a staging directory; rank 0 then adds the manifest, syncs and
        renames it into place, and removes old checkpoints (keeping the best)."""
        manager, step = self.manager, self.state.global_step

        def write(staging: Path) -> Path:
            self._staging_root = staging
            try:
                super(_TaskTrainerMixin, self)._save_checkpoint(model, trial)
            finally:
                self._staging_root = None
            staged = staging / f"checkpoint-{step}"
            best = self.state.best_model_checkpoint
            if self.args.should_save and best and Path(best).parent == staging:  # the Trainer's path: staging
                self.state.best_model_checkpoint = str(manager.path(step))
                self.state.save_to_json(str(staged / "trainer_state.json"))
            return staged

        manager.save(step, write, self._data_state() if self.args.should_save else None, self.model,
                     main=self.args.should_save, barrier=self.accelerator.wait_for_everyone)
        if self.args.should_save:
            manager.rotate(self.state.best_model_checkpoint)
        self.last_checkpoint = manager.path(step)

    _deferred_save: bool | None = None  # an epoch's last step: its save waits for the epoch-end call

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        """The Trainer's, then: on SIGTERM / SIGINT save a checkpoint at this step (if it did not) and stop.

        The Trainer calls this after an epoch's last step and again after the epoch's end, where it evaluates
        (eval_strategy: epoch); a checkpoint saved by the first call would miss that evaluation (log history, best
        metric) and hold the RNG from before it, so resuming from it is not exact. That step's save (and a signal's)
        waits for the second call, as in the one loop."""
        step, epoch = self.state.global_step, self.state.epoch
        # an epoch's last step leaves state.epoch a whole number (epoch + steps / steps); asking the schedule
        # would build a DataLoader here, whose set-up draws from the RNG that dropout uses
        if self._deferred_save is None and epoch is not None and float(epoch).is_integer():
            self._deferred_save = bool(self.control.should_save)
            self.control.should_save = False
            super()._maybe_log_save_evaluate(*args, **kwargs)
            return
        if self._deferred_save is not None:
            self.control.should_save = self.control.should_save or self._deferred_save
            self._deferred_save = None
        elif self.stopped_by_signal:
            # stopped mid-epoch by a signal, the checkpoint saved: the Trainer's epoch-end call would evaluate
            # and save that checkpoint again with the RNG the evaluation moved (the one loop stops here too)
            return
        super()._maybe_log_save_evaluate(*args, **kwargs)
        self._stop_if_signalled(saved=self.last_checkpoint == self.manager.path(step))

    def _save_now(self) -> None:
        self._save_checkpoint(self.model_wrapped, None)

    def _batches_per_epoch(self) -> int:
        if is_stream(self.train_dataset):  # one pass of max_steps, as the Trainer counts a stream
            return self.args.max_steps * self.args.gradient_accumulation_steps
        if getattr(self, "_train_batches", None) is None:  # each get_train_dataloader() is prepared anew: once
            self._train_batches = len(self.get_train_dataloader())
        return self._train_batches

    def _schedule(self):
        return training_schedule(self._batches_per_epoch(), self.args)

    # The backend contract used by FineTunePipeLine.
    def run_training(self) -> TrainResult:
        resume = self._resume_point()
        if resume is not None:
            from transformers import TrainerState
            saved = TrainerState.load_from_json(str(resume / "trainer_state.json"))
            if not self._steps_left(resume, saved.global_step):  # transformers would train one step more
                self._load_from_checkpoint(str(resume))
                self.state = saved
                return self._result({"epoch": saved.epoch}, already_trained=True)
        self.evaluations = FinalEvaluation()
        with self._stopping_on_signals():
            output = self.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        return self._result(dict(output.metrics))

    def run_evaluation(self, dataset=None, split: str = "validation") -> dict[str, Any]:
        metrics = strip_prefix(self.evaluate(eval_dataset=dataset, metric_key_prefix=split), f"{split}_")
        return flag_non_finite_metrics(metrics, split)

    def trained_model(self):
        """The plain model: no DDP wrapper, and no mixed-precision autocast left around its forward (accelerate
        puts one there for bf16/fp16). ``extract_model_from_parallel(keep_fp32_wrapper=False)`` would also strip
        transformers' own decorators from forward (it unwraps every ``__wrapped__``), so the forward saved by
        accelerate is put back instead."""
        from accelerate.utils import extract_model_from_parallel
        model = extract_model_from_parallel(self.model)
        original = model.__dict__.pop("_original_forward", None)
        if original is not None:
            if getattr(original, "__func__", None) is type(model).forward:
                model.__dict__.pop("forward", None)  # the class's forward again
            else:
                model.forward = original
        return model

    @property
    def is_main_process(self) -> bool:
        return self.is_world_process_zero()


class NLPTrainer(_TaskTrainerMixin, Trainer):
    """transformers.Trainer for encoder tasks (classification, tagging, QA, MLM, causal LM)."""


class NLPSeq2SeqTrainer(_TaskTrainerMixin, Seq2SeqTrainer):
    """transformers.Seq2SeqTrainer that evaluates with generate() using the specs' generation settings,
    never the library's 20-token default."""

    args_class = Seq2SeqTrainingArguments

    def extra_arguments(self, specs) -> dict[str, Any]:
        gen = specs.generation
        return {"predict_with_generate": True, "generation_num_beams": gen.num_beams,
                "generation_max_length": None}

    def logits_reducer(self, task):
        return None  # generated ids are already reduced

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval", **gen_kwargs):
        # The evaluations Trainer runs during training call evaluate() without generation arguments, and
        # Seq2SeqTrainer would then generate with the model's generation_config (20 tokens by default).
        gen_kwargs = {**self.task.generation_kwargs(), **gen_kwargs}
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix,
                                **gen_kwargs)

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test", **gen_kwargs):
        gen_kwargs = {**self.task.generation_kwargs(), **gen_kwargs}
        return super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix,
                               **gen_kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        if getattr(self.task, "decoder_only", False):
            # Seq2SeqTrainer would generate from the whole prompt + target: the task's own step generates from
            # the prompt and keeps the new tokens
            inputs = self._prepare_inputs(inputs)
            loss, preds, labels = prediction_step(model, inputs, self.task, self.label_names)
            return (loss, None, None) if prediction_loss_only else (loss, preds, labels)
        with self._generation_config_kept(model):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs)

    @contextlib.contextmanager
    def _generation_config_kept(self, model):
        """Seq2SeqTrainer writes every library default (max_length=20, ...) into model.generation_config after
        each batch it generates; put the model's own back, per batch: else generate() warns on every later batch
        that max_length and max_new_tokens are both set, and a model saved after evaluating carries max_length."""
        model = self.accelerator.unwrap_model(model)
        kept = copy.deepcopy(getattr(model, "generation_config", None))
        try:
            yield
        finally:
            if kept is not None:
                model.generation_config = kept
