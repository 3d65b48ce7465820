"""After a successful final save the run's checkpoints lose their optimizer state unless
training.keep_optimizer_state is on; resume: auto of the finished run still works, continuing from a checkpoint
without it is refused with a typed error (issue 15)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tunepipe.trainers.checkpoints import CheckpointManager
from tunepipe.errors import CheckpointError
from tunepipe.pipeline import FineTunePipeLine
from tunepipe.specs import load_specs


def _specs(tiny_specs, ner_data, backend, **training):
    return tiny_specs("token_classification", ner_data, backend=backend,
                      training={"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "keep_last_n": 2,
                                "eval_strategy": "no", **training})


@pytest.mark.parametrize("backend", ["hf", "accelerate"])
def test_optimizer_state_dropped_after_the_final_save(tiny_specs, ner_data, backend):
    specs = _specs(tiny_specs, ner_data, backend)
    FineTunePipeLine(specs).train()
    out = Path(specs["output_dir"])
    manager = CheckpointManager(out / "checkpoints", load_specs(specs))
    kept = manager.checkpoints()
    assert [CheckpointManager.step_of(p) for p in kept] == [2, 4]
    for path in kept:
        names = {p.name for p in path.iterdir()}
        assert "optimizer.pt" not in names and {"scheduler.pt", "trainer_state.json"} <= names
        manifest = manager.verify(path)  # still intact: the manifest no longer lists the optimizer
        assert manifest["optimizer_state"] == "dropped" and "optimizer.pt" not in manifest["files"]
    # resume: auto of the finished run: nothing left to train, no error
    done = FineTunePipeLine(dict(specs, training={**specs["training"], "resume": "auto"}))
    assert done.train().global_step == 4
    log = (out / "train_log.jsonl").read_text()
    # continuing from the earlier checkpoint would need the optimizer: refused, naming the setting, log untouched
    earlier = FineTunePipeLine(dict(specs, training={**specs["training"], "resume": str(kept[0])}))
    with pytest.raises(CheckpointError) as err:
        earlier.train()
    assert err.value.field == "training.keep_optimizer_state" and "no optimizer state" in err.value.message
    assert (out / "train_log.jsonl").read_text() == log


@pytest.mark.parametrize("backend", ["hf", "accelerate"])
def test_keep_optimizer_state_keeps_it(tiny_specs, ner_data, backend):
    specs = _specs(tiny_specs, ner_data, backend, keep_optimizer_state=True)
    pipe = FineTunePipeLine(specs)
    pipe.train()
    assert "keep_optimizer_state" not in pipe.trainer.args.to_dict()  # tunepipe's key, not TrainingArguments'
    for path in CheckpointManager(Path(specs["output_dir"]) / "checkpoints").checkpoints():
        assert (path / "optimizer.pt").is_file()
    # and a checkpoint that keeps it resumes as before
    earlier = Path(specs["output_dir"]) / "checkpoints" / ("checkpoint-2" if backend == "hf" else "step-2")
    again = FineTunePipeLine(dict(specs, training={**specs["training"], "resume": str(earlier)}))
    assert again.train().global_step == 4
