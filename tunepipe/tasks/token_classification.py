"""Token classification (NER, POS, chunking): word-level BIO tags aligned to sub-tokens; seqeval metrics.

A sentence of more than ``data.max_length`` tokens is cut into windows sharing ``data.stride`` tokens (as question
answering cuts contexts): every window is a training feature, and evaluation and prediction merge the windows back
into one tag per word (word_chunks.py), so no word past the first window is dropped.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import ConfigError, ValidationError
from .base import Task, run_batches
from .word_chunks import ChunkLayout, ScoredWords, samples


def _entity_type(tag: str) -> str:
    return tag[2:] if tag[:2] in ("B-", "I-", "E-", "S-") else tag


def b_to_i(tag: str) -> str:
    return "I-" + tag[2:] if tag.startswith("B-") else tag


def tag_sort_key(tag: str) -> tuple:
    return (tag != "O", _entity_type(tag), tag[:2] != "B-", tag)


def spans_from_tags(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, first unit, last unit + 1) for each entity, by transformers' grouping rule: a unit joins the entity
    before it when it has the same type and is not a B- (or S-) unit; O ends an entity."""
    spans: list[tuple[str, int, int]] = []
    current: list | None = None
    for i, tag in enumerate(list(tags) + ["O"]):
        kind = _entity_type(tag)
        continues = (current is not None and current[0] == kind and tag != "O"
                     and tag[:2] not in ("B-", "S-"))
        if current is not None and not continues:
            spans.append((current[0], current[1], i))
            current = None
        if tag != "O" and not continues:
            current = [kind, i]
    return spans


AGGREGATION_STRATEGIES = ("first", "average", "max", "simple")


class TokenClassificationTask(Task):
    name = "token_classification"
    aliases = ("ner",)
    description = "Tag each word (NER, POS): CoNLL columns or records with tokens + tags; seqeval entity F1"
    uses_labels = True
    ordered_eval = True  # compute_metrics maps feature rows back to (sentence, word) by position
    auto_model_class = "AutoModelForTokenClassification"
    peft_task_type = "TOKEN_CLS"
    pre_split_words = True
    text_file_format = "conll"
    defaults = {
        "data": {"text_column": "tokens", "label_column": "ner_tags", "max_length": 256, "stride": 32},
        # length groups of 8 batches, not transformers' up to 50: groups of near-identical sentences (all
        # headlines, all long ones) cost F1 on small NER sets (docs/backends.md "Sampling")
        "training": {"per_device_train_batch_size": 16, "learning_rate": 5e-5, "num_train_epochs": 3,
                     "metric_for_best_model": "f1", "length_group_batches": 8},
    }
    predict_choices = {"aggregation_strategy": AGGREGATION_STRATEGIES}  # for `tunepipe predict --help`
    example_data = {"tokens": ["Ada", "Lovelace", "lived", "in", "London", "."],
                    "ner_tags": ["B-PER", "I-PER", "O", "O", "B-LOC", "O"]}

    def required_columns(self) -> list[str]:
        return [self.column("text"), self.column("label")]

    def _name(self, value: Any) -> str:
        if isinstance(value, int) and not isinstance(value, bool):
            if not self.specs.data.labels:
                raise ValueError("integer tags need data.labels (tag names in id order)")
            return self.specs.data.labels[value]
        return str(value)

    def validate_record(self, record: dict[str, Any], split: str) -> str | None:
        tokens, tags = record.get(self.column("text")), record.get(self.column("label"))
        if not (tags is None and split == "test") and not isinstance(tags, list):
            return f"column '{self.column('label')}' must be a list of tags, got {type(tags).__name__}"
        if not isinstance(tokens, list) or not tokens:
            return f"column '{self.column('text')}' must be a non-empty list of words"
        if not all(isinstance(t, str) for t in tokens):
            return f"column '{self.column('text')}' must hold strings only"
        if tags is None:
            return None
        if len(tags) != len(tokens):
            return f"{len(tokens)} tokens but {len(tags)} tags"
        for tag in tags:
            try:
                name = self._name(tag)
            except (ValueError, IndexError):
                return f"tag {tag!r} is an integer with no name: set data.labels to the tag names in id order"
            if self.labels is not None and name not in self.labels:
                return f"unknown label '{name}' (known: {', '.join(self.labels)})"
        return None

    def infer_labels(self, train_records) -> list[str]:
        col = self.column("label")
        seen = {self._name(t) for r in train_records for t in (r.get(col) or [])}
        # label_all_tokens maps B-X to I-X on continuation pieces, so I-X must exist as a class.
        seen |= {b_to_i(t) for t in seen}
        return sorted(seen | {"O"}, key=tag_sort_key)

    def _window(self, tokenizer) -> tuple[int | None, int | None]:
        """(max_length, stride) for cutting sentences into windows; stride None: no windows (data.max_length unset:
        the tokenizer truncates at its own limit, as before, so an over-long record stays one feature that
        limits.check_sequences can name). The default stride is lowered (to a quarter of the room) when a short
        max_length leaves no room for it; a chosen one that does not fit is refused."""
        max_length, stride = self.specs.data.max_length, self.specs.data.stride
        if max_length is None:
            return None, None
        default = self.defaults["data"]["stride"]
        stride = default if stride is None else stride
        room = max_length - tokenizer.num_special_tokens_to_add(pair=False)
        if stride == default and stride >= room:
            stride = max(room // 4, 0)
        if stride >= room:
            raise ConfigError(f"data.stride ({stride}) must be smaller than data.max_length ({max_length}) less the "
                              f"{max_length - room} special tokens the tokenizer adds", field="data.stride",
                              suggestions=["lower data.stride or raise data.max_length",
                                           f"the defaults are max_length 256, stride {default}"])
        return max_length, stride

    def _tokenize(self, tokenizer, inputs: list, split_words: bool = True):
        """Windows of every input: (encoding without overflow_to_sample_mapping, features per input, layouts)."""
        max_length, stride = self._window(tokenizer)
        windows = {"stride": stride, "return_overflowing_tokens": True} if stride is not None else {}
        enc = tokenizer(inputs, is_split_into_words=split_words, truncation=True, max_length=max_length, **windows)
        groups = samples(enc.pop("overflow_to_sample_mapping", None) or range(len(enc["input_ids"])))
        from_end = getattr(tokenizer, "truncation_side", "right") == "left"
        return enc, groups, [ChunkLayout([enc.encodings[f] for f in g], stride or 0, from_end) for g in groups]

    def preprocess(self, batch, tokenizer):
        return self._features(batch, tokenizer, for_eval=False)

    def preprocess_eval(self, batch, tokenizer):
        """Like preprocess, plus the window number within its sentence (``chunk``) and per token the word it
        scores (``word_index``: the word's first piece in the window that sees it best, else -1)."""
        return self._features(batch, tokenizer, for_eval=True)

    def _features(self, batch, tokenizer, for_eval: bool):
        words_col, tags_col = self.column("text"), self.column("label")
        enc, groups, layouts = self._tokenize(tokenizer, batch[words_col])
        enc["length"] = [len(ids) for ids in enc["input_ids"]]
        if for_eval:
            enc["chunk"] = [k for g in groups for k in range(len(g))]
            enc["word_index"] = [layout.scored_words(k) for layout in layouts for k in range(len(layout.spans))]
        if tags_col not in batch or batch[tags_col][0] is None:
            return enc
        label2id = {t: i for i, t in enumerate(self.labels)}
        all_tok = self.specs.data.label_all_tokens
        all_labels = []
        for tags, group, layout in zip(batch[tags_col], groups, layouts):
            for k, f in enumerate(group):
                row = []
                for word, first in zip(enc.word_ids(f), layout.is_first_piece(k)):
                    if word is None:
                        row.append(-100)
                    elif first:
                        row.append(label2id[self._name(tags[word])])
                    else:
                        row.append(label2id[b_to_i(self._name(tags[word]))] if all_tok else -100)
                all_labels.append(row)
        enc["labels"] = all_labels
        return enc

    def bind_eval_data(self, split, records, features) -> None:
        """Keep, from the features only, which token of which feature scores each word of each sentence."""
        names = getattr(features, "column_names", None) or list(features)
        if "word_index" in names and "chunk" in names:
            self.eval_data[split] = ScoredWords.from_features(features["chunk"], features["word_index"])
        else:
            self.eval_data.pop(split, None)

    def collator(self, tokenizer):
        from transformers import DataCollatorForTokenClassification
        return DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=8)

    def _decode(self, predictions, label_ids):
        names = self.labels
        y_true, y_pred = [], []
        for pred_row, label_row in zip(predictions, label_ids):
            keep = [(p, t) for p, t in zip(pred_row, label_row) if t != -100]
            y_true.append([names[t] for _, t in keep])
            y_pred.append([names[p] for p, _ in keep])
        return y_true, y_pred

    def compute_metrics(self, eval_pred) -> dict[str, float]:
        """Entity metrics over one tag per word of every sentence of the bound split (windows merged); rows of
        an unbound split are scored as they come, each labelled piece once."""
        predictions, label_ids = eval_pred.predictions, eval_pred.label_ids
        words = self.eval_data.get(self.eval_split)
        if isinstance(words, ScoredWords):
            return entity_metrics(*words.gather(predictions, label_ids, self.labels, self.eval_split))
        return entity_metrics(*self._decode(predictions, label_ids))

    def metric_table(self, metrics):
        return [(k, v) for k, v in metrics.items() if isinstance(v, (int, float))]

    def prepare_input(self, item: Any, where: str) -> Any:
        if isinstance(item, dict):
            item = item.get(self.column("text"), item.get("text"))
        if not (isinstance(item, str) or (isinstance(item, (list, tuple)) and all(isinstance(w, str) for w in item))):
            raise ValidationError(f"{where} must be a text or a list of words, got {type(item).__name__}",
                                  suggestions=['pass "Ada lives in Paris" or ["Ada", "lives", "in", "Paris"]'])
        return list(item) if isinstance(item, tuple) else item

    def predict(self, model, tokenizer, inputs, batch_size: int = 32, aggregation_strategy: str = "first"):
        """Each input is a raw text or a list of words; returns word tags and entities with character offsets.

        A raw text is tokenized as it is, and its words are the tokenizer's own (split at spaces and punctuation),
        as in transformers' token-classification pipeline; a list of words is kept as given.
        ``aggregation_strategy`` takes that pipeline's names: ``first`` (default: a word takes its first piece's
        label, the only piece training labels), ``average`` or ``max`` over a word's pieces, or ``simple`` (every
        piece on its own, so a word can split between entities; ``tags`` stay per word by ``first``).
        An input of more than ``data.max_length`` tokens is cut into windows sharing ``data.stride`` tokens; each
        token is read from the window where it is farthest from a cut, so every word gets a tag."""
        if aggregation_strategy not in AGGREGATION_STRATEGIES:
            raise ConfigError(f"Unknown aggregation_strategy {aggregation_strategy!r}", field="aggregation_strategy",
                              suggestions=[f"one of: {', '.join(AGGREGATION_STRATEGIES)}"])
        id2label = {int(k): v for k, v in model.config.id2label.items()}
        results: list[Any] = [None] * len(inputs)
        texts = [i for i, x in enumerate(inputs) if isinstance(x, str)]
        word_lists = [i for i, x in enumerate(inputs) if not isinstance(x, str)]
        for positions, split_words in ((texts, False), (word_lists, True)):
            if not positions:
                continue
            items = [inputs[i] if not split_words else (list(inputs[i]) or [""]) for i in positions]
            enc, groups, layouts = self._tokenize(tokenizer, items, split_words)
            rows = _window_probs(model, tokenizer, enc, batch_size)
            for i, group, layout in zip(positions, groups, layouts):
                word_ids, offsets, probs = layout.merged([rows[f] for f in group])
                merged = _Merged(word_ids, offsets)
                results[i] = _aggregate(inputs[i], merged, probs, id2label, aggregation_strategy)
        return results


class _Merged:
    """The content tokens of one input, its windows merged (what _aggregate reads of an Encoding)."""

    def __init__(self, word_ids, offsets):
        self.word_ids, self.offsets = word_ids, offsets


def _window_probs(model, tokenizer, enc, batch_size: int) -> list[Any]:
    """Label probabilities per token of every window of ``enc``, batched by length."""
    from transformers.data.data_collator import pad_without_fast_tokenizer_warning
    names = [k for k in tokenizer.model_input_names if k in enc]

    def encode(features):
        rows = {k: [enc[k][f] for f in features] for k in names}
        return pad_without_fast_tokenizer_warning(tokenizer, rows, padding=True, return_tensors="pt")

    n_features = len(enc["input_ids"])
    outputs = run_batches(model, encode, list(range(n_features)), batch_size,
                          length=lambda f: len(enc["input_ids"][f]))
    out = []
    for f, (_, _, logits) in enumerate(outputs):
        n = len(enc["input_ids"][f])
        left = logits.shape[0] - n if tokenizer.padding_side == "left" else 0
        out.append(logits[left:left + n].softmax(-1).numpy())
    return out


def _aggregate(item, encoding, probs, id2label: dict[int, str], strategy: str) -> dict[str, Any]:
    """Word tags and entities of one input from its pieces' label probabilities."""
    if isinstance(item, str):
        text, word_starts, words_given = item, None, None
    else:
        words_given = list(item)
        word_starts, pos = [], 0
        for w in words_given:
            word_starts.append(pos)
            pos += len(w) + 1
        text = " ".join(words_given)
    pieces: dict[int, list[tuple[int, int, int]]] = {}  # word -> [(token position, start char, end char)]
    for pos, word in enumerate(encoding.word_ids):
        if word is None:
            continue
        start, end = encoding.offsets[pos]
        if word_starts is not None:
            start, end = start + word_starts[word], end + word_starts[word]
        pieces.setdefault(word, []).append((pos, start, end))
    if words_given is not None:
        spans = [(s, s + len(w)) for s, w in zip(word_starts, words_given)]
    else:
        spans = [(pieces[w][0][1], pieces[w][-1][2]) for w in sorted(pieces)]
    words = [text[s:e] for s, e in spans]
    tags, scores = ["O"] * len(words), [0.0] * len(words)
    for word, members in pieces.items():
        if word >= len(words):
            continue
        if strategy == "average":
            row = probs[[p for p, _, _ in members]].mean(0)
        elif strategy == "max":
            row = max((probs[p] for p, _, _ in members), key=lambda r: r.max())
        else:
            row = probs[members[0][0]]
        best = int(np.argmax(row))
        tags[word], scores[word] = id2label[best], float(row[best])
    if strategy == "simple":
        units = [(id2label[int(probs[p].argmax())], float(probs[p].max()), s, e)
                 for w in sorted(pieces) for p, s, e in pieces[w]]
    else:
        units = [(tags[w], scores[w], spans[w][0], spans[w][1]) for w in range(len(words)) if w in pieces]
    entities = []
    for kind, first, last in spans_from_tags([u[0] for u in units]):
        start, end = units[first][2], units[last - 1][3]
        entities.append({"label": kind, "start": start, "end": end, "text": text[start:end],
                         "score": sum(u[1] for u in units[first:last]) / (last - first)})
    return {"tokens": words, "tags": tags, "entities": entities}


def entity_metrics(y_true: list[list[str]], y_pred: list[list[str]]) -> dict[str, float]:
    """seqeval entity-level precision/recall/F1 (overall and per type) plus token accuracy."""
    from seqeval.metrics import accuracy_score, classification_report

    report = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    micro = report.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
    out = {"precision": float(micro["precision"]), "recall": float(micro["recall"]),
           "f1": float(micro["f1-score"]), "accuracy": float(accuracy_score(y_true, y_pred))}
    for kind, row in report.items():
        if kind not in ("micro avg", "macro avg", "weighted avg"):
            out[f"{kind}_f1"] = float(row["f1-score"])
            out[f"{kind}_support"] = int(row["support"])
    return out
