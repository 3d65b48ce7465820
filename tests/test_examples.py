"""examples/ and `tunepipe init`: what a new user runs first must load, find its data and train.

Each example is trained for two steps from the repository root, as its comment says to run it, with only
output_dir, max_steps and (where its model is not on this machine offline, or is too large for a unit test) the
model swapped for a tiny one of the same kind. Each `init` template trains on the sample data of its task.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from tunepipe.cli import main
from tunepipe.specs import load_specs, read_specs_file
from tunepipe.tasks import get_task, task_names

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
SAMPLES = ROOT / "examples" / "data"
TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 512}
TINY_GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 512}
FAST = ["training.max_steps=2", "training.logging_steps=1", "training.save_strategy='no'", "training.disable_tqdm=true",
        "training.dataloader_pin_memory=false"]


def _example_ids():
    return [p.stem for p in EXAMPLES]


def _data_files(specs) -> list[str]:
    files = []
    for split in ("train", "validation", "test"):
        value = getattr(specs.data, split)
        files += [value] if isinstance(value, str) else list(value or [])
    return files


@pytest.fixture(scope="module")
def samples_module():
    spec = importlib.util.spec_from_file_location("make_samples", SAMPLES / "make_samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A tiny BERT saved like a pretrained checkpoint, with a WordPiece tokenizer trained on all the sample text:
    the stand-in for MiniLM in bert2bert examples (encoder_decoder: {encoder: dir, decoder: dir})."""
    from transformers import BertConfig, BertModel

    from tunepipe.tiny import train_wordpiece_tokenizer
    texts = []
    for path in SAMPLES.glob("*/*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            texts += [v if isinstance(v, str) else " ".join(map(str, v)) for v in json.loads(line).values()
                      if isinstance(v, (str, list))]
    out = tmp_path_factory.mktemp("tiny-bert")
    tok = train_wordpiece_tokenizer(texts, out, vocab_size=600)
    cfg = {k: v for k, v in TINY_BERT.items() if k != "model_type"}
    BertModel(BertConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **cfg)).save_pretrained(out)
    return str(out)


def tiny_overrides(specs, tiny_bert_dir: str) -> list[str]:
    """Swap the example's model for a tiny one of the same kind: MiniLM and the bert2bert built from it are on this
    machine but take minutes here with generation; a hub decoder is not reachable offline. A model built from
    config (the causal-LM example) stays as it is."""
    model = specs.model
    if model.from_config:
        return []
    if model.encoder_decoder:
        return ["model=" + json.dumps({"encoder_decoder": {"encoder": tiny_bert_dir, "decoder": tiny_bert_dir}}),
                "generation.max_new_tokens=8"]
    if model.name_or_path == "minilm":
        return ["model=" + json.dumps({"from_config": TINY_BERT}), f"tokenizer.name_or_path={tiny_bert_dir}"]
    # a decoder-only LM from the hub: a tiny GPT-2 with a BPE tokenizer trained on the data
    return ["model=" + json.dumps({"from_config": TINY_GPT2}),
            "tokenizer=" + json.dumps({"train": {"type": "bpe", "vocab_size": 400}}), "generation.max_new_tokens=8"]


# ---- the examples ------------------------------------------------------------------------------------------------
def test_every_task_has_an_example():
    tasks = {read_specs_file(p)["task"] for p in EXAMPLES}
    assert {get_task(t).name for t in tasks} == set(task_names())


@pytest.mark.parametrize("path", EXAMPLES, ids=_example_ids())
def test_example_loads_names_existing_sample_data_and_says_how_to_run(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    specs = load_specs(path)
    files = _data_files(specs)
    assert specs.data.train and specs.data.validation
    for name in files:
        assert Path(name).is_file(), f"{path.name} names {name}, which does not exist"
        assert Path(name).resolve().is_relative_to(SAMPLES), f"{path.name}: {name} is not sample data of examples/"
    text = path.read_text(encoding="utf-8")
    assert f"tunepipe train examples/{path.name}" in text
    prose = " ".join(line.lstrip("# ") for line in text.lower().splitlines())  # comments, line breaks undone
    assert "for real work" in prose, f"{path.name} does not say which data set to use for real work"


def test_sample_data_is_reproducible_small_and_disjoint(samples_module, tmp_path):
    written = samples_module.write_all(tmp_path)
    committed = sorted(SAMPLES.glob("*/*.jsonl"))
    assert [p.relative_to(tmp_path) for p in written] == [p.relative_to(SAMPLES) for p in committed]
    for new, old in zip(written, committed):
        assert new.read_bytes() == old.read_bytes(), f"{old} differs from what make_samples.py writes"
    assert sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file()) < 500_000
    for folder in {p.parent for p in committed}:
        train = (folder / "train.jsonl").read_text(encoding="utf-8").splitlines()
        validation = (folder / "validation.jsonl").read_text(encoding="utf-8").splitlines()
        assert (len(train), len(validation)) == (samples_module.N_TRAIN, samples_module.N_VALIDATION)
        assert not set(train) & set(validation), f"{folder.name}: a validation record repeats a training record"
    for line in (SAMPLES / "question_answering" / "train.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        start, answer = record["answers"]["answer_start"][0], record["answers"]["text"][0]
        assert record["context"][start:start + len(answer)] == answer


def test_the_decoder_only_example_decodes_greedily(monkeypatch):
    """README: decoder-only models decode greedily (4 beams + no_repeat_ngram_size 3 scored 3.8 ROUGE-1 lower)."""
    monkeypatch.chdir(ROOT)
    specs = load_specs(ROOT / "examples" / "summarization_decoder.yaml")
    assert specs.generation.num_beams == 1 and not specs.generation.do_sample
    assert specs.generation.no_repeat_ngram_size == 0
    # the same as the task's default for a decoder whose config it can read (a hub id it cannot read offline gets
    # the encoder-decoder defaults: hence the explicit section in the example)
    raw = read_specs_file(ROOT / "examples" / "summarization_decoder.yaml")
    del raw["generation"]
    raw["model"] = {"from_config": TINY_GPT2}
    default = load_specs(raw).generation
    assert (default.num_beams, default.no_repeat_ngram_size) == (1, 0)


@pytest.mark.parametrize("path", EXAMPLES, ids=_example_ids())
def test_example_trains_two_steps(path, tmp_path, monkeypatch, tiny_bert_dir, one_torch_thread):
    from tunepipe import FineTunePipeLine
    from tunepipe.modeling.peft_support import peft_enabled
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # the MLflow example: its default store inside output_dir
    overrides = [f"output_dir={tmp_path / 'run'}", *FAST, *tiny_overrides(load_specs(path), tiny_bert_dir)]
    pipe = FineTunePipeLine(str(path), overrides=overrides)
    pipe.run()
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]
    saved = tmp_path / "run" / ("adapter" if peft_enabled(pipe.specs) else "model")
    assert saved.is_dir() and pipe.metrics["validation"]


# ---- tunepipe init -------------------------------------------------------------------------------------------------
def _kind_of(model) -> str:
    """The kind of model a specs' model section names, in starter.model_kind's words."""
    if model.encoder_decoder:
        return "encoder_decoder"
    if model.from_config and model.from_config.get("model_type") == "gpt2":
        return "decoder"
    return "encoder" if model.name_or_path == "minilm" else "decoder"


def _examples_of(task: str) -> list[Path]:
    return [p for p in EXAMPLES if get_task(read_specs_file(p)["task"]).name == task]


@pytest.mark.parametrize("task", task_names())
def test_init_matches_the_examples_and_trains_on_their_data(task, tmp_path, monkeypatch, capsys, tiny_bert_dir,
                                                            one_torch_thread):
    from tunepipe import FineTunePipeLine
    from tunepipe.starter import model_kind
    target = tmp_path / f"{task}.yaml"
    assert main(["init", task, "-o", str(target)]) == 0
    assert "alias" not in capsys.readouterr().err  # its own name is not an alias
    specs = load_specs(target)
    cls = get_task(task)
    # the template reads records laid out like the task's example record ...
    assert cls(specs).validate_record(dict(cls.example_data), "train") is None
    # ... and names the model the example of its kind names (decoder / bert2bert / encoder)
    kind = model_kind(cls)
    same_kind = [p for p in _examples_of(task) if _kind_of(load_specs(p).model) == kind]
    assert same_kind, f"no example of {task} uses the starter's {kind} model"
    example = load_specs(same_kind[0])
    assert specs.model.model_dump() == example.model.model_dump()
    assert specs.tokenizer.model_dump() == example.tokenizer.model_dump()
    for column in ("text_column", "label_column", "text_pair_column", "source_column", "target_column"):
        if getattr(example.data, column) is not None:
            assert getattr(specs.data, column) == getattr(example.data, column), column
    # with the sample data's paths filled in, it trains (tiny model of the same kind)
    monkeypatch.chdir(ROOT)
    overrides = [f"output_dir={tmp_path / 'run'}", f"data.train={example.data.train}",
                 f"data.validation={example.data.validation}", *FAST, "training.max_steps=1",
                 *tiny_overrides(specs, tiny_bert_dir)]
    pipe = FineTunePipeLine(str(target), overrides=overrides)
    pipe.run()
    assert (tmp_path / "run" / "model").is_dir()


def test_init_says_when_the_name_is_an_alias(tmp_path, capsys):
    assert main(["init", "ner", "-o", str(tmp_path / "ner.yaml")]) == 0
    assert "'ner' is an alias of token_classification" in capsys.readouterr().err
    assert yaml.safe_load((tmp_path / "ner.yaml").read_text())["task"] == "token_classification"


def test_init_templates_follow_the_model_kind():
    from tunepipe.starter import starter_body
    bodies = {t: starter_body(get_task(t)) for t in task_names()}
    assert bodies["causal_lm"]["model"]["from_config"]["model_type"] == "gpt2" and "train" in bodies["causal_lm"][
        "tokenizer"]
    for task in ("translation", "summarization", "text_generation"):
        assert bodies[task]["model"] == {"encoder_decoder": "minilm"}
    for task in ("token_classification", "text_classification", "question_answering", "masked_language_modeling"):
        assert bodies[task]["model"] == {"name_or_path": "minilm"}


# ---- predict --help ----------------------------------------------------------------------------------------------
def _predict_help(capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main(["predict", "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def _task_line(help_text: str, task: str) -> str:
    """The help's entry for ``task`` (a line naming tasks, with its continuation lines)."""
    lines = help_text.split("prediction settings")[1].splitlines()
    for i, line in enumerate(lines):
        names = line.strip().split(":")[0].split(", ")
        if line.startswith("  ") and not line.startswith("      ") and task in names:
            cont = []
            for ln in lines[i + 1:]:
                if not ln.startswith("      "):
                    break
                cont.append(ln.strip())
            return " ".join([line.strip(), *cont])
    raise AssertionError(f"{task} is not in predict --help")


def test_predict_help_lists_what_each_task_accepts(capsys):
    import inspect

    from tunepipe.errors import ConfigError
    from tunepipe.serving.model_loading import check_predict_kwargs
    from tunepipe.specs import load_specs as load
    from tunepipe.tasks.token_classification import AGGREGATION_STRATEGIES
    text = _predict_help(capsys)
    for task in task_names():
        line = _task_line(text, task)
        cls = get_task(task)
        params = inspect.signature(cls.predict).parameters
        named = [n for n, p in params.items() if n not in ("self", "model", "tokenizer", "inputs", "batch_size")
                 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        for name in named:
            assert f"{name}=" in line, (task, name)
        instance = cls(load({"task": task, "model": "minilm", "data": {"train": "x.jsonl"}}))
        for word in line.replace(",", " ").replace(";", " ").split():
            if "=" in word:  # each setting the help shows for the task, with its default, passes the task's check
                name = word.split("=")[0]
                check_predict_kwargs(instance, {name: params[name].default})
        if cls.auto_model_class in ("AutoModelForSeq2SeqLM", "AutoModelForCausalLM"):
            assert "max_new_tokens" in line and "num_beams" in line
        elif not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            with pytest.raises(ConfigError):  # and the task refuses what the help does not list
                check_predict_kwargs(instance, {"num_beams": 2})
    assert "first|average|max|simple" == "|".join(AGGREGATION_STRATEGIES)
    assert "aggregation_strategy=first|average|max|simple" in _task_line(text, "token_classification")
    assert "top_k" not in _task_line(text, "text_classification")  # the old fixed list claimed it for everyone
    assert "aggregation_strategy" not in _task_line(text, "summarization")
    qa_line = _task_line(text, "question_answering")
    qa = get_task("question_answering")(load({"task": "qa", "model": "minilm", "data": {"train": "x.jsonl"}}))
    for name in qa.predict_settings:
        assert name in qa_line
        assert qa.predict(None, None, [], **{name: 1}) == []  # accepted (no inputs: nothing else runs)
    with pytest.raises(ConfigError):
        qa.predict(None, None, [], num_beams=2)


def test_help_of_other_commands_does_not_import_the_tasks():
    import subprocess
    import sys
    code = ("import sys; from tunepipe.cli import build_parser; p = build_parser(); p.format_help(); "
            "print(any(m.startswith('tunepipe.tasks') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


# ---- README: the serving example -----------------------------------------------------------------------------------
def test_readme_serving_example_is_what_the_server_answers(tmp_path, tiny_specs, ner_data, one_torch_thread):
    """The request in the README's serving part, sent to the app `tunepipe serve` runs (over a tiny NER model
    trained on the demo's data), answers in the README's shape with the README's tokens."""
    import re
    import shlex

    from fastapi.testclient import TestClient

    from tunepipe import FineTunePipeLine, InferencePipeLine
    from tunepipe.serving.serve import create_app
    part = (ROOT / "README.md").read_text(encoding="utf-8").split("## Inference and serving")[1].split("\n## ")[0]
    match = re.search(r"```bash\n((?:(?!```).)*)```\n```json\n((?:(?!```).)*)```", part, re.DOTALL)
    assert match, "README's serving part has no curl request followed by its JSON answer"
    command, answer = match.group(1), json.loads(match.group(2))
    assert command.count("\n") <= 4, command
    assert "tunepipe serve --model runs/demo" in command  # the model `tunepipe demo` writes
    words = shlex.split(command.split("curl", 1)[1].replace("\\\n", " "))
    body = json.loads(words[words.index("-d") + 1])
    url = next(w for w in words if w.startswith("http://"))
    text = body["inputs"][0]
    for entity in answer["predictions"][0]["entities"]:  # the README's offsets point at its texts
        assert text[entity["start"]:entity["end"]] == entity["text"]
    specs = tiny_specs("token_classification", ner_data, training={"max_steps": 2})
    FineTunePipeLine(specs).run()
    client = TestClient(create_app(InferencePipeLine("token_classification", specs["output_dir"])))
    response = client.post(url.split("8000", 1)[1], json=body)
    assert response.status_code == 200, response.text
    got = response.json()
    assert set(got) == set(answer) and got["task"] == answer["task"]
    assert len(got["predictions"]) == len(answer["predictions"])
    ours, theirs = got["predictions"][0], answer["predictions"][0]
    assert set(ours) == set(theirs) and ours["tokens"] == theirs["tokens"]
    for entity in ours["entities"]:
        assert set(entity) == set(theirs["entities"][0]) and text[entity["start"]:entity["end"]] == entity["text"]
