"""Masked language modeling: texts packed into blocks of ``chunk_size`` tokens (or one example per line), dynamic
masking for training drawn from the seed, the epoch and the batch (not from how many batches came before, so a
resumed run masks as the uninterrupted one did), and a *fixed* masking of the evaluation data, drawn once from the
seed and the text, so that perplexities before and after training (or between two runs) score the very same
masked tokens.

The language-modeling helpers shared with the causal-LM task live here too: ``group_texts`` and the per-batch
token log-likelihood reduction that keeps evaluation memory flat (no vocabulary-sized logits are gathered).
"""
from __future__ import annotations

import math
import os
import zlib
from itertools import chain
from typing import Any, Sequence

import numpy as np

from ..errors import ConfigError, ValidationError
from ..modeling.limits import LengthSetting, config_limit
from .base import Task, run_batches

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels")
MASK_SPELLINGS = ("[MASK]", "<mask>")
EVAL_MASK_CHUNK = 64  # examples masked together when fixing the evaluation masks (whole-word masks are B x L x L)


# ---- shared language-modeling helpers -----------------------------------------------------------------------
def group_texts(batch: dict[str, list], block_size: int, drop_remainder: bool = True) -> dict[str, list]:
    """Concatenate each column of a tokenized batch and cut it into blocks of ``block_size`` (run_mlm's
    group_texts). The tail shorter than a block is dropped when ``drop_remainder`` unless it is all there is."""
    joined = {k: list(chain.from_iterable(v)) for k, v in batch.items()}
    total = len(joined["input_ids"])
    if drop_remainder and total >= block_size:
        total -= total % block_size
    return {k: [v[i:i + block_size] for i in range(0, total, block_size)] for k, v in joined.items()}


def token_nll(logits, labels, shift: bool = False):
    """Per example ``[sum of -log p(label), number of labelled tokens]`` (labels -100 are ignored).

    Used as ``preprocess_logits_for_metrics``: evaluation keeps two floats per example instead of the logits.
    ``shift`` for causal LMs, whose logits at position t predict the label at t + 1."""
    import torch
    if isinstance(logits, tuple):
        logits = logits[0]
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != -100
    nll = torch.zeros(labels.shape[0], dtype=torch.float32, device=logits.device)
    if keep.any():
        losses = torch.nn.functional.cross_entropy(logits[keep].float(), labels[keep], reduction="none")
        nll.index_add_(0, keep.nonzero()[:, 0], losses)
    return torch.stack([nll, keep.sum(dim=1).float()], dim=1)


def perplexity_metrics(eval_pred) -> dict[str, float]:
    """Perplexity = exp(mean negative log-likelihood per predicted token), over the whole evaluation set.
    (The trainer's ``loss`` averages per-batch means instead, so exp(loss) can differ slightly.)"""
    stats = np.asarray(eval_pred.predictions, dtype=np.float64).reshape(-1, 2)
    nll, count = float(stats[:, 0].sum()), float(stats[:, 1].sum())
    token_loss = nll / count if count else float("nan")
    return {"perplexity": math.exp(min(token_loss, 700.0)) if count else float("nan"), "token_loss": token_loss,
            "predicted_tokens": int(count)}


def check_block_size(size: int, tokenizer, field: str) -> None:
    limit = getattr(tokenizer, "model_max_length", None)
    if limit and limit < 1_000_000 and size > limit:
        raise ConfigError(f"Blocks of {size} tokens are longer than the tokenizer's model_max_length ({limit})",
                          field=field, suggestions=[f"set {field} to {limit} or less"])


def check_positions(model, size: int, field: str) -> None:
    """Blocks longer than the model's position table fail deep inside the forward pass: say so before training."""
    found = config_limit(getattr(model, "config", None))
    limit = found.tokens if found is not None and found.hard else None  # rotary: longer runs (limits.py)
    if isinstance(limit, int) and size > limit:
        raise ConfigError(f"Blocks of {size} tokens are longer than the model's {limit} positions", field=field,
                          suggestions=[f"set {field} to {limit} or less",
                                       "or build the model with more positions (max_position_embeddings)"])


# ---- collation -----------------------------------------------------------------------------------------------
class MaskingCollator:
    """Training batches get fresh masks from a generator seeded by ``seed``, the epoch (``set_epoch``, called at
    every epoch's start) and the batch's tokens: a generator that ran on from batch to batch would sit elsewhere
    after a resume (the loaders collate a batch ahead, before the checkpoint's RNG is restored), and mask
    differently from the uninterrupted run. Evaluation examples arrive already masked (they carry ``labels``) and
    are only padded. Non-model columns are dropped here, because whole-word masking needs the ``offset_mapping``
    column that the Trainer would otherwise remove. (With persistent DataLoader workers, the workers keep the
    epoch they started with.)"""

    def __init__(self, tokenizer, mlm_probability: float, whole_word_mask: bool, seed: int | None,
                 pad_to_multiple_of: int | None = 8):
        from transformers import DataCollatorForLanguageModeling, DataCollatorForTokenClassification
        # transformers 5 whole-word masking always writes the mask token (no random/kept replacements)
        replace = {"mask_replace_prob": 1.0, "random_replace_prob": 0.0} if whole_word_mask else {}
        self.masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability,
                                                      whole_word_mask=whole_word_mask, seed=seed,
                                                      pad_to_multiple_of=pad_to_multiple_of, **replace)
        self.padder = DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _seed_batch(self, features: list[dict[str, Any]]) -> None:
        if self.seed is None:
            return  # the global RNG, as transformers' collator draws without a seed
        import torch
        tokens = zlib.crc32(np.concatenate([np.asarray(f["input_ids"], dtype=np.int64) for f in features]).tobytes())
        self.masker.generator = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + self.epoch * 7_919 + tokens) % (2 ** 63))
        self.masker._generator_pid = os.getpid()  # transformers' collator keeps a generator of this process

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if "labels" in features[0]:
            return self.padder([{k: f[k] for k in MODEL_INPUTS if k in f} for f in features])
        keep = MODEL_INPUTS + ("special_tokens_mask", "offset_mapping")
        features = [{k: f[k] for k in keep if k in f} for f in features]
        if self.masker.whole_word_mask and "offset_mapping" not in features[0]:
            raise ConfigError("Whole-word masking needs the offset_mapping column, and it was removed before "
                              "collation", field="training.remove_unused_columns",
                              suggestions=["keep training.remove_unused_columns: false (the task default)",
                                           "or set data.whole_word_mask: false"])
        if "offset_mapping" in features[0]:  # the tokenizer's pad() leaves offsets ragged: pad them here
            width = max(len(f["input_ids"]) for f in features)
            if self.pad_to_multiple_of:
                width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
            for f in features:
                f["offset_mapping"] = [list(o) for o in f["offset_mapping"]] + [[0, 0]] * (width - len(f["input_ids"]))
        self._seed_batch(features)
        return self.masker(features)


# ---- the task ------------------------------------------------------------------------------------------------
class MaskedLMTask(Task):
    name = "masked_language_modeling"
    aliases = ("mlm", "masked_lm")
    description = ("Masked LM on raw text (.txt lines or a text column): packed blocks or line by line, optional "
                   "whole-word masking; perplexity")
    auto_model_class = "AutoModelForMaskedLM"
    defaults = {
        "data": {"text_column": "text", "chunk_size": 128, "mlm_probability": 0.15, "packing": True},
        "training": {"per_device_train_batch_size": 16, "per_device_eval_batch_size": 32, "learning_rate": 5e-5,
                     "num_train_epochs": 3, "metric_for_best_model": "perplexity", "greater_is_better": False,
                     # the masking collator needs special_tokens_mask / offset_mapping, which the Trainer drops
                     "remove_unused_columns": False},
    }
    example_data = {"text": "Emma Woodhouse, handsome, clever, and rich, with a comfortable home."}

    @classmethod
    def predict_example(cls) -> str:
        return "the [MASK] sat on the mat ."  # tunepipe reads [MASK] / <mask> as the tokenizer's mask token

    def __init__(self, specs):
        super().__init__(specs)
        if specs.data.whole_word_mask and getattr(specs.training, "remove_unused_columns", False):
            raise ConfigError("Whole-word masking needs the offset_mapping column, which "
                              "training.remove_unused_columns: true removes", field="training.remove_unused_columns",
                              suggestions=["set training.remove_unused_columns: false (the task default)"])

    @property
    def packing(self) -> bool:
        return self.specs.data.packing is not False

    def block_size(self) -> int:
        data = self.specs.data
        return (data.chunk_size or 128) if self.packing else (data.max_length or data.chunk_size or 128)

    def validate_record(self, record: dict[str, Any], split: str) -> str | None:
        text = record.get(self.column("text"))
        if not isinstance(text, str) or not text.strip():
            return f"column '{self.column('text')}' is empty or not text"
        return None

    def tokenizer_training_texts(self, records: Sequence[dict[str, Any]]) -> list[str]:
        return [r[self.column("text")] for r in records if isinstance(r.get(self.column("text")), str)]

    capped_lengths = ()  # the block size defines the training examples: a default over the limit is refused

    def length_settings(self) -> list[Any]:
        return [LengthSetting("data.chunk_size" if self.packing else "data.max_length", self.block_size())]

    def configure_model(self, model, tokenizer) -> None:
        check_positions(model, self.block_size(), "data.chunk_size" if self.packing else "data.max_length")

    def _check_tokenizer(self, tokenizer) -> None:
        if tokenizer.mask_token is None:
            raise ConfigError("This tokenizer has no mask token, so it cannot be used for masked LM",
                              field="tokenizer.name_or_path",
                              suggestions=["use an encoder's tokenizer (BERT, RoBERTa, MiniLM)",
                                           "or train one: tokenizer: {train: {type: wordpiece}}"])
        if self.specs.data.whole_word_mask and not tokenizer.is_fast:
            raise ConfigError("Whole-word masking needs a fast tokenizer (character offsets)",
                              field="data.whole_word_mask", suggestions=["set tokenizer.use_fast: true"])

    # ---- data --------------------------------------------------------------------------------------------
    def preprocess(self, batch, tokenizer):
        self._check_tokenizer(tokenizer)
        size = self.block_size()
        check_block_size(size, tokenizer, "data.chunk_size" if self.packing else "data.max_length")
        texts = [t for t in batch[self.column("text")] if isinstance(t, str) and t.strip()]
        kwargs = {"return_special_tokens_mask": True, "return_offsets_mapping": self.specs.data.whole_word_mask}
        if self.packing:
            # long texts are cut into blocks below; the tokenizer's length warning does not apply
            enc = dict(tokenizer(texts, verbose=False, **kwargs))
            out = group_texts(enc, size)
        else:
            out = dict(tokenizer(texts, truncation=True, max_length=size, **kwargs))
        out["length"] = [len(ids) for ids in out["input_ids"]]
        return out

    def preprocess_eval(self, batch, tokenizer):
        """Tokenize, then mask once with a generator seeded by the training seed and the tokens themselves:
        every evaluation of this data scores the same masked positions."""
        enc = self.preprocess(batch, tokenizer)
        n = len(enc["input_ids"])
        out: dict[str, list] = {k: [] for k in MODEL_INPUTS if k in enc or k == "labels"}
        for start in range(0, n, EVAL_MASK_CHUNK):
            rows = range(start, min(n, start + EVAL_MASK_CHUNK))
            features = [{k: enc[k][i] for k in enc if k != "length"} for i in rows]
            ids = np.fromiter(chain.from_iterable(f["input_ids"] for f in features), dtype=np.int64)
            seed = (self.specs.training.seed * 1_000_003 + zlib.crc32(ids.tobytes())) % (2 ** 31)
            masked = self.collator(tokenizer, seed=seed, pad_to_multiple_of=None)(features)
            for row, f in enumerate(features):
                length = len(f["input_ids"])
                for k in out:
                    out[k].append(masked[k][row, :length].tolist())
        out["length"] = enc["length"]
        return out

    def collator(self, tokenizer, seed: int | None = -1, pad_to_multiple_of: int | None = 8):
        self._check_tokenizer(tokenizer)
        return MaskingCollator(tokenizer, self.specs.data.mlm_probability or 0.15, self.specs.data.whole_word_mask,
                               seed=self.specs.training.seed if seed == -1 else seed,
                               pad_to_multiple_of=pad_to_multiple_of)

    # ---- evaluation --------------------------------------------------------------------------------------
    def preprocess_logits_for_metrics(self, logits, labels):
        return token_nll(logits, labels)

    def compute_metrics(self, eval_pred) -> dict[str, float]:
        return perplexity_metrics(eval_pred)

    # ---- inference ---------------------------------------------------------------------------------------
    def _with_mask_token(self, text: Any, mask: str) -> str:
        if not isinstance(text, str):
            raise ValidationError(f"Masked-LM input must be a text, got {type(text).__name__}",
                                  suggestions=[f"write {mask} where a word is missing"])
        for spelling in MASK_SPELLINGS:
            if spelling != mask:
                text = text.replace(spelling, mask)
        if mask not in text:
            raise ValidationError(f"No mask token in the input {text[:60]!r}",
                                  suggestions=[f"write {mask} where a word is missing, e.g. 'the {mask} sat on the mat'"])
        return text

    def predict(self, model, tokenizer, inputs, batch_size: int = 32, top_k: int = 5):
        """Top-k fills for each mask token of each text; ``sequence`` is the text with every mask filled by its
        best candidate."""
        mask = tokenizer.mask_token
        texts = [self._with_mask_token(x, mask) for x in inputs]

        def encode(batch):
            return tokenizer(batch, truncation=True, max_length=self.block_size(), padding=True, return_tensors="pt")

        results = []
        for text, (enc, row, logits) in zip(texts, run_batches(model, encode, texts, batch_size, length=len)):
            positions = (enc["input_ids"][row] == tokenizer.mask_token_id).nonzero()[:, 0].tolist()
            fills = []
            for pos in positions:
                probs = logits[pos].softmax(-1)
                scores, ids = probs.topk(min(top_k, probs.shape[-1]))
                fills.append([{"token": int(i), "token_str": tokenizer.decode([int(i)]).strip(), "score": float(s)}
                              for s, i in zip(scores, ids)])
            sequence = text
            for candidates in fills:
                sequence = sequence.replace(mask, candidates[0]["token_str"], 1)
            results.append({"text": text, "fills": fills, "sequence": sequence})
        return results
