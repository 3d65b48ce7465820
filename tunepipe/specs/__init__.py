"""The ``specs``: one typed object, validated once, that every later step reads.

Users write a dict, a YAML/JSON file, or the flat keys of the original design; ``load_specs`` turns any of them
into :class:`Specs`. Unknown keys fail with a "did you mean" suggestion, because a silently ignored typo
(``learning_rte``) costs a whole training run.

Other stages' modules are imported inside the functions that use them: this file is on the start-up
path of `tunepipe train`, where a specs typo is reported before they load (tests/test_import_placement.py).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Iterator

from pydantic import ValidationError as PydanticValidationError

from ..errors import ConfigError
from .files import deep_merge, load_json, load_yaml, parse_assignment, read_specs_file, set_override
from .legacy import (
    DROPPED_TRAINING_KEYS,
    LEGACY_KEYS,
    RENAMED_TRAINING_KEYS,
    TOP_LEVEL,
    UNSUPPORTED_KEYS,
    _apply_legacy,
    _backend_from_flags,
    _check_section_keys,
    _training_argument_names_from_source,
    suggest,
    training_argument_names,
)
from .schema import (
    BACKENDS,
    MAX_STEPS,
    PEFT_METHODS,
    SECTIONS,
    STEP_COUNT_HINTS,
    STEP_COUNT_RULES,
    DataSpec,
    DistributedSpec,
    GenerationSpec,
    MlflowSpec,
    ModelSpec,
    PeftSpec,
    QuantizationSpec,
    Specs,
    TokenizerSpec,
    TrackingSpec,
    TrainingSpec,
    check_count,
)

__all__ = ["BACKENDS", "DROPPED_TRAINING_KEYS", "DataSpec", "DistributedSpec", "GenerationSpec", "LEGACY_KEYS",
           "MAX_STEPS", "MlflowSpec", "ModelSpec", "PEFT_METHODS", "PeftSpec", "QuantizationSpec",
           "RENAMED_TRAINING_KEYS", "SECTIONS", "STEP_COUNT_HINTS", "STEP_COUNT_RULES", "Specs", "TOP_LEVEL",
           "TokenizerSpec", "TrackingSpec", "TrainingSpec", "UNSUPPORTED_KEYS", "check_count", "deep_merge",
           "load_json", "load_specs", "load_yaml", "parse_assignment", "read_specs_file", "set_override", "suggest",
           "training_argument_names", "_training_argument_names_from_source"]


def load_specs(source: "Specs | dict[str, Any] | str | Path", overrides: list[str] | None = None,
               **extra: Any) -> Specs:
    """Resolve ``source`` (+ overrides + keyword extras) into validated :class:`Specs`, task defaults included."""
    if isinstance(source, Specs):
        if not overrides and not extra:
            return source
        raw: dict[str, Any] = source.model_dump(mode="python")
    elif isinstance(source, dict):
        raw = copy.deepcopy(source)
    else:
        raw = read_specs_file(source)
    raw.update({k: v for k, v in extra.items() if v is not None})
    for item in overrides or []:
        set_override(raw, item)
    d = _apply_legacy(raw)
    _backend_from_flags(d)
    if "task" not in d or not d["task"]:
        raise ConfigError("The specs do not say which task to run", field="task",
                          suggestions=["add `task: token_classification` (see `tunepipe tasks`)"])
    from ..tasks import get_task
    task = get_task(str(d["task"]))
    d["task"] = task.name
    _check_section_keys(d)
    defaults = task.default_specs(model=d.get("model"))
    merged = deep_merge(defaults, d)
    merged.setdefault("output_dir", f"runs/{task.name}")
    _refuse_non_finite(merged)  # before pydantic, whose message for NaN would be "greater than or equal to 0"
    specs = _validate(merged)  # a bad value is reported before the model's config is read (transformers: seconds)
    if task.capped_lengths:  # a default length the model cannot read is lowered to its limit (limits.py)
        from ..modeling.limits import limits_for_model_section, virtual_tokens
        limits = limits_for_model_section(d.get("model"))
        fitted = task.fit_default_lengths(copy.deepcopy(defaults), limits, virtual_tokens(d.get("peft"))) \
            if limits else defaults
        if fitted != defaults:
            d = deep_merge(fitted, d)
            d.setdefault("output_dir", f"runs/{task.name}")
            specs = _validate(d)
    _check_values(specs)
    _check_combinations(specs)
    return specs


def _validate(d: dict[str, Any]) -> Specs:
    """Specs.model_validate, its errors as one ConfigError naming every invalid field."""
    try:
        return Specs.model_validate(d)
    except PydanticValidationError as e:
        errs = e.errors()
        first = errs[0]
        field = ".".join(str(p) for p in first["loc"])
        lines = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']} (got {err.get('input')!r})" for err in errs]
        raise ConfigError("Invalid specs: " + "; ".join(lines), field=field,
                          suggestions=_value_suggestions(first, field)) from None


def _refuse_non_finite(tree: dict[str, Any]) -> None:
    """No NaN or infinity anywhere in the specs (the data splits' in-memory records aside)."""
    data = tree.get("data")
    if isinstance(data, dict):
        tree = {**tree, "data": {k: v for k, v in data.items() if k not in ("train", "validation", "test")}}
    for path in _non_finite(tree, ""):
        raise ConfigError(f"{path} is not a finite number (NaN or infinity)", field=path,
                          suggestions=[f"give {path} a finite value, or remove it to use the default"])


def _non_finite(value: Any, path: str) -> Iterator[str]:
    if isinstance(value, float) and not math.isfinite(value):
        yield path
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _non_finite(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _non_finite(v, f"{path}[{i}]")


def _check_values(specs: Specs) -> None:
    """Values that type-check yet would make a run silently wrong: NaN / inf anywhere (``.inf``, ``'nan'``: a
    learning rate of inf trains NaN weights, a NaN max_grad_norm turns clipping off), and an output_dir whose
    path cannot be resolved (a symlink loop)."""
    _refuse_non_finite(specs.model_dump(mode="python", exclude={"data": {"train", "validation", "test"}}))
    out = Path(specs.output_dir).expanduser()
    try:
        out.resolve()
    except (RuntimeError, OSError) as e:  # Python < 3.13 raises RuntimeError("Symlink loop from ...")
        raise ConfigError(f"output_dir cannot be resolved: {e}", field="output_dir", file=str(out),
                          suggestions=["a symbolic link in the path points (through others) back to itself: "
                                       "remove or fix it, or choose another output_dir"]) from None


def _value_suggestions(err: dict[str, Any], field: str) -> list[str]:
    """What to write instead of a rejected value: the allowed choices (closest first), or pydantic's rule."""
    import re
    if err.get("type") == "literal_error":
        choices = re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected", "")))
        return suggest(str(err.get("input")), choices) + [f"'{field}' takes one of: {', '.join(choices)}"]
    rule = err["msg"][:1].lower() + err["msg"][1:]
    return [f"set '{field}' to a valid value ({rule})"]


def _check_combinations(specs: Specs) -> None:
    """Settings that are valid one by one but not together."""
    if specs.training.fp16 and specs.training.bf16 is True:
        raise ConfigError("training.fp16 and training.bf16 are both on", field="training.bf16",
                          suggestions=["keep one of them: bf16 (Ampere+ GPUs, CPUs with AVX512-BF16/AMX) or fp16 "
                                       "(CUDA GPUs)"])
    _check_sharded_strategy(specs)


SHARDED_STRATEGIES = ("fsdp", "deepspeed")


def _check_sharded_strategy(specs: Specs) -> None:
    """FSDP / DeepSpeed on the accelerate and lightning backends: their loop checkpoints and saves the model and
    optimizer from rank 0 as whole tensors, which under a sharding strategy would write one rank's shard as the
    whole state. Refused until per-rank sharded saving exists, rather than writing a model that looks complete."""
    dist = specs.distributed
    if specs.backend == "hf":
        return
    if dist.fsdp is not None or dist.deepspeed is not None:
        sharded = "fsdp" if dist.fsdp is not None else "deepspeed"
        field = f"distributed.{sharded}"
    else:
        sharded = next((s for s in SHARDED_STRATEGIES if str(dist.strategy).lower().startswith(s)), None)
        field = "distributed.strategy"
    if sharded:
        raise ConfigError(f"{sharded} is not supported on backend: {specs.backend}: its loop saves checkpoints and "
                          "the final model from rank 0 and cannot yet gather sharded weights and optimizer state",
                          field=field,
                          suggestions=[f"backend: hf runs {sharded} through transformers' Trainer, which saves "
                                       "sharded state per rank (untested here: it needs GPUs)",
                                       "or strategy: ddp on this backend if the model fits on one device"])
