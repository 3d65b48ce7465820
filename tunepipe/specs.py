"""The ``specs``: one typed object, validated once, that every later step reads.

Users write a dict, a YAML/JSON file, or the flat keys of the original design; ``load_specs`` turns any of them
into :class:`Specs`. Unknown keys fail with a "did you mean" suggestion, because a silently ignored typo
(``learning_rte``) costs a whole training run.
"""
from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Iterator, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic import ValidationError as PydanticValidationError

from .errors import ConfigError

BACKENDS = ("hf", "accelerate", "lightning", "lightning+accelerate")
PEFT_METHODS = ("none", "lora", "qlora", "dora", "ia3", "prefix_tuning", "prompt_tuning", "p_tuning")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelSpec(_Section):
    name_or_path: str | None = Field(None, description="local directory, hub id, or 'minilm' (the bundled encoder)")
    from_config: dict[str, Any] | None = Field(None, description="build a fresh model: {model_type: bert, ...}")
    encoder_decoder: str | dict[str, str] | None = Field(
        None, description="seq2seq warm-started from pretrained encoders: 'minilm' (both sides) or "
                          "{encoder: ..., decoder: ...}")
    revision: str | None = None
    trust_remote_code: bool = False


class TokenizerSpec(_Section):
    name_or_path: str | None = Field(None, description="defaults to model.name_or_path")
    use_fast: bool = True
    padding_side: Literal["left", "right"] | None = None
    train: dict[str, Any] | None = Field(None, description="train a tokenizer on the training text")
    special_tokens: dict[str, str] | None = Field(None, description="named special tokens, added when new: "
                                                                    "{pad_token: '<pad>', ...}; embeddings resized")
    additional_special_tokens: list[str] | None = Field(None, description="tokens added as special (never split): "
                                                                          "['<ent>', '</ent>']; embeddings resized")

    @model_validator(mode="after")
    def _special_tokens(self) -> "TokenizerSpec":
        from .special_tokens import check_special_tokens
        check_special_tokens(self.special_tokens, self.additional_special_tokens)
        return self


class DataSpec(_Section):
    train: Any = None
    validation: Any = None
    test: Any = None
    format: Literal["auto", "jsonl", "json", "csv", "tsv", "parquet", "text", "conll", "hub"] = "auto"
    hub_config: str | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    columns: dict[str, str] = Field(default_factory=dict, description="rename {name in file: name tunepipe uses}")
    labels: list[str] | None = Field(None, description="label names in id order; inferred from train if omitted")
    multi_label: bool = False
    max_length: int | None = Field(None, gt=0)
    stride: int | None = Field(None, ge=0)
    chunk_size: int | None = Field(None, gt=0)
    mlm_probability: float | None = Field(None, gt=0, lt=1)
    packing: bool | None = Field(None, description="MLM/causal LM: concatenate texts and cut full blocks of "
                                                    "chunk_size tokens (false: one example per text/line)")
    whole_word_mask: bool = Field(False, description="MLM: mask every piece of a chosen word together")
    label_all_tokens: bool = False
    validation_split: float | None = Field(None, gt=0, lt=1, description="carve validation out of train")
    max_train_samples: int | None = Field(None, gt=0)
    max_eval_samples: int | None = Field(None, gt=0)
    cache: bool = Field(True, description="keep read and tokenized splits between runs (TUNEPIPE_CACHE_DIR, "
                                          "default ~/.cache/tunepipe; `tunepipe cache clear` empties it)")
    on_bad_record: Literal["stop", "skip"] = Field("stop", description="a record that fails the checks: stop with "
                                                                       "its file and line, or skip and count it")
    streaming: bool = Field(False, description="read train as a stream (constant memory, no pass over the data "
                                               "before training); needs training.max_steps")
    shuffle_buffer: int = Field(10_000, gt=0, description="streaming: records shuffled together (the stream's "
                                                          "order is otherwise the files' order)")
    preprocess: str | None = Field(None, description="'module:function' (or 'file.py:function') applied to each "
                                                     "record as it is read, before the checks: dict -> dict, or "
                                                     "None to drop it (docs/extending.md)")
    # extractive question answering (the names of transformers' run_qa.py)
    version_2_with_negative: bool = Field(False, description="QA: SQuAD v2.0, some questions have no answer")
    null_score_diff_threshold: float = Field(0.0, description="QA v2: answer nothing when null score - best span "
                                                               "score exceeds this")
    n_best_size: int | None = Field(None, gt=0, description="QA: start/end candidates kept per window")
    max_answer_length: int | None = Field(None, gt=0, description="QA: longest answer, in tokens")
    # sequence to sequence (the names of transformers' run_translation.py / run_summarization.py)
    source_column: str | None = Field(None, description="seq2seq: input text column")
    target_column: str | None = Field(None, description="seq2seq: output text column")
    references_column: str | None = Field(None, description="seq2seq: optional list of reference texts per "
                                                             "record, all used by BLEU/ROUGE")
    source_lang: str | None = Field(None, description="translation: source key in a {'translation': {lang: text}} "
                                                      "record (or a column of that name)")
    target_lang: str | None = Field(None, description="translation: target key, like source_lang")
    source_prefix: str | None = Field(None, description="seq2seq: text put before every source (T5 style)")
    source_suffix: str | None = Field(None, description="seq2seq: text put after every source; with a decoder-only "
                                                        "model it ends the prompt (default per task, e.g. "
                                                        "'\\nTL;DR:' for summarization)")
    max_target_length: int | None = Field(None, gt=0, description="seq2seq: target tokens kept for training")

    @model_validator(mode="after")
    def _preprocess_reference(self) -> "DataSpec":
        if self.preprocess is not None:  # the form only: the code is imported by the run (extensions.py)
            from .extensions import check_reference
            check_reference(self.preprocess, "data.preprocess")
        return self


MAX_STEPS = 10 ** 9  # far beyond any real run; larger values are typos (1e30) that overflow step arithmetic
# key -> (smallest whole value, fraction of all steps allowed (0 < x < 1), values allowed besides)
STEP_COUNT_RULES: dict[str, tuple[int, bool, tuple]] = {
    "max_steps": (1, False, (-1,)), "gradient_accumulation_steps": (1, False, ()),
    "per_device_train_batch_size": (1, False, ()), "per_device_eval_batch_size": (1, False, ()),
    "save_steps": (1, True, ()), "eval_steps": (1, True, (None,)), "logging_steps": (1, True, ()),
    "warmup_steps": (1, True, (0,)), "keep_last_n": (1, False, (None,)), "save_total_limit": (1, False, (None,)),
}
STEP_COUNT_HINTS = {
    "max_steps": "-1 (the default) trains for num_train_epochs; a positive number stops after that many steps",
    "save_steps": "to save no checkpoints set training.save_strategy: no",
    "eval_steps": "to evaluate only per epoch set training.eval_strategy: epoch",
    "logging_steps": "e.g. 25 (steps) or 0.05 (a fraction of all steps)",
    "keep_last_n": "keep at least 1 checkpoint (needed to resume); to write none set training.save_strategy: no",
    "save_total_limit": "keep at least 1 checkpoint; to write none set training.save_strategy: no",
}


def check_count(field: str, value: Any, minimum: int, fraction: bool, also: tuple = ()) -> None:
    """One rule for every count in the specs: a whole number >= ``minimum`` and <= MAX_STEPS, or (``fraction``)
    a ratio in (0, 1), or one of ``also``. Non-numbers are left to the type check, which names them."""
    if value is None or isinstance(value, str) or (not isinstance(value, bool) and value in also):
        return
    key = field.rsplit(".", 1)[-1]
    hints = [STEP_COUNT_HINTS[key]] if key in STEP_COUNT_HINTS else []
    if isinstance(value, bool):  # pydantic would read true as 1
        raise ConfigError(f"{field} is a count, not true/false (got {value})", field=field,
                          suggestions=hints or [f"set {field} to a whole number"])
    if not isinstance(value, (int, float)):
        return
    if not math.isfinite(value):
        raise ConfigError(f"{field} must be a finite number, got {value}", field=field,
                          suggestions=hints or [f"set {field} to a whole number"])
    if fraction and 0 < value < 1:
        return
    allowed = " or ".join([f"a whole number >= {minimum}"] + (["a fraction of all steps in (0, 1)"] if fraction
                                                                else []) + [repr(a) for a in also if a is not None])
    if value != int(value):
        raise ConfigError(f"{field} is a count and must be {allowed}, got {value}", field=field,
                          suggestions=[f"write a whole number, e.g. {field}: {max(minimum, round(value))}"] + hints)
    if value < minimum:
        raise ConfigError(f"{field}: {value!r} is not allowed: it must be {allowed}", field=field,
                          suggestions=hints or [f"set {field} to {minimum} or more"])
    if value > MAX_STEPS:
        raise ConfigError(f"{field}: {value:g} is absurdly large (over {MAX_STEPS:,}); was it a typo?", field=field,
                          suggestions=[f"set {field} to a realistic value"] + hints)


class TrainingSpec(BaseModel):
    """transformers ``TrainingArguments`` names. Listed fields carry tunepipe's defaults; any other
    TrainingArguments name is accepted and passed through."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    num_train_epochs: float = Field(3.0, gt=0, le=1_000_000)
    max_steps: int = -1
    learning_rate: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    per_device_train_batch_size: int = Field(16, gt=0)
    per_device_eval_batch_size: int = Field(32, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_grad_norm: float = Field(1.0, ge=0, description="0 = no clipping")
    warmup_steps: float = Field(0, ge=0, description="int = steps; float in [0, 1) = fraction of all steps")
    lr_scheduler_type: str = "linear"
    seed: int = Field(42, ge=0, le=2 ** 32 - 1, description="numpy takes seeds in [0, 2**32)")
    eval_strategy: Literal["no", "steps", "epoch"] = "epoch"
    save_strategy: Literal["no", "steps", "epoch", "best"] = "epoch"
    save_total_limit: int | None = 1
    logging_steps: float = 25
    bf16: bool | Literal["auto"] = Field("auto", description="auto = on where the device runs bf16 fast")
    fp16: bool = False
    train_sampling_strategy: str = Field("group_by_length", description="length-grouped batches: less padding")
    token_weighted_loss: bool | Literal["auto"] = Field(
        "auto", description="auto = on with group_by_length and per-token labels: each batch's mean loss is "
                            "weighted by its token count, so batches of short examples do not count more per token")
    gradient_checkpointing: bool = False
    metric_for_best_model: str | None = None
    load_best_model_at_end: bool = False
    resume_from_checkpoint: str | None = Field(None, description="older name of `resume`")
    resume: str | None = Field(None, description="auto = the newest complete checkpoint in <output_dir>/checkpoints "
                                                 "(a fresh start when there is none), or a checkpoint directory")
    keep_last_n: int | None = Field(None, gt=0, description="checkpoints kept; overrides save_total_limit")
    keep_best: bool | str | None = Field(None, description="never rotate out the best checkpoint (default when a "
                                                           "metric is chosen); a metric name sets "
                                                           "metric_for_best_model; false: rotate it too")
    keep_optimizer_state: bool = Field(False, description="keep optimizer.pt in the checkpoints after the run "
                                                          "finished (else dropped after the final save)")

    @model_validator(mode="before")
    @classmethod
    def _step_counts(cls, data: Any) -> Any:
        """Counts of steps, examples and checkpoints are whole numbers in a sane range (see STEP_COUNT_RULES):
        ``max_steps: 0`` or ``save_steps: 2.5`` would otherwise train nothing or be rounded silently."""
        if isinstance(data, dict):
            for key, value in data.items():
                if key in STEP_COUNT_RULES:
                    check_count(f"training.{key}", value, *STEP_COUNT_RULES[key])
        return data

    @model_validator(mode="before")
    @classmethod
    def _strategy_no(cls, data: Any) -> Any:
        """YAML 1.1 reads an unquoted ``no`` as false: ``save_strategy: no`` (what our own hints say) means "no"."""
        if isinstance(data, dict):
            data = {k: "no" if k.endswith("_strategy") and v is False else v for k, v in data.items()}
        return data

    @model_validator(mode="before")
    @classmethod
    def _checkpoint_aliases(cls, data: Any) -> Any:
        """resume_from_checkpoint fills resume; keep_best: <metric> fills metric_for_best_model (when unset)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("resume") in (None, False, "") and data.get("resume_from_checkpoint"):
            data["resume"] = data["resume_from_checkpoint"]
        if data.get("resume") is True:
            data["resume"] = "auto"
        if data.get("resume") is False:
            data["resume"] = None
        best = data.get("keep_best")
        if isinstance(best, str) and best.lower() not in ("true", "false") and not data.get("metric_for_best_model"):
            data["metric_for_best_model"] = best
        return data


class PeftSpec(_Section):
    method: Literal[PEFT_METHODS] = "none"  # type: ignore[valid-type]
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    bias: Literal["none", "all", "lora_only"] = "none"
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    num_virtual_tokens: int = Field(20, gt=0)
    config: dict[str, Any] | None = Field(None, description="peft's own fields for the method's config class "
                                                            "(LoraConfig, IA3Config, ...); with a peft_type: a "
                                                            "complete peft config, passed to peft as is")

    @model_validator(mode="before")
    @classmethod
    def _peft_names(cls, data: Any) -> Any:
        """peft's names beside tunepipe's (lora_alpha -> alpha, use_dora, init_lora_weights -> config, ...): one
        canonical section, its typos and contradictions refused (peft_names.py)."""
        if not isinstance(data, dict):
            return data
        from .peft_names import normalise_peft
        return normalise_peft(data, {k: f.default for k, f in cls.model_fields.items()})


class QuantizationSpec(_Section):
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    skip_modules: list[str] | None = None


class MlflowSpec(_Section):
    tracking_uri: str | None = None
    experiment: str = "tunepipe"
    run_name: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    log_model: bool = False
    request_timeout: int | None = Field(None, gt=0, description="seconds per HTTP request (default 5; "
                                                                  "env MLFLOW_HTTP_REQUEST_TIMEOUT)")
    max_retries: int | None = Field(None, ge=0, description="HTTP retries (default 1; "
                                                             "env MLFLOW_HTTP_REQUEST_MAX_RETRIES)")


class TrackingSpec(_Section):
    mlflow: MlflowSpec | None = None
    resources: bool = Field(True, description="CPU/RSS/GPU and throughput in train_log.jsonl + resources.json")


class GenerationSpec(_Section):
    max_new_tokens: int = Field(64, gt=0)
    num_beams: int = Field(1, gt=0)
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    do_sample: bool = False
    min_new_tokens: int | None = Field(None, ge=0)
    early_stopping: bool | None = Field(None, description="beam search: stop when num_beams candidates are done")
    temperature: float | None = Field(None, gt=0, description="sampling only")
    top_k: int | None = Field(None, ge=0, description="sampling only")
    top_p: float | None = Field(None, gt=0, le=1, description="sampling only")


class DistributedSpec(_Section):
    """Multi-process settings, passed to each engine's own machinery (see docs/backends.md). The HF and Accelerate
    backends take the process count from their launcher (torchrun / accelerate launch); Lightning launches its own
    processes from ``devices`` / ``num_nodes`` / ``strategy``."""

    strategy: str = Field("auto", description="Lightning strategy: auto | ddp | ddp_spawn | fsdp | deepspeed")
    devices: int | str | list[int] = Field("auto", description="Lightning: devices (processes) per machine")
    num_nodes: int = Field(1, gt=0, description="Lightning: number of machines")
    accelerator: str = Field("auto", description="Lightning: auto | cpu | gpu")
    process_group_backend: str | None = Field(None, description="gloo (CPU) | nccl (CUDA); default: the engine's")
    find_unused_parameters: bool = Field(False, description="DDP: parameters without gradients in some steps")
    deepspeed: str | dict[str, Any] | None = Field(None, description="DeepSpeed JSON config (path or mapping), "
                                                                     "given to every engine as is")
    fsdp: dict[str, Any] | None = Field(None, description="FSDP settings in the engine's own names "
                                                          "(TrainingArguments fsdp/fsdp_config, Accelerate "
                                                          "FullyShardedDataParallelPlugin, Lightning FSDPStrategy)")


class Specs(_Section):
    task: str
    output_dir: str = "runs/tunepipe"
    overwrite_output_dir: bool = Field(False, description="train into an output_dir that holds a run of other specs")
    model: ModelSpec = Field(default_factory=ModelSpec)
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    peft: PeftSpec = Field(default_factory=PeftSpec)
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    backend: Literal[BACKENDS] = "hf"  # type: ignore[valid-type]
    metrics: list[str] = Field(default_factory=list, description="'module:function' references called after the "
                                                                 "task's compute_metrics; their metrics are merged "
                                                                 "in (docs/extending.md)")

    @model_validator(mode="before")
    @classmethod
    def _metric_references(cls, data: Any) -> Any:
        """``metrics: mod:fn`` (one string) or a list of them; the form only, nothing imported here."""
        if isinstance(data, dict) and data.get("metrics") is not None:
            from .extensions import check_reference
            value = data["metrics"]
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list):
                raise ConfigError(f"metrics must be a 'module:function' string or a list of them, got {value!r}",
                                  field="metrics", suggestions=["e.g. metrics: [my_metrics:macro_f1]"])
            data = {**data, "metrics": [check_reference(v, "metrics" if len(items) == 1 else f"metrics[{i}]")
                                        for i, v in enumerate(items)]}
        return data

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"data": {"train", "validation", "test"}}) | {
            "data": _data_for_dump(self.data)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def fingerprint(self) -> str:
        """Hash of what changes the trained weights (not where they are written)."""
        d = self.to_dict()
        d.pop("output_dir", None)
        d.pop("overwrite_output_dir", None)
        d.get("training", {}).pop("resume_from_checkpoint", None)
        d.get("training", {}).pop("resume", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _data_for_dump(data: DataSpec) -> dict[str, Any]:
    out = data.model_dump(mode="json", exclude={"train", "validation", "test"})
    for split in ("train", "validation", "test"):
        value = getattr(data, split)
        out[split] = value if value is None or isinstance(value, (str, list)) and all(
            isinstance(v, str) for v in ([value] if isinstance(value, str) else value)) else f"<in-memory {type(value).__name__}>"
    return out


SECTIONS = {"model": ModelSpec, "tokenizer": TokenizerSpec, "data": DataSpec, "training": TrainingSpec,
            "peft": PeftSpec, "quantization": QuantizationSpec, "tracking": TrackingSpec,
            "generation": GenerationSpec, "distributed": DistributedSpec}

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


def suggest(key: str, allowed: set[str] | list[str]) -> list[str]:
    close = difflib.get_close_matches(key, sorted(allowed), n=3, cutoff=0.6)
    return [f"did you mean '{c}'?" for c in close]


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


def _normalise_training(training: dict[str, Any]) -> dict[str, Any]:
    result = {}
    names = None
    for key, value in training.items():
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


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_assignment(assignment: str, example: str = "--set training.learning_rate=3e-5") -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value), the value parsed as YAML (3e-5, true, [a, b]; text stays
    text). Shared by ``--set`` and ``tunepipe predict --param``."""
    if "=" not in assignment:
        raise ConfigError(f"'{assignment}' is not of the form KEY=VALUE", field=assignment,
                          suggestions=[f"e.g. {example}"])
    path, _, text = assignment.partition("=")
    try:
        value = load_yaml(text, where=assignment) if text.strip() else None
    except yaml.YAMLError:
        value = text
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"'{assignment}' has an empty key", suggestions=[f"e.g. {example}"])
    return keys, value


def set_override(d: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override."""
    keys, value = parse_assignment(assignment)
    path = ".".join(keys)
    node = d
    for k in keys[:-1]:
        if isinstance(node.get(k), str) and k in ("model", "tokenizer"):
            node[k] = {"name_or_path": node[k]}
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"Cannot set '{path}': '{k}' is not a section", field=path)
    node[keys[-1]] = value


# ---- reading YAML / JSON: no silent surprises ---------------------------------------------------------------
MAX_YAML_VALUES = 100_000  # values after alias expansion; real specs have a few hundred


class SpecsYamlLoader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads ``3e-5`` (no dot) as a number, as YAML 1.2 and JSON do: PyYAML's YAML 1.1
    reads it as the *string* '3e-5', which a passed-through TrainingArguments field would receive as text."""


SpecsYamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                      list("-+0123456789"))


def load_yaml(text: str, file: str | None = None, where: str | None = None) -> Any:
    """Parse one YAML document, refusing (before building any Python object) what yaml.safe_load accepts
    silently: a key given twice in one mapping (the second would replace the first) and aliases that expand
    to more than MAX_YAML_VALUES values (an alias bomb: tiny to parse, huge once copied and hashed)."""
    loader = SpecsYamlLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_node(node, file, where)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_yaml_node(root: yaml.Node, file: str | None, where: str | None) -> None:
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    at = f" in {where}" if where else ""

    def size(node: yaml.Node, path: str) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ConfigError(f"Recursive YAML alias at '{path or '<top>'}'{at}: a value contains itself",
                              field=path or None, file=file, line=node.start_mark.line + 1,
                              suggestions=["remove the alias (*name) that points back to its own anchor"])
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                child = f"{path}.{name}" if path and name is not None else (name or path)
                if name is not None and key_node.tag != "tag:yaml.org,2002:merge":
                    line = key_node.start_mark.line + 1
                    if (key_node.tag, name) in seen:
                        raise ConfigError(
                            f"Duplicate key '{child}'{at}: it is given at line {seen[(key_node.tag, name)]} and "
                            f"again at line {line}; YAML would silently keep only the second", field=child,
                            file=file, line=line,
                            suggestions=["merge the two into one entry (or delete one of them)"])
                    seen[(key_node.tag, name)] = line
                total += size(key_node, child) + size(value_node, child)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                total += size(item, path)
        if total > MAX_YAML_VALUES:
            raise ConfigError(f"The YAML{at} expands to more than {MAX_YAML_VALUES:,} values through its aliases "
                              f"(at '{path or '<top>'}'): refused before it is built", field=path or None,
                              file=file, line=node.start_mark.line + 1,
                              suggestions=["write the values out, or use fewer nested aliases (*name)"])
        open_nodes.discard(key)
        sizes[key] = total
        return total

    size(root, "")


def load_json(text: str, file: str | None = None) -> Any:
    """json.loads, refusing a key given twice in one object (the second would replace the first silently)."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                hits = [m.start() for m in re.finditer(re.escape(json.dumps(key)) + r"\s*:", text)]
                line = text.count("\n", 0, hits[1]) + 1 if len(hits) > 1 else None
                raise ConfigError(f"Duplicate key '{key}': JSON would silently keep only the last one", field=key,
                                  file=file, line=line, suggestions=["merge the two into one entry"])
            out[key] = value
        return out

    return json.loads(text, object_pairs_hook=pairs)


def read_specs_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Specs file not found: {p}", file=str(p),
                          suggestions=["check the path", "`tunepipe init TASK` writes a starter file"])
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raw = p.read_bytes()
        raise ConfigError(f"Specs file is not valid UTF-8 (byte {e.start})", file=str(p),
                          line=raw[:e.start].count(b"\n") + 1, suggestions=["save it as UTF-8"]) from None
    try:
        data = load_json(text, str(p)) if p.suffix == ".json" else load_yaml(text, file=str(p))
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else None
        raise ConfigError(f"Invalid YAML: {e.problem}", file=str(p), line=line,
                          suggestions=["check indentation and `key: value` syntax on that line"]) from e
    except yaml.YAMLError as e:
        raise ConfigError(f"Invalid YAML: {e}", file=str(p), suggestions=["check the file's syntax"]) from e
    except RecursionError:
        raise ConfigError("Specs file is nested too deeply to read", file=str(p),
                          suggestions=["specs are a few levels deep: check for runaway brackets"]) from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"Invalid JSON: {e.msg}", file=str(p), line=e.lineno,
                          suggestions=["check commas and quotes on that line"]) from e
    if not isinstance(data, dict):
        raise ConfigError("Specs file must hold a mapping of keys to values", file=str(p),
                          suggestions=["start with `task: token_classification`"])
    return data


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
    from .tasks import get_task
    task = get_task(str(d["task"]))
    d["task"] = task.name
    _check_section_keys(d)
    defaults = task.default_specs(model=d.get("model"))
    merged = deep_merge(defaults, d)
    merged.setdefault("output_dir", f"runs/{task.name}")
    _refuse_non_finite(merged)  # before pydantic, whose message for NaN would be "greater than or equal to 0"
    specs = _validate(merged)  # a bad value is reported before the model's config is read (transformers: seconds)
    if task.capped_lengths:  # a default length the model cannot read is lowered to its limit (limits.py)
        from .limits import limits_for_model_section, virtual_tokens
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
