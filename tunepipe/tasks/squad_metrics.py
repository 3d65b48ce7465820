"""The official SQuAD evaluation, restated here because ``evaluate.load("squad")`` needs a download.

v1.1: exact match and token F1 after answer normalisation, the maximum over the gold answers of each question.
v2.0: the same, except that an empty answer (no answer) only matches an empty gold list, and scores are split into
HasAns / NoAns questions. Results are in percent, as the official scripts print them.
"""
from __future__ import annotations

import collections
import re
import string
from typing import Mapping, Sequence

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lower case, remove punctuation, remove the articles a/an/the, collapse white space (the official order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str, empty_matches_empty: bool = False) -> float:
    """Bag-of-tokens F1 of the normalised answers. v2.0 scores an empty answer 1 against an empty gold, else 0
    (``empty_matches_empty``); v1.1 scores any pair with no common token 0."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if empty_matches_empty and (not pred_tokens or not gold_tokens):
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_v1(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Official v1.1: every question in ``references`` counts; a missing prediction scores 0."""
    em = f1 = 0.0
    for qid, golds in references.items():
        if qid not in predictions:
            continue
        pred = predictions[qid]
        em += max(exact_match(pred, g) for g in golds)
        f1 += max(token_f1(pred, g) for g in golds)
    total = len(references)
    return {"exact_match": 100.0 * em / total if total else 0.0, "f1": 100.0 * f1 / total if total else 0.0,
            "total": total}


def squad_v2(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Official v2.0 (no na_prob file): a question with no gold answers has the gold answer ''. Adds HasAns_* and
    NoAns_* scores over the answerable and unanswerable questions."""
    scores: dict[str, tuple[float, float, bool]] = {}
    for qid, raw_golds in references.items():
        has_answer = bool(raw_golds)
        golds = [g for g in raw_golds if normalize_answer(g)] or [""]
        pred = predictions.get(qid)
        if pred is None:
            scores[qid] = (0.0, 0.0, has_answer)
            continue
        scores[qid] = (max(exact_match(pred, g) for g in golds),
                       max(token_f1(pred, g, empty_matches_empty=True) for g in golds), has_answer)

    def summary(keep) -> tuple[float, float, int]:
        rows = [s for s in scores.values() if keep(s)]
        if not rows:
            return 0.0, 0.0, 0
        return 100.0 * sum(r[0] for r in rows) / len(rows), 100.0 * sum(r[1] for r in rows) / len(rows), len(rows)

    em, f1, total = summary(lambda s: True)
    out = {"exact_match": em, "f1": f1, "total": total}
    for name, flag in (("HasAns", True), ("NoAns", False)):
        em, f1, n = summary(lambda s, flag=flag: s[2] == flag)
        if n:
            out.update({f"{name}_exact_match": em, f"{name}_f1": f1, f"{name}_total": n})
    return out


def squad_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                  version_2_with_negative: bool = False) -> dict[str, float]:
    return (squad_v2 if version_2_with_negative else squad_v1)(predictions, references)
