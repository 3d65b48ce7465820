"""Special tokens added to the tokenizer (``tokenizer.special_tokens`` / ``tokenizer.additional_special_tokens``),
and the model's embeddings resized to match.

- ``tokenizer.special_tokens: {pad_token: "<pad>"}`` sets named special tokens (those of transformers'
  ``SPECIAL_TOKENS_ATTRIBUTES``: bos, eos, unk, sep, pad, cls, mask), adding them to the vocabulary when new;
- ``tokenizer.additional_special_tokens: ["<ent>", "</ent>"]`` adds tokens that are never split.

The saved tokenizer (``model/`` or ``adapter/``) carries them. The embeddings are resized to exactly
``len(tokenizer)`` (no padding to a multiple: peft's ``AutoPeftModel`` resizes the base to ``len(tokenizer)`` of the
adapter folder, and must land on the saved size). With PEFT, the resized input embeddings (and an untied output
embedding) are trained and saved in the adapter through ``modules_to_save``; loading the adapter resizes the base
first (``peft_support.load_adapter``, from ``vocab_size`` in ``tunepipe_adapter.json``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..suggest import suggest

NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_RESIZED = "_tunepipe_resized_vocab"  # set on a model whose embeddings were resized for added tokens


def check_special_tokens(named: Any, additional: Any) -> None:
    """The shape of the two settings (TokenizerSpec's validator): names from NAMED, non-empty token texts."""
    for key, value in (named or {}).items():
        if key not in NAMED:
            raise ConfigError(f"Unknown special token name 'tokenizer.special_tokens.{key}'",
                              field=f"tokenizer.special_tokens.{key}",
                              suggestions=suggest(key, NAMED) + [f"names: {', '.join(NAMED)}; other tokens go in "
                                                                 "tokenizer.additional_special_tokens"])
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"tokenizer.special_tokens.{key} must be a non-empty text, got {value!r}",
                              field=f"tokenizer.special_tokens.{key}", suggestions=[f'e.g. {key}: "<pad>"'])
    for i, token in enumerate(additional or []):
        if not isinstance(token, str) or not token.strip():
            raise ConfigError(f"tokenizer.additional_special_tokens[{i}] must be a non-empty text, got {token!r}",
                              field="tokenizer.additional_special_tokens",
                              suggestions=['e.g. additional_special_tokens: ["<ent>", "</ent>"]'])
    if additional and len(set(additional)) != len(additional):
        raise ConfigError("tokenizer.additional_special_tokens lists a token twice",
                          field="tokenizer.additional_special_tokens", suggestions=["list each token once"])


def add_special_tokens(tokenizer, spec) -> int:
    """Add the specs' special tokens to ``tokenizer``; returns how many entered the vocabulary."""
    before = len(tokenizer)
    if spec.special_tokens:
        tokenizer.add_special_tokens(dict(spec.special_tokens))
    if spec.additional_special_tokens:
        tokenizer.add_tokens(list(spec.additional_special_tokens), special_tokens=True)
    return len(tokenizer) - before


def resize_embeddings(model, tokenizer, field: str = "tokenizer.additional_special_tokens") -> bool:
    """Grow the model's embeddings to ``len(tokenizer)`` when tokens were added beyond them; True when resized."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(emb, "num_embeddings", None)
    if rows is None or len(tokenizer) <= rows:
        return False
    if type(model).__name__ == "EncoderDecoderModel":
        raise ConfigError("Added special tokens need resized embeddings, which transformers' EncoderDecoderModel "
                          "(model.encoder_decoder) cannot do", field=field,
                          suggestions=["add the tokens to the encoders' tokenizer and save it, then warm-start from "
                                       "models resized to it", "or use a T5/BART-style seq2seq checkpoint"])
    model.resize_token_embeddings(len(tokenizer))
    setattr(model, _RESIZED, True)
    return True


def resized_embeddings(model) -> list[str]:
    """Names of the input embeddings (and an untied output embedding) when the vocabulary was resized away from the
    base checkpoint's: by tunepipe for added tokens, or found by comparing with the base's config.json."""
    emb = model.get_input_embeddings()
    if not getattr(model, _RESIZED, False):
        base = getattr(model.config, "_name_or_path", "") or ""
        if not base or not (Path(base) / "config.json").is_file():
            return []
        saved = json.loads((Path(base) / "config.json").read_text()).get("vocab_size")
        if saved is None or emb.num_embeddings == saved:
            return []
    names = [n for n, m in model.named_modules() if m is emb]
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and out.weight is not emb.weight:
        names += [n for n, m in model.named_modules() if m is out]
    return names


def card_note(resize_lines: list[str]) -> str:
    """What the model card says when the base must be resized before the adapter loads on it."""
    if not resize_lines:
        return ""
    return ("\nThe run added tokens to the tokenizer (`tokenizer.special_tokens` / `additional_special_tokens`): "
            "the adapter holds the resized embeddings, so the base must be resized to the adapter's vocabulary "
            f"first (`{resize_lines[0].strip()}` above; `AutoPeftModel...` does it from the tokenizer in "
            "`adapter/`, tunepipe from `vocab_size` in `adapter/tunepipe_adapter.json`).\n")
