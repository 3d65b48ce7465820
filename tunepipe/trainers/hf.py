"""HF backend: thin subclasses of transformers' Trainer / Seq2SeqTrainer, wired to a Task."""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainerCallback

from .common import JsonlLogWriter, TrainResult, strip_prefix, training_arguments


class _JsonlLogCallback(TrainerCallback):
    def __init__(self, writer: JsonlLogWriter):
        self.writer = writer

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.writer.write({"step": state.global_step, "epoch": state.epoch, **logs})


class _TaskTrainerMixin:
    """Everything the two HF trainer classes add to transformers' own: construction from (task, specs)."""

    args_class: Any = None

    def __init__(self, task, specs, model, tokenizer, datasets: dict[str, Any], output_dir: str | Path,
                 callbacks: list | None = None):
        output_dir = Path(output_dir)
        self.task, self.specs = task, specs
        eval_ds = datasets.get("validation")
        args = training_arguments(specs, output_dir / "checkpoints", has_eval=eval_ds is not None,
                                  cls=self.args_class, **self.extra_arguments(specs))
        super().__init__(model=model, args=args, data_collator=task.collator(tokenizer),
                         train_dataset=datasets.get("train"), eval_dataset=eval_ds, processing_class=tokenizer,
                         compute_metrics=task.compute_metrics,
                         preprocess_logits_for_metrics=self.logits_reducer(task),
                         callbacks=[_JsonlLogCallback(JsonlLogWriter(output_dir / "train_log.jsonl"))]
                         + list(callbacks or []))

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

    # The backend contract used by FineTunePipeLine.
    def run_training(self) -> TrainResult:
        output = self.train(resume_from_checkpoint=self.specs.training.resume_from_checkpoint)
        return TrainResult(global_step=output.global_step, train_metrics=dict(output.metrics),
                           log_history=list(self.state.log_history))

    def run_evaluation(self, dataset=None, split: str = "validation") -> dict[str, Any]:
        return strip_prefix(self.evaluate(eval_dataset=dataset, metric_key_prefix=split), f"{split}_")

    def trained_model(self):
        return self.model

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
        with self._generation_config_kept():
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix,
                                    **gen_kwargs)

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test", **gen_kwargs):
        gen_kwargs = {**self.task.generation_kwargs(), **gen_kwargs}
        with self._generation_config_kept():
            return super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix,
                                   **gen_kwargs)

    @contextlib.contextmanager
    def _generation_config_kept(self):
        """Seq2SeqTrainer writes every library default (max_length=20, ...) into model.generation_config while
        it evaluates; put the model's own back so saved models carry only the specs' settings."""
        model = self.accelerator.unwrap_model(self.model)
        kept = copy.deepcopy(getattr(model, "generation_config", None))
        try:
            yield
        finally:
            if kept is not None:
                model.generation_config = kept

    def run_evaluation(self, dataset=None, split: str = "validation") -> dict[str, Any]:
        metrics = self.evaluate(eval_dataset=dataset, metric_key_prefix=split)
        return strip_prefix(metrics, f"{split}_")
