"""keep_last_n keeps the newest complete checkpoints, the final one included, and the best one, on every backend
(issue 15: the hf backend kept only checkpoint-6 of a 14-step run)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunepipe.pipeline import FineTunePipeLine


def _kept(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize("backend", ["hf", "accelerate"])
def test_final_and_best_checkpoints_are_kept(tiny_specs, ner_data, backend):
    specs = tiny_specs("token_classification", ner_data, backend=backend,
                       training={"max_steps": 14, "save_strategy": "steps", "save_steps": 6, "keep_last_n": 1,
                                 "eval_strategy": "steps", "eval_steps": 6, "metric_for_best_model": "f1",
                                 "learning_rate": 5e-3, "logging_steps": 1})
    pipe = FineTunePipeLine(specs)
    pipe.train()
    out = pipe.output_dir
    best = pipe.trainer.state.best_model_checkpoint
    best_step = int(Path(best).name.split("-")[1])
    assert _kept(out) == sorted({14, best_step})  # the newest (final) one and the best one, nothing else
    # resume: auto finds the whole run there: nothing is trained again
    again = FineTunePipeLine(dict(specs, training={**specs["training"], "resume": "auto"}))
    assert again.train().global_step == 14
    steps = [r["step"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, 15))  # each step logged once: none retrained


@pytest.mark.parametrize("backend", ["hf", "accelerate"])
def test_keep_last_n_counts_the_final_checkpoint(tiny_specs, ner_data, backend):
    specs = tiny_specs("token_classification", ner_data, backend=backend,
                       training={"max_steps": 14, "save_strategy": "steps", "save_steps": 6, "keep_last_n": 2,
                                 "eval_strategy": "no"})
    pipe = FineTunePipeLine(specs)
    pipe.train()
    assert _kept(pipe.output_dir) == [12, 14]
