"""`tunepipe check` / `train --dry-run`: the report matches what a real run does (rows, labels, lengths,
parameters, steps), errors are train's own, and nothing is written."""
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tunepipe.check import check_run
from tunepipe.cli import main

LONG = {"tokens": ["Greta"] * 10 + ["went", "to", "Lisbon"] * 10, "ner_tags": ["B-PER"] * 10 + ["O", "O", "B-LOC"] * 10}


def snapshot(*roots) -> dict[str, tuple]:
    """Every path under ``roots`` with its size and modification time."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = p.lstat()
                out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def ner_long(tmp_path, ner_data):
    """The NER fixture's training records plus one longer than max_length (an odd count: 97)."""
    rows = [json.loads(line) for line in Path(ner_data["train"]).read_text().splitlines()] + [LONG]
    path = tmp_path / "data" / "train.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"train": str(path), "validation": ner_data["validation"]}, rows


def _config(tmp_path, specs, name="c.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(specs))
    return str(path)


def _real_lengths(tokenizer_dir, rows) -> list[int]:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return sorted(len(ids) for ids in tok([r["tokens"] for r in rows], is_split_into_words=True)["input_ids"])


def test_report_matches_a_real_run(tmp_path, tiny_specs, ner_long, tokenizer_dir, one_torch_thread):
    """Rows, labels, lengths before truncation, parameters and steps, compared with a real tiny run."""
    data, rows = ner_long
    specs = tiny_specs("token_classification", {**data, "max_length": 24},
                       training={"num_train_epochs": 2, "gradient_accumulation_steps": 3, "eval_strategy": "no"})
    before = snapshot(tmp_path)
    report = check_run(specs)
    assert snapshot(tmp_path) == before and not Path(specs["output_dir"]).exists()

    train = report.splits["train"]
    n_val = len(Path(data["validation"]).read_text().splitlines())
    assert (train["records"], train["tokenized"], train["sampled"]) == (97, 97, False)
    assert train["examples"] > 97  # the long record is cut into windows of 24 tokens (data.stride)
    assert report.splits["validation"]["records"] == n_val
    assert train["labels"] == dict(Counter(t for r in rows for t in r["ner_tags"]))
    lengths = _real_lengths(tokenizer_dir, rows)
    (stats,) = train["lengths"]
    assert stats["field"] == "data.max_length" and stats["limit"] == 24 and stats["measured"] == "before truncation"
    assert stats["max"] == lengths[-1] > 24 and stats["p50"] == lengths[math.ceil(0.5 * 97) - 1]
    assert stats["p99"] == lengths[math.ceil(0.99 * 97) - 1]
    assert stats["over_limit"] == sum(n > 24 for n in lengths) >= 1
    # 97 records in 105 windows / batch 8 = 14 batches; 3 per optimizer step = 5 steps per epoch; 2 epochs
    assert (report.steps["steps_per_epoch"], report.steps["total"]) == (5, 10)
    assert report.memory["total"] > 0 and report.memory["device"] == "cpu"

    from tunepipe import FineTunePipeLine
    from tunepipe.modeling.peft_support import trainable_parameters
    pipe = FineTunePipeLine(specs)
    pipe.setup()
    assert trainable_parameters(pipe.model) == (report.parameters["trainable"], report.parameters["total"])
    assert max(len(x) for x in pipe.datasets["train"]["input_ids"]) == 24  # the real run cuts windows there
    assert len(pipe.datasets["train"]) == train["examples"]
    assert pipe.train().global_step == report.steps["total"]


def test_lora_parameters_match_the_loaded_model(tmp_path, tiny_specs, cls_data, one_torch_thread):
    specs = tiny_specs("text_classification", cls_data, peft={"method": "lora", "r": 4})
    before = snapshot(tmp_path)
    report = check_run(specs)
    assert snapshot(tmp_path) == before  # a real from-config PEFT run writes its base into output_dir first
    assert report.parameters["peft"] == "lora" and 0 < report.parameters["trainable"] < report.parameters["total"]
    labels = Counter(json.loads(line)["label"] for line in Path(cls_data["train"]).read_text().splitlines())
    assert report.splits["train"]["labels"] == dict(labels)

    from tunepipe import FineTunePipeLine
    from tunepipe.modeling.peft_support import is_peft_model, trainable_parameters
    pipe = FineTunePipeLine(specs)
    pipe.setup()
    assert is_peft_model(pipe.model)
    assert trainable_parameters(pipe.model) == (report.parameters["trainable"], report.parameters["total"])


def test_label_ids_are_shown_by_the_names_data_labels_gives(tmp_path, tiny_specs, cls_data):
    rows = [json.loads(line) for line in Path(cls_data["train"]).read_text().splitlines()]
    ids = tmp_path / "ids.jsonl"
    ids.write_text("".join(json.dumps({"text": r["text"], "label": ["neg", "pos"].index(r["label"])}) + "\n"
                           for r in rows))
    specs = tiny_specs("text_classification", {"train": str(ids), "labels": ["negative", "positive"]})
    counts = Counter(r["label"] for r in rows)
    assert check_run(specs).splits["train"]["labels"] == {"negative": counts["neg"], "positive": counts["pos"]}


def test_large_split_is_sampled(tiny_specs, ner_long):
    report = check_run(tiny_specs("token_classification", ner_long[0]), sample=10)
    train = report.splits["train"]
    assert (train["records"], train["tokenized"], train["sampled"], train["examples"]) == (97, 10, True, 97)
    assert train["lengths"][0]["count"] == 10
    assert any("sample of 10 of 97" in n for n in report.notes)
    assert report.steps["total"] == math.ceil(97 / 8)  # one epoch of the whole split, not of the sample


def test_trained_tokenizer_leaves_nothing_behind(tmp_path, tiny_specs, ner_data, capsys, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path / "data")
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where the tokenizer is trained, then removed
    specs = tiny_specs("token_classification", ner_data, tokenizer={"name_or_path": None,
                                                                   "train": {"type": "wordpiece", "vocab_size": 300}})
    cfg = _config(tmp_path / "data", specs)
    before = snapshot(tmp_path / "data", Path(ner_data["train"]).parent)
    assert main(["check", cfg]) == 0
    out = capsys.readouterr().out
    assert "trained on the training text" in out and "nothing was written" in out
    assert snapshot(tmp_path / "data", Path(ner_data["train"]).parent) == before
    assert not Path(specs["output_dir"]).exists()
    assert not list(temp.glob("tunepipe-*"))  # (torch's own compile cache may appear there on import)


def test_json_report_and_dry_run(tmp_path, tiny_specs, ner_data, capsys):
    cfg = _config(tmp_path, tiny_specs("token_classification", ner_data))
    assert main(["check", cfg, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["written"] == "nothing" and report["splits"]["train"]["records"] == 96
    assert set(report) >= {"parameters", "steps", "memory", "splits", "output_dir_state"}
    before = snapshot(tmp_path)
    assert main(["train", cfg, "--dry-run", "--json", "--set", "training.num_train_epochs=3"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["steps"]["total"] == 3 * report["steps"]["total"]
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", ["typo", "bad-value", "bad-record", "output-dir"])
def test_errors_are_trains_own(tmp_path, tiny_specs, ner_data, capsys, case):
    specs = tiny_specs("token_classification", ner_data)
    if case == "typo":
        specs["training"]["learning_rte"] = 1e-3
    elif case == "bad-value":
        specs["training"]["eval_strategy"] = "epoc"
    elif case == "bad-record":
        bad = tmp_path / "bad.jsonl"
        bad.write_text(Path(ner_data["train"]).read_text() + json.dumps({"tokens": ["a", "b"], "ner_tags": ["O"]}))
        specs["data"]["train"] = str(bad)
    else:
        Path(specs["output_dir"]).mkdir()
        (Path(specs["output_dir"]) / "notes.txt").write_text("mine")
    cfg = _config(tmp_path, specs)
    before = snapshot(tmp_path)
    errors = []
    for argv in (["check", cfg], ["train", cfg, "--dry-run"], ["train", cfg]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        errors.append(err[err.index("error:"):])
        assert snapshot(tmp_path) == before
    assert errors[0] == errors[1] == errors[2]
    assert main(["check", cfg, "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["error"]["code"] in errors[0] and out["error"]["message"] in errors[0]


def test_typo_reported_before_heavy_imports(tmp_path, tiny_specs, ner_data):
    specs = tiny_specs("token_classification", ner_data)
    specs["training"]["num_train_epoch"] = 2
    cfg = _config(tmp_path, specs)
    code = ("import sys, time; t = time.perf_counter(); from tunepipe.cli import main; "
            f"rc = main(['check', {cfg!r}]); "
            "print(rc, time.perf_counter() - t, 'torch' in sys.modules, 'transformers' in sys.modules)")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - start
    rc, seconds, torch_loaded, transformers_loaded = result.stdout.split()
    assert (rc, torch_loaded, transformers_loaded) == ("2", "False", "False"), result.stderr
    assert "did you mean 'num_train_epochs'" in result.stderr
    assert float(seconds) < 2.0, (seconds, wall)


def test_training_argument_names_read_without_import():
    import dataclasses

    from transformers import TrainingArguments

    from tunepipe.specs import _training_argument_names_from_source
    assert _training_argument_names_from_source() == {f.name for f in dataclasses.fields(TrainingArguments)}
