"""Text-generation metrics on decoded strings: sacreBLEU / chrF, ROUGE (rouge-score, stemmed), generated length.

Every metric takes one list of references per prediction (one or more), so multi-reference sets (SciTLDR) are
scored against all their references. Scores are on a 0-100 scale, as sacreBLEU and transformers' example scripts
report them.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")


def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacreBLEU wants one stream per reference position; missing references (variable counts) are None."""
    most = max((len(r) for r in references), default=0)
    if most == 0:
        raise ValueError("every prediction needs at least one reference")
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(most)]


def bleu_chrf(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU and chrF with sacreBLEU's defaults (13a tokenisation, cased), as papers report them."""
    import sacrebleu

    streams = _reference_streams(references)
    return {"bleu": float(sacrebleu.corpus_bleu(list(predictions), streams).score),
            "chrf": float(sacrebleu.corpus_chrf(list(predictions), streams).score)}


def split_sentences(text: str) -> str:
    """One sentence per line: ROUGE-Lsum scores summary-level LCS over newline-separated sentences.

    A punctuation rule (., !, ? followed by white space) rather than nltk's punkt, which needs a download."""
    return "\n".join(s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip())


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]],
          use_stemmer: bool = True) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measure; with several references, the best-scoring one per metric counts.

    rouge-score keeps only [a-z0-9] tokens (lower-cased), so it suits English text."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, refs in zip(predictions, references):
        if not refs:
            raise ValueError("every prediction needs at least one reference")
        scores = scorer.score_multi([split_sentences(r) for r in refs], split_sentences(prediction))
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    n = max(len(predictions), 1)
    return {key: 100.0 * value / n for key, value in totals.items()}


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Share of predictions equal to one of their references after white-space normalisation (0-100)."""
    def norm(text: str) -> str:
        return " ".join(text.split())
    hits = sum(norm(p) in {norm(r) for r in refs} for p, refs in zip(predictions, references))
    return {"exact_match": 100.0 * hits / max(len(predictions), 1)}


def generated_lengths(token_ids: Iterable[Sequence[int]], not_counted: Iterable[int]) -> dict[str, float]:
    """Mean and max number of generated tokens per output, not counting pad/special ids or -100 fill.

    Reported beside the scores so that outputs cut at a length cap (the 20-token default) show up."""
    skip = set(not_counted) | {-100}
    lengths = [sum(1 for t in row if int(t) not in skip) for row in token_ids]
    if not lengths:
        return {"gen_len": 0.0, "gen_len_max": 0.0}
    return {"gen_len": float(np.mean(lengths)), "gen_len_max": float(max(lengths))}
