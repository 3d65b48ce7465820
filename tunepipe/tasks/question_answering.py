"""Extractive question answering (SQuAD v1.1 / v2.0): find the answer span of a question in its context.

Long contexts are cut into windows of ``data.max_length`` tokens that overlap by ``data.stride`` tokens; each window
is one feature. Training labels are the answer's start/end token in the window (the null index, [CLS], when the
answer is not inside the window or the question has no answer). Evaluation and prediction share one n-best
post-processing over the windows of a question (qa_postprocess.py), so every answer is the exact substring
``context[start:end]``.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

from ..errors import ConfigError, TrainingError, ValidationError
from ..modeling.limits import LengthSetting
from .base import Task
from .qa_postprocess import EvalSplit, best_answers
from .squad_metrics import squad_metrics


# ---- answers in records ------------------------------------------------------------------------------------
def parse_answers(value: Any) -> tuple[list[str], list[int]] | str:
    """(texts, starts) from the HF layout {text: [...], answer_start: [...]} or a list of {text, answer_start};
    a string says what is wrong."""
    if value is None:
        return [], []
    if isinstance(value, dict):
        texts, starts = value.get("text"), value.get("answer_start")
        texts = [] if texts is None else texts
        starts = [] if starts is None else starts
        if isinstance(texts, str):
            texts, starts = [texts], [starts]
    elif isinstance(value, list) and all(isinstance(a, dict) for a in value):
        texts, starts = [a.get("text") for a in value], [a.get("answer_start") for a in value]
    else:
        return "answers must look like {text: [...], answer_start: [...]}"
    if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
        return "answers need as many answer_start values as texts"
    if not all(isinstance(t, str) for t in texts):
        return "answer texts must be strings"
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in starts):
        return "answer_start values must be character offsets (integers >= 0)"
    return texts, starts


# ---- windows and labels ------------------------------------------------------------------------------------
def tokenize_windows(tokenizer, questions: Sequence[str], contexts: Sequence[str], max_length: int, stride: int):
    """Question + context windows of at most ``max_length`` tokens, consecutive windows sharing ``stride`` context
    tokens. Returns the encoding and the sequence id of the context (1, or 0 for left-padding tokenizers)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("Question answering needs a fast tokenizer (character offsets of tokens)",
                          field="tokenizer.use_fast", suggestions=["set tokenizer.use_fast: true"])
    context_first = tokenizer.padding_side == "left"
    questions = [q.lstrip() for q in questions]  # leading spaces waste window room (as run_qa does)
    first, second = (contexts, questions) if context_first else (questions, contexts)
    try:
        enc = tokenizer(first, second, truncation="only_first" if context_first else "only_second",
                        max_length=max_length, stride=stride, return_overflowing_tokens=True,
                        return_offsets_mapping=True)
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions for impossible windows
        raise ValidationError(f"Cannot cut question/context windows of {max_length} tokens with stride {stride}: "
                              f"{str(e).splitlines()[0]}", field="data.stride",
                              suggestions=["raise data.max_length or lower data.stride",
                                           "a question longer than max_length - stride cannot fit: shorten it"]
                              ) from None
    return enc, 0 if context_first else 1


def null_index(input_ids: Sequence[int], tokenizer) -> int:
    """Where the model points for 'no answer here': the [CLS] token (position 0 for BERT-style inputs)."""
    cls_id = tokenizer.cls_token_id
    return input_ids.index(cls_id) if cls_id is not None and cls_id in input_ids else 0


def answer_token_span(offsets, sequence_ids, context_id: int, start_char: int, end_char: int):
    """(first, last) token of the answer inside this window, or None when the window does not hold all of it."""
    context = [i for i, s in enumerate(sequence_ids) if s == context_id]
    if not context:
        return None
    first, last = context[0], context[-1]
    if offsets[first][0] > start_char or offsets[last][1] < end_char:
        return None
    start = first
    while start <= last and offsets[start][0] <= start_char:
        start += 1
    end = last
    while end >= first and offsets[end][1] >= end_char:
        end -= 1
    return start - 1, end + 1


def context_offsets(offsets, sequence_ids, context_id: int) -> list:
    """Character offsets of context tokens; None for question, special and padding tokens."""
    return [tuple(o) if s == context_id else None for o, s in zip(offsets, sequence_ids)]


# ---- the task ----------------------------------------------------------------------------------------------
class QuestionAnsweringTask(Task):
    name = "question_answering"
    aliases = ("qa",)
    description = "Extractive QA (SQuAD v1.1/v2.0 records): answer spans in a context; official SQuAD EM/F1"
    auto_model_class = "AutoModelForQuestionAnswering"
    peft_task_type = "QUESTION_ANS"
    ordered_eval = True
    defaults = {
        "data": {"text_column": "question", "text_pair_column": "context", "label_column": "answers",
                 "max_length": 384, "stride": 128, "n_best_size": 20, "max_answer_length": 30},
        # warmup: short runs from a freshly initialised span head are unstable without it (the seed-to-seed
        # spread and the gap to run_qa: README.md "Tasks", benchmarks/results/quality_question_answering_seeds.json)
        "training": {"per_device_train_batch_size": 16, "learning_rate": 5e-5, "num_train_epochs": 2,
                     "warmup_steps": 0.1, "metric_for_best_model": "f1"},
    }
    # the data settings predict(**settings) may override for one call (`tunepipe predict --help` lists them)
    predict_settings = ("n_best_size", "max_answer_length", "version_2_with_negative", "null_score_diff_threshold")
    example_data = {"id": "q1", "context": "Ada Lovelace was born in London in 1815.",
                    "question": "Where was Ada Lovelace born?",
                    "answers": {"text": ["London"], "answer_start": [25]}}

    def __init__(self, specs):
        super().__init__(specs)
        self.last_predictions: dict[str, list[dict[str, Any]]] = {}

    # ---- settings ------------------------------------------------------------------------------------------
    @classmethod
    def fit_default_lengths(cls, defaults, limits, input_extra: int = 0):
        """A lowered default max_length takes the default stride down with it (run_qa's 1:3), so the windows
        still overlap by less than their length."""
        before = defaults.get("data", {}).get("max_length")
        defaults = super().fit_default_lengths(defaults, limits, input_extra)
        data = defaults.get("data", {})
        if data.get("max_length") != before and isinstance(data.get("stride"), int) and data["stride"] >= data[
                "max_length"] // 3:
            data["stride"] = data["max_length"] // 3
        return defaults

    def on_model_loaded(self, model) -> None:
        super().on_model_loaded(model)
        data = self.specs.data
        if data.stride in (None, self.defaults["data"]["stride"]) and self._setting("stride") >= self._setting(
                "max_length"):  # the default max_length was lowered to the model's limit: the stride follows
            data.stride = self._setting("max_length") // 3

    def length_settings(self):
        return [LengthSetting("data.max_length", self._setting("max_length"), "input")]

    def _setting(self, name: str):
        value = getattr(self.specs.data, name)
        return self.defaults["data"].get(name) if value is None else value

    @property
    def version_2(self) -> bool:
        return self.specs.data.version_2_with_negative

    def _windows(self, tokenizer, questions, contexts):
        max_length, stride = self._setting("max_length"), self._setting("stride")
        if stride >= max_length:
            raise ConfigError(f"data.stride ({stride}) must be smaller than data.max_length ({max_length})",
                              field="data.stride", suggestions=["the run_qa defaults are max_length 384, stride 128"])
        return tokenize_windows(tokenizer, questions, contexts, max_length, stride)

    def _post(self, contexts, feature_example, offsets, starts, ends, null_indices, **overrides):
        settings = {"n_best_size": self._setting("n_best_size"),
                    "max_answer_length": self._setting("max_answer_length"),
                    "version_2_with_negative": self.version_2,
                    "null_score_diff_threshold": self.specs.data.null_score_diff_threshold}
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return best_answers(contexts, feature_example, offsets, starts, ends, null_indices, **settings)

    # ---- data ----------------------------------------------------------------------------------------------
    def required_columns(self) -> list[str]:
        return [self.column("text"), self.column("text_pair"), self.column("label")]

    def validate_record(self, record: dict[str, Any], split: str) -> str | None:
        for role in ("text", "text_pair"):
            value = record.get(self.column(role))
            if not isinstance(value, str) or not value.strip():
                return f"column '{self.column(role)}' is empty or not text"
        raw = record.get(self.column("label"))
        if raw is None and split == "test":
            return None
        parsed = parse_answers(raw)
        if isinstance(parsed, str):
            return parsed if raw is not None else f"column '{self.column('label')}' is missing"
        texts, starts = parsed
        if not texts:
            if split == "test" or self.version_2:
                return None
            return "the question has no answer: set data.version_2_with_negative: true for unanswerable questions"
        context = record[self.column("text_pair")]
        text, start = texts[0], starts[0]
        if split == "train" and context[start:start + len(text)] != text:
            return (f"answer {text!r} is not at character {start} of the context "
                    f"(found {context[start:start + len(text)]!r})")
        return None

    def _label_positions(self, enc, i: int, context_id: int, answers, tokenizer) -> tuple[int, int]:
        k = null_index(enc["input_ids"][i], tokenizer)
        parsed = parse_answers(answers)
        if isinstance(parsed, str) or not parsed[0]:
            return k, k
        start_char = parsed[1][0]
        span = answer_token_span(enc["offset_mapping"][i], enc.sequence_ids(i), context_id, start_char,
                                 start_char + len(parsed[0][0]))
        return span if span is not None else (k, k)

    def preprocess(self, batch, tokenizer):
        q, c, a = self.column("text"), self.column("text_pair"), self.column("label")
        enc, context_id = self._windows(tokenizer, batch[q], batch[c])
        samples = enc["overflow_to_sample_mapping"]
        positions = [self._label_positions(enc, i, context_id, batch[a][samples[i]], tokenizer)
                     for i in range(len(enc["input_ids"]))] if a in batch else None
        enc.pop("overflow_to_sample_mapping")
        enc.pop("offset_mapping")
        if positions is not None:
            enc["start_positions"] = [p[0] for p in positions]
            enc["end_positions"] = [p[1] for p in positions]
        enc["length"] = [len(ids) for ids in enc["input_ids"]]
        return enc

    def preprocess_eval(self, batch, tokenizer):
        """Like preprocess, plus what post-processing needs: context offsets, the window number within its
        question, the record id, and the null index. Label positions (from the first gold answer) give an
        eval loss and tell the trainer the split is labelled."""
        q, c, a = self.column("text"), self.column("text_pair"), self.column("label")
        enc, context_id = self._windows(tokenizer, batch[q], batch[c])
        samples = enc["overflow_to_sample_mapping"]
        ids = batch.get("id")
        offsets, windows, example_ids, nulls, positions = [], [], [], [], []
        for i, sample in enumerate(samples):
            offsets.append(context_offsets(enc["offset_mapping"][i], enc.sequence_ids(i), context_id))
            windows.append(0 if i == 0 or samples[i - 1] != sample else windows[-1] + 1)
            example_ids.append("" if ids is None or ids[sample] is None else str(ids[sample]))
            nulls.append(null_index(enc["input_ids"][i], tokenizer))
            if a in batch:
                positions.append(self._label_positions(enc, i, context_id, batch[a][sample], tokenizer))
        enc.pop("overflow_to_sample_mapping")
        enc["offset_mapping"], enc["window"] = offsets, windows
        enc["example_id"], enc["null_index"] = example_ids, nulls
        if a in batch:
            enc["start_positions"] = [p[0] for p in positions]
            enc["end_positions"] = [p[1] for p in positions]
        enc["length"] = [len(x) for x in enc["input_ids"]]
        return enc

    def can_evaluate(self, dataset) -> bool:
        return "start_positions" in dataset.column_names

    def bind_eval_data(self, split, records, features) -> None:
        """Map each feature (window) to its record: a new record starts at every window number 0."""
        feature_example, example = [], -1
        for window, example_id in zip(features["window"], features["example_id"]):
            if window == 0:
                example += 1
            record_id = records[example].get("id")
            if example_id and record_id is not None and str(record_id) != example_id:
                raise TrainingError(f"Feature for '{example_id}' lines up with record '{record_id}' in the {split} "
                                    "data", suggestions=["this is a bug: please report it with the data file"])
            feature_example.append(example)
        if example != len(records) - 1:
            raise TrainingError(f"{len(records)} {split} records but windows for {example + 1}",
                                suggestions=["this is a bug: please report it with the data file"])
        golds = []
        for r in records:
            raw = r.get(self.column("label"))
            parsed = parse_answers(raw)
            golds.append(None if raw is None or isinstance(parsed, str) else parsed[0])
        self.eval_data[split] = EvalSplit([r[self.column("text_pair")] for r in records], golds, feature_example,
                                          list(features["offset_mapping"]), list(features["null_index"]))

    # ---- evaluation ----------------------------------------------------------------------------------------
    def preprocess_logits_for_metrics(self, logits, labels):
        """Keep the start and end logits (the trainer pads and concatenates them): no argmax for spans."""
        start, end = logits[0], logits[1]
        return start.float(), end.float()

    def compute_metrics(self, eval_pred) -> dict[str, float]:
        split = self.eval_data.get(self.eval_split)
        if not isinstance(split, EvalSplit):
            raise TrainingError(f"No {self.eval_split} features bound for question answering",
                                suggestions=["evaluate through FineTunePipeLine, which prepares the data"])
        starts, ends = eval_pred.predictions[0], eval_pred.predictions[1]
        if len(starts) != len(split.offsets):
            raise TrainingError(f"{len(starts)} predictions for {len(split.offsets)} {self.eval_split} windows",
                                suggestions=["evaluation must keep the dataset order (Task.ordered_eval)"])
        answers = self._post(split.contexts, split.feature_example, split.offsets, starts, ends, split.null_indices)
        self.last_predictions[self.eval_split] = answers
        scored = [i for i, g in enumerate(split.golds) if g is not None]
        predictions = {str(i): answers[i]["answer"] for i in scored}
        references = {str(i): split.golds[i] for i in scored}
        return squad_metrics(predictions, references, self.version_2)

    # ---- inference -----------------------------------------------------------------------------------------
    def input_from_record(self, record: dict[str, Any]) -> dict[str, str]:
        return {"question": record.get(self.column("text")), "context": record.get(self.column("text_pair"))}

    def _as_input(self, item: Any, n: int) -> tuple[str, str]:
        if isinstance(item, str):
            try:
                item = json.loads(item)
            except json.JSONDecodeError:
                item = None
        if isinstance(item, (tuple, list)) and len(item) == 2:
            item = {"question": item[0], "context": item[1]}
        if isinstance(item, dict):
            question = item.get("question", item.get(self.column("text")))
            context = item.get("context", item.get(self.column("text_pair")))
            if isinstance(question, str) and isinstance(context, str) and question.strip():
                return question, context
        raise ValidationError(f"Input {n + 1} is not a question with a context",
                              suggestions=['pass {"question": "...", "context": "..."} (or a JSON Lines file of them)'])

    def predict(self, model, tokenizer, inputs, batch_size: int = 32, **settings) -> list[dict[str, Any]]:
        """Each input is {"question", "context"}; returns the answer text, its character ``start``/``end`` in the
        context (answer == context[start:end]), a ``score`` and ``no_answer``. ``settings`` override
        n_best_size, max_answer_length, version_2_with_negative, null_score_diff_threshold."""
        import torch
        unknown = set(settings) - set(self.predict_settings)
        if unknown:
            raise ConfigError(f"Unknown prediction setting(s): {', '.join(sorted(unknown))}",
                              suggestions=[f"use {', '.join(self.predict_settings)}"])
        items = [self._as_input(x, n) for n, x in enumerate(inputs)]
        if not items:
            return []
        enc, context_id = self._windows(tokenizer, [q for q, _ in items], [c for _, c in items])
        n_features = len(enc["input_ids"])
        offsets = [context_offsets(enc["offset_mapping"][i], enc.sequence_ids(i), context_id)
                   for i in range(n_features)]
        nulls = [null_index(enc["input_ids"][i], tokenizer) for i in range(n_features)]
        names = [k for k in tokenizer.model_input_names if k in enc]
        order = sorted(range(n_features), key=lambda i: len(enc["input_ids"][i]))
        starts: list[Any] = [None] * n_features
        ends: list[Any] = [None] * n_features
        device = next(model.parameters()).device
        model.eval()
        with torch.inference_mode():
            for b in range(0, n_features, batch_size):
                idx = order[b:b + batch_size]
                batch = _pad([{k: enc[k][i] for k in names} for i in idx], tokenizer)
                out = model(**{k: v.to(device) for k, v in batch.items()})
                for row, i in enumerate(idx):
                    n = len(enc["input_ids"][i])
                    left = batch["input_ids"].shape[1] - n if tokenizer.padding_side == "left" else 0
                    starts[i] = out.start_logits[row, left:left + n].float().cpu().numpy()
                    ends[i] = out.end_logits[row, left:left + n].float().cpu().numpy()
        return self._post([c for _, c in items], list(enc["overflow_to_sample_mapping"]), offsets, starts, ends,
                          nulls, **settings)


def _pad(rows: list[dict[str, list[int]]], tokenizer) -> dict[str, Any]:
    """Pad a batch of encoded windows to its longest (on the tokenizer's padding side)."""
    import torch
    width = max(len(r["input_ids"]) for r in rows)
    pad_values = {"input_ids": tokenizer.pad_token_id or 0, "attention_mask": 0,
                  "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0)}
    out = {}
    for key in rows[0]:
        filled = []
        for r in rows:
            pad = [pad_values.get(key, 0)] * (width - len(r[key]))
            filled.append(pad + list(r[key]) if tokenizer.padding_side == "left" else list(r[key]) + pad)
        out[key] = torch.tensor(filled, dtype=torch.long)
    return out
