"""What every backend shares: device/precision decisions, TrainingArguments from specs, logging callbacks,
and the result type."""
from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, CudaError

# Keys of TrainingSpec that are tunepipe's, not TrainingArguments'.
NOT_TRAINING_ARGUMENTS = {"resume_from_checkpoint", "resume", "keep_last_n", "keep_best", "token_weighted_loss"}


@dataclass
class TrainResult:
    """Same shape whichever backend ran."""
    global_step: int
    train_metrics: dict[str, float] = field(default_factory=dict)
    log_history: list[dict[str, Any]] = field(default_factory=list)


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run faster than fp32 here (measured ~1.8x on the dev machine)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def bf16_supported() -> bool:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_fast_bf16()


def resolve_precision(training) -> tuple[bool, bool]:
    """(bf16, fp16) to use. 'auto' = bf16 where the device runs it fast; fp16 only on CUDA."""
    import torch
    if training.fp16:
        if not torch.cuda.is_available():
            raise CudaError("fp16 mixed precision needs a CUDA GPU", field="training.fp16",
                            suggestions=["remove fp16 (bf16 is used automatically where the CPU supports it)"])
        if training.bf16 is True:
            raise ConfigError("fp16 and bf16 are both on", field="training.bf16", suggestions=["choose one"])
        return False, True
    if training.bf16 == "auto":
        return bf16_supported(), False
    if training.bf16 and not torch.cuda.is_available() and not cpu_has_fast_bf16():
        import warnings
        warnings.warn("bf16 on a CPU without AVX512-BF16/AMX is emulated and slow", stacklevel=2)
    return bool(training.bf16), False


def training_arguments(specs, output_dir: Path, has_eval: bool, cls=None, **extra):
    """TrainingArguments (or a subclass) from specs.training, with tunepipe's safe defaults applied."""
    from transformers import TrainingArguments
    cls = cls or TrainingArguments
    values = training_values(specs, has_eval, cls)
    values.update(extra)
    try:
        return cls(output_dir=str(output_dir), **values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"transformers rejected the training settings: {str(e).splitlines()[0]}",
                          field="training", suggestions=["check the training section against TrainingArguments"]) from None


def training_values(specs, has_eval: bool, cls=None) -> dict[str, Any]:
    """specs.training as TrainingArguments keyword values, with tunepipe's rules (precision, eval/save coupling,
    distributed pass-through) applied. Shared by every backend so they read the same settings."""
    from transformers import TrainingArguments
    cls = cls or TrainingArguments
    values = specs.training.model_dump()
    for key in NOT_TRAINING_ARGUMENTS:
        values.pop(key, None)
    values["bf16"], values["fp16"] = resolve_precision(specs.training)
    if not _has_gpu():
        # transformers refuses bf16 on CPU unless told it is on CPU on purpose, and only sets up a multi-process
        # CPU run (torchrun / accelerate launch: MULTI_CPU with gloo) when use_cpu is on; without it every
        # launched process trains alone on all the data.
        values["use_cpu"] = True
    _rename_for_installed_transformers(values, cls)
    if not has_eval:
        values["eval_strategy"] = "no"
        values["load_best_model_at_end"] = False
    if values.get("load_best_model_at_end") and values["save_strategy"] != values["eval_strategy"]:
        values["save_strategy"] = values["eval_strategy"]
    values.setdefault("report_to", "none")
    values.setdefault("push_to_hub", False)
    # transformers' default (True) multiplies the loss by the number of processes for every model whose forward
    # takes **kwargs, assuming it divides by num_items_in_batch; BERT-style heads ignore it, so multi-process runs
    # logged (and stepped on) world_size x the loss. Off: each rank's mean loss, averaged by DDP, as the
    # Accelerate and Lightning backends do. Single-process runs are unaffected.
    values.setdefault("average_tokens_across_devices", False)
    distributed = getattr(specs, "distributed", None)
    if distributed is not None:
        from .distributed import hf_training_values
        for key, value in hf_training_values(distributed).items():
            values.setdefault(key, value)
    return values


def _has_gpu() -> bool:
    import torch
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _rename_for_installed_transformers(values: dict[str, Any], cls) -> None:
    """Follow renames between transformers versions so one specs file works across them."""
    import dataclasses
    names = {f.name for f in dataclasses.fields(cls)}
    for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                     ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        if old in values and new in names:
            value = values.pop(old)
            if value:
                values[new] = value
    if "train_sampling_strategy" not in names and "train_sampling_strategy" in values:  # transformers < 5
        values["group_by_length"] = values.pop("train_sampling_strategy") == "group_by_length"


class JsonlLogWriter:
    """Appends one JSON object per logging step to train_log.jsonl (rank 0 only)."""

    def __init__(self, path: Path):
        self.path = path
        self.start = time.time()

    def write(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"time": round(time.time() - self.start, 3), **record}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")


def truncate_log_after(path: Path, step: int) -> None:
    """Resuming from step N: drop the records an interrupted run wrote after its checkpoint, so each step is
    logged once."""
    from ..output import atomic_text
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


# ---- settings shared by the hand-written loops (Accelerate, Lightning) -------------------------------------------
class TrainingSettings:
    """TrainingArguments' values (its defaults + specs.training) without building TrainingArguments, whose
    constructor sets up torch.distributed and would fight Lightning's launcher. The transformers helpers that read
    ``args`` (optimizer choice, warmup, DefaultFlowCallback, ProgressCallback) accept this object unchanged."""

    def __init__(self, values: dict[str, Any]):
        self.__dict__.update(values)

    def get_warmup_steps(self, num_training_steps: int) -> int:
        from transformers import TrainingArguments
        return TrainingArguments.get_warmup_steps(self, num_training_steps)

    @property
    def train_batch_size(self) -> int:
        return self.per_device_train_batch_size

    @property
    def eval_batch_size(self) -> int:
        return self.per_device_eval_batch_size

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_") and k != "device"}


def training_settings(specs, output_dir: Path, has_eval: bool) -> TrainingSettings:
    import dataclasses

    from transformers import TrainingArguments
    values: dict[str, Any] = {}
    for f in dataclasses.fields(TrainingArguments):
        if f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            values[f.name] = f.default_factory()  # type: ignore[misc]
    values.update(training_values(specs, has_eval))
    values["output_dir"] = str(output_dir)
    # the normalisations TrainingArguments.__post_init__ would make
    for key in ("eval_strategy", "save_strategy", "logging_strategy", "lr_scheduler_type", "optim"):
        values[key] = str(getattr(values[key], "value", values[key]))
    if values["eval_strategy"] == "steps" and not values.get("eval_steps"):
        values["eval_steps"] = values["logging_steps"]
    if values.get("load_best_model_at_end") and values.get("metric_for_best_model") is None:
        values["metric_for_best_model"] = "loss"
    if values.get("greater_is_better") is None and values.get("metric_for_best_model"):
        values["greater_is_better"] = not values["metric_for_best_model"].endswith("loss")
    values["lr_scheduler_kwargs"] = values.get("lr_scheduler_kwargs") or {}
    values.setdefault("process_index", 0)
    values.setdefault("world_size", 1)
    values["device"] = None
    return TrainingSettings(values)


# ---- optimizer and scheduler: one factory for every backend ------------------------------------------------------
def decay_parameter_names(model) -> list[str]:
    """Same rule as transformers' Trainer: no weight decay on biases and norm layers."""
    from torch import nn
    from transformers.trainer_pt_utils import get_parameter_names
    forbidden = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    return get_parameter_names(model, [nn.LayerNorm], forbidden)


def create_optimizer(model, args):
    """The Trainer's optimizer for ``args.optim`` (fused AdamW by default on torch >= 2.8) with its weight-decay
    parameter groups; transformers' own selection code, so every backend steps identically."""
    from transformers import Trainer
    decay = set(decay_parameter_names(model))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if n in decay], "weight_decay": args.weight_decay},
              {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0}]
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    if kwargs.get("fused"):
        kwargs = {**kwargs, "fused": fused_adamw_supported(params)}
    return optimizer_cls(groups, **kwargs)


def fused_adamw_supported(named_params) -> bool:
    import torch
    devices = {p.device.type for _, p in named_params}
    dtypes = {p.dtype for _, p in named_params}
    return devices <= {"cpu", "cuda", "xpu", "mps"} and dtypes <= {torch.float32, torch.float16, torch.bfloat16}


def create_scheduler(optimizer, args, num_training_steps: int):
    from transformers import get_scheduler
    return get_scheduler(args.lr_scheduler_type, optimizer=optimizer,
                         num_warmup_steps=args.get_warmup_steps(num_training_steps),
                         num_training_steps=num_training_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)


def prepare_model_for_training(model, args) -> None:
    """Activation checkpointing as the Trainer enables it (non-reentrant: works with LoRA)."""
    if getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False):
        kwargs = dict(getattr(args, "activation_checkpointing_kwargs", None)
                      or getattr(args, "gradient_checkpointing_kwargs", None) or {"use_reentrant": False})
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()


# ---- data: the Trainer's sampling, column filtering and schedule -------------------------------------------------
class EpochSeededLengthGroupedSampler:
    """Length-grouped batches in shuffled order, re-seeded with ``seed + epoch`` at every pass.

    transformers' LengthGroupedSampler sorts each mega-batch (up to 50 batches) by length and yields its batches in
    that order, so training sweeps from the longest to the shortest examples again and again; on SQuAD, where the
    questions of one paragraph have nearly the same length, consecutive batches also share paragraphs. Here the
    batches keep the same members (the same padding savings) but come in a random order, the longest first so an
    out-of-memory error shows at step one. The Trainer's sampler draws from the global RNG, which dropout advances
    differently on each rank; the epoch seed gives every rank the same order in every epoch."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        self.batch_size, self.lengths = batch_size, list(lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        yield from self.indices(self.epoch)
        self.epoch += 1

    def indices(self, epoch: int) -> list[int]:
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices
        generator = torch.Generator().manual_seed(self.seed + epoch)
        grouped = get_length_grouped_indices(self.lengths, self.batch_size, generator=generator)
        batches = [grouped[i:i + self.batch_size] for i in range(0, len(grouped), self.batch_size)]
        # the first batch holds the longest example; a short final batch stays last so that every batch the
        # DataLoader cuts from this stream is one of these groups
        middle_end = len(batches) - (1 if len(batches) > 1 and len(batches[-1]) < self.batch_size else 0)
        middle = batches[1:middle_end]
        order = torch.randperm(len(middle), generator=generator).tolist()
        batches = batches[:1] + [middle[i] for i in order] + batches[middle_end:]
        return [i for batch in batches for i in batch]


class TokenWeightedLoss:
    """Scales a batch's mean loss by its label tokens over the expected count for a batch of its size.

    Length-grouped batches hold only short or only long examples, and a loss averaged inside each batch then
    weighs a token of a short-sentence batch several times more than one of a long-sentence batch (x8 on
    CoNLL-2003 NER). Weighting each batch by its token count gives back the
    token-mean objective of random batches and keeps grouping's padding savings."""

    def __init__(self, tokens_per_example: float):
        self.tokens_per_example = tokens_per_example

    def __call__(self, loss, batch: dict[str, Any]):
        labels = batch.get("labels") if isinstance(batch, dict) else None
        if labels is None or labels.dim() < 2:
            return loss
        return loss * ((labels != -100).sum() / (self.tokens_per_example * labels.shape[0]))


def token_weighted_loss(specs, dataset, sample_size: int = 10_000) -> TokenWeightedLoss | None:
    """The weighting for this run: on under ``token_weighted_loss: auto`` when batches are length-grouped and
    the labels are per token (tagging, seq2seq targets); None otherwise (one label per example needs none)."""
    setting = specs.training.token_weighted_loss
    if setting is False or dataset is None or "labels" not in getattr(dataset, "column_names", ()):
        return None
    if setting == "auto" and specs.training.train_sampling_strategy != "group_by_length":
        return None
    rows = list(dataset.select(range(min(len(dataset), sample_size)))["labels"])  # datasets 5: a Column
    if not rows or not isinstance(rows[0], (list, tuple)):
        return None
    mean = sum(sum(1 for v in row if v != -100) for row in rows) / len(rows)
    return TokenWeightedLoss(mean) if mean > 0 else None


def train_sampler(dataset, args, tokenizer=None):
    """Sampler per ``training.train_sampling_strategy`` (group_by_length | random | sequential), seeded from
    ``data_seed`` or ``seed`` like the Trainer's. Iterated identically on every rank; sharding happens after."""
    from accelerate.data_loader import SeedableRandomSampler
    from torch.utils.data import SequentialSampler
    seed = args.data_seed if args.data_seed is not None else args.seed
    strategy = args.train_sampling_strategy
    if strategy == "sequential":
        return SequentialSampler(dataset)
    if strategy == "group_by_length":
        column = args.length_column_name
        if column in dataset.column_names:
            lengths = list(dataset[column])
        else:
            name = tokenizer.model_input_names[0] if tokenizer is not None else "input_ids"
            lengths = [len(x) for x in dataset[name]]
        return EpochSeededLengthGroupedSampler(args.train_batch_size * args.gradient_accumulation_steps, lengths, seed)
    if strategy not in ("random",):
        import warnings
        warnings.warn(f"train_sampling_strategy '{strategy}' is not supported by this backend: random is used",
                      stacklevel=2)
    return SeedableRandomSampler(data_source=dataset, data_seed=seed)


def eval_order(dataset) -> list[int]:
    """Longest first (less padding, early OOM), stable; predictions are put back in dataset order afterwards."""
    if "length" in dataset.column_names:
        lengths = dataset["length"]
        return sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return list(range(len(dataset)))


def model_columns(model) -> list[str]:
    """Columns the model's forward accepts (the Trainer drops the others, e.g. ``length``)."""
    import inspect
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = list(inspect.signature(base.forward).parameters)
    return names + ["label", "label_ids"] + label_names(model)


def keep_model_columns(dataset, model):
    keep = set(model_columns(model))
    unused = [c for c in dataset.column_names if c not in keep]
    return dataset.remove_columns(unused) if unused else dataset


def label_names(model) -> list[str]:
    from transformers.utils import find_labels
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return find_labels(base.__class__)


class DictCollator:
    """The task's collator, returning a plain dict (Lightning rebuilds Mapping types when moving batches)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        return dict(self.collator(features))


@dataclass
class Schedule:
    max_steps: int
    num_epochs: int
    steps_in_epoch: int  # batches per epoch on one rank
    updates_per_epoch: int


def training_schedule(batches_per_epoch: int, args) -> Schedule:
    """Optimizer steps and epochs exactly as transformers' Trainer derives them (set_initial_training_values)."""
    import math
    ga = args.gradient_accumulation_steps
    updates = max(batches_per_epoch // ga + int(batches_per_epoch % ga > 0), 1)
    if args.max_steps > 0:
        max_steps = args.max_steps
        epochs = max_steps // updates + int(max_steps % updates > 0)
    else:
        max_steps = math.ceil(args.num_train_epochs * updates)
        epochs = math.ceil(args.num_train_epochs)
    return Schedule(max_steps, epochs, batches_per_epoch, updates)


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
    import torch
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


def reorder(arrays, order: list[int]):
    """Put rows gathered in ``order`` back into dataset order (nested tuples allowed)."""
    import numpy as np
    if arrays is None:
        return None
    if isinstance(arrays, (list, tuple)):
        return type(arrays)(reorder(a, order) for a in arrays)
    inverse = np.empty(len(order), dtype=np.int64)
    inverse[np.asarray(order)] = np.arange(len(order))
    return arrays[: len(order)][inverse]


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
    from transformers.trainer_callback import (CallbackHandler, DefaultFlowCallback, PrinterCallback,
                                               ProgressCallback)

    from .hf import _JsonlLogCallback
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


def log_metrics(handler, args, state, control, logs: dict[str, float]):
    """The Trainer's ``log``: add epoch, append to log_history, call on_log."""
    if state.epoch is not None:
        logs = {**logs, "epoch": state.epoch}
    state.log_history.append({**logs, "step": state.global_step})
    return handler.on_log(args, state, control, logs)


def speed_metrics(prefix: str, start: float, num_samples: int, num_steps: int) -> dict[str, float]:
    from transformers.trainer_utils import speed_metrics as hf_speed_metrics
    return hf_speed_metrics(prefix, start, num_samples=num_samples, num_steps=num_steps)


class LoopBookkeeping:
    """What the hand-written loops do after each optimizer step, as transformers' Trainer does it: log (loss
    averaged over ranks and steps, grad_norm, learning_rate), evaluate, keep the best metric, save checkpoints,
    and stop (after saving) when SIGTERM / SIGINT arrived. A backend provides: args, specs, state, control,
    handler, tokenizer, eval_dataset, is_main_process, and the methods _mean_over_ranks(tensor), _barrier(),
    _evaluate(dataset, split), _checkpoint_objects(), _data_state()."""

    stop_guard = None  # a checkpoints.StopOnSignal while training
    stopped_by_signal = False
    last_checkpoint: Path | None = None
    _finite_guard = None

    @property
    def finite_guard(self):
        """The shared NaN / inf rule (trainers/finite.py): the loop reports each micro-batch's loss to it and calls
        :meth:`_check_finite` before every optimizer step."""
        if self._finite_guard is None:
            from .finite import NonFiniteGuard
            self._finite_guard = NonFiniteGuard(self.args)
        return self._finite_guard

    def _check_finite(self, grad_norm=None, parameters=None, scaler=None) -> None:
        """Before the optimizer step: stop with NON_FINITE_LOSS (every rank at the same step) if this step's loss
        or, without a gradient scaler, its gradients are NaN / inf."""
        reduce_max = self._max_over_ranks if getattr(self.args, "world_size", 1) > 1 else None
        self.finite_guard.check(self.state.global_step + 1, grad_norm=grad_norm, parameters=parameters,
                                scaler=scaler, reduce_max=reduce_max,
                                last_checkpoint=self.checkpoint_manager().latest)

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, learning_rate, total_loss: float, last_logged: int):
        args, state = self.args, self.state
        if self.control.should_log and state.global_step > last_logged:
            loss = self._mean_over_ranks(tr_loss)
            tr_loss -= tr_loss
            logs = {"loss": loss / (state.global_step - last_logged)}
            if grad_norm is not None:
                logs["grad_norm"] = grad_norm.item() if hasattr(grad_norm, "item") else float(grad_norm)
            if learning_rate is not None:
                logs["learning_rate"] = learning_rate
            total_loss += loss
            last_logged = state.global_step
            self.control = log_metrics(self.handler, args, state, self.control, logs)
        metrics = None
        if self.control.should_evaluate:
            metrics = self._evaluate(self.eval_dataset, "eval")
        new_best = metrics is not None and self._is_new_best(metrics)
        if args.save_strategy == "best":
            self.control.should_save = new_best
        saved = False
        if self.control.should_save:
            self._save(new_best)
            saved = True
            self.control = self.handler.on_save(args, state, self.control)
        if not self.stopped_by_signal and self._signal_received():
            if not saved:
                self._save(False)
            self.stopped_by_signal = True
            self.control.should_training_stop = True
        return total_loss, last_logged

    def _signal_received(self) -> bool:
        guard = self.stop_guard
        if guard is None:
            return False
        if getattr(self.args, "world_size", 1) <= 1:
            return guard.synced()
        import torch

        def any_rank(flag: int) -> int:
            return int(self._mean_over_ranks(torch.tensor(float(flag), device=self.args.device)) > 0)

        return guard.synced(any_rank)

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

    def checkpoint_manager(self):
        from ..checkpoints import CheckpointManager
        if getattr(self, "_checkpoint_manager", None) is None:
            self._checkpoint_manager = CheckpointManager.for_specs(self.specs, Path(self.args.output_dir))
        return self._checkpoint_manager

    def _grad_scaler(self):
        return None

    def _save(self, new_best: bool) -> None:
        manager = self.checkpoint_manager()
        step = self.state.global_step
        if new_best:
            self.state.best_model_checkpoint = str(manager.path(step))
        shared = None
        if getattr(self.args, "world_size", 1) > 1:  # every rank's RNG goes into one staging directory
            import shutil

            from ..checkpoints import save_rank_rng
            shared = manager.shared_staging_dir(step)
            if self.is_main_process:
                shutil.rmtree(shared, ignore_errors=True)
                shared.mkdir(parents=True)
            self._barrier()
            if not self.is_main_process:
                save_rank_rng(shared, self.args.process_index)
        self._barrier()
        if self.is_main_process:
            model, optimizer, scheduler = self._checkpoint_objects()
            manager.save_loop_state(step, model=model, optimizer=optimizer, scheduler=scheduler, state=self.state,
                                    tokenizer=self.tokenizer, scaler=self._grad_scaler(),
                                    data_state=self._data_state(), tmp=shared)
            manager.rotate(self.state.best_model_checkpoint)
        self.last_checkpoint = manager.path(step)
        self._barrier()


# ---- checkpoints (tunepipe/checkpoints.py owns them): where the loop is in the data -------------------------------
def data_state(args, schedule: "Schedule", num_examples: int, world_size: int, global_step: int) -> dict[str, Any]:
    """Where the loop is in the data after ``global_step`` optimizer steps: the epoch, the batches of it already
    consumed, and what must match for that position to mean the same on resume."""
    epoch, done = divmod(global_step, schedule.updates_per_epoch)
    return {"global_step": global_step, "epoch": epoch,
            "batches_consumed_in_epoch": done * args.gradient_accumulation_steps,
            "steps_in_epoch": schedule.steps_in_epoch, "updates_per_epoch": schedule.updates_per_epoch,
            "num_examples": num_examples, "world_size": world_size,
            "train_sampling_strategy": args.train_sampling_strategy,
            "sampler_seed": args.data_seed if args.data_seed is not None else args.seed}
