"""``resume: auto`` with a damaged newest checkpoint (weights truncated, manifest deleted, optimizer state changed)
falls back to the newest intact one with a warning naming what it skipped, and the run finishes with the weights
of an uninterrupted run, on every backend. A damaged checkpoint named explicitly stays a CHECKPOINT_ERROR; so do
checkpoints of other specs, and a directory whose checkpoints are all damaged."""
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from test_checkpoints import _save, _specs
from tunepipe.trainers.checkpoints import MANIFEST, CheckpointManager
from tunepipe.trainers.resume import DamagedCheckpoint
from tunepipe.errors import CheckpointError
from tunepipe.pipeline import FineTunePipeLine
from tunepipe.specs import load_specs

BACKENDS = ["hf", "accelerate", "lightning", "lightning+accelerate"]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny models run fastest on one thread, and the machine is shared."""


def _truncate_weights(path: Path) -> None:
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _delete_manifest(path: Path) -> None:
    (path / MANIFEST).unlink()


def _corrupt_optimizer(path: Path) -> None:
    """Same size, a changed block in the middle: only the hash tells."""
    optimizer = path / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    optimizer.write_bytes(bytes(data))


DAMAGE = {"truncated weights": _truncate_weights, "no manifest": _delete_manifest,
          "corrupt optimizer": _corrupt_optimizer}


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path / "model.safetensors"))


def _logged_steps(out: Path) -> list[int]:
    lines = (out / "train_log.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "loss" in r and "train_loss" not in r]


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_auto_falls_back_to_the_newest_intact_checkpoint(tiny_specs, ner_data, tmp_path, backend, caplog):
    specs = tiny_specs("token_classification", ner_data, backend=backend,
                       training={"max_steps": 6, "save_strategy": "steps", "save_steps": 2, "eval_strategy": "no",
                                 "logging_steps": 1, "save_total_limit": None, "keep_optimizer_state": True})
    out = Path(specs["output_dir"])
    FineTunePipeLine(specs).train()
    prefix = "checkpoint" if backend == "hf" else "step"
    newest, previous = f"{prefix}-6", f"{prefix}-4"
    uninterrupted = _weights(out / "checkpoints" / newest)

    for i, (what, damage) in enumerate(DAMAGE.items()):
        run = tmp_path / f"run-{i}"
        shutil.copytree(out, run)
        damage(run / "checkpoints" / newest)
        resumed = dict(specs, output_dir=str(run), training={**specs["training"], "resume": "auto"})
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tunepipe"):
            result = FineTunePipeLine(resumed).train()
        assert result.global_step == 6, what
        assert f"skips the damaged checkpoint {run / 'checkpoints' / newest}" in caplog.text, what
        assert f"resuming from {run / 'checkpoints' / previous}, the newest intact checkpoint" in caplog.text, what
        # steps 5 and 6 trained again from step 4 (each step logged once), and step 6 saved anew, intact, with the
        # uninterrupted run's weights
        assert _logged_steps(run) == [1, 2, 3, 4, 5, 6], what
        rebuilt = run / "checkpoints" / newest
        CheckpointManager(rebuilt.parent, load_specs(resumed)).verify(rebuilt)
        for name, tensor in _weights(rebuilt).items():
            torch.testing.assert_close(tensor, uninterrupted[name], rtol=0, atol=1e-5, msg=f"{what}: {name}")

    # named explicitly, a damaged checkpoint is an error, not a fallback
    _corrupt_optimizer(out / "checkpoints" / newest)
    explicit = dict(specs, training={**specs["training"], "resume": str(out / "checkpoints" / newest)})
    pipe = FineTunePipeLine(explicit)
    with pytest.raises(CheckpointError) as err:
        pipe.train()
    assert err.value.code == "CHECKPOINT_ERROR" and "corrupt" in err.value.message
    assert err.value.file == str(out / "checkpoints" / newest / "optimizer.pt")


# ---- the rule itself, on CheckpointManager -----------------------------------------------------------------------
def test_every_damaged_checkpoint_skipped_and_named(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, _specs())
    first = _save(manager, 2)
    for step, damage in zip((4, 6, 8), DAMAGE.values()):
        damage(_save(manager, step))
    with caplog.at_level(logging.WARNING, logger="tunepipe"):
        assert manager.resolve("auto") == first
    for step, why in ((8, "corrupt"), (6, "no manifest.json"), (4, "corrupt")):
        assert f"skips the damaged checkpoint {tmp_path / f'step-{step}'}: " in caplog.text
        assert why in caplog.text
    assert "skipped step-8, step-6, step-4" in caplog.text


def test_all_damaged_is_an_error_not_a_silent_fresh_start(tmp_path):
    manager = CheckpointManager(tmp_path, _specs())
    _truncate_weights(_save(manager, 2))
    _delete_manifest(_save(manager, 4))
    with pytest.raises(DamagedCheckpoint) as err:
        manager.resolve("auto")
    e = err.value
    assert e.code == "CHECKPOINT_ERROR" and "no intact checkpoint" in e.message
    assert "step-4" in e.message and "step-2" in e.message and e.suggestions


def test_other_specs_are_not_damage_and_are_not_skipped(tmp_path):
    _save(CheckpointManager(tmp_path, _specs()), 2)
    _save(CheckpointManager(tmp_path, _specs(learning_rate=2e-3)), 4)
    with pytest.raises(CheckpointError) as err:
        CheckpointManager(tmp_path, _specs()).resolve("auto")
    assert not isinstance(err.value, DamagedCheckpoint)
    assert err.value.field == "training.learning_rate"


def test_explicit_damaged_path_is_an_error(tmp_path):
    manager = CheckpointManager(tmp_path, _specs())
    _save(manager, 2)
    path = _save(manager, 4)
    _truncate_weights(path)
    with pytest.raises(CheckpointError, match="corrupt") as err:
        manager.resolve(str(path))
    assert any("step-2" in s for s in err.value.suggestions)
