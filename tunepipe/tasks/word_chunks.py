"""Long word sequences cut into overlapping chunks of tokens, and token results merged back per word.

The tokenizer cuts an input of more than ``max_length`` tokens into windows (``return_overflowing_tokens``), two
consecutive windows sharing ``stride`` tokens. ``ChunkLayout`` places each window's tokens on the input's content
tokens (specials left out) and says, for every content token, which window sees it best: the one where it has the
most context on its nearer side, a window edge inside the input counting as no context beyond it and the input's
own start and end as unlimited context. Ties go to the earlier window. A word is scored (evaluation) and tagged
(prediction) from its first piece in that window; training labels a word's first piece in every window holding it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np

from ..errors import TrainingError

NOT_SCORED = -1  # word_index of a token that is not the scored first piece of a word


def samples(sample_mapping: Sequence[int]) -> list[list[int]]:
    """Feature numbers per input, from ``overflow_to_sample_mapping`` (an input's windows are consecutive)."""
    groups: list[list[int]] = []
    for feature, sample in enumerate(sample_mapping):
        if feature == 0 or sample != sample_mapping[feature - 1]:
            groups.append([])
        groups[-1].append(feature)
    return groups


class ChunkLayout:
    """Where the windows of one input lie among its content tokens.

    ``encodings``: the windows' ``tokenizers.Encoding`` objects in the tokenizer's order; ``from_end``: the
    tokenizer truncates on the left, so its first window is the input's last one and the others go backwards.
    """

    def __init__(self, encodings: Sequence[Any], stride: int, from_end: bool = False):
        self.encodings = list(encodings)
        sizes = [sum(1 for s in e.special_tokens_mask if not s) for e in self.encodings]
        starts, edge = [], 0
        for n in sizes:  # consecutive windows share `stride` tokens
            if from_end:
                starts.append(edge - n)
                edge = edge - n + stride
            else:
                starts.append(edge)
                edge = edge + n - stride
        shift = -min(starts) if starts else 0
        self.spans = [(s + shift, s + shift + n) for s, n in zip(starts, sizes)]
        self.total = max((end for _, end in self.spans), default=0)
        # positions[k][t]: content position of token t of window k (None for special tokens)
        self.positions: list[list[int | None]] = []
        ids: dict[int, int] = {}  # content position -> token id, to check that the windows line up
        for e, (start, _) in zip(self.encodings, self.spans):
            row, p = [], start
            for special, token in zip(e.special_tokens_mask, e.ids):
                row.append(None if special else p)
                if not special:
                    if ids.setdefault(p, token) != token:
                        raise TrainingError(f"The tokenizer's windows do not overlap by {stride} tokens (data.stride)",
                                            suggestions=[("this tokenizer cuts long inputs in an unexpected way: "
                                                          "raise data.max_length so no input needs windows")])
                    p += 1
            self.positions.append(row)
        # best[p]: (window, token) that sees content position p with the most context
        best: list[tuple[float, int, int, int] | None] = [None] * self.total
        for k, (row, (start, end)) in enumerate(zip(self.positions, self.spans)):
            for t, p in enumerate(row):
                if p is None:
                    continue
                left = p - start if start > 0 else float("inf")
                right = end - 1 - p if end < self.total else float("inf")
                key = (min(left, right), -start, k, t)
                if best[p] is None or key[:2] > best[p][:2]:
                    best[p] = key
        self.best = [(b[2], b[3]) for b in best]  # type: ignore[index]
        # first[w]: content position of word w's first piece
        self.first: dict[int, int] = {}
        for e, row in zip(self.encodings, self.positions):
            for w, p in zip(e.word_ids, row):
                if w is not None and p is not None and p < self.first.get(w, p + 1):
                    self.first[w] = p

    def is_first_piece(self, k: int) -> list[bool]:
        """Per token of window ``k``: it is its word's first piece (the piece training labels)."""
        return [w is not None and p is not None and self.first.get(w) == p
                for w, p in zip(self.encodings[k].word_ids, self.positions[k])]

    def scored_words(self, k: int) -> list[int]:
        """Per token of window ``k``: its word when this token is the word's first piece in the window that sees
        it best (each word is scored exactly once over the windows), else NOT_SCORED."""
        out = []
        for t, (w, p) in enumerate(zip(self.encodings[k].word_ids, self.positions[k])):
            scored = w is not None and p is not None and self.first.get(w) == p and self.best[p] == (k, t)
            out.append(w if scored else NOT_SCORED)
        return out

    def merged(self, rows: Sequence[np.ndarray]) -> tuple[list[int | None], list[tuple[int, int]], np.ndarray]:
        """The input's content tokens in order, each from the window that sees it best: word ids, character
        offsets, and the token's row of ``rows[k]`` (per-window token scores, one row per token)."""
        word_ids, offsets, picked = [], [], []
        for k, t in self.best:
            e = self.encodings[k]
            word_ids.append(e.word_ids[t])
            offsets.append(tuple(e.offsets[t]))
            picked.append(rows[k][t])
        width = rows[0].shape[-1] if len(rows) else 0
        return word_ids, offsets, np.stack(picked) if picked else np.zeros((0, width))


@dataclass
class ScoredWords:
    """The words of one evaluation split, each scored once: feature and token of its scored first piece, in
    (example, word) order; ``bounds[i]:bounds[i + 1]`` are example ``i``'s entries."""
    features: np.ndarray
    tokens: np.ndarray
    bounds: np.ndarray
    n_features: int

    @classmethod
    def from_features(cls, chunks: Sequence[int], word_index: Sequence[Sequence[int]]) -> ScoredWords:
        """From the ``chunk`` (window number within its example) and ``word_index`` columns."""
        feats, toks, examples, words = [], [], [], []
        example = -1
        for f, (chunk, row) in enumerate(zip(chunks, word_index)):
            example += chunk == 0
            for t, w in enumerate(row):
                if w >= 0:
                    feats.append(f)
                    toks.append(t)
                    examples.append(example)
                    words.append(w)
        order = np.lexsort((np.asarray(words, dtype=np.int64), np.asarray(examples, dtype=np.int64)))
        examples_sorted = np.asarray(examples, dtype=np.int64)[order]
        bounds = np.searchsorted(examples_sorted, np.arange(example + 2))
        return cls(np.asarray(feats, dtype=np.int64)[order], np.asarray(toks, dtype=np.int64)[order], bounds,
                   len(chunks))

    def gather(self, predictions, label_ids, names: Sequence[str], split: str) -> tuple[list[list[str]],
                                                                                         list[list[str]]]:
        """(gold tags, predicted tags) per example, one per word, from per-feature token rows in dataset order.
        Fewer rows than features (a prefix, as the pipeline's metric-name probe passes) score the words whose
        scored piece lies in them; the examples past them come out empty."""
        predictions, label_ids = np.asarray(predictions), np.asarray(label_ids)
        rows = len(label_ids)
        order_hint = "evaluation must keep the dataset order (Task.ordered_eval)"
        if rows > self.n_features or len(predictions) != rows:
            raise TrainingError(f"{len(predictions)} predictions and {rows} label rows for {self.n_features} "
                                f"{split} features", suggestions=[order_hint])
        keep = self.features < rows
        f, t = self.features[keep], self.tokens[keep]
        gold, pred = label_ids[f, t], predictions[f, t]
        if (gold < 0).any() or (pred < 0).any():
            raise TrainingError(f"Predictions of the {split} data do not line up with its words (a first piece "
                                "without a label)", suggestions=[order_hint, "else please report this bug"])
        kept = np.concatenate([[0], np.cumsum(keep)])[self.bounds]
        y_true = [[names[i] for i in gold[a:b]] for a, b in pairwise(kept)]
        y_pred = [[names[i] for i in pred[a:b]] for a, b in pairwise(kept)]
        return y_true, y_pred
