"""`tunepipe init TASK`: a commented starter specs file built from the task's own defaults.

The starter names the same kind of model as the task's example in examples/ (an encoder for the encoder tasks,
a bert2bert for the seq2seq tasks, a decoder for causal LM) and the columns of the task's example record, so that
a file from `init` trains on data laid out like that record (and on examples/data/) once its paths are filled in.
"""
from __future__ import annotations

import copy
import json
import re
import textwrap
from pathlib import Path

import yaml

# a decoder built from config with a tokenizer trained on the data: the one decoder that trains offline from a fresh
# install (examples/causal_lm.yaml); a pretrained one is named in the comment
DECODER_STARTER = {"from_config": {"model_type": "gpt2", "n_embd": 256, "n_layer": 4, "n_head": 4,
                                   "n_positions": 512}}
DECODER_TOKENIZER = {"train": {"type": "bpe", "vocab_size": 8000}}

COMMENTS = {
    "task": "which task; `tunepipe tasks` lists them",
    "output_dir": "model/, specs.yaml, metrics.json, train_log.jsonl and a model card go here",
    "data": "jsonl / json / csv / tsv / parquet / txt / CoNLL files, or a datasets hub id",
    "training": "transformers TrainingArguments names; bf16 'auto' = on where the device runs it fast",
    "backend": "hf (transformers Trainer)",
}
MODEL_COMMENTS = {
    "encoder": "local dir, hub id, or 'minilm' (the bundled pretrained encoder); or from_config: {model_type: "
               "bert, ...}",
    "encoder_decoder": "a bert2bert warm-started from the bundled MiniLM (offline); or name_or_path: a T5/BART dir. "
                       "A decoder-only LM (name_or_path: HuggingFaceTB/SmolLM2-135M-Instruct, GPT-2, LLaMA) also "
                       "works: the source becomes a prompt (examples/summarization_decoder.yaml)",
    "decoder": "a small GPT-2 from config (runs offline); for a useful model a pretrained decoder instead: "
               "name_or_path: HuggingFaceTB/SmolLM2-135M-Instruct (or a local folder), and drop the tokenizer "
               "section",
}
TOKENIZER_COMMENT = "a byte-level BPE tokenizer trained on data.train, saved with the model"
GENERATION_COMMENT = ("decoding for evaluation and predict, the encoder-decoder defaults; a decoder-only model decodes "
                      "greedily: num_beams: 1, no_repeat_ngram_size: 0 (README, Tasks)")


def model_kind(task_cls) -> str:
    """'decoder', 'encoder_decoder' or 'encoder': what the task's starter file (and its example) trains."""
    if getattr(task_cls, "starter_model", None):
        return "encoder_decoder"
    if task_cls.auto_model_class == "AutoModelForCausalLM":
        return "decoder"
    return "encoder"


def starter_body(task_cls) -> dict:
    """The specs a starter file holds, as a dict (``starter_yaml`` adds the comments)."""
    defaults = task_cls.default_specs()
    kind = model_kind(task_cls)
    body: dict = {"task": task_cls.name, "output_dir": f"runs/{task_cls.name}"}
    if kind == "encoder_decoder":
        body["model"] = dict(task_cls.starter_model)
    elif kind == "decoder":
        body["model"] = copy.deepcopy(DECODER_STARTER)
        body["tokenizer"] = copy.deepcopy(DECODER_TOKENIZER)
    else:
        body["model"] = {"name_or_path": "minilm"}
    body["data"] = {"train": "data/train.jsonl", "validation": "data/validation.jsonl", **defaults.get("data", {})}
    body["training"] = {"num_train_epochs": 3, "learning_rate": 5.0e-5, **defaults.get("training", {}),
                        "bf16": "auto"}
    if defaults.get("generation"):
        body["generation"] = defaults["generation"]
    body["backend"] = "hf"
    return body


HEADER = "# tunepipe specs for "  # the first line of every starter file: `init --force` replaces only such a file
_HEADER_LINE = re.compile(re.escape(HEADER) + r"[\w.-]+: ")


def is_starter_file(path: Path) -> bool:
    """Whether ``path`` is a file that `tunepipe init` wrote (its first line is the starter's header; the rest may
    have been edited): the only kind of existing file `init --force` replaces."""
    try:
        with open(path, "rb") as f:
            first = f.readline(400).decode("utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return False
    return bool(_HEADER_LINE.match(first))


def starter_yaml(task_cls) -> str:
    kind = model_kind(task_cls)
    lines = [f"{HEADER}{task_cls.name}: {task_cls.description}",
             "# Run: tunepipe train THIS_FILE [--set training.learning_rate=3e-5]",
             "# examples/ in the tunepipe repository has a runnable version of each task with sample data", ""]
    comments = {**COMMENTS, "model": MODEL_COMMENTS[kind], "tokenizer": TOKENIZER_COMMENT,
                "generation": GENERATION_COMMENT}
    for key, value in starter_body(task_cls).items():
        if key in comments:
            lines += textwrap.wrap(comments[key], 116, initial_indent="# ", subsequent_indent="#   ")
        lines.append(yaml.safe_dump({key: value}, sort_keys=False).rstrip())
        if key == "data":
            # json keeps a record on one line (yaml would fold a text holding a newline onto several)
            example = json.dumps(task_cls.example_data, ensure_ascii=False)
            lines.append(f"  # one record looks like: {example}")
    return "\n".join(lines) + "\n"
