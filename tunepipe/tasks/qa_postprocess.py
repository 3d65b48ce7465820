"""QA's n-best post-processing, shared by evaluation and prediction: window start/end logits -> one answer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass
class EvalSplit:
    """What compute_metrics needs to turn feature logits of one split back into answers."""
    contexts: list[str]
    golds: list[list[str] | None]
    feature_example: list[int]
    offsets: list[list]
    null_indices: list[int]


def best_answers(contexts: Sequence[str], feature_example: Sequence[int], feature_offsets: Sequence[list],
                 start_logits, end_logits, null_indices: Sequence[int], *, n_best_size: int = 20,
                 max_answer_length: int = 30, version_2_with_negative: bool = False,
                 null_score_diff_threshold: float = 0.0) -> list[dict[str, Any]]:
    """One answer per context from the start/end logits of its windows (run_qa's n-best search).

    A candidate pairs one of the ``n_best_size`` best context starts with one of the best context ends of the same
    window (end >= start, at most ``max_answer_length`` tokens); its score is start + end logit. ``score`` in the
    result is the softmax probability among the n best candidates (and the null answer for v2). For v2 the null
    answer wins when (lowest null score over the windows) - (best span score) > ``null_score_diff_threshold``.
    """
    windows: list[list[int]] = [[] for _ in contexts]
    for f, example in enumerate(feature_example):
        windows[example].append(f)
    results = []
    for example, context in enumerate(contexts):
        spans: list[tuple[float, int, int]] = []  # (score, start char, end char)
        null_score = None
        for f in windows[example]:
            offsets = feature_offsets[f]
            starts_all = np.asarray(start_logits[f], dtype=np.float64)
            ends_all = np.asarray(end_logits[f], dtype=np.float64)
            k = null_indices[f]
            score = starts_all[k] + ends_all[k]
            null_score = score if null_score is None else min(null_score, score)
            ctx = np.array([i for i, o in enumerate(offsets[:len(starts_all)]) if o is not None], dtype=np.int64)
            if ctx.size == 0:
                continue
            top_starts = ctx[np.argsort(-starts_all[ctx], kind="stable")[:n_best_size]]
            top_ends = ctx[np.argsort(-ends_all[ctx], kind="stable")[:n_best_size]]
            length = top_ends[None, :] - top_starts[:, None]
            ok = (length >= 0) & (length < max_answer_length)
            scores = starts_all[top_starts][:, None] + ends_all[top_ends][None, :]
            for i, j in zip(*np.nonzero(ok)):
                s, e = int(top_starts[i]), int(top_ends[j])
                spans.append((float(scores[i, j]), offsets[s][0], offsets[e][1]))
        spans.sort(key=lambda c: -c[0])
        spans = spans[:n_best_size]
        pool = [c[0] for c in spans] + ([null_score] if version_2_with_negative and null_score is not None else [])
        probs = _softmax(pool)
        if spans:
            _, start, end = spans[0]
            result = {"answer": context[start:end], "start": start, "end": end, "score": probs[0],
                      "no_answer": False}
        else:
            result = {"answer": "", "start": 0, "end": 0, "score": 0.0, "no_answer": True}
        if version_2_with_negative and null_score is not None:
            diff = float(null_score - spans[0][0]) if spans else None
            if diff is None or diff > null_score_diff_threshold:
                result = {"answer": "", "start": 0, "end": 0, "score": probs[-1], "no_answer": True}
            result["null_score_diff"] = diff
        results.append(result)
    return results


def _softmax(scores: list[float]) -> list[float]:
    if not scores:
        return []
    x = np.asarray(scores, dtype=np.float64)
    e = np.exp(x - x.max())
    return [float(p) for p in e / e.sum()]
