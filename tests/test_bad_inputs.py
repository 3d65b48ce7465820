"""The bad-input suite: every user mistake ends in a typed error that names the field / file / line, suggests a
fix, exits the CLI with code 2 (no traceback), and leaves nothing half-written behind.

Each case is run through ``tunepipe.cli.main`` in-process with a specs file written to a fresh directory; the
error object the CLI prints is captured, so one run checks the error class and code, the location, the
suggestions, the exit code, what stderr says, and a hash of every file under the case's directory before and
after (an output_dir that did not exist stays absent; a previous good run or checkpoint stays byte-identical).

Cases by category (ids below):
  specs (30): wrong-type, negative-lr, section-not-mapping, range, duplicate-labels, empty-labels,
    validation-split-beside-validation, warmup-ratio-above-one, unknown-top-key, unknown-section-key,
    unknown-nested-key, missing-task, unknown-task, invalid-choice, invalid-backend, peft-method-for-task,
    quantization-without-peft, qlora-without-bitsandbytes, qlora-unsupported-device, fp16-without-cuda,
    fp16-and-bf16, eval-steps-without-validation, best-model-without-validation, metric-not-produced,
    streaming-without-max-steps, override-without-value, file-not-found, file-not-mapping, tokenizer-train-pretrained,
    from-config-without-model-type
  data (21): no-train, missing-file, folder-without-data-files, unknown-extension, empty-file, json-array-line,
    malformed-json-file, json-not-records, wrong-source-type, missing-column-qa, csv-wrong-header,
    conll-one-column, length-mismatch, unknown-tag, unknown-declared-label, empty-tokens, empty-text-csv,
    text-not-string, non-utf8-csv, parquet-unreadable, qa-answer-misplaced
  models (14): missing-path, dir-without-config, dir-without-files-and-no-tokenizer, path-is-a-file, not-given,
    corrupt-config, truncated-weights, wrong-task-head,
    encoder-only-for-seq2seq, tokenizer-missing, tokenizer-vocab-too-large, tokenizer-no-pad,
    hub-id-offline, from-config-invalid
  checkpoints (4): not-a-checkpoint, missing, truncated-weights, different-specs
  paths (6): output-under-file, output-is-file, output-holds-other-run, output-is-data-dir,
    output-contains-data-file, evaluate-without-model
  total: 75
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from tunepipe.trainers.resume import DamagedCheckpoint
from tunepipe.errors import (CheckpointError, ConfigError, CudaError, DatasetLoadError, DependencyError,
                             ModelError, ModelNotFoundError, TaskTypeError, TunepipeIOError, ValidationError)

from conftest import TINY_BERT, write_jsonl

NER_ROWS = [{"tokens": ["Ada", "lives", "in", "Paris"], "ner_tags": ["B-PER", "O", "O", "B-LOC"]},
            {"tokens": ["Greta", "left", "Lisbon", "."], "ner_tags": ["B-PER", "O", "B-LOC", "O"]},
            {"tokens": ["Rosa", "Varga", "met", "Ada"], "ner_tags": ["B-PER", "I-PER", "O", "B-PER"]}]
CLS_ROWS = [{"text": "a warm and funny film", "label": "pos"}, {"text": "a dull film", "label": "neg"},
            {"text": "i loved every minute", "label": "pos"}]
QA_ROWS = [{"id": "q1", "question": "Where was Ada born?", "context": "Ada was born in London.",
            "answers": {"text": ["London"], "answer_start": [16]}},
           {"id": "q2", "question": "Who left Lisbon?", "context": "Greta left Lisbon in May.",
            "answers": {"text": ["Greta"], "answer_start": [0]}}]


# ---- the environment a case builds its specs in ----------------------------------------------------------------
class Env:
    def __init__(self, root: Path, request):
        self.root = root
        self.out = root / "run"
        self._request = request

    def fixture(self, name: str):
        return self._request.getfixturevalue(name)

    def write(self, name: str, content: str | bytes) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return str(path)

    def jsonl(self, name: str, rows) -> str:
        return str(write_jsonl(self.root / name, rows))

    def specs(self, task: str = "token_classification", data: dict | None = None, **sections) -> dict:
        if data is None:
            data = {"train": self.jsonl("train.jsonl", NER_ROWS)}
        specs = {"task": task, "output_dir": str(self.out), "model": {"from_config": dict(TINY_BERT)},
                 "tokenizer": {"name_or_path": self.fixture("tokenizer_dir")}, "data": data,
                 "training": {"max_steps": 1, "per_device_train_batch_size": 2, "save_strategy": "no",
                              "eval_strategy": "no", "disable_tqdm": True, "bf16": False,
                              "dataloader_pin_memory": False}}
        for key, value in sections.items():
            specs[key] = {**specs.get(key, {}), **value} if isinstance(value, dict) else value
        return specs

    def ner(self, **sections) -> dict:
        return self.specs("token_classification", **sections)

    def cls(self, train_rows=CLS_ROWS, **data) -> dict:
        return self.specs("text_classification", {"train": self.jsonl("train.jsonl", train_rows), **data})


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Env], Any]  # -> a specs dict (written to c.yaml) or the path of a specs file as is
    error: type
    code: str
    field: str | None = None
    file: str | None = None  # the error names a file whose path ends with this
    line: int | None = None
    hint: str | None = None  # some suggestion contains this (case-insensitive)
    command: str = "train"
    cli_args: tuple[str, ...] = ()
    prior: str | None = None  # "same": output_dir already holds a good run of these specs; "other": of other specs
    patch: Callable[[Any], None] | None = None  # (monkeypatch) -> None: simulate a device / a missing package


# ---- specs --------------------------------------------------------------------------------------------------------
def _no_bitsandbytes(mp):
    mp.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError


def _mps_device(mp):
    import tunepipe.modeling.quantization
    mp.setattr(tunepipe.modeling.quantization, "training_device", lambda specs=None: "mps")


def _no_cuda(mp):
    import torch
    mp.setattr(torch.cuda, "is_available", lambda: False)


QLORA = {"peft": {"method": "qlora", "r": 4}, "quantization": {"load_in_4bit": True}}

SPECS_CASES = [
    Case("specs-wrong-type", lambda e: e.ner(training={"per_device_train_batch_size": "eight"}), ConfigError,
         "CONFIG_ERROR", field="training.per_device_train_batch_size", hint="integer"),
    Case("specs-negative-lr", lambda e: e.ner(training={"learning_rate": -1e-4}), ConfigError, "CONFIG_ERROR",
         field="training.learning_rate", hint="greater than 0"),
    Case("specs-section-not-mapping", lambda e: {**e.ner(), "training": 5}, ConfigError, "CONFIG_ERROR",
         field="training", hint="training: {"),
    Case("specs-range", lambda e: e.ner(data={"train": e.jsonl("t.jsonl", NER_ROWS), "validation_split": 1.5}),
         ConfigError, "CONFIG_ERROR", field="data.validation_split", hint="less than 1"),
    Case("specs-duplicate-labels",
         lambda e: e.ner(data={"train": e.jsonl("t.jsonl", NER_ROWS), "labels": ["O", "B-PER", "I-PER", "O"]}),
         ConfigError, "CONFIG_ERROR", field="data.labels", hint="once"),
    Case("specs-empty-labels", lambda e: e.ner(data={"train": e.jsonl("t.jsonl", NER_ROWS), "labels": []}),
         ConfigError, "CONFIG_ERROR", field="data.labels", hint="leave data.labels out"),
    Case("specs-validation-split-beside-validation",
         lambda e: e.ner(data={"train": e.jsonl("t.jsonl", NER_ROWS), "validation": e.jsonl("v.jsonl", NER_ROWS),
                               "validation_split": 0.2}),
         ConfigError, "CONFIG_ERROR", field="data.validation_split", hint="remove data.validation_split"),
    Case("specs-warmup-ratio-above-one", lambda e: e.ner(training={"warmup_ratio": 5}), ConfigError, "CONFIG_ERROR",
         field="training.warmup_ratio", hint="warmup_steps"),
    Case("specs-unknown-top-key", lambda e: {**e.ner(), "outptu_dir": "x"}, ConfigError, "CONFIG_ERROR",
         field="outptu_dir", hint="output_dir"),
    Case("specs-unknown-section-key", lambda e: e.ner(tokenizer={"use_fats": False}), ConfigError, "CONFIG_ERROR",
         field="tokenizer.use_fats", hint="use_fast"),
    Case("specs-unknown-nested-key", lambda e: e.ner(generation={"num_beam": 2}), ConfigError, "CONFIG_ERROR",
         field="generation.num_beam", hint="num_beams"),
    Case("specs-missing-task", lambda e: {k: v for k, v in e.ner().items() if k != "task"}, ConfigError,
         "CONFIG_ERROR", field="task", hint="task: token_classification"),
    Case("specs-unknown-task", lambda e: {**e.ner(), "task": "summarisation"}, TaskTypeError, "TASK_TYPE_ERROR",
         field="task", hint="summarization"),
    Case("specs-invalid-choice", lambda e: e.ner(peft={"method": "loraa"}), ConfigError, "CONFIG_ERROR",
         field="peft.method", hint="'lora'"),
    Case("specs-invalid-backend", lambda e: {**e.ner(), "backend": "deepspeed"}, ConfigError, "CONFIG_ERROR",
         field="backend", hint="accelerate"),
    Case("specs-peft-method-for-task", lambda e: e.ner(peft={"method": "prompt_tuning"}), ConfigError,
         "CONFIG_ERROR", field="peft.method", hint="lora"),
    Case("specs-quantization-without-peft", lambda e: e.ner(quantization={"load_in_4bit": True}), ConfigError,
         "CONFIG_ERROR", field="quantization.load_in_4bit", hint="peft: {method: lora}"),
    Case("specs-qlora-without-bitsandbytes", lambda e: e.ner(**QLORA), DependencyError, "IMPORT_ERROR",
         field="quantization.load_in_4bit", hint="bitsandbytes", patch=_no_bitsandbytes),
    Case("specs-qlora-unsupported-device", lambda e: e.ner(**QLORA), CudaError, "CUDA_ERROR",
         field="quantization.load_in_4bit", hint="lora", patch=_mps_device),
    Case("specs-fp16-without-cuda", lambda e: e.ner(training={"fp16": True}), CudaError, "CUDA_ERROR",
         field="training.fp16", hint="remove fp16", patch=_no_cuda, prior="same"),
    Case("specs-fp16-and-bf16", lambda e: e.ner(training={"fp16": True, "bf16": True}), ConfigError,
         "CONFIG_ERROR", field="training.bf16", hint="one of"),
    Case("specs-eval-steps-without-validation", lambda e: e.ner(training={"eval_strategy": "steps"}), ConfigError,
         "CONFIG_ERROR", field="training.eval_strategy", hint="data.validation"),
    Case("specs-best-model-without-validation",
         lambda e: e.ner(training={"eval_strategy": "epoch", "save_strategy": "epoch",
                                   "load_best_model_at_end": True}),
         ConfigError, "CONFIG_ERROR", field="training.load_best_model_at_end", hint="validation_split"),
    Case("specs-metric-not-produced",
         lambda e: e.ner(data={"train": e.jsonl("t.jsonl", NER_ROWS), "validation": e.jsonl("v.jsonl", NER_ROWS)},
                         training={"eval_strategy": "epoch", "metric_for_best_model": "f1_score"}),
         ConfigError, "CONFIG_ERROR", field="training.metric_for_best_model", hint="'f1'"),
    Case("specs-streaming-without-max-steps",
         lambda e: e.ner(data={"train": e.jsonl("t.jsonl", NER_ROWS), "streaming": True,
                               "labels": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]},
                       training={"max_steps": -1}), ConfigError,
         "CONFIG_ERROR", field="training.max_steps", hint="max_steps"),
    Case("specs-override-without-value", lambda e: e.ner(), ConfigError, "CONFIG_ERROR",
         field="training.learning_rate", hint="--set training.learning_rate=3e-5",
         cli_args=("--set", "training.learning_rate")),
    Case("specs-file-not-found", lambda e: e.root / "nr.yaml", ConfigError, "CONFIG_ERROR", file="nr.yaml",
         hint="tunepipe init"),
    Case("specs-file-not-mapping", lambda e: Path(e.write("list.yaml", "- task: ner\n- model: minilm\n")),
         ConfigError, "CONFIG_ERROR", file="list.yaml", hint="task:"),
    Case("specs-tokenizer-train-pretrained",
         lambda e: {**e.ner(), "model": {"name_or_path": "minilm"}, "tokenizer": {"train": {"type": "wordpiece"}}},
         ConfigError, "CONFIG_ERROR", field="tokenizer.train", hint="remove tokenizer.train"),
    Case("specs-from-config-without-model-type", lambda e: {**e.ner(), "model": {"from_config": {"hidden_size": 32}}},
         ConfigError, "CONFIG_ERROR", field="model.from_config.model_type", hint="model_type: bert"),
]


# ---- data ---------------------------------------------------------------------------------------------------------
def _csv(rows) -> str:
    return "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows)


def _parquet_garbage(e: Env) -> dict:
    return e.cls() | {"data": {"train": e.write("train.parquet", b"PAR1 this is not a parquet file at all")}}


def _misspelt_validation(e: Env) -> dict:
    e.jsonl("validation.jsonl", NER_ROWS)  # the file the user meant
    return e.ner(data={"train": e.jsonl("train.jsonl", NER_ROWS), "validation": str(e.root / "valid.jsonl")})


DATA_CASES = [
    Case("data-no-train", lambda e: e.ner(data={"validation": e.jsonl("v.jsonl", NER_ROWS)}), DatasetLoadError,
         "DATASET_LOAD_ERROR", field="data.train", hint="data.train"),
    Case("data-missing-file", _misspelt_validation,
         DatasetLoadError, "DATASET_LOAD_ERROR", field="data.validation", file="valid.jsonl",
         hint="validation.jsonl", prior="same"),
    Case("data-folder-without-data-files", lambda e: e.ner(data={"train": str(Path(e.write("d/notes.md", "x")).parent)}),
         DatasetLoadError, "DATASET_LOAD_ERROR", field="data.train", file="/d", hint="save_to_disk"),
    Case("data-unknown-extension", lambda e: e.ner(data={"train": e.write("train.xlsx", "x")}), DatasetLoadError,
         "DATASET_LOAD_ERROR", field="data.train", file="train.xlsx", hint="data.format"),
    Case("data-empty-file",
         lambda e: e.ner(data={"train": e.jsonl("t.jsonl", NER_ROWS), "validation": e.write("v.jsonl", "\n\n")}),
         DatasetLoadError, "DATASET_LOAD_ERROR", field="data.validation", file="v.jsonl", hint="empty"),
    Case("data-json-array-line",
         lambda e: e.ner(data={"train": e.write("t.jsonl", json.dumps(NER_ROWS[0]) + "\n\n[1, 2]\n")}),
         DatasetLoadError, "DATASET_LOAD_ERROR", file="t.jsonl", line=3, hint="each line must look like"),
    Case("data-malformed-json-file",
         lambda e: e.ner(data={"train": e.write("t.json", json.dumps(NER_ROWS[0]) + '\n{"tokens": ["a"],\n')}),
         DatasetLoadError, "DATASET_LOAD_ERROR", file="t.json", line=2, hint="fix or delete that line"),
    Case("data-json-not-records", lambda e: e.ner(data={"train": e.write("t.json", '"just a string"')}),
         DatasetLoadError, "DATASET_LOAD_ERROR", file="t.json", hint="one object per line"),
    Case("data-wrong-source-type", lambda e: e.ner(data={"train": 5}), DatasetLoadError, "DATASET_LOAD_ERROR",
         field="data.train", hint="path"),
    Case("data-missing-column-qa",
         lambda e: e.specs("question_answering", {"train": e.jsonl("qa.jsonl", [
             {("contxt" if k == "context" else k): v for k, v in r.items()} for r in QA_ROWS])}),
         DatasetLoadError, "DATASET_LOAD_ERROR", field="data.text_pair_column", file="qa.jsonl", hint="'contxt'"),
    Case("data-csv-wrong-header",
         lambda e: e.cls() | {"data": {"train": e.write("t.csv", "sentence,sentiment\ngood film,pos\n")}},
         DatasetLoadError, "DATASET_LOAD_ERROR", field="data.text_column", file="t.csv", hint="sentence"),
    Case("data-conll-one-column",
         lambda e: e.ner(data={"train": e.write("t.conll", "Ada B-PER\nlives O\nin\nParis B-LOC\n")}),
         DatasetLoadError, "DATASET_LOAD_ERROR", file="t.conll", line=3, hint="word and tag"),
    Case("data-length-mismatch",
         lambda e: e.ner(data={"train": e.jsonl("t.jsonl", NER_ROWS), "validation": e.jsonl("v.jsonl", [
             NER_ROWS[0], {"tokens": ["Ada", "left"], "ner_tags": ["B-PER", "O", "O"]}])}),
         ValidationError, "VALIDATION_ERROR", file="v.jsonl", line=2, hint="fix or remove"),
    Case("data-unknown-tag",
         lambda e: e.ner(data={"train": e.jsonl("t.jsonl", NER_ROWS), "validation": e.jsonl("v.jsonl", [
             NER_ROWS[1], NER_ROWS[2], {"tokens": ["Bluefin"], "ner_tags": ["B-ORG"]}])}),
         ValidationError, "VALIDATION_ERROR", file="v.jsonl", line=3, hint="data.labels", prior="same"),
    Case("data-unknown-declared-label",
         lambda e: e.cls(CLS_ROWS + [{"text": "so so", "label": "neutral"}], labels=["neg", "pos"]),
         ValidationError, "VALIDATION_ERROR", file="train.jsonl", line=4, hint="data.labels"),
    Case("data-empty-tokens",
         lambda e: e.ner(data={"train": e.jsonl("t.jsonl", [NER_ROWS[0], {"tokens": [], "ner_tags": []}])}),
         ValidationError, "VALIDATION_ERROR", file="t.jsonl", line=2, hint="fix or remove"),
    Case("data-empty-text-csv",
         lambda e: e.cls() | {"data": {"train": e.write("t.csv", _csv(CLS_ROWS[:1]) .rstrip("\n") + "\n,neg\n")}},
         ValidationError, "VALIDATION_ERROR", file="t.csv", line=3, hint="fix or remove"),
    Case("data-text-not-string", lambda e: e.cls(CLS_ROWS + [{"text": 42, "label": "pos"}]), ValidationError,
         "VALIDATION_ERROR", file="train.jsonl", line=4, hint="fix or remove"),
    Case("data-non-utf8-csv",
         lambda e: e.cls() | {"data": {"train": e.write("t.csv", _csv(CLS_ROWS[:1]).encode() + "caf\xe9 film,pos\n"
                                                        .encode("latin-1"))}},
         DatasetLoadError, "DATASET_LOAD_ERROR", file="t.csv", line=3, hint="iconv"),
    Case("data-parquet-unreadable", _parquet_garbage, DatasetLoadError, "DATASET_LOAD_ERROR", field="data.train",
         file="train.parquet", hint="parquet"),
    Case("data-qa-answer-misplaced",
         lambda e: e.specs("question_answering", {"train": e.jsonl("qa.jsonl", [
             QA_ROWS[0], {**QA_ROWS[1], "answers": {"text": ["Greta"], "answer_start": [3]}}])}),
         ValidationError, "VALIDATION_ERROR", file="qa.jsonl", line=2, hint="fix or remove"),
]


# ---- models -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def saved_models(tmp_path_factory, tokenizer_dir):
    """A tiny saved BART (seq2seq, no token-classification head) and a tiny saved BERT encoder."""
    import transformers
    root = tmp_path_factory.mktemp("saved-models")
    bart = transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=400, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64))
    bart.save_pretrained(root / "bart")
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=400, **{k: v for k, v in TINY_BERT.items()
                                                                              if k != "model_type"}))
    bert.save_pretrained(root / "bert")
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(root / "bert")
    return {"bart": str(root / "bart"), "bert": str(root / "bert")}


@pytest.fixture(scope="session")
def tokenizer_without_pad(tmp_path_factory):
    """A word-level tokenizer with no pad, eos or unk token: nothing to pad batches with."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(sorted({t for r in NER_ROWS for t in r["tokens"]} | {"[X]"}))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[X]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = tmp_path_factory.mktemp("tok-no-pad")
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(out)
    return str(out)


def _model_dir(e: Env, name: str, files: dict[str, str | bytes]) -> str:
    for fname, content in files.items():
        e.write(f"{name}/{fname}", content)
    return str(e.root / name)


def _truncated_weights(e: Env) -> dict:
    source = Path(e.fixture("saved_models")["bert"])
    data = (source / "model.safetensors").read_bytes()
    path = _model_dir(e, "bert-cut", {"config.json": (source / "config.json").read_text(),
                                      "model.safetensors": data[:len(data) // 3]})
    return {**e.ner(), "model": {"name_or_path": path}}


MODEL_CASES = [
    Case("model-missing-path", lambda e: {**e.ner(), "model": {"name_or_path": str(e.root / "no-such-model")}},
         ModelNotFoundError, "MODEL_NOT_FOUND", field="model.name_or_path", hint="minilm", prior="same"),
    Case("model-dir-without-config",
         lambda e: {**e.ner(), "model": {"name_or_path": _model_dir(e, "m", {"README.md": "notes"})}},
         ModelNotFoundError, "MODEL_NOT_FOUND", field="model.name_or_path", file="/m", hint="config.json"),
    Case("model-dir-without-files-and-no-tokenizer",
         lambda e: {**e.ner(), "model": {"name_or_path": _model_dir(e, "m", {"README.md": "notes"})},
                    "tokenizer": {}},
         ModelNotFoundError, "MODEL_NOT_FOUND", field="model.name_or_path", file="/m", hint="save_pretrained"),
    Case("model-path-is-a-file",
         lambda e: {**e.ner(), "model": {"name_or_path": e.write("weights.bin", "x")}, "tokenizer": {}},
         ModelNotFoundError, "MODEL_NOT_FOUND", field="model.name_or_path", file="weights.bin", hint="directory"),
    Case("model-not-given", lambda e: {**{k: v for k, v in e.ner().items() if k != "model"}, "tokenizer": {}},
         ConfigError, "CONFIG_ERROR", field="model.name_or_path", hint="minilm"),
    Case("model-corrupt-config",
         lambda e: {**e.ner(), "model": {"name_or_path": _model_dir(e, "m", {"config.json": '{"model_type": "be'})}},
         ModelError, "MODEL_ERROR", field="model.name_or_path", file="config.json", hint="save_pretrained"),
    Case("model-truncated-weights", _truncated_weights, ModelError, "MODEL_ERROR", field="model.name_or_path",
         file="model.safetensors", hint="save_pretrained", prior="same"),
    Case("model-wrong-task-head", lambda e: {**e.ner(), "model": {"name_or_path": e.fixture("saved_models")["bart"]}},
         TaskTypeError, "TASK_TYPE_ERROR", field="model.name_or_path", hint="architecture"),
    Case("model-encoder-only-for-seq2seq",
         lambda e: {**e.specs("translation", {"train": e.jsonl("tr.jsonl", [{"source": "a b", "target": "b a"}] * 2),
                                              "source_column": "source", "target_column": "target"}),
                    "model": {"name_or_path": e.fixture("saved_models")["bert"]}, "tokenizer": {}},
         TaskTypeError, "TASK_TYPE_ERROR", field="model.name_or_path", hint="encoder_decoder"),
    Case("model-tokenizer-missing", lambda e: e.ner(tokenizer={"name_or_path": str(e.root / "no-tokenizer")}),
         ModelNotFoundError, "MODEL_NOT_FOUND", field="tokenizer.name_or_path", hint="check the path"),
    Case("model-tokenizer-vocab-too-large",
         lambda e: {**e.ner(), "model": {"from_config": {**TINY_BERT, "vocab_size": 50}}}, ModelError, "MODEL_ERROR",
         field="tokenizer.name_or_path", hint="vocab_size", prior="same"),
    Case("model-tokenizer-no-pad", lambda e: e.ner(tokenizer={"name_or_path": e.fixture("tokenizer_without_pad")}),
         ModelError, "MODEL_ERROR", field="tokenizer.name_or_path", hint="pad"),
    Case("model-hub-id-offline", lambda e: {**e.ner(), "model": {"name_or_path": "someorg/tiny-ner-model"},
                                            "tokenizer": {}},
         ModelNotFoundError, "MODEL_NOT_FOUND", field="model.name_or_path", hint="HF_HUB_OFFLINE"),
    Case("model-from-config-invalid",
         lambda e: {**e.ner(), "model": {"from_config": {**TINY_BERT, "hidden_size": 30, "num_attention_heads": 4}}},
         ConfigError, "CONFIG_ERROR", field="model.from_config", hint="config"),
]


# ---- paths --------------------------------------------------------------------------------------------------------
def _under_file(e: Env) -> dict:
    return {**e.ner(), "output_dir": e.write("not-a-dir", "a file") + "/sub"}


PATH_CASES = [
    Case("path-output-under-file", _under_file, TunepipeIOError, "IO_ERROR", field="output_dir",
         hint="another output_dir"),
    Case("path-output-is-file", lambda e: {**e.ner(), "output_dir": e.write("out.txt", "a file")}, TunepipeIOError,
         "IO_ERROR", field="output_dir", hint="another output_dir"),
    Case("path-output-holds-other-run", lambda e: e.ner(), ConfigError, "CONFIG_ERROR", field="output_dir",
         file="specs.yaml", hint="overwrite_output_dir", prior="other"),
    Case("path-output-is-data-dir",
         lambda e: {**e.ner(), "output_dir": str(Path(e.jsonl("d/train.jsonl", NER_ROWS)).parent),
                    "data": {"train": str(e.root / "d" / "train.jsonl")}},
         ConfigError, "CONFIG_ERROR", field="output_dir", file="train.jsonl", hint="another output_dir"),
    Case("path-output-contains-data-file",
         lambda e: {**e.ner(), "data": {"train": e.jsonl("run/model/train.jsonl", NER_ROWS)}},
         ConfigError, "CONFIG_ERROR", field="output_dir", file="train.jsonl", hint="another output_dir"),
    Case("path-evaluate-without-model", lambda e: e.ner(data={"train": e.jsonl("t.jsonl", NER_ROWS),
                                                              "validation": e.jsonl("v.jsonl", NER_ROWS)}),
         ModelNotFoundError, "MODEL_NOT_FOUND", file="run/model", hint="tunepipe train", command="evaluate"),
]


# ---- checkpoints --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tokenizer_dir):
    """A finished 2-step run with a checkpoint after each step (both kept): the previous good state that a bad
    resume must leave as it was."""
    from tunepipe import FineTunePipeLine
    env = Env(tmp_path_factory.mktemp("trained"), None)
    env.fixture = {"tokenizer_dir": tokenizer_dir}.get
    specs = env.ner(training={"max_steps": 2, "save_strategy": "steps", "save_steps": 1, "save_total_limit": 2})
    FineTunePipeLine(specs).train()
    assert sorted(p.name for p in (env.out / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    return specs


def _resume(e: Env, resume: str | None = None, damage: Callable[[Path], None] | None = None, **training) -> dict:
    """The trained run copied into this case's output_dir, resumed from ``resume`` (default: its newest
    checkpoint) with ``training`` changed."""
    import shutil
    specs = e.fixture("trained_run")
    shutil.copytree(specs["output_dir"], e.out)
    newest = e.out / "checkpoints" / "checkpoint-2"
    if damage:
        damage(newest)
    return {**specs, "output_dir": str(e.out),
            "training": {**specs["training"], "max_steps": 3, **training, "resume": resume or str(newest)}}


def _truncate(checkpoint: Path) -> None:
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


CHECKPOINT_CASES = [
    Case("ckpt-not-a-checkpoint", lambda e: _resume(e, e.write("notckpt/weights.bin", b"\0" * 8).rsplit("/", 1)[0]),
         DamagedCheckpoint, "CHECKPOINT_ERROR", field="training.resume", file="notckpt", hint="checkpoint-2"),
    Case("ckpt-missing", lambda e: _resume(e, str(e.out / "checkpoints" / "checkpoint-9")), CheckpointError,
         "CHECKPOINT_ERROR", field="training.resume", file="checkpoint-9", hint="resume: auto"),
    Case("ckpt-truncated-weights", lambda e: _resume(e, damage=_truncate), DamagedCheckpoint, "CHECKPOINT_ERROR",
         field="training.resume", file="checkpoint-2/model.safetensors", hint="checkpoint-1"),
    Case("ckpt-different-specs", lambda e: _resume(e, learning_rate=3e-3), CheckpointError, "CHECKPOINT_ERROR",
         field="training.learning_rate", file="checkpoint-2/manifest.json", hint="specs the checkpoint was trained"),
]

CASES = SPECS_CASES + DATA_CASES + MODEL_CASES + CHECKPOINT_CASES + PATH_CASES


# ---- the runner ---------------------------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under root: a hash for files, 'dir' for directories. The error log a failed run
    appends to a directory tunepipe already owns (tunepipe.log) is checked apart (test_bad_input)."""
    state = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.name == "tunepipe.log":
            continue
        state[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return state


def write_prior_run(specs: dict, kind: str) -> None:
    """A previous good run in output_dir: its specs.yaml and a (stand-in) saved model."""
    from tunepipe.specs import load_specs
    resolved = load_specs(specs if kind == "same" else {**specs, "training": {**specs["training"], "seed": 7}})
    out = Path(specs["output_dir"])
    (out / "model").mkdir(parents=True)
    (out / "specs.yaml").write_text(resolved.to_yaml())
    (out / "model" / "config.json").write_text('{"model_type": "bert"}')
    (out / "model" / "model.safetensors").write_bytes(b"previous good weights")
    (out / ".tunepipe.json").write_text('{"kind": "run"}')  # tunepipe's mark on the directories it writes


def assert_refused(case, argv: list[str], monkeypatch, capsys) -> str:
    """Run the CLI with ``argv``: exit 2, exactly one typed error with the case's code, field, file, line and hint
    in its suggestions, printed without a traceback. Returns stderr."""
    import tunepipe.cli as cli
    caught = []
    printed = cli._print_error
    monkeypatch.setattr(cli, "_print_error", lambda e, *a, **k: (caught.append(e), printed(e, *a, **k)))
    capsys.readouterr()
    exit_code = cli.main(argv)
    stderr = capsys.readouterr().err
    assert exit_code == cli.EXIT_USER_ERROR == 2, stderr
    assert len(caught) == 1, stderr
    err = caught[0]
    assert type(err) is case.error, err.render()
    assert err.code == case.code
    assert case.field or case.file, "a case must name a field or a file"
    if case.field:
        assert err.field == case.field, err.render()
        assert f"field '{case.field}'" in stderr
    if case.file:
        assert err.file and str(err.file).rstrip("/").endswith(case.file), err.render()
        assert case.file in stderr
    if case.line is not None:
        assert err.line == case.line, err.render()
        assert f"{case.file or ''}:{case.line}" in stderr
    assert err.suggestions and all(isinstance(s, str) and s.strip() for s in err.suggestions)
    if case.hint:
        assert any(case.hint.lower() in s.lower() for s in err.suggestions), err.render()
    printed_error = stderr[stderr.index(f"error: [{case.code}]"):]  # (other lines: progress and library logs)
    assert "Traceback" not in printed_error and "\n  -> " in printed_error
    return stderr


def build_case(case, env_class, tmp_path, request, monkeypatch):
    """(env, what the case built, the specs file it refers to: a dict written to c.yaml, else as built)."""
    monkeypatch.chdir(tmp_path)
    env = env_class(tmp_path / "case", request)
    env.root.mkdir()
    built = case.build(env)
    if not isinstance(built, dict):
        return env, built, built
    if getattr(case, "prior", None):
        write_prior_run(built, case.prior)
    config = env.root / "c.yaml"
    config.write_text(yaml.safe_dump(built))
    return env, built, config


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, request, monkeypatch, capsys):
    env, built, config = build_case(case, Env, tmp_path, request, monkeypatch)
    if case.patch:
        case.patch(monkeypatch)
    before = snapshot(tmp_path)
    assert case.prior is None or any(k.endswith("model.safetensors") for k in before)

    assert_refused(case, [case.command, str(config), *case.cli_args], monkeypatch, capsys)
    assert snapshot(tmp_path) == before, "a failed run left files behind or changed them"
    for log in tmp_path.rglob("tunepipe.log"):  # only in a directory that was tunepipe's before the run
        assert (log.parent / ".tunepipe.json").is_file() and f"[{case.code}]" in log.read_text()


def test_case_count_and_the_listing_above():
    """At least 40 cases, unique ids, and the module docstring lists exactly these, by category."""
    import re
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 40
    prefixes = {"specs": "specs", "data": "data", "models": "model", "checkpoints": "ckpt", "paths": "path"}
    listed = {}
    for name, count, names in re.findall(r"^  (\w+) \((\d+)\): (.*?)(?=^  \w+ \(|^  total)", __doc__, re.M | re.S):
        listed[name] = [f"{prefixes[name]}-{n.strip()}" for n in names.replace("\n", " ").split(",")]
        assert len(listed[name]) == int(count), name
    assert set(listed) == set(prefixes)
    assert sorted(sum(listed.values(), [])) == sorted(ids)
    assert f"total: {len(ids)}" in __doc__
