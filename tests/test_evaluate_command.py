"""`tunepipe evaluate` reads and tokenizes only the splits it scores, and writes its results beside the run's
records (metrics.json["evaluations"]) without replacing them (issue 15)."""
from __future__ import annotations

import json
from pathlib import Path

from tunepipe.pipeline import FineTunePipeLine


def _trained_run(tiny_specs, ner_data):
    data = {**ner_data, "test": ner_data["validation"]}
    specs = tiny_specs("token_classification", data, training={"max_steps": 4, "eval_strategy": "no"})
    FineTunePipeLine(specs).run()
    return specs, Path(specs["output_dir"])


def _snapshot(out: Path) -> dict[str, str]:
    return {name: (out / name).read_text() for name in ("train_log.jsonl", "README.md", "metrics.json")}


def test_evaluate_tokenizes_only_the_scored_splits_and_keeps_the_run_records(tiny_specs, ner_data):
    specs, out = _trained_run(tiny_specs, ner_data)
    before = _snapshot(out)
    trained = json.loads(before["metrics.json"])
    # the training split is neither read nor tokenized: its file holds nothing, and evaluation still runs
    specs = dict(specs, data={**specs["data"], "train": str(out.parent / "gone.jsonl")})
    (out.parent / "gone.jsonl").write_text("")  # present (the specs name it) but holding nothing to read
    pipe = FineTunePipeLine(specs)
    pipe.setup(trained_dir=out / "model")
    assert set(pipe.datasets) == {"validation", "test"} and "train" not in pipe.data.records
    pipe.evaluate()
    # the run's records are unchanged: train_log.jsonl (no step-0 line), the model card (no epoch 0)
    after = _snapshot(out)
    assert after["train_log.jsonl"] == before["train_log.jsonl"]
    assert after["README.md"] == before["README.md"]
    metrics = json.loads(after["metrics.json"])
    assert {k: v for k, v in metrics.items() if k != "evaluations"} == trained  # train, validation, test kept
    [entry] = metrics["evaluations"]
    assert entry["model"] == str(out / "model") and entry["time"]
    assert entry["data"] == {"validation": [ner_data["validation"]], "test": [ner_data["validation"]]}
    assert set(entry["metrics"]) == {"validation", "test"} and "f1" in entry["metrics"]["validation"]
    assert "epoch" not in entry["metrics"]["validation"]
    # a second evaluation is added, not replacing the first
    pipe = FineTunePipeLine(specs)
    pipe.setup(trained_dir=out / "model")
    pipe.evaluate()
    assert len(json.loads((out / "metrics.json").read_text())["evaluations"]) == 2


def test_evaluate_command_keeps_the_train_section(tiny_specs, ner_data, tmp_path):
    import yaml

    from tunepipe.cli import main
    specs, out = _trained_run(tiny_specs, ner_data)
    before = _snapshot(out)
    config = tmp_path / "ner.yaml"
    config.write_text(yaml.safe_dump(specs))
    assert main(["evaluate", str(config)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "train" in metrics and metrics["train"] == json.loads(before["metrics.json"])["train"]
    assert len(metrics["evaluations"]) == 1
    assert (out / "train_log.jsonl").read_text() == before["train_log.jsonl"]
    assert (out / "README.md").read_text() == before["README.md"]
