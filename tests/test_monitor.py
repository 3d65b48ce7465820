"""Resource monitor: fields in every training record of train_log.jsonl on each backend, exact sample and
non-padding token counts, the end-of-training summary, and the switch that turns it off."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import torch

from tunepipe import FineTunePipeLine
from tunepipe.tracking.monitor import STEP_FIELDS, ResourceMonitor, format_summary, place_before_log_writer

CPU_FIELDS = [f for f in STEP_FIELDS if not f.startswith("gpu")]
GPU_FIELDS = ["gpu_mem_mb", "gpu_mem_peak_mb"]  # gpu_util also needs pynvml


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Small models run fastest on one thread, and so do several tests sharing a small machine."""


def records(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("backend", ["hf", "accelerate", "lightning"])
def test_every_training_record_carries_resources_and_the_summary_counts_exactly(backend, tiny_specs, ner_data,
                                                                                  capsys):
    if backend == "lightning":
        pytest.importorskip("lightning")
    specs = tiny_specs("token_classification", ner_data, backend=backend,
                       training={"eval_strategy": "steps", "eval_steps": 6})
    pipe = FineTunePipeLine(specs)
    pipe.setup()
    result = pipe.train()

    steps = [r for r in records(pipe.output_dir) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(2, result.global_step + 1, 2))
    for r in steps:
        assert set(CPU_FIELDS) <= set(r), f"missing {set(CPU_FIELDS) - set(r)} at step {r['step']}"
        assert r["step_time"] > 0 and r["samples_per_second"] > 0 and r["tokens_per_second"] > 0
        assert r["rss_mb"] > 50 and r["cpu_percent"] >= 0
        assert (set(GPU_FIELDS) <= set(r)) == torch.cuda.is_available()  # no GPU: no GPU fields, not zeros
    evals = [r for r in records(pipe.output_dir) if "eval_loss" in r]
    assert evals and not any("samples_per_second" in r for r in evals)  # evaluation records keep their own

    summary = json.loads((pipe.output_dir / "resources.json").read_text())
    train = pipe.datasets["train"]
    assert summary["steps"] == result.global_step == 12
    assert summary["samples"] == len(train) == 96  # every sample the model saw while training, once
    assert summary["tokens"] == sum(len(ids) for ids in train["input_ids"])  # attention_mask ones, no padding
    assert summary["eval_and_save_seconds"] > 0  # two evaluations, left out of the training time
    assert summary["train_seconds"] < summary["wall_seconds"]
    assert summary["samples_per_second"] == pytest.approx(96 / summary["train_seconds"], rel=0.01)
    assert summary["rss_peak_mb"] >= summary["rss_mb"] > 50
    assert (summary["gpu"] is None) == (not torch.cuda.is_available())
    assert format_summary(summary) in capsys.readouterr().out


def test_resources_off_leaves_the_log_as_it_was(tiny_specs, ner_data):
    specs = tiny_specs("token_classification", ner_data, tracking={"resources": False})
    pipe = FineTunePipeLine(specs)
    pipe.setup()
    pipe.train()
    steps = [r for r in records(pipe.output_dir) if "loss" in r]
    assert steps and not any(set(STEP_FIELDS) & set(r) for r in steps)
    assert not (pipe.output_dir / "resources.json").exists()


def test_the_monitor_runs_before_the_log_writer_so_its_fields_are_written():
    from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

    from tunepipe.trainers.common import JsonlLogWriter
    from tunepipe.trainers.hf import _JsonlLogCallback

    class Loop:  # the tunepipe loops keep their CallbackHandler in .handler
        pass

    monitor = ResourceMonitor()
    writer = _JsonlLogCallback(JsonlLogWriter(Path("unused.jsonl")))
    loop = Loop()
    loop.handler = CallbackHandler([DefaultFlowCallback, writer, monitor], None, None, None, None)
    assert place_before_log_writer(loop, monitor)
    assert [type(cb) for cb in loop.handler.callbacks] == [DefaultFlowCallback, ResourceMonitor, _JsonlLogCallback]
    assert not place_before_log_writer(loop, ResourceMonitor())  # not attached: nothing to move
