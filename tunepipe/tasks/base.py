"""The Task interface: everything that differs between tasks lives behind it, so backends stay task-agnostic.

A Task instance is bound to one run's specs and, once the data is seen, to its label set. ``preprocess`` is a
pure batched function of (batch, tokenizer), so it serves ``Dataset.map``, streaming and per-rank shards alike.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, ClassVar, Sequence

from ..errors import ValidationError
from ..modeling.limits import LengthSetting, check_lengths


class Task:
    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    auto_model_class: ClassVar[str]
    generative: ClassVar[bool] = False  # True: backends evaluate with generate() (Seq2Seq trainer)
    peft_task_type: ClassVar[str | None] = None  # peft TaskType name (TOKEN_CLS, SEQ_CLS, ...): saves the head
    uses_labels: ClassVar[bool] = False  # True: a label set is inferred from data and stored in the model config
    # True: compute_metrics maps predictions back to features by position (QA), so evaluation batches must keep
    # the dataset order (transformers 5 otherwise length-groups and shuffles them under group_by_length).
    ordered_eval: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {}
    example_data: ClassVar[dict[str, Any]] = {}
    # Default lengths lowered to the model's position limit when the specs are resolved (limits.py): (field, side,
    # positions used beyond the value). Empty for tasks whose lengths are training block sizes (LM tasks): there a
    # default over the limit is refused like a chosen one.
    capped_lengths: ClassVar[tuple[tuple[str, str, int], ...]] = (("data.max_length", "input", 0),)
    # Inputs may come pre-split into words: a byte-level BPE tokenizer (RoBERTa, GPT-2) then needs add_prefix_space.
    pre_split_words: ClassVar[bool] = False
    text_file_format: ClassVar[str] = "text"  # what a .txt data file holds for this task (data.format: auto)

    def __init__(self, specs):
        self.specs = specs
        self.labels: list[str] | None = specs.data.labels
        self.eval_data: dict[str, Any] = {}
        self.eval_split = "validation"
        self.position_limits = None  # {side: limits.PositionLimit | None}, set once the model is known

    # ---- specs -------------------------------------------------------------------------------------------
    @classmethod
    def default_specs(cls, model: Any = None) -> dict[str, Any]:
        """The task's defaults; ``model`` is the specs' model section, for tasks whose defaults depend on it."""
        return copy.deepcopy(cls.defaults)

    @classmethod
    def fit_default_lengths(cls, defaults: dict[str, Any], limits: dict[str, Any],
                            input_extra: int = 0) -> dict[str, Any]:
        """``defaults`` (from default_specs) with each of ``capped_lengths`` lowered to the model's hard position
        limit: a default the model cannot read is not what the user asked for (limits.py). ``input_extra``:
        positions taken before the input (prompt tuning's virtual tokens)."""
        from ..specs.schema import SECTIONS
        for field, side, extra in cls.capped_lengths:
            extra += input_extra if side == "input" else 0
            section, key = field.split(".", 1)
            info = SECTIONS[section].model_fields.get(key)
            value = defaults.get(section, {}).get(key, info.default if info is not None else None)
            limit = limits.get(side)
            if isinstance(value, int) and limit is not None and limit.hard and value + extra > limit.tokens:
                defaults.setdefault(section, {})[key] = max(1, limit.tokens - extra)
        return defaults

    def length_settings(self) -> list[Any]:
        """The specs values that bound the sequences the model reads (limits.LengthSetting), checked against
        its position limits once it is loaded."""
        return [LengthSetting("data.max_length", self.specs.data.max_length, "input")]

    def column(self, role: str) -> str:
        """Column name for a role ('text', 'label', 'text_pair'), from specs or the task default."""
        value = getattr(self.specs.data, f"{role}_column", None)
        return value or self.defaults.get("data", {}).get(f"{role}_column") or role

    def required_columns(self) -> list[str]:
        return [self.column("text")]

    # ---- data --------------------------------------------------------------------------------------------
    def validate_record(self, record: dict[str, Any], split: str) -> str | None:
        """Return why a record is unusable, or None. Called for every record before tokenizing."""
        for col in self.required_columns():
            value = record.get(col)
            if value is None or (isinstance(value, (str, list)) and len(value) == 0):
                return f"column '{col}' is empty"
        return None

    def infer_labels(self, train_records: Sequence[dict[str, Any]]) -> list[str] | None:
        return None

    def input_from_record(self, record: dict[str, Any]) -> Any:
        """What ``predict`` takes, from one record of an input file (jsonl)."""
        return record.get(self.column("text"))

    def prepare_input(self, item: Any, where: str) -> Any:
        """One prediction input checked (and normalised) before any tokenizer sees it: a clear 4xx instead of a
        crash deep inside. ``where`` names it in errors ('Input 3')."""
        return item

    @classmethod
    def predict_example(cls) -> Any:
        """One input ``predict`` takes, for model cards and help texts: from ``example_data`` by default."""
        data = cls.example_data or {}
        if "question" in data and "context" in data:
            return {"question": data["question"], "context": data["context"]}
        for key in ("text", "source", "document", "prompt"):
            if isinstance(data.get(key), str):
                return data[key]
        if isinstance(data.get("tokens"), list):
            return " ".join(data["tokens"])
        return "some text"

    def prepare_inputs(self, items: Sequence[Any]) -> list[Any]:
        return [self.prepare_input(x, f"Input {n + 1}") for n, x in enumerate(items)]

    def on_model_loaded(self, model) -> None:
        """A saved model was loaded for prediction/evaluation: adopt its label set."""
        id2label = getattr(model.config, "id2label", None)
        if self.uses_labels and id2label:
            self.labels = [id2label[i] for i in range(len(id2label))]
        check_lengths(self, model.config, predicting=True)  # a default length over the limit is lowered to it

    def bind_tokenizer(self, tokenizer) -> None:
        """Called before tokenizing, or before tokenized splits are read from the cache (data/cache.py), for tasks
        that need the tokenizer later (seq2seq decodes generations in compute_metrics)."""

    def preprocess(self, batch: dict[str, list], tokenizer) -> dict[str, list]:
        raise NotImplementedError

    def preprocess_eval(self, batch: dict[str, list], tokenizer) -> dict[str, list]:
        """Tokenize validation/test data; override when evaluation needs extra columns (QA offsets)."""
        return self.preprocess(batch, tokenizer)

    def can_evaluate(self, dataset) -> bool:
        """Whether a tokenized validation/test split carries what compute_metrics needs (else it is skipped)."""
        return "labels" in dataset.column_names

    def bind_eval_data(self, split: str, records: list[dict[str, Any]], features) -> None:
        """Called once per validation/test split after tokenizing, for tasks whose metrics map features back to
        examples (QA). ``self.eval_split`` names the split being evaluated when compute_metrics runs."""
        self.eval_data[split] = (records, features)

    def generation_kwargs(self) -> dict[str, Any]:
        """Settings for model.generate() in evaluation/prediction of generative tasks (from specs.generation)."""
        return self.specs.generation.model_dump() if self.generative else {}

    def collator(self, tokenizer) -> Callable:
        from transformers import DataCollatorWithPadding
        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)

    # ---- model -------------------------------------------------------------------------------------------
    def adopt_config(self, config) -> None:
        """Called with the model's config before the model is built or reloaded, for tasks whose model class
        depends on the architecture (seq2seq: encoder-decoder or decoder-only)."""

    def model_kwargs(self) -> dict[str, Any]:
        if not self.labels:
            return {}
        return {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                "label2id": {label: i for i, label in enumerate(self.labels)}}

    # ---- evaluation --------------------------------------------------------------------------------------
    def preprocess_logits_for_metrics(self, logits, labels):
        """Reduce logits per batch (argmax) so evaluation memory does not grow with the eval set."""
        if isinstance(logits, tuple):
            logits = logits[0]
        return logits.argmax(dim=-1)

    def compute_metrics(self, eval_pred) -> dict[str, float]:
        return {}

    def metric_table(self, metrics: dict[str, float]) -> list[tuple[str, float]]:
        return [(k, v) for k, v in metrics.items() if isinstance(v, (int, float))]

    # ---- inference ---------------------------------------------------------------------------------------
    def predict(self, model, tokenizer, inputs: Sequence[Any], batch_size: int = 32, **kwargs) -> list[dict[str, Any]]:
        raise NotImplementedError

    def label_error(self, label: Any, split: str) -> ValidationError:
        return ValidationError(f"Label '{label}' in the {split} data is not among the training labels {self.labels}",
                               suggestions=["add it to data.labels, or fix the record"])


def run_batches(model, encode: Callable[[list], dict], items: Sequence[Any], batch_size: int,
                length: Callable[[Any], int] | None = None) -> list[Any]:
    """Forward ``items`` in length-sorted batches; return per-item (encoding, logits row) in input order.

    Without ``length`` the items are sorted by their token count (``encode``'s attention mask): characters are a
    poor proxy (numbers and rare words take many pieces; docs/serving.md, "Scheduling", gives the padding each
    leaves)."""
    import torch

    lengths = token_counts(encode, items) if length is None else [length(x) for x in items]
    order = sorted(range(len(items)), key=lambda i: lengths[i])
    out: list[Any] = [None] * len(items)
    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = encode([items[i] for i in idx])
            tensors = {k: v.to(device) for k, v in enc.items() if hasattr(v, "to")}
            logits = model(**tensors).logits.float().cpu()
            for row, i in enumerate(idx):
                out[i] = (enc, row, logits[row])
    return out


def token_counts(encode: Callable[[list], dict], items: Sequence[Any], chunk: int = 1024) -> list[int]:
    """Tokens per item, from the same encoding the forward pass gets (tokenizing twice costs ~2% of inference)."""
    counts: list[int] = []
    for start in range(0, len(items), chunk):
        enc = encode(list(items[start:start + chunk]))
        mask = enc.get("attention_mask")
        if mask is None:  # a tokenizer without attention masks: no sorting to gain
            return [0] * len(items)
        counts.extend(int(n) for n in mask.sum(-1).tolist())
    return counts
