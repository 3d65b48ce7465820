"""Causal-LM fine-tuning of decoder models on three record layouts:

- ``{"prompt": ..., "completion": ...}``: loss on the completion only (labels -100 on the prompt);
- ``{"instruction": ..., "input": optional, "output": ...}``: rendered with an Alpaca-style template, loss on output;
- ``{"text": ...}`` (or .txt lines): loss on every token.

Other column names map onto these with ``data.columns``. ``data.packing`` concatenates short examples into full
blocks (labels travel with their tokens, so completion-only loss survives packing). Metric: perplexity over the
labelled tokens. Prediction is greedy (or beam) generation with ``generation.max_new_tokens``.
"""
from __future__ import annotations

from typing import Any, Sequence

from ..errors import ValidationError
from ..modeling.limits import LengthSetting
from .base import Task
from .masked_lm import check_block_size, check_positions, group_texts, perplexity_metrics, token_nll

INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
INSTRUCTION_INPUT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def instruction_prompt(record: dict[str, Any]) -> str:
    extra = record.get("input")
    if isinstance(extra, str) and extra.strip():
        return INSTRUCTION_INPUT_TEMPLATE.format(instruction=record["instruction"], input=extra)
    return INSTRUCTION_TEMPLATE.format(instruction=record["instruction"])


def prompt_completion_example(prompt_ids: list[int], completion_ids: list[int], max_length: int):
    """``input_ids`` and ``labels`` (-100 on the prompt), cut to ``max_length``. A long prompt loses its start
    rather than the completion losing its end: the prompt keeps at least half the window."""
    room = max(max_length - len(completion_ids), max_length // 2)
    if len(prompt_ids) > room:
        prompt_ids = prompt_ids[len(prompt_ids) - room:]
    ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + completion_ids)[:max_length]
    return ids, labels


class CausalLMCollator:
    """Right-pads input_ids (pad id), attention_mask (0) and labels (-100) to a multiple of 8, whatever the
    tokenizer's padding side: training positions must start at 0."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = 8):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch
        width = max(len(f["input_ids"]) for f in features)
        if self.multiple:
            width = -(-width // self.multiple) * self.multiple
        batch = {"input_ids": torch.full((len(features), width), self.pad_token_id, dtype=torch.long),
                 "attention_mask": torch.zeros((len(features), width), dtype=torch.long),
                 "labels": torch.full((len(features), width), -100, dtype=torch.long)}
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            batch["input_ids"][row, :n] = torch.tensor(f["input_ids"])
            batch["attention_mask"][row, :n] = 1
            if "labels" in f:
                batch["labels"][row, :n] = torch.tensor(f["labels"])
        return batch


class CausalLMTask(Task):
    name = "causal_lm"
    aliases = ("clm",)
    description = ("Fine-tune a decoder LM on prompt/completion, instruction or plain-text records (loss on the "
                   "completion), optional packing; perplexity")
    auto_model_class = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"
    defaults = {
        "data": {"text_column": "text", "max_length": 512, "packing": False},
        "training": {"per_device_train_batch_size": 8, "per_device_eval_batch_size": 16, "learning_rate": 5e-5,
                     "num_train_epochs": 3, "metric_for_best_model": "perplexity", "greater_is_better": False},
    }
    example_data = {"prompt": "Question: what is the capital of France? Answer:", "completion": " Paris"}

    def required_columns(self) -> list[str]:
        return []  # three record layouts: validate_record checks each record for one of them

    def split_record(self, record: dict[str, Any]) -> tuple[str, str] | None:
        """(prompt, completion) of a record; the prompt is '' for plain text (loss on all of it)."""
        if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
            return record["prompt"], record["completion"]
        if isinstance(record.get("instruction"), str) and isinstance(record.get("output"), str):
            return instruction_prompt(record), record["output"]
        text = record.get(self.column("text"))
        if isinstance(text, str):
            return "", text
        return None

    def validate_record(self, record: dict[str, Any], split: str) -> str | None:
        parts = self.split_record(record)
        if parts is None:
            present = ", ".join(sorted(k for k, v in record.items() if v is not None)) or "none"
            return (f"needs 'prompt' + 'completion', 'instruction' + 'output', or '{self.column('text')}' "
                    f"(columns present: {present}; rename with data.columns)")
        if not parts[1].strip():
            return "the completion/output/text is empty"
        return None

    def tokenizer_training_texts(self, records: Sequence[dict[str, Any]]) -> list[str]:
        return [p + c for p, c in filter(None, map(self.split_record, records))]

    def block_size(self) -> int:
        return self.specs.data.chunk_size or self.specs.data.max_length or 512

    @staticmethod
    def eos_id(tokenizer) -> int | None:
        return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id

    def _prompt_ids(self, prompt: str, tokenizer) -> list[int]:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
        if not ids:  # an empty prompt still needs a first token to condition on
            start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else self.eos_id(tokenizer)
            ids = [start] if start is not None else []
        return ids

    # ---- data --------------------------------------------------------------------------------------------
    def preprocess(self, batch, tokenizer):
        max_length = self.specs.data.max_length or 512
        check_block_size(self.block_size() if self.specs.data.packing else max_length, tokenizer,
                         "data.chunk_size" if self.specs.data.packing else "data.max_length")
        eos = self.eos_id(tokenizer)
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        for values in zip(*batch.values()):
            prompt, completion = self.split_record(dict(zip(batch, values)))
            if prompt:
                completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
                completion_ids += [eos] if eos is not None else []
                ids, labels = prompt_completion_example(self._prompt_ids(prompt, tokenizer), completion_ids,
                                                        max_length)
            else:  # plain text: the tokenizer's own specials (a bos for LLaMA-style tokenizers), loss everywhere
                ids = tokenizer(completion, add_special_tokens=True)["input_ids"]
                if eos is not None and ids[-1:] != [eos]:
                    ids.append(eos)
                ids = ids[:max_length]
                labels = list(ids)
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(labels)
        if self.specs.data.packing:
            out = group_texts(out, self.block_size(), drop_remainder=False)
        out["length"] = [len(ids) for ids in out["input_ids"]]
        return out

    def collator(self, tokenizer):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id(tokenizer)
        return CausalLMCollator(pad if pad is not None else 0)

    capped_lengths = ()  # the block size defines the training examples: a default over the limit is refused

    def length_settings(self) -> list[Any]:
        packing = bool(self.specs.data.packing)
        return [LengthSetting("data.chunk_size" if packing and self.specs.data.chunk_size else "data.max_length",
                              self.block_size() if packing else (self.specs.data.max_length or 512))]

    def configure_model(self, model, tokenizer) -> None:
        packing = bool(self.specs.data.packing)
        check_positions(model, self.block_size() if packing else (self.specs.data.max_length or 512),
                        "data.chunk_size" if packing and self.specs.data.chunk_size else "data.max_length")
        generation = getattr(model, "generation_config", None)
        if generation is not None and generation.pad_token_id is None and tokenizer is not None:
            generation.pad_token_id = tokenizer.pad_token_id  # plain generate() then needs no pad warning

    def model_kwargs(self) -> dict[str, Any]:
        # an encoder checkpoint (BERT, MiniLM) loaded for causal LM must attend only to the left
        return {"is_decoder": True}

    # ---- evaluation --------------------------------------------------------------------------------------
    def preprocess_logits_for_metrics(self, logits, labels):
        return token_nll(logits, labels, shift=True)

    def compute_metrics(self, eval_pred) -> dict[str, float]:
        return perplexity_metrics(eval_pred)

    # ---- inference ---------------------------------------------------------------------------------------
    def prompt_of(self, item: Any) -> str:
        if isinstance(item, str):
            return item
        if isinstance(item, dict):
            if isinstance(item.get("prompt"), str):
                return item["prompt"]
            if isinstance(item.get("instruction"), str):
                return instruction_prompt(item)
            if isinstance(item.get(self.column("text")), str):
                return item[self.column("text")]
        raise ValidationError(f"Cannot make a prompt from {str(item)[:80]!r}",
                              suggestions=["give a text, or a record with 'prompt', 'instruction' (+ 'input') or "
                                           f"'{self.column('text')}'"])

    def input_from_record(self, record: dict[str, Any]) -> Any:
        return self.prompt_of(record)

    def predict(self, model, tokenizer, inputs, batch_size: int = 32, **generation):
        """Continue each prompt; returns the completion text (up to the eos) and the number of tokens generated.

        Prompts are batched only with prompts of the same token length: no padding, so a batch gives exactly the
        tokens that one-at-a-time generation gives."""
        import torch
        prompts = [self.prompt_of(x) for x in inputs]
        settings = {**self.specs.generation.model_dump(), **generation}
        encoded = [self._prompt_ids(p, tokenizer) for p in prompts]
        if any(not ids for ids in encoded):
            raise ValidationError("An empty prompt, and the tokenizer has no bos/eos token to start from",
                                  suggestions=["give a non-empty prompt"])
        eos = self.eos_id(tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        by_length: dict[int, list[int]] = {}
        for i, ids in enumerate(encoded):
            by_length.setdefault(len(ids), []).append(i)
        device = next(model.parameters()).device
        results: list[dict[str, Any]] = [{}] * len(prompts)
        model.eval()
        with torch.inference_mode():
            for length, members in sorted(by_length.items()):
                for start in range(0, len(members), batch_size):
                    idx = members[start:start + batch_size]
                    ids = torch.tensor([encoded[i] for i in idx], device=device)
                    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), eos_token_id=eos,
                                         pad_token_id=pad, **settings)
                    for row, i in enumerate(idx):
                        new = out[row, length:].tolist()
                        if eos is not None and eos in new:
                            new = new[:new.index(eos)]
                        results[i] = {"prompt": prompts[i], "completion": tokenizer.decode(new, skip_special_tokens=True),
                                      "generated_tokens": len(new)}
        return results
