"""Sequence to sequence: translation, summarization and text-to-text generation with encoder-decoder models, or
with decoder-only models, where the source becomes a prompt and the target its completion (seq2seq_decoder.py).

Evaluation generates (predict-with-generate) with the specs' ``generation`` settings, never the library's 20-token
default, and scores the generated text against the references *as written in the data* (all of them when a record
has several), not against labels decoded back from token ids: an uncased or lossy tokenizer must not flatter BLEU.
Predictions are matched to their records by their label ids, so evaluation batches may be length-grouped.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import ValidationError
from ..modeling.limits import LengthSetting
from . import seq2seq_decoder, seq2seq_generation
from .base import Task
from .causal_lm import CausalLMCollator
from .seq2seq_generation import (  # noqa: F401 - BEAM_ONLY, SAMPLING_ONLY importable from here as before
    BEAM_ONLY, DECODER_ONLY_GENERATION, SAMPLING_ONLY)
from .seq2seq_metrics import bleu_chrf, exact_match, generated_lengths, rouge

# warm-up: an encoder-decoder warm-started from pretrained encoders has new, randomly initialised cross-attention
_TRAINING = {"per_device_train_batch_size": 16, "per_device_eval_batch_size": 32, "learning_rate": 5e-5,
             "num_train_epochs": 3, "warmup_steps": 0.1}


class Seq2SeqTask(Task):
    """Shared by the three seq2seq tasks; subclasses choose columns, generation defaults and metrics."""

    generative = True
    # generation.max_new_tokens is not lowered with them: on a decoder-only model the prompt shares its positions,
    # so no single value is right; over an encoder-decoder's decoder limit it is refused at setup (limits.py)
    capped_lengths = (("data.max_length", "input", 0), ("data.max_target_length", "output", 0))
    auto_model_class = "AutoModelForSeq2SeqLM"
    peft_task_type = "SEQ_2_SEQ_LM"
    output_key = "generated_text"
    # what a starter specs file should load: the only pretrained seq2seq available offline (bert2bert from MiniLM)
    starter_model = {"encoder_decoder": "minilm"}

    def __init__(self, specs):
        super().__init__(specs)
        self.tokenizer = None  # set by preprocess/predict: compute_metrics decodes with it
        self.decoder_start_token_id: int | None = None  # set once the model is known
        self._references: dict[str, dict[tuple[int, ...], list[str]]] = {}
        self.decoder_only = False  # set by adopt_config: a causal LM completes prompts instead

    @classmethod
    def default_specs(cls, model: Any = None) -> dict[str, Any]:
        specs = super().default_specs()
        if model is not None and seq2seq_decoder.names_a_decoder_only_model(model):
            specs["generation"] = {**specs.get("generation", {}), **DECODER_ONLY_GENERATION}
        return specs

    def adopt_config(self, config) -> None:
        self.decoder_only = seq2seq_decoder.is_decoder_only(config)
        self.auto_model_class = "AutoModelForCausalLM" if self.decoder_only else "AutoModelForSeq2SeqLM"
        self.peft_task_type = "CAUSAL_LM" if self.decoder_only else "SEQ_2_SEQ_LM"

    # ---- columns -----------------------------------------------------------------------------------------
    def column(self, role: str) -> str:
        """'source'/'target' columns; text_column / label_column are accepted as their aliases."""
        data, defaults = self.specs.data, self.defaults.get("data", {})
        if role in ("source", "text"):
            default = defaults.get("source_column", "source")
            if data.text_column and data.source_column in (None, default):
                return data.text_column
            return data.source_column or default
        if role in ("target", "label"):
            default = defaults.get("target_column", "target")
            if data.label_column and data.target_column in (None, default):
                return data.label_column
            return data.target_column or default
        return super().column(role)

    @property
    def _languages(self) -> tuple[str, str] | None:
        data = self.specs.data
        return (data.source_lang, data.target_lang) if data.source_lang and data.target_lang else None

    def required_columns(self) -> list[str]:
        # with languages, a record holds {"translation": {lang: text}} or one column per language (checked per record)
        return [] if self._languages else [self.column("source"), self.column("target")]

    def _side(self, record: dict[str, Any], side: int) -> Any:
        if self._languages:
            lang = self._languages[side]
            pair = record.get("translation")
            return pair.get(lang) if isinstance(pair, dict) else record.get(lang)
        return record.get(self.column("source" if side == 0 else "target"))

    def source_text(self, record: dict[str, Any]) -> Any:
        return self._side(record, 0)

    def target_text(self, record: dict[str, Any]) -> Any:
        return self._side(record, 1)

    def _where(self, side: int) -> str:
        if self._languages:
            return f"'translation.{self._languages[side]}'"
        return f"column '{self.column('source' if side == 0 else 'target')}'"

    def references_of(self, record: dict[str, Any]) -> list[str]:
        """All reference texts of a record: the references column when present, else the target."""
        col = self.specs.data.references_column
        refs = record.get(col) if col else None
        if isinstance(refs, list) and refs and all(isinstance(r, str) and r.strip() for r in refs):
            return list(refs)
        return [self.target_text(record)]

    def validate_record(self, record: dict[str, Any], split: str) -> str | None:
        source = self.source_text(record)
        if not isinstance(source, str) or not source.strip():
            hint = " (set data.source_lang/target_lang to the keys of the 'translation' dict)" if (
                "translation" in record and not self._languages) else ""
            return f"{self._where(0)} is missing, empty or not text{hint}"
        target = self.target_text(record)
        if target is None and split == "test":
            return None
        if not isinstance(target, str) or not target.strip():
            return f"{self._where(1)} is missing, empty or not text"
        col = self.specs.data.references_column
        refs = record.get(col) if col else None
        if refs is not None and not (isinstance(refs, list) and all(isinstance(r, str) for r in refs)):
            return f"column '{col}' must be a list of reference texts"
        return None

    def input_from_record(self, record: dict[str, Any]) -> Any:
        return self.source_text(record)

    def prepare_input(self, item: Any, where: str) -> Any:
        text = item if isinstance(item, str) else self.input_from_record(item) if isinstance(item, dict) else None
        if not isinstance(text, str):
            raise ValidationError(f"{where} must be a text or a record with the source text, got "
                                  f"{type(item).__name__}", suggestions=['pass "a source text"'])
        return item

    def tokenizer_training_texts(self, rows: Sequence[dict[str, Any]]) -> list[str]:
        """Source and target text, for a tokenizer trained on the training data (tokenizer.train)."""
        texts = [self.source_text(r) for r in rows] + [self.target_text(r) for r in rows]
        return [t for t in texts if isinstance(t, str)]

    # ---- tokenizing --------------------------------------------------------------------------------------
    def _sources(self, texts: Sequence[str]) -> list[str]:
        prefix = self.specs.data.source_prefix or ""
        suffix = "" if self.decoder_only else self.specs.data.source_suffix or ""
        return [prefix + t + suffix for t in texts]

    def _prompts(self, texts: Sequence[str], tokenizer) -> list[list[int]]:
        data = self.specs.data
        suffix = data.source_suffix
        if suffix is None:
            suffix = seq2seq_decoder.DEFAULT_SUFFIXES[self.name]
        return seq2seq_decoder.encode_prompts(self._sources(texts), suffix, tokenizer, data.max_length,
                                           data.max_target_length)

    def _start_to_strip(self, tokenizer) -> int | None:
        """The decoder is fed its start token before the first label; a label that repeats it (BERT's [CLS])
        would spend a step predicting it. BART-style targets (<s>, decoder start </s>) are kept as they are."""
        if self.decoder_start_token_id is not None:
            return self.decoder_start_token_id
        return tokenizer.cls_token_id if tokenizer.bos_token_id is None else None

    def encode_targets(self, targets: Sequence[str], tokenizer) -> list[list[int]]:
        """Target ids that end with the end-of-text token (eos, or BERT's [SEP]) even when truncated."""
        limit = self.specs.data.max_target_length
        ids = tokenizer(text_target=list(targets), max_length=limit, truncation=True)["input_ids"]
        start = self._start_to_strip(tokenizer)
        end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        out = []
        for row in ids:
            row = list(row)
            if start is not None and row and row[0] == start:
                row = row[1:]
            if end is not None and (not row or row[-1] != end):
                row = row[:limit - 1] if limit else row
                row.append(end)
            out.append(row)
        return out

    def bind_tokenizer(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def preprocess(self, batch, tokenizer):
        self.tokenizer = tokenizer
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        targets = [self.target_text(r) for r in rows]
        labelled = all(isinstance(t, str) for t in targets)
        if self.decoder_only:
            prompts = self._prompts([self.source_text(r) for r in rows], tokenizer)
            limit = self.specs.data.max_target_length
            completions = seq2seq_decoder.encode_completions(targets, tokenizer, limit) if labelled else None
            return seq2seq_decoder.prompt_completion_rows(prompts, completions)
        enc = tokenizer(self._sources([self.source_text(r) for r in rows]), max_length=self.specs.data.max_length,
                        truncation=True)
        enc["length"] = [len(ids) for ids in enc["input_ids"]]
        if labelled:
            enc["labels"] = self.encode_targets(targets, tokenizer)
        return enc

    def bind_eval_data(self, split: str, records: list[dict[str, Any]], features) -> None:
        """Remember the references of each evaluation record under its label ids."""
        super().bind_eval_data(split, records, features)
        if "labels" not in features.column_names:
            return
        index: dict[tuple[int, ...], list[str]] = {}
        for record, labels in zip(records, features["labels"]):
            index.setdefault(tuple(t for t in labels if t >= 0), self.references_of(record))
        self._references[split] = index

    def collator(self, tokenizer):
        if self.decoder_only:
            return CausalLMCollator(tokenizer.pad_token_id)
        from transformers import DataCollatorForSeq2Seq
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, pad_to_multiple_of=8)

    def generation_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """What generate() gets from an evaluation batch: the source, or for a decoder-only model the prompts
        (the tokens before each row's labels), left-padded."""
        if not self.decoder_only:
            return {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else 0
        return seq2seq_decoder.left_padded(seq2seq_decoder.prompts_of_batch(batch), pad, batch["input_ids"].device)

    def generated_part(self, ids, inputs: dict[str, Any]):
        """The new tokens of generate()'s output: a decoder-only model returns the prompt in front of them."""
        return ids[:, inputs["input_ids"].shape[1]:] if self.decoder_only else ids

    # ---- model -------------------------------------------------------------------------------------------
    def generation_kwargs(self) -> dict[str, Any]:
        """What model.generate() gets: only settings that apply (no beam options for greedy search, no sampling
        options without do_sample), so transformers neither warns nor refuses to save the generation config."""
        return seq2seq_generation.generation_kwargs(self.specs.generation)

    def configure_model(self, model, tokenizer) -> None:
        """Give the model its start/end/pad ids and the specs' generation settings, which save_pretrained writes
        to generation_config.json: plain transformers then generates the same text without extra arguments."""
        seq2seq_generation.configure_generation(model, tokenizer, self.generation_kwargs(), self.decoder_only)
        self.decoder_start_token_id = getattr(model.config, "decoder_start_token_id", None)

    def on_model_loaded(self, model) -> None:
        self.adopt_config(model.config)  # a reloaded model (or an adapter's base) says how to prompt it
        self.decoder_start_token_id = getattr(model.config, "decoder_start_token_id", None)
        super().on_model_loaded(model)  # lengths held to the model's positions

    def length_settings(self) -> list[Any]:
        """Encoder-decoder: sources on the encoder; targets and generated tokens (after the start token) on the
        decoder. Decoder-only: prompt and completion share one stack, within data.max_length."""
        data = self.specs.data
        settings = [LengthSetting("data.max_length", data.max_length, "input")]
        if not self.decoder_only:
            settings += [LengthSetting("data.max_target_length", data.max_target_length, "output"),
                         LengthSetting("generation.max_new_tokens", self.specs.generation.max_new_tokens, "output",
                                       extra=1)]
        return settings

    # ---- evaluation --------------------------------------------------------------------------------------
    def preprocess_logits_for_metrics(self, logits, labels):
        return logits  # generated ids arrive already reduced

    def score(self, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        raise NotImplementedError

    def _label_references(self, label_ids, tokenizer) -> list[list[str]]:
        index = self._references.get(self.eval_split, {})
        pad = tokenizer.pad_token_id
        out = []
        for row in label_ids:
            key = [int(t) for t in row if t >= 0]
            while key and key[-1] == pad and pad not in (tokenizer.eos_token_id, tokenizer.sep_token_id):
                key.pop()  # Seq2SeqTrainer pads labels with the pad id, batches are joined with -100
            refs = index.get(tuple(key))
            out.append(refs if refs is not None else [tokenizer.decode(key, skip_special_tokens=True).strip()])
        return out

    def compute_metrics(self, eval_pred) -> dict[str, float]:
        """Decode generated ids (-100 fill allowed), score against the records' references, add lengths."""
        tokenizer = self.tokenizer
        if tokenizer is None:
            raise RuntimeError("compute_metrics needs the tokenizer: run preprocess or predict first")
        predictions = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        predictions = np.asarray(predictions)
        predictions = np.where(predictions < 0, tokenizer.pad_token_id, predictions)
        texts = [t.strip() for t in tokenizer.batch_decode(predictions, skip_special_tokens=True)]
        metrics = self.score(texts, self._label_references(np.asarray(eval_pred.label_ids), tokenizer))
        metrics.update(generated_lengths(predictions, tokenizer.all_special_ids))
        return metrics

    # ---- inference ---------------------------------------------------------------------------------------
    def predict(self, model, tokenizer, inputs, batch_size: int = 32, **generation) -> list[dict[str, Any]]:
        """Generated text per input (a text, or a record with the source column); ``generation`` overrides the
        specs' settings for this call, e.g. ``num_beams=1``."""
        import torch

        self.tokenizer = tokenizer
        texts = [x if isinstance(x, str) else self.input_from_record(x) for x in inputs]
        kwargs = {**self.generation_kwargs(), **generation}
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[dict[str, Any]] = [{}] * len(texts)
        device = next(model.parameters()).device
        model.eval()
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                if self.decoder_only:
                    enc = seq2seq_decoder.left_padded(self._prompts([texts[i] for i in idx], tokenizer),
                                                   tokenizer.pad_token_id, device)
                else:
                    enc = tokenizer(self._sources([texts[i] for i in idx]), max_length=self.specs.data.max_length,
                                    truncation=True, padding=True, return_tensors="pt").to(device)
                enc = {k: enc[k] for k in ("input_ids", "attention_mask")}
                ids = self.generated_part(model.generate(**enc, **kwargs), enc)
                for i, text in zip(idx, tokenizer.batch_decode(ids, skip_special_tokens=True)):
                    out[i] = {self.output_key: text.strip()}
        return out


class TranslationTask(Seq2SeqTask):
    name = "translation"
    description = ("Translate text: source/target columns or {'translation': {lang: text}} records; "
                   "sacreBLEU, chrF, generated length")
    output_key = "translation_text"
    defaults = {
        "data": {"source_column": "source", "target_column": "target", "max_length": 128, "max_target_length": 128},
        "training": {**_TRAINING, "metric_for_best_model": "bleu"},
        "generation": {"max_new_tokens": 128, "num_beams": 4},
    }
    example_data = {"source": "A man rides a bike.", "target": "Ein Mann fährt Fahrrad."}

    def score(self, predictions, references):
        return bleu_chrf(predictions, references)


class SummarizationTask(Seq2SeqTask):
    name = "summarization"
    description = "Summarize documents: document/summary columns (+ optional references list); ROUGE-1/2/L/Lsum"
    output_key = "summary_text"
    defaults = {
        "data": {"source_column": "document", "target_column": "summary", "references_column": "references",
                 "max_length": 512, "max_target_length": 128},
        "training": {**_TRAINING, "metric_for_best_model": "rougeL"},
        "generation": {"max_new_tokens": 128, "num_beams": 4, "no_repeat_ngram_size": 3},
    }
    example_data = {"document": "We propose a method that ... Experiments show ...",
                    "summary": "A method that does X better than Y."}

    def score(self, predictions, references):
        return rouge(predictions, references)


class TextGenerationTask(Seq2SeqTask):
    """Any text-to-text job (question generation, paraphrase, data-to-text). ROUGE measures overlap with the
    reference and exact match catches short, closed answers; no single metric fits every such job."""

    name = "text_generation"
    description = "Text-to-text generation: source/target columns; ROUGE-1/2/L/Lsum, exact match, generated length"
    defaults = {
        "data": {"source_column": "source", "target_column": "target", "max_length": 256, "max_target_length": 128},
        "training": {**_TRAINING, "metric_for_best_model": "rougeL"},
        "generation": {"max_new_tokens": 64, "num_beams": 1},
    }
    example_data = {"source": "question: where is the Eiffel tower?", "target": "in Paris"}

    def score(self, predictions, references):
        return {**rouge(predictions, references), **exact_match(predictions, references)}
