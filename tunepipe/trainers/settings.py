"""Settings every backend reads the same way: TrainingArguments values from the specs (precision resolved by
modeling/type_utils.py), the optimizer and scheduler factory, and the Trainer's step/epoch schedule."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..modeling.type_utils import resolve_precision
from .distributed import hf_training_values

# Keys of TrainingSpec that are tunepipe's, not TrainingArguments'.
NOT_TRAINING_ARGUMENTS = {"resume_from_checkpoint", "resume", "keep_last_n", "keep_best", "token_weighted_loss",
                          "keep_optimizer_state", "length_group_batches"}


@dataclass
class TrainResult:
    """Same shape whichever backend ran."""
    global_step: int
    train_metrics: dict[str, float] = field(default_factory=dict)
    log_history: list[dict[str, Any]] = field(default_factory=list)
    already_trained: bool = False  # resumed from a checkpoint that held every step: nothing was trained now


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
    if not has_gpu():
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
        for key, value in hf_training_values(distributed).items():
            values.setdefault(key, value)
    return values


def has_gpu() -> bool:
    import torch
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _rename_for_installed_transformers(values: dict[str, Any], cls) -> None:
    """Follow renames between transformers versions so one specs file works across them."""
    names = {f.name for f in dataclasses.fields(cls)}
    for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                     ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        if old in values and new in names:
            value = values.pop(old)
            if value:
                values[new] = value
    if "train_sampling_strategy" not in names and "train_sampling_strategy" in values:  # transformers < 5
        values["group_by_length"] = values.pop("train_sampling_strategy") == "group_by_length"



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



@dataclass
class Schedule:
    max_steps: int
    num_epochs: int
    steps_in_epoch: int  # batches per epoch on one rank
    updates_per_epoch: int


def training_schedule(batches_per_epoch: int, args) -> Schedule:
    """Optimizer steps and epochs exactly as transformers' Trainer derives them (set_initial_training_values)."""
    ga = args.gradient_accumulation_steps
    updates = max(batches_per_epoch // ga + int(batches_per_epoch % ga > 0), 1)
    if args.max_steps > 0:
        max_steps = args.max_steps
        epochs = max_steps // updates + int(max_steps % updates > 0)
    else:
        max_steps = math.ceil(args.num_train_epochs * updates)
        epochs = math.ceil(args.num_train_epochs)
    return Schedule(max_steps, epochs, batches_per_epoch, updates)


