"""A full disk while a checkpoint is saved: IO_ERROR naming the checkpoint, the space it needs and the space free;
nothing half-written stays, the previous checkpoint still verifies and ``resume: auto`` continues from it, on every
backend. Two shapes of the failure: an OSError carrying ENOSPC (Python file writes, safetensors' message), and
torch.save's RuntimeError, which loses the OS error ("unexpected pos ...") and is told apart by the free space."""
import errno
import re
from pathlib import Path

import pytest
import torch

import tunepipe.disk_space as disk_space
from tunepipe.trainers.checkpoints import CheckpointManager
from tunepipe.disk_space import is_disk_full
from tunepipe.errors import TunepipeIOError
from tunepipe.pipeline import FineTunePipeLine
from tunepipe.specs import load_specs

BACKENDS = ["hf", "accelerate", "lightning", "lightning+accelerate"]
STEP_4 = re.compile(r"^\.?(checkpoint|step)-4(\.|$)")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny models run fastest on one thread, and the machine is shared."""


def _fail_saves_of_step_4(monkeypatch, error: Exception) -> None:
    """torch.save (optimizer, scheduler, RNG states: the checkpoint's largest files) fails inside step 4's save."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, Path)) and any(STEP_4.match(part) for part in Path(f).parts):
            raise error
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("shape", ["enospc", "torch"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_disk_full_during_a_checkpoint_save(tiny_specs, ner_data, backend, shape, monkeypatch):
    specs = tiny_specs("token_classification", ner_data, backend=backend,
                       training={"max_steps": 6, "save_strategy": "steps", "save_steps": 2, "eval_strategy": "no",
                                 "save_total_limit": None})
    root = Path(specs["output_dir"]) / "checkpoints"
    prefix = "checkpoint" if backend == "hf" else "step"
    if shape == "enospc":
        _fail_saves_of_step_4(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    else:
        _fail_saves_of_step_4(monkeypatch, RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                                                        "704 vs 598"))
        monkeypatch.setattr(disk_space, "free_bytes", lambda path: 1024)  # less than a checkpoint
    with pytest.raises(TunepipeIOError) as err:
        FineTunePipeLine(specs).train()
    e = err.value
    target, previous = root / f"{prefix}-4", root / f"{prefix}-2"
    assert e.code == "IO_ERROR" and e.file == str(target)
    assert f"Disk full while saving the checkpoint {target}" in e.message
    assert "needs about" in e.message and f"the size of {prefix}-2" in e.message and "are free" in e.message
    assert str(previous) in e.message and any("free at least" in s for s in e.suggestions)
    # the partial write is gone, the previous checkpoint is intact, no final model
    assert sorted(p.name for p in root.iterdir()) == [f"{prefix}-2"]
    CheckpointManager(root, load_specs(specs)).verify(previous)
    assert not (Path(specs["output_dir"]) / "model").exists()
    # space again: resume: auto continues from step 2 and finishes
    monkeypatch.undo()
    resumed = dict(specs, training={**specs["training"], "resume": "auto"})
    assert FineTunePipeLine(resumed).train().global_step == 6
    assert (Path(specs["output_dir"]) / "model").is_dir()


def test_other_save_errors_stay_what_they_are(tiny_specs, ner_data, monkeypatch):
    """A failed write with plenty of space is not called a full disk."""
    specs = tiny_specs("token_classification", ner_data, backend="accelerate",
                       training={"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "eval_strategy": "no",
                                 "save_total_limit": None})
    _fail_saves_of_step_4(monkeypatch, RuntimeError("unexpected pos 704 vs 598"))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        _train(specs)
    root = Path(specs["output_dir"]) / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-2"]


def _train(specs):
    pipe = FineTunePipeLine(specs)
    pipe.setup()
    return pipe.trainer.run_training()


def test_first_checkpoint_needs_weights_and_optimizer_state(tmp_path, monkeypatch):
    """No earlier checkpoint to measure: the estimate is the weights plus AdamW's two moments."""
    from transformers import TrainerState, get_scheduler

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(100, 10)  # 1010 parameters: 4040 B of weights, 8080 B of moments

        def save_pretrained(self, path, safe_serialization=True):
            from safetensors.torch import save_file
            save_file(dict(self.state_dict()), str(Path(path) / "model.safetensors"))

    model = Model()
    optimizer = torch.optim.AdamW(model.parameters())
    manager = CheckpointManager(tmp_path, load_specs({"task": "token_classification", "model": "m",
                                                      "data": {"train": "x"}}))
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    with pytest.raises(TunepipeIOError) as err:
        manager.save_loop_state(2, model=model, optimizer=optimizer, state=TrainerState(global_step=2),
                                scheduler=get_scheduler("constant", optimizer))
    assert "needs about 11.8 KB (weights plus optimizer state)" in err.value.message
    assert list(tmp_path.iterdir()) == []


def test_disk_full_is_recognised_in_the_shapes_libraries_report():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    # safetensors (Rust) puts the OS error in its message: 'Error while serializing: I/O error: ... (os error 28)'
    from safetensors import SafetensorError
    assert is_disk_full(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert is_disk_full(wrapped)
    assert not is_disk_full(RuntimeError("unexpected pos 704 vs 598"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_final_model_helper_wraps_an_atomic_save(tmp_path):
    """``disk_full_as_io_error`` for the pipeline's final-model save (output.atomic_dir removes the partial copy)."""
    from tunepipe.disk_space import disk_full_as_io_error
    from tunepipe.output import atomic_dir
    target = tmp_path / "model"

    def write(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(TunepipeIOError) as err:
        with disk_full_as_io_error(target, 4096, "the model's weights", "final model"):
            atomic_dir(target, write)
    assert f"Disk full while saving the final model {target}: it needs about 4.0 KB" in err.value.message
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError):  # anything else passes through unchanged
        with disk_full_as_io_error(target, 4096, "the model's weights", "final model"):
            raise ValueError("not a disk problem")


def test_disk_full_while_saving_the_final_model(tiny_specs, ner_data, monkeypatch):
    """The final save is atomic too: IO_ERROR naming model/ and its size, no model/ and no temporary dir left."""
    import transformers
    specs = tiny_specs("token_classification", ner_data, training={"max_steps": 2, "eval_strategy": "no"})
    out = Path(specs["output_dir"])

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full)
    with pytest.raises(TunepipeIOError) as err:
        FineTunePipeLine(specs).train()
    assert err.value.file == str(out / "model") and "final model" in err.value.message
    assert "needs about" in err.value.message
    assert not (out / "model").exists() and not list(out.glob(".model.tmp-*"))
