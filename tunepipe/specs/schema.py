"""The specs' sections as typed pydantic models: what each key means, its default and its allowed values.
Other stages' modules are imported inside the functions that use them: this file is on the start-up
path of `tunepipe train`, where a specs typo is reported before they load (tests/test_import_placement.py)."""
from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import ConfigError
from .counts import MAX_STEPS, STEP_COUNT_HINTS, STEP_COUNT_RULES, check_count  # noqa: F401 (re-exported)

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
        from ..modeling.special_tokens import check_special_tokens
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
            from .references import check_reference
            check_reference(self.preprocess, "data.preprocess")
        return self

    @model_validator(mode="after")
    def _labels_and_splits(self) -> "DataSpec":
        """A label listed twice would get two ids (a dead class in the head); validation_split beside a validation
        file would be ignored without a word."""
        if self.labels is not None:
            repeated = sorted({name for name in self.labels if self.labels.count(name) > 1})
            if not self.labels or repeated:
                raise ConfigError("data.labels " + (f"lists {', '.join(map(repr, repeated))} more than once: each "
                                                    "label needs one id" if repeated else "is empty"),
                                  field="data.labels", suggestions=["list each label name once, in id order",
                                                                    "or leave data.labels out to read the label set "
                                                                    "from the training data"])
        if self.validation_split and self.validation is not None:
            raise ConfigError("data.validation_split and data.validation are both set: the split would be ignored "
                              "(data.validation is used)", field="data.validation_split",
                              suggestions=["remove data.validation_split to evaluate on data.validation",
                                           "or remove data.validation to carve validation data out of train"])
        return self


LENGTH_GROUP_BATCHES = 50  # transformers' rule; a task measured to gain from fewer sets its own (docs/backends.md)


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
    length_group_batches: int = Field(
        LENGTH_GROUP_BATCHES, ge=1, le=10_000,
        description="group_by_length: batches sorted by length together; more = less padding, fewer = more varied "
                    "batches (token classification: 8)")
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
        from ..modeling.peft_names import normalise_peft
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
            from .references import check_reference
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
