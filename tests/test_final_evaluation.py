"""The validation split is scored once at the end of a run: the pipeline's "validation metrics" reuse the
trainer's evaluation of the final weights (issue 15), on the hf backend and on the one loop."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunepipe.pipeline import FineTunePipeLine


def _counted(pipe) -> list[int]:
    """Wrap the task's compute_metrics (the hf Trainer takes it at construction, the loop reads it per call):
    one entry per evaluation, its number of rows."""
    calls: list[int] = []
    original = pipe.task.compute_metrics

    def compute_metrics(eval_pred):
        calls.append(len(eval_pred.label_ids))
        return original(eval_pred)

    pipe.task.compute_metrics = compute_metrics
    return calls


def _run(specs) -> tuple[FineTunePipeLine, list[int]]:
    pipe = FineTunePipeLine(specs)
    calls = _counted(pipe)
    pipe.setup()
    calls.clear()  # the metric-name probe of setup() is not an evaluation
    pipe.train()
    pipe.evaluate()
    return pipe, calls


def _log(pipe) -> list[dict]:
    return [json.loads(line) for line in (pipe.output_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("backend", ["hf", "accelerate"])
def test_validation_scored_once_at_the_end(tiny_specs, ner_data, backend):
    data = {**ner_data, "test": ner_data["validation"]}
    specs = tiny_specs("token_classification", data, backend=backend, training={"eval_strategy": "epoch"})
    pipe, calls = _run(specs)
    n_val = len(pipe.datasets["validation"])
    # one evaluation of the validation split (the epoch's), one of the test split; the old code scored
    # validation a second time after training
    assert calls == [n_val, len(pipe.datasets["test"])]
    metrics = json.loads((pipe.output_dir / "metrics.json").read_text())
    assert set(metrics) >= {"validation", "test", "train"}
    # logged as the final evaluation was (the curves' final point, MLflow)
    assert [r["validation_f1"] for r in _log(pipe) if "validation_f1" in r] == [metrics["validation"]["f1"]]
    # the same metric names as a fresh evaluation of the split
    fresh = pipe.trainer.run_evaluation(pipe.datasets["validation"], split="validation")
    assert sorted(metrics["validation"]) == sorted(fresh)
    assert metrics["validation"]["f1"] == pytest.approx(fresh["f1"], abs=1e-6)
    evaluated = [r for r in _log(pipe) if "eval_f1" in r]
    assert len(evaluated) == 1 and evaluated[0]["eval_f1"] == metrics["validation"]["f1"]
    # taken once: a later evaluate() scores the split again (the caller may have changed the model)
    calls.clear()
    pipe.evaluate(["validation"])
    assert calls == [n_val]


@pytest.mark.parametrize("backend", ["hf", "accelerate"])
def test_best_model_at_end_reuses_the_best_steps_evaluation(tiny_specs, ner_data, backend):
    specs = tiny_specs("token_classification", ner_data, backend=backend,
                       training={"max_steps": 9, "eval_strategy": "steps", "eval_steps": 3, "save_strategy": "steps",
                                 "save_steps": 3, "load_best_model_at_end": True, "metric_for_best_model": "f1",
                                 "learning_rate": 5e-3})
    pipe, calls = _run(specs)
    n_val = len(pipe.datasets["validation"])
    assert calls == [n_val] * 3  # steps 3, 6, 9; none after the best model was reloaded
    best = Path(pipe.trainer.state.best_model_checkpoint)
    best_step = int(best.name.split("-")[1])
    logged = next(r for r in _log(pipe) if "eval_f1" in r and r["step"] == best_step)
    assert pipe.metrics["validation"]["f1"] == logged["eval_f1"]
    # and it is what the reloaded weights score
    assert pipe.trainer.run_evaluation(pipe.datasets["validation"])["f1"] == pytest.approx(logged["eval_f1"],
                                                                                           abs=1e-6)


def test_no_evaluation_during_training_scores_validation_at_the_end(tiny_specs, ner_data):
    specs = tiny_specs("token_classification", ner_data, training={"eval_strategy": "no", "max_steps": 2})
    pipe, calls = _run(specs)
    assert calls == [len(pipe.datasets["validation"])]
    assert "f1" in pipe.metrics["validation"]
