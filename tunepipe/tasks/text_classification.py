"""Text (and text-pair) classification, single- or multi-label; accuracy and macro-F1."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ValidationError
from .base import Task, run_batches


class TextClassificationTask(Task):
    name = "text_classification"
    aliases = ("classification",)
    description = "Label a text or a text pair (sentiment, topic, NLI); single- or multi-label"
    uses_labels = True
    auto_model_class = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"
    defaults = {
        "data": {"text_column": "text", "label_column": "label", "max_length": 256},
        "training": {"per_device_train_batch_size": 16, "learning_rate": 5e-5, "num_train_epochs": 3,
                     "metric_for_best_model": "accuracy"},
    }
    example_data = {"text": "a gripping, beautifully shot film", "label": "positive"}

    @property
    def multi_label(self) -> bool:
        return self.specs.data.multi_label

    def required_columns(self) -> list[str]:
        cols = [self.column("text"), self.column("label")]
        if self.specs.data.text_pair_column:
            cols.insert(1, self.specs.data.text_pair_column)
        return cols

    def _name(self, value: Any) -> str:
        names = self.specs.data.labels
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and names and value < len(names):
            return names[int(value)]
        return str(value)

    def _names(self, value: Any) -> list[str]:
        if self.multi_label:
            return [self._name(v) for v in (value if isinstance(value, list) else [value])]
        return [self._name(value)]

    def validate_record(self, record: dict[str, Any], split: str) -> str | None:
        text = record.get(self.column("text"))
        if not isinstance(text, str) or not text.strip():
            return f"column '{self.column('text')}' is empty or not text"
        pair = self.specs.data.text_pair_column
        if pair and not isinstance(record.get(pair), str):
            return f"column '{pair}' is missing or not text"
        label = record.get(self.column("label"))
        if label is None or label == "" or label == []:
            return None if split == "test" else f"column '{self.column('label')}' is empty"
        if isinstance(label, list) and not self.multi_label:
            return "label is a list: set data.multi_label: true for multi-label data"
        if self.labels is not None:
            for name in self._names(label):
                if name not in self.labels:
                    return f"unknown label '{name}' (known: {', '.join(self.labels)})"
        return None

    def infer_labels(self, train_records) -> list[str]:
        raw = set()
        for r in train_records:
            value = r.get(self.column("label"))
            raw.update(value if isinstance(value, list) else [value])
        raw.discard(None)
        if all(isinstance(v, (int, np.integer)) for v in raw):
            return [self._name(v) for v in sorted(raw)]
        return sorted({self._name(v) for v in raw})

    def model_kwargs(self) -> dict[str, Any]:
        kwargs = super().model_kwargs()
        if self.multi_label:
            kwargs["problem_type"] = "multi_label_classification"
        return kwargs

    def _encode_text(self, tokenizer, batch, **kwargs):
        pair = self.specs.data.text_pair_column
        args = (batch[self.column("text")],) + ((batch[pair],) if pair else ())
        return tokenizer(*args, truncation=True, max_length=self.specs.data.max_length, **kwargs)

    def preprocess(self, batch, tokenizer):
        enc = self._encode_text(tokenizer, batch)
        enc["length"] = [len(ids) for ids in enc["input_ids"]]
        col = self.column("label")
        if col not in batch or batch[col][0] is None:
            return enc
        label2id = {t: i for i, t in enumerate(self.labels)}
        if self.multi_label:
            rows = []
            for value in batch[col]:
                row = [0.0] * len(self.labels)
                for name in self._names(value):
                    row[label2id[name]] = 1.0
                rows.append(row)
            enc["labels"] = rows
        else:
            enc["labels"] = [label2id[self._name(v)] for v in batch[col]]
        return enc

    def preprocess_logits_for_metrics(self, logits, labels):
        if isinstance(logits, tuple):
            logits = logits[0]
        return (logits > 0).long() if self.multi_label else logits.argmax(dim=-1)

    def compute_metrics(self, eval_pred) -> dict[str, float]:
        return classification_metrics(np.asarray(eval_pred.label_ids), np.asarray(eval_pred.predictions),
                                      self.multi_label, len(self.labels))

    def prepare_input(self, item: Any, where: str) -> Any:
        if isinstance(item, dict):
            text, pair = item.get(self.column("text"), item.get("text")), item.get("text_pair")
            item = (text, pair) if pair is not None else text
        if isinstance(item, (list, tuple)):
            if len(item) != 2 or not all(isinstance(t, str) for t in item):
                raise ValidationError(f"{where}: a text pair must be two texts, got {item!r:.80}",
                                      suggestions=['pass ["first text", "second text"]'])
            return tuple(item)
        if not isinstance(item, str):
            raise ValidationError(f"{where} must be a text, got {type(item).__name__}",
                                  suggestions=['pass "a text", or a pair ["text", "text pair"]'])
        return item

    def prepare_inputs(self, items):
        out = super().prepare_inputs(items)
        if len({isinstance(x, tuple) for x in out}) > 1:
            raise ValidationError("Texts and text pairs are mixed in one request",
                                  suggestions=["send single texts and pairs in separate requests"])
        return out

    def predict(self, model, tokenizer, inputs, batch_size: int = 32, all_scores: bool = False):
        """Each input is a text, or a (text, pair) tuple for pair tasks."""
        import torch
        id2label = {int(k): v for k, v in model.config.id2label.items()}
        multi = model.config.problem_type == "multi_label_classification"
        items = [x if isinstance(x, (tuple, list)) else (x,) for x in inputs]

        def encode(batch):
            args = ([b[0] for b in batch],) + (([b[1] for b in batch],) if len(batch[0]) > 1 else ())
            return tokenizer(*args, truncation=True, max_length=self.specs.data.max_length, padding=True,
                             return_tensors="pt")

        results = []
        for _, _, logits in run_batches(model, encode, items, batch_size):
            probs = torch.sigmoid(logits) if multi else logits.softmax(-1)
            scores = {id2label[i]: float(p) for i, p in enumerate(probs)}
            if multi:
                result = {"labels": [n for n, p in scores.items() if p > 0.5], "scores": scores}
            else:
                best = int(probs.argmax())
                result = {"label": id2label[best], "score": float(probs[best])}
                if all_scores:
                    result["scores"] = scores
            results.append(result)
        return results


def classification_metrics(labels: np.ndarray, preds: np.ndarray, multi_label: bool, num_labels: int) -> dict:
    from sklearn.metrics import f1_score
    if multi_label:
        labels = labels.astype(int)
        return {"accuracy": float((labels == preds).all(axis=1).mean()),
                "micro_f1": float(f1_score(labels, preds, average="micro", zero_division=0)),
                "macro_f1": float(f1_score(labels, preds, average="macro", zero_division=0))}
    return {"accuracy": float((labels == preds).mean()),
            "macro_f1": float(f1_score(labels, preds, average="macro", labels=list(range(num_labels)),
                                       zero_division=0))}
