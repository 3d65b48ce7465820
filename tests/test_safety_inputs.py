"""No silent wrong results from inputs: values that type-check but would train nothing, train NaN, count data
twice, crash deep inside the model, or predict on a path's characters are refused up front with a typed error
that names the field / file / line and a fix, and the CLI exits with 2.

Each table case runs ``tunepipe.cli.main`` in-process (a specs file or a predict command built in a fresh
directory) and checks the error class and code, the location, a suggestion, the exit code and what stderr says.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from tunepipe.errors import (ConfigError, DatasetLoadError, ErrorHandler, ModelError, TunepipeIOError,
                             ValidationError)

from conftest import TINY_BERT, write_jsonl
from test_bad_inputs import CLS_ROWS, NER_ROWS
from test_bad_inputs import Env as BadInputEnv
from test_bad_inputs import assert_refused, build_case

QA_ROWS = [{"id": "q1", "question": "Where was Ada born?", "context": "Ada was born in London.",
            "answers": {"text": ["London"], "answer_start": [16]}}]
MT_ROWS = [{"source": "ada lives in paris", "target": "greta left lisbon"}] * 2
TINY_BART = {"model_type": "bart", "d_model": 16, "encoder_layers": 1, "decoder_layers": 1,
             "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32,
             "max_position_embeddings": 64}
LONG_WORDS = ["ada"] * 300  # 300 words: over TINY_BERT's 128 positions


class Env(BadInputEnv):
    """test_bad_inputs' environment, with this table's text-level specs files and its cls(rows) signature."""

    def cls(self, rows, **data) -> dict:
        return self.specs("text_classification", {"train": self.jsonl("train.jsonl", rows), **data})

    def yaml_text(self, body: str) -> Path:
        """A specs file written as text (YAML that yaml.safe_dump cannot produce: .inf, duplicates, aliases)."""
        base = yaml.safe_dump(self.ner())
        return Path(self.write("c.yaml", body.replace("<BASE>", base)))


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Env], Any]  # -> a specs dict (written to c.yaml), a specs file path, or a predict argv list
    error: type
    code: str
    field: str | None = None
    file: str | None = None  # the error names a file whose path ends with this
    line: int | None = None
    hint: str | None = None  # some suggestion contains this (case-insensitive)
    cli_args: tuple[str, ...] = ()


def _training_yaml(e: Env, key: str, literal: str) -> Path:
    """The base specs with `training.<key>: <literal>` written as YAML text (literals such as .inf, 1e30)."""
    specs = e.ner()
    training = specs.pop("training")
    training.pop(key, None)
    text = yaml.safe_dump(specs) + yaml.safe_dump({"training": training}) + f"  {key}: {literal}\n"
    return Path(e.write("c.yaml", text))


def _loop(e: Env) -> dict:
    loop = e.root / "loop"
    os.symlink(loop, loop)  # a link to itself
    return {**e.ner(), "output_dir": str(loop / "run")}


BOMB = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10 if i else ['x'] * 10)}]\n" for i in range(9))

SPECS_CASES = [
    Case("specs-inf-learning-rate", lambda e: _training_yaml(e, "learning_rate", ".inf"), ConfigError,
         "CONFIG_ERROR", field="training.learning_rate", hint="finite value"),
    Case("specs-nan-max-grad-norm", lambda e: _training_yaml(e, "max_grad_norm", ".nan"), ConfigError,
         "CONFIG_ERROR", field="training.max_grad_norm", hint="finite value"),
    Case("specs-inf-as-text", lambda e: e.ner(training={"learning_rate": "inf"}), ConfigError, "CONFIG_ERROR",
         field="training.learning_rate", hint="finite value"),
    Case("specs-inf-passed-through", lambda e: _training_yaml(e, "adam_epsilon", "-.inf"), ConfigError,
         "CONFIG_ERROR", field="training.adam_epsilon", hint="finite value"),
    Case("specs-nan-via-set", lambda e: e.ner(), ConfigError, "CONFIG_ERROR", field="training.max_grad_norm",
         hint="finite value", cli_args=("--set", "training.max_grad_norm=.nan")),
    Case("specs-max-steps-zero", lambda e: e.ner(training={"max_steps": 0}), ConfigError, "CONFIG_ERROR",
         field="training.max_steps", hint="-1 (the default)"),
    Case("specs-max-steps-below-minus-one", lambda e: e.ner(training={"max_steps": -5}), ConfigError,
         "CONFIG_ERROR", field="training.max_steps", hint="-1 (the default)"),
    Case("specs-save-steps-zero", lambda e: e.ner(training={"save_strategy": "steps", "save_steps": 0}),
         ConfigError, "CONFIG_ERROR", field="training.save_steps", hint="save_strategy: no"),
    Case("specs-keep-last-n-zero", lambda e: e.ner(training={"keep_last_n": 0}), ConfigError, "CONFIG_ERROR",
         field="training.keep_last_n", hint="save_strategy: no"),
    Case("specs-save-total-limit-zero", lambda e: e.ner(training={"save_total_limit": 0}), ConfigError,
         "CONFIG_ERROR", field="training.save_total_limit", hint="save_strategy: no"),
    Case("specs-fractional-max-steps", lambda e: e.ner(training={"max_steps": 2.5}), ConfigError, "CONFIG_ERROR",
         field="training.max_steps", hint="whole number"),
    Case("specs-fractional-save-steps", lambda e: e.ner(training={"save_strategy": "steps", "save_steps": 2.5}),
         ConfigError, "CONFIG_ERROR", field="training.save_steps", hint="whole number"),
    Case("specs-fractional-accumulation", lambda e: e.ner(training={"gradient_accumulation_steps": 1.5}),
         ConfigError, "CONFIG_ERROR", field="training.gradient_accumulation_steps", hint="whole number"),
    Case("specs-max-steps-1e30", lambda e: _training_yaml(e, "max_steps", "1e30"), ConfigError, "CONFIG_ERROR",
         field="training.max_steps", hint="realistic"),
    Case("specs-count-is-bool", lambda e: e.ner(training={"max_steps": True}), ConfigError, "CONFIG_ERROR",
         field="training.max_steps", hint="-1 (the default)"),
    Case("specs-seed-too-large", lambda e: e.ner(training={"seed": 2 ** 32}), ConfigError, "CONFIG_ERROR",
         field="training.seed", hint="4294967295"),
    Case("specs-seed-negative", lambda e: e.ner(training={"seed": -1}), ConfigError, "CONFIG_ERROR",
         field="training.seed", hint="greater than or equal to 0"),
    Case("specs-epochs-absurd", lambda e: e.ner(training={"max_steps": -1, "num_train_epochs": 1e12}), ConfigError,
         "CONFIG_ERROR", field="training.num_train_epochs", hint="less than or equal"),
    Case("specs-duplicate-section", lambda e: e.yaml_text("<BASE>data:\n  max_length: 16\n"), ConfigError,
         "CONFIG_ERROR", field="data", file="c.yaml", hint="merge the two"),
    Case("specs-duplicate-nested-key",
         lambda e: Path(e.write("c.yaml", "task: ner\ntraining:\n  learning_rate: 0.1\n  seed: 3\n"
                                          "  learning_rate: 0.2\n")),
         ConfigError, "CONFIG_ERROR", field="training.learning_rate", file="c.yaml", line=5, hint="merge the two"),
    Case("specs-duplicate-json-key", lambda e: Path(e.write("c.json", '{"task": "ner",\n "task": "mlm"}')),
         ConfigError, "CONFIG_ERROR", field="task", file="c.json", line=2, hint="merge the two"),
    Case("specs-alias-bomb", lambda e: e.yaml_text("<BASE>" + BOMB), ConfigError, "CONFIG_ERROR", file="c.yaml",
         hint="fewer nested aliases"),
    Case("specs-recursive-alias", lambda e: e.yaml_text("<BASE>extra: &a [1, *a]\n"), ConfigError,
         "CONFIG_ERROR", field="extra", file="c.yaml", hint="points back"),
    Case("specs-output-dir-symlink-loop", _loop, ConfigError, "CONFIG_ERROR", field="output_dir", file="loop/run",
         hint="symbolic link"),
]

# ---- data ----------------------------------------------------------------------------------------------------
def _same_file_spelt_twice(e: Env) -> dict:
    path = e.jsonl("train.jsonl", NER_ROWS)
    return e.ner(data={"train": [path, str(Path(path).parent / "." / "train.jsonl")]})


DATA_CASES = [
    Case("data-same-file-twice", lambda e: e.ner(data={"train": [e.jsonl("t.jsonl", NER_ROWS)] * 2}),
         DatasetLoadError, "DATASET_LOAD_ERROR", field="data.train", file="t.jsonl", hint="list each file once"),
    Case("data-same-file-spelt-twice", _same_file_spelt_twice, DatasetLoadError, "DATASET_LOAD_ERROR",
         field="data.train", file="train.jsonl", hint="list each file once"),
    Case("data-mixed-int-and-text-labels", lambda e: e.cls(CLS_ROWS + [{"text": "so so", "label": 1}]),
         ValidationError, "VALIDATION_ERROR", field="data.label_column", file="train.jsonl", line=4,
         hint="the same way"),
    Case("data-mixed-bool-and-text-labels", lambda e: e.cls([{"text": "fine", "label": True}] + CLS_ROWS),
         ValidationError, "VALIDATION_ERROR", field="data.label_column", file="train.jsonl", line=2,
         hint="the same way"),
    Case("data-mixed-tag-kinds",
         lambda e: e.ner(data={"train": e.jsonl("t.jsonl", NER_ROWS + [{"tokens": ["Ada", "left"],
                                                                         "ner_tags": [1, "O"]}]),
                               "labels": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]}),
         ValidationError, "VALIDATION_ERROR", field="data.label_column", file="t.jsonl", line=4,
         hint="the same way"),
    Case("data-mixed-extra-column", lambda e: e.cls([{**r, "source": i if i else "web"} for i, r in
                                                     enumerate(CLS_ROWS)]),
         ValidationError, "VALIDATION_ERROR", file="train.jsonl", line=2, hint="fix or remove"),
    Case("data-accumulation-larger-than-data", lambda e: e.ner(training={"gradient_accumulation_steps": 4}),
         ConfigError, "CONFIG_ERROR", field="training.gradient_accumulation_steps",
         hint="gradient_accumulation_steps: 2"),
    Case("data-sequence-longer-than-positions",
         lambda e: e.ner(data={"train": e.jsonl("t.jsonl", NER_ROWS[:1] + [
             {"tokens": LONG_WORDS, "ner_tags": ["O"] * len(LONG_WORDS)}]), "max_length": None}),
         ConfigError, "CONFIG_ERROR", field="data.max_length", file="t.jsonl", line=2,
         hint="data.max_length: 128"),
]


# ---- models --------------------------------------------------------------------------------------------------
def _tokenizer_copy(e: Env, damage: Callable[[Path], None]) -> dict:
    target = e.root / "tok"
    shutil.copytree(e.fixture("tokenizer_dir"), target)
    damage(target / "tokenizer.json")
    return e.ner(tokenizer={"name_or_path": str(target)})


MODEL_CASES = [
    Case("model-max-length-over-positions", lambda e: e.ner(data={"train": e.jsonl("t.jsonl", NER_ROWS),
                                                                  "max_length": 512}),
         ConfigError, "CONFIG_ERROR", field="data.max_length", hint="data.max_length: 128"),
    Case("model-qa-max-length-over-positions",
         lambda e: e.specs("question_answering", {"train": e.jsonl("qa.jsonl", QA_ROWS), "max_length": 384}),
         ConfigError, "CONFIG_ERROR", field="data.max_length", hint="data.max_length: 128"),
    Case("model-target-over-decoder-positions",
         lambda e: {**e.specs("translation", {"train": e.jsonl("mt.jsonl", MT_ROWS), "max_length": 32,
                                              "max_target_length": 200}), "model": {"from_config": TINY_BART}},
         ConfigError, "CONFIG_ERROR", field="data.max_target_length", hint="data.max_target_length: 64"),
    Case("model-generation-over-decoder-positions",
         lambda e: {**e.specs("translation", {"train": e.jsonl("mt.jsonl", MT_ROWS), "max_length": 32},
                              generation={"max_new_tokens": 64}), "model": {"from_config": TINY_BART}},
         ConfigError, "CONFIG_ERROR", field="generation.max_new_tokens", hint="generation.max_new_tokens: 63"),
    Case("model-prompt-tuning-virtual-tokens",
         lambda e: {**e.cls(CLS_ROWS, max_length=120), "peft": {"method": "prompt_tuning",
                                                                 "num_virtual_tokens": 20}},
         ConfigError, "CONFIG_ERROR", field="data.max_length", hint="data.max_length: 108"),
    Case("model-tokenizer-json-truncated", lambda e: _tokenizer_copy(
        e, lambda p: p.write_text(p.read_text()[:300])), ModelError, "MODEL_ERROR", field="tokenizer.name_or_path",
         file="tok/tokenizer.json", hint="save_pretrained"),
    Case("model-tokenizer-json-not-a-tokenizer", lambda e: _tokenizer_copy(
        e, lambda p: p.write_text('{"version": "1.0", "model": {"type": "Nonsense"}}')), ModelError, "MODEL_ERROR",
         field="tokenizer.name_or_path", file="tok/tokenizer.json", hint="save_pretrained"),
]


# ---- predict -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def trained_ner(tmp_path_factory, tokenizer_dir) -> Path:
    """A one-step NER run (output_dir with specs.yaml and model/)."""
    from tunepipe import FineTunePipeLine
    env = Env(tmp_path_factory.mktemp("safety-run"), None)
    env.fixture = {"tokenizer_dir": tokenizer_dir}.get
    FineTunePipeLine(env.ner(data={"train": env.jsonl("train.jsonl", NER_ROWS), "max_length": 64})).train()
    return env.out


def _run_copy(e: Env, edit_specs: Callable[[dict], None] | None = None,
              damage: Callable[[Path], None] | None = None) -> Path:
    target = e.root / "trained"
    shutil.copytree(e.fixture("trained_ner"), target)
    if edit_specs:
        specs = yaml.safe_load((target / "specs.yaml").read_text())
        edit_specs(specs)
        (target / "specs.yaml").write_text(yaml.safe_dump(specs))
    if damage:
        damage(target / "model")
    return target


def _predict(model: Path | str, text: str) -> list[str]:
    return ["predict", "--model", str(model), "--input", text]


PREDICT_CASES = [
    Case("predict-missing-input-file", lambda e: _predict(e.fixture("trained_ner"), str(e.root / "inputs.jsonl")),
         DatasetLoadError, "DATASET_LOAD_ERROR", field="--input", file="inputs.jsonl", hint=".txt file"),
    Case("predict-missing-path-without-extension", lambda e: _predict(e.fixture("trained_ner"), "data/inputs"),
         DatasetLoadError, "DATASET_LOAD_ERROR", field="--input", file="data/inputs", hint=".txt file"),
    Case("predict-input-is-directory", lambda e: _predict(e.fixture("trained_ner"), str(e.root)),
         DatasetLoadError, "DATASET_LOAD_ERROR", field="--input", file="/case", hint="one file"),
    Case("predict-empty-input-file", lambda e: _predict(e.fixture("trained_ner"), e.write("in.txt", "\n \n")),
         DatasetLoadError, "DATASET_LOAD_ERROR", field="--input", file="in.txt", hint="not empty"),
    Case("predict-unsupported-input-file", lambda e: _predict(e.fixture("trained_ner"), e.write("in.conll", "A O\n")),
         DatasetLoadError, "DATASET_LOAD_ERROR", field="--input", file="in.conll", hint="JSON Lines"),
    Case("predict-bad-input-line", lambda e: _predict(e.fixture("trained_ner"),
                                                      e.write("in.jsonl", '{"tokens": ["a"]}\n{oops\n')),
         DatasetLoadError, "DATASET_LOAD_ERROR", file="in.jsonl", line=2, hint="fix or delete"),
    Case("predict-max-length-over-positions",
         lambda e: _predict(_run_copy(e, lambda s: s["data"].update(max_length=300)), "Ada lives in Paris"),
         ConfigError, "CONFIG_ERROR", field="data.max_length", hint="data.max_length: 128"),
    Case("predict-tokenizer-json-truncated",
         lambda e: _predict(_run_copy(e, damage=lambda m: (m / "tokenizer.json").write_text("{\n  \"vers")),
                            "Ada lives in Paris"),
         ModelError, "MODEL_ERROR", file="model/tokenizer.json", line=2, hint="save_pretrained"),
]

CASES = SPECS_CASES + DATA_CASES + MODEL_CASES + PREDICT_CASES


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused(case: Case, tmp_path, request, monkeypatch, capsys):
    env, built, config = build_case(case, Env, tmp_path, request, monkeypatch)
    argv = built if isinstance(built, list) else ["train", str(config), *case.cli_args]

    assert_refused(case, argv, monkeypatch, capsys)
    if argv[0] == "train":
        assert not env.out.exists(), "a refused run left its output_dir behind"


def test_duplicate_section_names_the_line_of_the_second():
    from tunepipe.specs import load_yaml
    with pytest.raises(ConfigError) as e:
        load_yaml("task: ner\ndata:\n  train: a.jsonl\ntraining: {}\ndata:\n  train: b.jsonl\n", file="s.yaml")
    assert (e.value.field, e.value.line) == ("data", 5) and "line 2" in e.value.message
    # YAML merge keys (<<) are not duplicates: the explicit key overrides the merged one
    assert load_yaml("base: &b {lr: 1}\nrun:\n  <<: *b\n  lr: 2\n")["run"] == {"lr": 2}


def test_alias_bomb_fails_in_milliseconds():
    """Nine levels of ten aliases: a billion values once expanded, refused before any Python object is built."""
    from tunepipe.specs import load_yaml
    start = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        load_yaml(BOMB + "task: ner\n", file="bomb.yaml")
    assert time.perf_counter() - start < 0.5
    assert e.value.line is not None and "aliases" in e.value.message
    ok = load_yaml("a: &a [1, 2]\nb: *a\nc: *a\n")  # ordinary aliases still work
    assert ok == {"a": [1, 2], "b": [1, 2], "c": [1, 2]}


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    """YAML 1.1 reads `1e-8` as text: a passed-through TrainingArguments value would arrive as a string."""
    from tunepipe.specs import load_specs, load_yaml
    assert load_yaml("a: 1e-8\nb: 3E5\nc: '1e-8'\nd: 10\n") == {"a": 1e-8, "b": 3e5, "c": "1e-8", "d": 10}
    path = tmp_path / "s.yaml"
    path.write_text("task: ner\nmodel: m\ndata: {train: t.jsonl}\ntraining:\n  adam_epsilon: 1e-8\n  max_steps: 1e3\n")
    specs = load_specs(path)
    assert specs.training.model_extra["adam_epsilon"] == 1e-8 and specs.training.max_steps == 1000


def test_valid_step_counts_still_pass():
    from tunepipe.specs import load_specs
    base = {"task": "ner", "model": "m", "data": {"train": "t.jsonl"}}
    t = load_specs({**base, "training": {"max_steps": -1, "save_steps": 0.25, "logging_steps": 10, "warmup_steps": 0,
                                         "eval_steps": None, "keep_last_n": 1, "seed": 2 ** 32 - 1,
                                         "max_grad_norm": 0.0}}).training
    assert (t.max_steps, t.save_steps, t.logging_steps, t.keep_last_n, t.seed) == (-1, 0.25, 10, 1, 2 ** 32 - 1)


def test_default_lengths_follow_the_models_positions():
    """A default the model cannot read is lowered to its limit when the specs are resolved; a chosen value is
    kept (and refused later, at setup); rotary and relative-position models keep the default."""
    from tunepipe.specs import load_specs
    tiny = {"from_config": dict(TINY_BERT)}
    base = {"data": {"train": "t.jsonl"}}
    assert load_specs({**base, "task": "ner", "model": tiny}).data.max_length == 128
    qa = load_specs({**base, "task": "qa", "model": tiny}).data
    assert (qa.max_length, qa.stride) == (128, 42)
    mt = load_specs({**base, "task": "translation", "model": {"from_config": TINY_BART}})
    assert (mt.data.max_length, mt.data.max_target_length, mt.generation.max_new_tokens) == (64, 64, 128)
    chosen = load_specs({"task": "ner", "model": tiny, "data": {"train": "t.jsonl", "max_length": 512}})
    assert chosen.data.max_length == 512
    rotary = {"from_config": {"model_type": "llama", "max_position_embeddings": 64}}
    assert load_specs({**base, "task": "text_classification", "model": rotary}).data.max_length == 256
    assert load_specs({**base, "task": "translation", "model": {"from_config": {"model_type": "t5"}}}
                      ).data.max_length == 128  # the task default, no limit
    assert load_specs({**base, "task": "ner", "model": "minilm"}).data.max_length == 256  # 512 positions


def test_position_limits_of_architectures():
    from transformers import AutoConfig

    from tunepipe.modeling.limits import config_limit, side_limits

    def limit(model_type, **kw):
        found = config_limit(AutoConfig.for_model(model_type, **kw))
        return None if found is None else (found.tokens, found.hard, found.source)

    assert limit("bert", max_position_embeddings=128) == (128, True, "max_position_embeddings")
    assert limit("roberta", max_position_embeddings=514, pad_token_id=1) == (512, True, "max_position_embeddings")
    assert limit("gpt2", n_positions=64)[:2] == (64, True)
    assert limit("llama", max_position_embeddings=2048)[:2] == (2048, False)  # rotary: longer runs
    assert limit("t5") is None and limit("bloom") is None
    assert limit("deberta-v2", position_biased_input=False) is None  # relative attention only
    from transformers import EncoderDecoderConfig
    pair = EncoderDecoderConfig.from_encoder_decoder_configs(
        AutoConfig.for_model("bert", max_position_embeddings=256),
        AutoConfig.for_model("bert", max_position_embeddings=64, is_decoder=True))
    assert {k: v.tokens for k, v in side_limits(pair).items()} == {"input": 256, "output": 64}


def test_predict_lowers_a_default_length_to_the_model(tmp_path, trained_ner, capsys):
    """A saved model without specs.yaml gets the task default max_length (256) for its 128 positions: predict
    lowers it instead of crashing on a long input."""
    from tunepipe.cli import main
    bare = tmp_path / "bare"
    shutil.copytree(trained_ner / "model", bare)
    capsys.readouterr()
    assert main(["predict", "--model", str(bare), "--task", "ner", "--input", " ".join(LONG_WORDS)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["tokens"][:3] == ["ada"] * 3


@pytest.mark.parametrize("text, is_path", [
    ("inputs.jsonl", True), ("data/inputs", True), ("./in", True), ("~/in.txt", True), ("C:\\data\\in", True),
    ("my notes.txt", True), ("Ada lives in Paris .", False), ("Ada and/or Greta left", False),
    ("https://example.org/a", False), ("two\nlines/x", False), ("", False)])
def test_predict_input_that_looks_like_a_path(text, is_path):
    from tunepipe.data import looks_like_path
    assert looks_like_path(text) is is_path


def test_predict_input_files_of_every_data_format(tmp_path):
    from tunepipe.data import read_predict_inputs
    (tmp_path / "a.csv").write_text("text\nfirst\nsecond\n")
    (tmp_path / "a.json").write_text(json.dumps([{"text": "first"}, {"text": "second"}]))
    (tmp_path / "a.txt").write_text("first\n\nsecond\n")
    assert read_predict_inputs(str(tmp_path / "a.csv")) == ([{"text": "first"}, {"text": "second"}], True)
    assert read_predict_inputs(str(tmp_path / "a.json")) == ([{"text": "first"}, {"text": "second"}], True)
    assert read_predict_inputs(str(tmp_path / "a.txt")) == (["first", "second"], True)
    assert read_predict_inputs("Ada lives in Paris") == (["Ada lives in Paris"], False)


def test_same_file_in_train_and_validation_warns(tmp_path, caplog):
    from tunepipe.data import DatasetModules
    from tunepipe.specs import load_specs
    from tunepipe.tasks import get_task
    path = str(write_jsonl(tmp_path / "t.jsonl", NER_ROWS))
    specs = load_specs({"task": "ner", "model": "m", "data": {"train": path, "validation": path}})
    with caplog.at_level("WARNING", logger="tunepipe"):
        DatasetModules(specs, get_task("ner")(specs)).load()
    assert any("data.validation reads" in r.getMessage() and "t.jsonl" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("exc, code, file", [
    (RuntimeError("Symlink loop from '/tmp/x/loop'"), "IO_ERROR", "/tmp/x/loop"),
    (OSError(40, "Too many levels of symbolic links", "/tmp/x/loop"), "IO_ERROR", "/tmp/x/loop"),
    (FileNotFoundError(2, "No such file or directory", "/tmp/x/gone.txt"), "IO_ERROR", "/tmp/x/gone.txt"),
])
def test_translate_names_the_path(exc, code, file):
    err = ErrorHandler.translate(exc, "writing")
    assert isinstance(err, TunepipeIOError) and (err.code, err.file) == (code, file) and err.suggestions
    assert not ErrorHandler.is_internal(err)
    assert ErrorHandler.is_internal(ErrorHandler.translate(KeyError("x"), "training"))


def test_cli_exit_code_2_for_typed_library_errors_1_for_bugs(monkeypatch, capsys):
    import tunepipe.cli as cli

    def raising(exc):
        def command(args):
            raise exc
        return command

    monkeypatch.setitem(cli.COMMANDS, "tasks", raising(RuntimeError("Symlink loop from '/tmp/x/loop'")))
    assert cli.main(["tasks"]) == cli.EXIT_USER_ERROR
    assert "[IO_ERROR]" in capsys.readouterr().err
    monkeypatch.setitem(cli.COMMANDS, "tasks", raising(KeyError("a bug")))
    assert cli.main(["tasks"]) == cli.EXIT_INTERNAL


def test_case_ids_are_unique_and_cover_each_item():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    for prefix in ("specs-inf", "specs-nan", "specs-max-steps-zero", "specs-save-steps-zero", "specs-keep-last-n",
                   "specs-fractional", "specs-max-steps-1e30", "specs-seed", "specs-duplicate", "specs-alias-bomb",
                   "specs-output-dir-symlink-loop", "data-same-file", "data-mixed-int-and-text-labels",
                   "data-accumulation", "model-max-length", "model-tokenizer-json", "predict-missing-input",
                   "predict-max-length"):
        assert any(i.startswith(prefix) for i in ids), prefix
