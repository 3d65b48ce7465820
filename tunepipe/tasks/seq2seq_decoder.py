"""Sequence-to-sequence tasks on decoder-only models (LLaMA, GPT-2, SmolLM...): the source becomes a prompt, the
target its completion.

Training sees ``prompt + completion + eos`` with the loss on the completion only. Evaluation and prediction
generate from the prompt alone, left-padded, and keep only the new tokens. The prompt is recovered from a training
batch itself (the positions whose label is -100), so no backend needs extra columns for it.
"""
from __future__ import annotations

from typing import Any, Sequence

from ..modeling.models import read_model_config

# what ends the prompt when data.source_suffix is unset: the cue the model completes
DEFAULT_SUFFIXES = {"summarization": "\nTL;DR:", "translation": "\nTranslation:", "text_generation": "\nOutput:"}


def is_decoder_only(config) -> bool:
    """A causal LM that is not also a masked-LM encoder: BERT has a causal-LM head class too, but a
    sequence-to-sequence model needs it warm-started as an encoder-decoder, not used alone."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING
    if getattr(config, "is_encoder_decoder", False):
        return False
    kind = type(config)
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING and kind not in MODEL_FOR_MASKED_LM_MAPPING


def names_a_decoder_only_model(model: Any) -> bool:
    """Whether the specs' model section (before anything loads) is a decoder-only LM: from_config's model_type, or
    the config of a local folder or hub id. Anything unreadable counts as no: the real load reports it."""
    model = {"name_or_path": model} if isinstance(model, str) else model
    if not isinstance(model, dict) or model.get("encoder_decoder"):
        return False
    built = model.get("from_config")
    if isinstance(built, dict) and built.get("model_type"):
        from transformers import AutoConfig
        try:
            return is_decoder_only(AutoConfig.for_model(built["model_type"]))
        except Exception:  # noqa: BLE001 (an unknown model_type: the model load names it)
            return False
    if not model.get("name_or_path"):
        return False
    config = read_model_config(model["name_or_path"], revision=model.get("revision"),
                               trust_remote_code=bool(model.get("trust_remote_code")))
    return config is not None and is_decoder_only(config)


def encode_prompts(sources: Sequence[str], suffix: str, tokenizer, max_length: int | None,
                   max_target_length: int | None) -> list[list[int]]:
    """Token ids of ``source + suffix``, as ``tokenizer(source + suffix)`` gives them (so plain transformers
    reproduces a prediction from the text). A source too long for ``max_length`` (less room for the target) loses
    its end, never the suffix: the model must see the cue."""
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
    room = max(max_length - len(suffix_ids) - (max_target_length or 0), max_length // 2) if max_length else None
    out = []
    for source, ids in zip(sources, tokenizer([s + suffix for s in sources])["input_ids"]):
        ids = list(ids)
        if ids and ids[-1] == tokenizer.eos_token_id and ids[-1] != tokenizer.bos_token_id:
            ids.pop()  # a tokenizer that closes every text: the completion, not the prompt, ends with eos
        if room is not None and len(ids) > room + len(suffix_ids):
            head = tokenizer(source, truncation=True, max_length=room)["input_ids"]
            ids = [t for t in head if t != tokenizer.eos_token_id or t == tokenizer.bos_token_id] + suffix_ids
        out.append(ids)
    return out


def encode_completions(targets: Sequence[str], tokenizer, max_target_length: int | None) -> list[list[int]]:
    """`` target`` + eos: the leading space keeps the first word a word-start token after the cue."""
    eos = tokenizer.eos_token_id
    limit = (max_target_length - 1) if max_target_length else None
    ids = tokenizer([" " + t.strip() for t in targets], add_special_tokens=False, truncation=limit is not None,
                    max_length=limit)["input_ids"]
    return [list(row) + ([eos] if eos is not None else []) for row in ids]


def prompt_completion_rows(prompts: list[list[int]], completions: list[list[int]] | None) -> dict[str, list]:
    if completions is None:
        return {"input_ids": prompts, "attention_mask": [[1] * len(p) for p in prompts],
                "length": [len(p) for p in prompts]}
    ids = [p + c for p, c in zip(prompts, completions)]
    return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids],
            "labels": [[-100] * len(p) + c for p, c in zip(prompts, completions)], "length": [len(x) for x in ids]}


def left_padded(rows: list[list[int]], pad_token_id: int, device=None) -> dict[str, Any]:
    """Generation inputs: prompts end at the same column, so every row's new tokens start at the same place."""
    import torch
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return {"input_ids": ids.to(device) if device is not None else ids,
            "attention_mask": mask.to(device) if device is not None else mask}


def prompts_of_batch(batch: dict[str, Any]) -> list[list[int]]:
    """Each row's prompt: its tokens before the first labelled one (all of its tokens when it has no labels)."""
    ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch.get("labels")
    rows = []
    for i in range(ids.shape[0]):
        n = int(mask[i].sum()) if mask is not None else ids.shape[1]
        if labels is not None:
            labelled = (labels[i, :n] != -100).nonzero()
            n = int(labelled[0]) if len(labelled) else n
        rows.append(ids[i, :n].tolist())
    return rows
