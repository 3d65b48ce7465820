"""Extension points without editing tunepipe (docs/extending.md), tested from a separate package written here: a
module with a metric function, a preprocess function and a Task subclass, plus a ``*.dist-info`` folder whose
entry_points.txt registers the task in the ``tunepipe.tasks`` group, put on sys.path like an installed package.

- ``metrics:`` functions run after the task's compute_metrics on every backend; metric_for_best_model may name one;
- ``data.preprocess`` runs on each record before the checks (errors name the raw record's file and line) and is
  part of the cache key (editing its module rebuilds the cached records);
- tasks from entry points train, list and init; broken ones are typed errors naming the distribution;
- a finished run's specs.yaml never imports these functions in predict, serve or merge.
"""
from __future__ import annotations

import importlib
import json
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tunepipe.cli import main as cli_main
from tunepipe.errors import ConfigError, DatasetLoadError, TrainingError

PACKAGE = "tp_ext_demo"
MODULE = '''
"""A user's extension module (written by tests/test_extensions.py)."""
import numpy as np

CALLS = []


def label_agreement(p):
    preds, labels = np.asarray(p.predictions), np.asarray(p.label_ids)
    keep = labels != -100
    CALLS.append({"split": p.split, "task": p.task.name, "labels": list(p.task.labels or []),
                  "task_metrics": sorted(p.metrics)})
    return {"label_agreement": float((preds[keep] == labels[keep]).mean())}


def accuracy_again(p):
    return {"accuracy": 1.0}


def relabel(record):
    if record["text"] == "a chore to watch":
        return None  # dropped
    record["label"] = {"pos": "positive", "neg": "negative"}[record["label"]]
    return record


def empty_the_joy(record):
    if record["text"] == "a joy to watch":
        record["text"] = ""
    return record
'''
TASKS = '''
from tunepipe.tasks.text_classification import TextClassificationTask


class ReviewSentiment(TextClassificationTask):
    name = "review_sentiment"
    description = "sentiment of short film reviews (a plugin task)"


class Misnamed(TextClassificationTask):
    name = "something_else"
'''
EVIL = '''
import pathlib
pathlib.Path({marker!r}).write_text("imported")


def metric(p):
    return {{"evil": 1.0}}


def preprocess(record):
    return record
'''


def _dist(root: Path, name: str, entry_points: dict[str, str]) -> None:
    info = root / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n", encoding="utf-8")
    lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[tunepipe.tasks]\n{lines}", encoding="utf-8")


def _forget_modules():
    for name in [m for m in sys.modules if m.split(".")[0] in (PACKAGE, "tp_evil")]:
        del sys.modules[name]


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The package tp_ext_demo, 'installed' on sys.path with its tunepipe.tasks entry point."""
    root = tmp_path / "site"
    (root / PACKAGE).mkdir(parents=True)
    (root / PACKAGE / "__init__.py").write_text(MODULE, encoding="utf-8")
    (root / PACKAGE / "tasks.py").write_text(TASKS, encoding="utf-8")
    _dist(root, "tp-ext-demo", {"review_sentiment": f"{PACKAGE}.tasks:ReviewSentiment"})
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # an edited module is read again, not a stale .pyc
    _forget_modules()
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    yield root
    _forget_modules()
    importlib.invalidate_caches()


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


# ---- metrics: and data.preprocess in training ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["hf", "accelerate"])
def test_custom_metric_and_preprocess_train_on_each_backend(backend, plugin, tiny_specs, cls_data, one_torch_thread):
    from tunepipe import FineTunePipeLine
    specs = tiny_specs("text_classification", {**cls_data, "preprocess": f"{PACKAGE}:relabel"}, backend=backend,
                       metrics=f"{PACKAGE}:label_agreement",
                       training={"metric_for_best_model": "label_agreement", "save_strategy": "epoch"})
    pipe = FineTunePipeLine(specs)
    pipe.run()
    module = sys.modules[PACKAGE]
    # the preprocessed records were checked, counted and labelled: the new label names, the dropped record gone
    assert pipe.task.labels == ["negative", "positive"]
    raw = [json.loads(line) for line in Path(cls_data["train"]).read_text().splitlines()]
    assert len(pipe.data.records["train"]) == sum(r["text"] != "a chore to watch" for r in raw) < len(raw)
    # the custom metric is merged into the task's, in metrics.json and in the training log
    validation = pipe.metrics["validation"]
    assert 0.0 <= validation["label_agreement"] <= 1.0 and "accuracy" in validation
    saved = json.loads((pipe.output_dir / "metrics.json").read_text())
    assert saved["validation"]["label_agreement"] == validation["label_agreement"]
    assert any("label_agreement" in k for r in _log(pipe.output_dir) for k in r)
    call = module.CALLS[-1]
    assert call["split"] == "validation" and call["task"] == "text_classification"
    assert call["labels"] == ["negative", "positive"] and "accuracy" in call["task_metrics"]
    # the run records what it used
    recorded = yaml.safe_load((pipe.output_dir / "specs.yaml").read_text())
    assert recorded["metrics"] == [f"{PACKAGE}:label_agreement"]
    assert recorded["data"]["preprocess"] == f"{PACKAGE}:relabel"


def test_preprocess_applies_to_a_streamed_training_split(plugin, tiny_specs, cls_data, one_torch_thread):
    """Streaming reads train while training through the same _rows: the relabelled records pass the label check
    (the raw 'pos'/'neg' are not among data.labels)."""
    from tunepipe import FineTunePipeLine
    data = {**cls_data, "preprocess": f"{PACKAGE}:relabel", "streaming": True, "labels": ["negative", "positive"]}
    pipe = FineTunePipeLine(tiny_specs("text_classification", data, metrics=f"{PACKAGE}:label_agreement",
                                       training={"max_steps": 3}))
    pipe.run()
    assert pipe.train_result.global_step == 3
    assert "label_agreement" in pipe.metrics["validation"]


def test_a_metric_named_like_the_tasks_own_is_an_error(plugin, tiny_specs, cls_data):
    import numpy as np
    from transformers import EvalPrediction

    from tunepipe.extensions import build_task
    from tunepipe.specs import load_specs
    specs = load_specs(tiny_specs("text_classification", cls_data, metrics=[f"{PACKAGE}:label_agreement",
                                                                             f"{PACKAGE}:accuracy_again"]))
    task = build_task(specs)
    task.labels = ["neg", "pos"]
    with pytest.raises(TrainingError) as caught:
        task.compute_metrics(EvalPrediction(predictions=np.array([0, 1]), label_ids=np.array([0, 1])))
    assert caught.value.field == "metrics[1]" and "'accuracy'" in caught.value.message
    assert "accuracy_again" in caught.value.message


def test_a_reference_that_does_not_resolve_names_the_field(plugin, tiny_specs, cls_data):
    from tunepipe import FineTunePipeLine
    with pytest.raises(ConfigError) as caught:
        FineTunePipeLine(tiny_specs("text_classification", cls_data, metrics=f"{PACKAGE}:label_agreemnt"))
    assert caught.value.field == "metrics"
    assert "did you mean 'label_agreement'?" in caught.value.suggestions
    with pytest.raises(ConfigError) as caught:
        FineTunePipeLine(tiny_specs("text_classification", {**cls_data, "preprocess": "no_such_module_x:fix"}))
    assert caught.value.field == "data.preprocess" and "PYTHONPATH" in " ".join(caught.value.suggestions)
    with pytest.raises(ConfigError) as caught:  # the form is checked with the specs, before anything is imported
        FineTunePipeLine(tiny_specs("text_classification", cls_data, metrics=[f"{PACKAGE}.label_agreement"]))
    assert caught.value.field == "metrics" and "module:function" in " ".join(caught.value.suggestions)
    pipe = FineTunePipeLine(tiny_specs("text_classification", cls_data, metrics=f"{PACKAGE}:label_agreement",
                                       training={"metric_for_best_model": "label_agreemnt"}))
    with pytest.raises(ConfigError) as caught:  # a custom metric is among the names the task reports, before training
        pipe.setup()
    assert "did you mean 'label_agreement'?" in caught.value.suggestions


def test_a_python_file_can_be_named_too(tmp_path, tiny_specs, cls_data, monkeypatch):
    from tunepipe.data import DatasetModules
    from tunepipe.extensions import build_task
    from tunepipe.specs import load_specs
    (tmp_path / "my_prep.py").write_text(MODULE, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    specs = load_specs(tiny_specs("text_classification", {**cls_data, "preprocess": "my_prep.py:relabel",
                                                                         "cache": False}))
    data = DatasetModules(specs, build_task(specs))
    data.load()
    assert data.task.labels == ["negative", "positive"]


def test_preprocess_errors_name_the_raw_records_file_and_line(plugin, tiny_specs, cls_data):
    from tunepipe import FineTunePipeLine
    pipe = FineTunePipeLine(tiny_specs("text_classification", {**cls_data, "preprocess": f"{PACKAGE}:empty_the_joy",
                                                                              "cache": False}))
    with pytest.raises(Exception) as caught:
        pipe.setup()
    lines = Path(cls_data["train"]).read_text().splitlines()
    first = next(i for i, line in enumerate(lines, 1) if json.loads(line)["text"] == "a joy to watch")
    assert f"{cls_data['train']}:{first}" in str(caught.value) and "empty" in str(caught.value)


def test_a_failing_preprocess_names_the_record(plugin, tiny_specs, cls_data):
    from tunepipe import FineTunePipeLine
    (plugin / PACKAGE / "__init__.py").write_text(MODULE + "\n\ndef broken(record):\n    return record['nope']\n")
    sys.modules.pop(PACKAGE, None)
    pipe = FineTunePipeLine(tiny_specs("text_classification", {**cls_data, "preprocess": f"{PACKAGE}:broken",
                                                                              "cache": False}))
    with pytest.raises(DatasetLoadError) as caught:
        pipe.setup()
    assert caught.value.field == "data.preprocess" and caught.value.line == 1
    assert caught.value.file == cls_data["train"] and "KeyError" in caught.value.message


def test_editing_the_preprocess_module_invalidates_the_cached_records(plugin, tiny_specs, cls_data):
    from tunepipe.data import DatasetModules
    from tunepipe.extensions import build_task
    from tunepipe.specs import load_specs

    def load():
        specs = load_specs(tiny_specs("text_classification", {**cls_data, "preprocess": f"{PACKAGE}:relabel"}))
        data = DatasetModules(specs, build_task(specs))
        data.load()
        return data

    first = load()
    assert load().cache_hits["records"]  # same function, same code: the cached records
    path = plugin / PACKAGE / "__init__.py"
    path.write_text(MODULE.replace('"positive"', '"good"'), encoding="utf-8")  # a changed function body
    del sys.modules[PACKAGE]  # as a new process would import it
    edited = load()
    assert not edited.cache_hits["records"]
    assert first.task.labels == ["negative", "positive"] and edited.task.labels == ["good", "negative"]


# ---- tasks from entry points --------------------------------------------------------------------------------------
def test_an_entry_point_task_lists_inits_trains_and_predicts(plugin, tiny_specs, cls_data, tmp_path, capsys,
                                                             one_torch_thread):
    from tunepipe import FineTunePipeLine
    from tunepipe.tasks import get_task, task_names
    assert "review_sentiment" in task_names(plugins=True) and "review_sentiment" not in task_names()
    assert get_task("review_sentiment").__module__ == f"{PACKAGE}.tasks"
    assert cli_main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "review_sentiment  (sentiment of short film reviews (a plugin task), from tp_ext_demo)" in out
    assert cli_main(["init", "review_sentiment", "-o", str(tmp_path / "rs.yaml")]) == 0
    assert yaml.safe_load((tmp_path / "rs.yaml").read_text())["task"] == "review_sentiment"
    pipe = FineTunePipeLine(tiny_specs("review_sentiment", cls_data, metrics=[f"{PACKAGE}:label_agreement"]))
    pipe.run()
    assert type(pipe.task).__name__ == "ReviewSentiment" and "label_agreement" in pipe.metrics["validation"]
    config = json.loads((pipe.output_dir / "model" / "config.json").read_text())
    assert config["tunepipe_task"] == "review_sentiment"
    capsys.readouterr()
    assert cli_main(["predict", "--model", str(pipe.output_dir), "--input", "a warm and funny film"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["label"] in ("neg", "pos")


def test_broken_entry_points_are_typed_errors_only_when_requested(plugin, tmp_path, monkeypatch, capsys):
    from tunepipe.specs import load_specs
    from tunepipe.tasks import TaskEntryPointError, get_task
    broken = tmp_path / "broken-site"
    _dist(broken, "tp-broken", {"missing_module": "tp_no_such_module:Task", "not_a_task": f"{PACKAGE}:relabel",
                                "ner": f"{PACKAGE}.tasks:ReviewSentiment",
                                "misnamed": f"{PACKAGE}.tasks:Misnamed"})
    monkeypatch.syspath_prepend(str(broken))
    importlib.invalidate_caches()
    # listing warns and skips them; the good plugin and the built-ins are listed
    assert cli_main(["tasks"]) == 0
    captured = capsys.readouterr()
    assert "review_sentiment" in captured.out and "text_classification" in captured.out
    assert "missing_module" not in captured.out and "not_a_task" not in captured.out
    for name in ("missing_module", "not_a_task", "'ner'", "misnamed"):
        assert name in captured.err and "tp-broken" in captured.err, name
    # requested, each is a typed error naming the distribution and the entry point
    cases = {"missing_module": "importing it failed", "not_a_task": "not a subclass",
             "misnamed": "name attribute", "token_classification": "built-in task name"}
    for task, why in cases.items():
        with pytest.raises(TaskEntryPointError) as caught:
            load_specs({"task": task, "data": {"train": "x.jsonl"}})
        assert caught.value.code == "TASK_TYPE_ERROR" and caught.value.distribution == "tp-broken", task
        assert why in caught.value.message and caught.value.entry_point in caught.value.message, task
    # the others work
    assert get_task("text_classification").name == "text_classification"
    assert get_task("review_sentiment").name == "review_sentiment"


# ---- a finished run's specs never import the functions ------------------------------------------------------------
def test_predict_serve_and_merge_do_not_import_a_runs_functions(plugin, tiny_specs, cls_data, tmp_path,
                                                                 one_torch_thread):
    from fastapi.testclient import TestClient

    from tunepipe import FineTunePipeLine, InferencePipeLine
    from tunepipe.serving.serve import create_app
    pipe = FineTunePipeLine(tiny_specs("text_classification", cls_data, peft={"method": "lora", "r": 2},
                                       training={"max_steps": 2, "eval_strategy": "no"}))
    pipe.run()
    run = pipe.output_dir
    # the run's specs.yaml now names a module that writes a marker when imported (on sys.path, as a received run's
    # functions might be)
    marker = tmp_path / "imported.txt"
    (plugin / "tp_evil.py").write_text(EVIL.format(marker=str(marker)), encoding="utf-8")
    importlib.invalidate_caches()
    specs = yaml.safe_load((run / "specs.yaml").read_text())
    specs["metrics"] = ["tp_evil:metric"]
    specs["data"]["preprocess"] = "tp_evil:preprocess"
    (run / "specs.yaml").write_text(yaml.safe_dump(specs), encoding="utf-8")

    assert cli_main(["predict", "--model", str(run), "--input", "a warm and funny film"]) == 0
    client = TestClient(create_app(InferencePipeLine("text_classification", str(run))))  # what serve runs
    assert client.post("/v1/predict", json={"inputs": ["a dull film"]}).status_code == 200
    assert cli_main(["merge", str(run), "--to", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()
    assert not marker.exists(), "a finished run's specs imported its metrics/preprocess module"
    # positive control: your own specs (training or evaluating with them) do import it
    FineTunePipeLine(specs | {"output_dir": str(tmp_path / "again")})
    assert marker.read_text() == "imported"


def test_docs_show_a_worked_example():
    text = (Path(__file__).resolve().parents[1] / "docs" / "extending.md").read_text(encoding="utf-8")
    for needle in ("metrics:", "preprocess:", "tunepipe.tasks", "entry_points", "MetricInputs"):
        assert needle in textwrap.dedent(text), needle
