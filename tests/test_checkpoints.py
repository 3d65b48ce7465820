"""CheckpointManager: atomic writes, manifest verification (corrupt, partial, incompatible -> CHECKPOINT_ERROR
naming the file and what to do), safe loading (weights_only), exact RNG round trip, resume: auto, rotation with
keep_last_n / keep_best, the specs aliases, and the backends' checkpoint directories."""
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tunepipe.trainers.checkpoints import MANIFEST, CheckpointManager
from tunepipe.trainers.run_state import capture_rng_state, restore_rng_state, safe_load, training_relevant_specs
from tunepipe.errors import CheckpointError
from tunepipe.pipeline import FineTunePipeLine
from tunepipe.specs import load_specs


def _specs(**training):
    return load_specs({"task": "token_classification", "model": "m", "data": {"train": "x"},
                       "training": {"learning_rate": 1e-3, **training}})


class _Model(torch.nn.Module):
    """Enough of a transformers model for save_pretrained / load_state_dict."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.linear(x)

    def save_pretrained(self, path, safe_serialization=True):
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(Path(path) / "model.safetensors"))


def _loop_objects():
    from transformers import TrainerState, get_scheduler
    torch.manual_seed(0)
    model = _Model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=1, num_training_steps=10)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler, TrainerState(global_step=3)


def _save(manager, step=3, **data):
    model, optimizer, scheduler, state = _loop_objects()
    state.global_step = step
    return manager.save_loop_state(step, model=model, optimizer=optimizer, scheduler=scheduler, state=state,
                                   data_state={"num_examples": 96, "steps_in_epoch": 12, "world_size": 1, **data})


# ---- writing: atomic, manifest last ---------------------------------------------------------------------------
def test_save_writes_a_sealed_checkpoint_with_hashes(tmp_path):
    manager = CheckpointManager(tmp_path, _specs())
    path = _save(manager)
    assert path == tmp_path / "step-3"
    manifest = json.loads((path / MANIFEST).read_text())
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
            "data_state.json"} <= set(manifest["files"])
    assert manifest["specs"]["training"]["learning_rate"] == 1e-3 and len(manifest["specs_hash"]) == 64
    assert [p.name for p in tmp_path.iterdir()] == ["step-3"]  # no temporary directory left
    assert manager.verify(path)["step"] == 3


def test_failed_save_leaves_the_previous_checkpoint_and_nothing_else(tmp_path):
    manager = CheckpointManager(tmp_path, _specs())
    good = _save(manager, 3)

    def crash(tmp: Path):
        (tmp / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        manager.save(6, crash)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3"]
    # a process killed while saving leaves its temporary directory: ignored, then cleaned by resume: auto
    leftover = tmp_path / ".step-6.tmp-999"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    assert manager.latest() == good
    assert manager.resolve("auto") == good
    assert not leftover.exists()


# ---- verification: corrupt, partial, incompatible ------------------------------------------------------------
def test_truncated_file_is_refused_with_the_file_named(tmp_path):
    manager = CheckpointManager(tmp_path, _specs())
    _save(manager, 3)
    path = _save(manager, 6)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    with pytest.raises(CheckpointError) as err:
        manager.resolve(str(path))
    e = err.value
    assert e.code == "CHECKPOINT_ERROR" and e.file == str(weights) and "corrupt" in e.message
    assert any("step-3" in s for s in e.suggestions)  # points to the newest intact one


def test_missing_manifest_is_an_incomplete_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path, _specs())
    path = _save(manager)
    (path / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="incomplete") as err:
        manager.verify(path)
    assert err.value.suggestions
    assert manager.latest() is None  # not a candidate for resume: auto
    (path / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="not found"):
        manager.verify(tmp_path / "step-99")


def test_changed_training_specs_are_refused_but_logging_changes_are_not(tmp_path):
    path = _save(CheckpointManager(tmp_path, _specs()))
    CheckpointManager(tmp_path, _specs(logging_steps=1, save_steps=7, output_dir="x")).verify(path)
    with pytest.raises(CheckpointError) as err:
        CheckpointManager(tmp_path, _specs(learning_rate=2e-3)).verify(path)
    assert err.value.field == "training.learning_rate"
    assert "0.001 in the checkpoint, 0.002 now" in err.value.message
    changed_model = load_specs({"task": "token_classification", "model": "other", "data": {"train": "x"},
                                "training": {"learning_rate": 1e-3}})
    with pytest.raises(CheckpointError, match="model.name_or_path"):
        CheckpointManager(tmp_path, changed_model).verify(path)
    with pytest.raises(CheckpointError, match="num_examples is 96 in the checkpoint and 50 now"):
        CheckpointManager(tmp_path, _specs()).verify(path, data_state={"num_examples": 50})


def test_relevant_specs_leave_out_paths_and_logging():
    relevant = training_relevant_specs(_specs(logging_steps=3, resume="auto"))
    assert "output_dir" not in relevant and "logging_steps" not in relevant["training"]
    assert "resume" not in relevant["training"] and "train" not in relevant["data"]
    assert relevant["training"]["learning_rate"] == 1e-3 and relevant["model"]["name_or_path"] == "m"


# ---- loading: safe and exact ---------------------------------------------------------------------------------
class Payload:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_loading_refuses_pickled_objects(tmp_path):
    torch.save({"state": Payload()}, tmp_path / "optimizer.pt")
    with pytest.raises(CheckpointError, match="Cannot read the optimizer state") as err:
        safe_load(tmp_path / "optimizer.pt", "optimizer state")
    assert err.value.file == str(tmp_path / "optimizer.pt")


def test_rng_state_round_trip_is_exact_and_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # a cached gaussian in numpy's state
    torch.save(capture_rng_state(), tmp_path / "rng.pth")
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True))
    got = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_load_loop_state_restores_weights_optimizer_scheduler(tmp_path):
    manager = CheckpointManager(tmp_path, _specs())
    path = _save(manager)
    saved_model, saved_opt, saved_sched, _ = _loop_objects()
    torch.manual_seed(5)
    model = _Model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    from transformers import get_scheduler
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=1, num_training_steps=10)
    state, data = manager.load_loop_state(path, model=model, optimizer=optimizer, scheduler=scheduler)
    assert state.global_step == 3 and data["num_examples"] == 96
    assert torch.equal(model.linear.weight, saved_model.linear.weight)
    assert scheduler.state_dict()["last_epoch"] == saved_sched.state_dict()["last_epoch"] == 1
    exp_avg = optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(exp_avg, saved_opt.state_dict()["state"][0]["exp_avg"])


# ---- resume: auto, rotation -----------------------------------------------------------------------------------
def test_resume_auto_without_checkpoints_starts_fresh_with_a_log_line(tmp_path, caplog):
    manager = CheckpointManager(tmp_path / "checkpoints", _specs())
    with caplog.at_level(logging.INFO, logger="tunepipe"):
        assert manager.resolve("auto") is None
    assert "starting fresh" in caplog.text
    assert manager.resolve(None) is None
    _save(manager, 2)
    newest = _save(manager, 4)
    assert manager.resolve("auto") == newest


def test_rotation_keeps_the_last_n_and_the_best(tmp_path):
    manager = CheckpointManager(tmp_path, _specs(), keep_last_n=2)
    for step in (1, 2, 3, 4):
        _save(manager, step)
    manager.rotate(best=tmp_path / "step-1")
    assert [p.name for p in manager.checkpoints()] == ["step-1", "step-4"]
    manager.keep_best = False
    _save(manager, 5)
    manager.rotate(best=tmp_path / "step-1")
    assert [p.name for p in manager.checkpoints()] == ["step-4", "step-5"]


def test_specs_aliases():
    t = _specs(resume_from_checkpoint="runs/x/checkpoints/step-3").training
    assert t.resume == "runs/x/checkpoints/step-3"
    assert _specs(resume=True).training.resume == "auto"
    t = _specs(keep_best="f1", keep_last_n=2).training
    assert t.metric_for_best_model == "f1"
    manager = CheckpointManager.for_specs(_specs(keep_last_n=2, save_total_limit=5))
    assert manager.keep_last_n == 2 and manager.keep_best
    assert CheckpointManager.for_specs(_specs(save_total_limit=5)).keep_last_n == 5
    assert CheckpointManager.for_specs(_specs(keep_best=False)).keep_best is False


# ---- the backends' checkpoints ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["hf", "accelerate"])
def test_backend_checkpoints_are_sealed_and_refuse_other_specs(tiny_specs, ner_data, tmp_path, backend):
    specs = tiny_specs("token_classification", ner_data, backend=backend,
                       training={"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "eval_strategy": "no",
                                 "keep_last_n": 1})
    pipe = FineTunePipeLine(specs)
    pipe.setup()
    pipe.trainer.run_training()
    root = Path(specs["output_dir"]) / "checkpoints"
    name = "checkpoint-4" if backend == "hf" else "step-4"
    assert sorted(p.name for p in root.iterdir()) == [name]  # keep_last_n: 1, no staging left
    manifest = CheckpointManager(root, pipe.specs).verify(root / name)
    assert manifest["layout"] == ("transformers-trainer" if backend == "hf" else "tunepipe-loop")
    assert {"optimizer.pt", "scheduler.pt", "trainer_state.json", "data_state.json"} <= set(manifest["files"])
    assert any(f.endswith(".safetensors") for f in manifest["files"])
    # resume: auto on a finished run trains nothing more (transformers alone would run one extra step)
    again = FineTunePipeLine(dict(specs, training={**specs["training"], "resume": "auto"}))
    again.setup()
    assert again.trainer.run_training().global_step == 4
    # a changed learning rate cannot continue this run
    changed = dict(specs, training={**specs["training"], "learning_rate": 5e-4, "resume": "auto"})
    pipe = FineTunePipeLine(changed)
    pipe.setup()
    with pytest.raises(CheckpointError) as err:
        pipe.trainer.run_training()
    assert err.value.field == "training.learning_rate"
    # the other backend family's layout is refused with a way out
    other = dict(specs, backend="accelerate" if backend == "hf" else "hf",
                 training={**specs["training"], "resume": str(root / name)})
    pipe = FineTunePipeLine(other)
    pipe.setup()
    with pytest.raises(CheckpointError, match="backend"):
        pipe.trainer.run_training()


def test_hf_trained_model_is_plain_after_bf16(tiny_specs, ner_data):
    specs = tiny_specs("token_classification", ner_data, training={"max_steps": 2, "bf16": True,
                                                                   "eval_strategy": "no"})
    pipe = FineTunePipeLine(specs)
    pipe.setup()
    pipe.trainer.run_training()
    assert "_original_forward" in pipe.trainer.model.__dict__  # accelerate wrapped forward in autocast
    model = pipe.trainer.trained_model()
    assert "_original_forward" not in model.__dict__
    assert getattr(model.forward, "__func__", None) is type(model).forward  # the class's own forward
    with torch.autocast("cpu", enabled=False):
        out = model(input_ids=torch.tensor([[2, 5, 6, 3]]))
    assert out.logits.dtype == torch.float32
