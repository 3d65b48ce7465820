"""Keys the specs accept besides their own: the original design's flat keys, renamed TrainingArguments names, and
unknown keys answered with a "did you mean".
Other stages' modules are imported inside the functions that use them: this file is on the start-up
path of `tunepipe train`, where a specs typo is reported before they load (tests/test_import_placement.py)."""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..suggest import suggest
from .schema import SECTIONS, MlflowSpec, PeftSpec, TrainingSpec

# Flat keys of the original design -> (section, key). Values may need translating (see _apply_legacy).
LEGACY_KEYS: dict[str, tuple[str, str]] = {
    **{k: ("training", k) for k in ("num_train_epochs", "learning_rate", "weight_decay", "per_device_train_batch_size",
                                    "per_device_eval_batch_size", "gradient_accumulation_steps", "max_grad_norm",
                                    "fp16", "bf16", "seed", "max_steps", "warmup_steps", "logging_steps")},
    **{k: ("data", k) for k in ("max_length", "chunk_size", "stride", "mlm_probability")},
    "scheduler_strategy": ("training", "lr_scheduler_type"),
    "evaluation_strategy": ("training", "eval_strategy"),
    "warmup_ratio": ("training", "warmup_steps"),
    "use_gradient_checkpointing": ("training", "gradient_checkpointing"),
    "lora_r": ("peft", "r"), "lora_alpha": ("peft", "alpha"), "lora_dropout": ("peft", "dropout"),
    "lora_bias": ("peft", "bias"), "peft_method": ("peft", "method"),
    "use_peft": ("peft", "<use_peft>"), "use_quantization": ("quantization", "<use>"),
    "quantization_type": ("quantization", "<type>"),
}
# Renamed transformers TrainingArguments keys, accepted inside `training:` too.
RENAMED_TRAINING_KEYS = {"evaluation_strategy": "eval_strategy", "no_cuda": "use_cpu", "warmup_ratio": "warmup_steps",
                         "scheduler_strategy": "lr_scheduler_type", "use_gradient_checkpointing": "gradient_checkpointing"}
DROPPED_TRAINING_KEYS = {"overwrite_output_dir", "logging_dir", "save_safetensors", "output_dir"}
TOP_LEVEL = set(SECTIONS) | {"task", "task_type", "output_dir", "overwrite_output_dir", "backend", "use_accelerate",
                             "use_lightning", "metrics"}
# Keys a user may expect but this version does not have: a specific error instead of "unknown key".
UNSUPPORTED_KEYS: dict[str, tuple[str, list[str]]] = {}


@functools.lru_cache(maxsize=1)
def training_argument_names() -> frozenset[str]:
    """The field names of transformers' TrainingArguments. Read from its source file (~50 ms) rather than by
    importing it (~10 s: it pulls in torch, peft and bitsandbytes), so that a typo in the specs is reported before
    any heavy import; the import stays the fallback where the source cannot be read that way."""
    names = _training_argument_names_from_source()
    if names is not None:
        return names
    import dataclasses

    from transformers import TrainingArguments
    return frozenset(f.name for f in dataclasses.fields(TrainingArguments))


def _training_argument_names_from_source() -> frozenset[str] | None:
    """TrainingArguments' dataclass fields as ``dataclasses.fields`` lists them (annotated class attributes, not
    ClassVar/InitVar), when the class is a plain ``@dataclass`` without base classes; else None."""
    import ast
    import importlib.util
    try:
        spec = importlib.util.find_spec("transformers")
        if spec is None or not spec.origin:
            return None
        tree = ast.parse((Path(spec.origin).parent / "training_args.py").read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError, ImportError):
        return None
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainingArguments"), None)
    if cls is None or cls.bases or cls.keywords or [ast.unparse(d) for d in cls.decorator_list] != ["dataclass"]:
        return None
    names = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
             and not re.search(r"\b(ClassVar|InitVar)\b", ast.unparse(n.annotation))}
    return frozenset(names) or None


def _apply_legacy(raw: dict[str, Any]) -> dict[str, Any]:
    """Move flat keys into their sections and translate renamed keys."""
    out: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    ta_names: set[str] | None = None
    for key, value in raw.items():
        if key in SECTIONS:
            if value is None:
                continue
            if key == "model" and isinstance(value, str):
                value = {"name_or_path": value}
            if key == "tokenizer" and isinstance(value, str):
                value = {"name_or_path": value}
            if not isinstance(value, dict):
                raise ConfigError(f"'{key}' must be a mapping, got {type(value).__name__}", field=key,
                                  suggestions=[f"write it as `{key}: {{...}}`"])
            sections.setdefault(key, {}).update(value)
        elif key in LEGACY_KEYS:
            if key == "warmup_ratio":
                _check_warmup_ratio(value, key)
            section, target = LEGACY_KEYS[key]
            sections.setdefault(section, {})
            if target == "<use_peft>":
                if value and "method" not in sections["peft"]:
                    sections["peft"].setdefault("method", raw.get("peft_method") or "lora")
                elif not value:
                    sections["peft"]["method"] = "none"
            elif target == "<use>":
                sections[section]["<use>"] = bool(value)
            elif target == "<type>":
                sections[section]["<type>"] = value
            else:
                sections[section][target] = value
        elif key == "task_type":
            out["task"] = value
        elif key in TOP_LEVEL:
            out[key] = value
        else:
            ta_names = ta_names if ta_names is not None else training_argument_names()
            if key in ta_names:
                sections.setdefault("training", {})[key] = value
            else:
                raise ConfigError(f"Unknown key '{key}'", field=key,
                                  suggestions=suggest(key, TOP_LEVEL | set(LEGACY_KEYS) | ta_names) or [
                                      f"top-level keys are: {', '.join(sorted(TOP_LEVEL))}"])
    q = sections.get("quantization", {})
    use, qtype = q.pop("<use>", None), q.pop("<type>", None)
    if use or (use is None and qtype):
        qtype = str(qtype or "nf4").lower()
        if qtype in ("8bit", "int8"):
            q["load_in_8bit"] = True
        elif qtype in ("4bit", "nf4", "fp4", "int4"):
            q["load_in_4bit"] = True
            q["quant_type"] = "fp4" if qtype == "fp4" else "nf4"
        else:
            raise ConfigError(f"Unknown quantization_type '{qtype}'", field="quantization_type",
                              suggestions=["use one of: 4bit, nf4, fp4, 8bit"])
    if "training" in sections:
        if "overwrite_output_dir" in sections["training"]:  # a TrainingArguments name in transformers < 5
            out.setdefault("overwrite_output_dir", sections["training"].pop("overwrite_output_dir"))
        sections["training"] = _normalise_training(sections["training"])
    out.update(sections)
    return out


def _check_warmup_ratio(value: Any, field: str) -> None:
    """warmup_ratio becomes warmup_steps, where a number of 1 or more counts steps: a ratio outside [0, 1) would
    silently turn into that many steps."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not 0 <= value < 1:
        raise ConfigError(f"{field} is a fraction of all steps, in [0, 1); got {value}", field=field,
                          suggestions=["e.g. warmup_ratio: 0.1 (the first 10% of the steps)",
                                       "or a number of steps: training.warmup_steps: 500"])


def _normalise_training(training: dict[str, Any]) -> dict[str, Any]:
    result = {}
    names = None
    for key, value in training.items():
        if key == "warmup_ratio":
            _check_warmup_ratio(value, "training.warmup_ratio")
        key = RENAMED_TRAINING_KEYS.get(key, key)
        if key in DROPPED_TRAINING_KEYS:
            continue
        if key == "group_by_length":
            if value:
                result["train_sampling_strategy"] = "group_by_length"
            else:
                result.setdefault("train_sampling_strategy", "random")
            continue
        if key not in TrainingSpec.model_fields:
            names = names if names is not None else training_argument_names()
            if key not in names:
                raise ConfigError(f"Unknown training key '{key}'", field=f"training.{key}",
                                  suggestions=suggest(key, names | set(TrainingSpec.model_fields)) or [
                                      "training accepts transformers TrainingArguments names"])
        result[key] = value
    return result


def _backend_from_flags(d: dict[str, Any]) -> None:
    acc, lit = d.pop("use_accelerate", None), d.pop("use_lightning", None)
    if acc is None and lit is None:
        return
    flagged = {(False, False): "hf", (True, False): "accelerate", (False, True): "lightning",
               (True, True): "lightning+accelerate"}[(bool(acc), bool(lit))]
    if "backend" in d and d["backend"] != flagged:
        raise ConfigError(f"backend '{d['backend']}' contradicts use_accelerate={acc}, use_lightning={lit}",
                          field="backend", suggestions=["set either `backend:` or the two flags, not both"])
    d["backend"] = flagged


def _check_section_keys(d: dict[str, Any]) -> None:
    for name, section in d.items():
        model = SECTIONS.get(name)
        if model is None or model.model_config.get("extra") == "allow" or not isinstance(section, dict):
            continue
        if model is PeftSpec:  # peft's own names too: PeftSpec._peft_names checks them
            PeftSpec._peft_names(section)
            continue
        for key in section:
            if f"{name}.{key}" in UNSUPPORTED_KEYS:
                message, hints = UNSUPPORTED_KEYS[f"{name}.{key}"]
                raise ConfigError(message, field=f"{name}.{key}", suggestions=hints)
            if key not in model.model_fields:
                raise ConfigError(f"Unknown key '{name}.{key}'", field=f"{name}.{key}",
                                  suggestions=suggest(key, set(model.model_fields)) or [
                                      f"'{name}' accepts: {', '.join(model.model_fields)}"])
    mlflow = d.get("tracking", {}).get("mlflow") if isinstance(d.get("tracking"), dict) else None
    if isinstance(mlflow, dict):
        for key in mlflow:
            if key not in MlflowSpec.model_fields:
                raise ConfigError(f"Unknown key 'tracking.mlflow.{key}'", field=f"tracking.mlflow.{key}",
                                  suggestions=suggest(key, set(MlflowSpec.model_fields)))
