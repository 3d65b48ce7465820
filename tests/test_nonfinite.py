"""NaN / inf during training stops every backend with NON_FINITE_LOSS naming the step, before the optimizer steps
on it: the weights stay finite, the checkpoints written before it stay intact (and none after it), no final model
is written, and ``tunepipe train`` exits 2. A NaN evaluation is flagged in the metrics, never reported silently."""
import math
from pathlib import Path

import pytest
import torch
import yaml

from tunepipe.trainers.checkpoints import CheckpointManager
from tunepipe.cli import main
from tunepipe.errors import NonFiniteLossError
from tunepipe.pipeline import FineTunePipeLine

BACKENDS = ["hf", "accelerate", "lightning", "lightning+accelerate"]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny models run fastest on one thread, and the machine is shared."""


def _specs(tiny_specs, ner_data, backend, **training):
    return tiny_specs("token_classification", ner_data, backend=backend,
                      training={"max_steps": 8, "save_strategy": "steps", "save_steps": 2, "eval_strategy": "no",
                                "logging_steps": 1, "save_total_limit": None, **training})


def _checkpoints(specs) -> list[Path]:
    root = Path(specs["output_dir"]) / "checkpoints"
    return sorted((p for p in root.iterdir() if not p.name.startswith(".")), key=lambda p: int(p.name.split("-")[1]))


def _assert_intact_and_finite(pipe, path: Path) -> None:
    from safetensors.torch import load_file
    CheckpointManager(path.parent, pipe.specs).verify(path)
    weights = load_file(str(path / "model.safetensors"))
    assert weights and all(torch.isfinite(t).all() for t in weights.values())


def _trainer_state(pipe):
    return pipe.trainer.state  # the Trainer's, or the loops' TrainerState


@pytest.mark.parametrize("kind", ["loss", "gradients"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_stops_before_the_optimizer_step(tiny_specs, ner_data, backend, kind):
    """NaN injected at optimizer step 5 through the real forward / backward: in the loss (forward hook), or only
    in the gradients with a finite loss (a gradient hook, clipping off so the guard computes the norm itself)."""
    extra = {"max_grad_norm": 0.0} if kind == "gradients" else {}
    specs = _specs(tiny_specs, ner_data, backend, **extra)
    pipe = FineTunePipeLine(specs)
    pipe.setup()
    model = pipe.model
    bad_step = 5

    def poisoned() -> bool:
        return model.training and _trainer_state(pipe).global_step == bad_step - 1

    def nan_loss(module, args, output):
        if poisoned():
            output["loss"] = output["loss"] * float("nan")
        return output

    if kind == "loss":
        model.register_forward_hook(nan_loss)
    else:
        weight = model.classifier.weight
        weight.register_hook(lambda grad: grad * float("inf") if poisoned() else grad)
    with pytest.raises(NonFiniteLossError) as err:
        pipe.train()
    e = err.value
    assert e.code == "NON_FINITE_LOSS" and e.step == bad_step and e.kind == kind
    assert f"at step {bad_step}" in e.message and e.suggestions
    assert ("training loss is nan" if kind == "loss" else "gradient norm is") in e.message
    # the optimizer never stepped on it: the weights in memory are still finite
    assert all(torch.isfinite(p).all() for p in pipe.trainer.trained_model().parameters())
    assert _trainer_state(pipe).global_step == bad_step - 1
    # checkpoints 2 and 4 (none after the bad step), both intact with finite weights; no final model
    found = _checkpoints(specs)
    assert [int(p.name.split("-")[1]) for p in found] == [2, 4]
    assert str(found[-1]) in e.message
    for path in found:
        _assert_intact_and_finite(pipe, path)
    assert not (Path(specs["output_dir"]) / "model").exists()


def _train_fails(specs, tmp_path, capsys, code: str) -> str:
    """`tunepipe train` exits 2 with ``code``, the learning rate named, and neither a model nor metrics saved."""
    path = tmp_path / "specs.yaml"
    path.write_text(yaml.safe_dump(specs), encoding="utf-8")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"[{code}]" in err and "learning_rate" in err
    out = Path(specs["output_dir"])
    assert not (out / "model").exists() and not (out / "metrics.json").exists()
    return err


@pytest.mark.parametrize("backend", BACKENDS)
def test_cli_exits_2_when_the_learning_rate_blows_up(tiny_specs, ner_data, tmp_path, backend, capsys):
    """No hook: a learning rate of 1e30 makes the loss NaN at step 2 on every backend."""
    specs = _specs(tiny_specs, ner_data, backend, learning_rate=1e30, save_steps=1)
    assert "at step 2" in _train_fails(specs, tmp_path, capsys, "NON_FINITE_LOSS")
    found = _checkpoints(specs)
    assert [int(p.name.split("-")[1]) for p in found] == [1]
    pipe = FineTunePipeLine(specs)
    _assert_intact_and_finite(pipe, found[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_evaluation_is_flagged_in_the_metrics(tiny_specs, ner_data, backend, caplog):
    specs = tiny_specs("token_classification", ner_data, backend=backend, training={"max_steps": 1})
    pipe = FineTunePipeLine(specs)
    pipe.setup()

    def nan_loss(module, args, output):
        if not module.training:
            output["loss"] = output["loss"] * float("nan")
        return output

    pipe.model.register_forward_hook(nan_loss)
    metrics = pipe.trainer.run_evaluation(pipe.datasets["validation"], split="validation")
    assert math.isnan(metrics["loss"])
    assert metrics["warnings"] and "loss=nan" in metrics["warnings"][0]
    assert "validation evaluation produced non-finite values" in caplog.text


def test_guard_skips_gradients_under_a_grad_scaler_but_not_the_loss():
    """fp16's GradScaler skips steps with inf gradients by design: only a non-finite loss stops training there."""
    from tunepipe.trainers.finite import NonFiniteGuard

    class Args:
        learning_rate, max_grad_norm, bf16, fp16 = 1e-3, 1.0, False, True

    class Scaler:
        def is_enabled(self):
            return True

    guard = NonFiniteGuard(Args())
    guard.observe_loss(torch.tensor(1.5))
    guard.check(3, grad_norm=torch.tensor(float("inf")), scaler=Scaler())  # skipped step: no error
    guard.observe_loss(torch.tensor(1.5))
    with pytest.raises(NonFiniteLossError, match="gradient norm is inf"):
        guard.check(3, grad_norm=torch.tensor(float("inf")))
    guard.observe_loss(torch.tensor(1.5))
    guard.observe_loss(torch.tensor(float("inf")))  # second micro-batch of an accumulated step
    with pytest.raises(NonFiniteLossError, match="loss is inf at step 4") as err:
        guard.check(4, grad_norm=torch.tensor(2.0), scaler=Scaler())
    assert err.value.kind == "loss" and any("fp32" in s for s in err.value.suggestions)
    # another rank's NaN stops this one at the same step
    guard.observe_loss(torch.tensor(1.0))
    with pytest.raises(NonFiniteLossError, match="another process"):
        guard.check(5, grad_norm=torch.tensor(1.0), reduce_max=lambda code: 2.0)


def test_guard_stops_a_finite_loss_that_diverges():
    """A loss that grows past DIVERGENCE_FACTOR x the first step's (floored at 1.0) is LOSS_DIVERGED, on this
    process or another; growth below that keeps training."""
    from tunepipe.errors import LossDivergedError
    from tunepipe.trainers.finite import DIVERGENCE_FACTOR, NonFiniteGuard

    class Args:
        learning_rate, max_grad_norm, bf16, fp16 = 1e4, 1.0, False, False

    for first, below, above in ((0.7, 0.9 * DIVERGENCE_FACTOR, 1.1 * DIVERGENCE_FACTOR),
                                (5.0, 4.5 * DIVERGENCE_FACTOR, 5.5 * DIVERGENCE_FACTOR)):
        guard = NonFiniteGuard(Args())
        guard.observe_loss(torch.tensor(first))
        guard.check(1, grad_norm=torch.tensor(1.0))
        guard.observe_loss(torch.tensor(below))
        guard.check(2, grad_norm=torch.tensor(1.0))
        guard.observe_loss(torch.tensor(above))
        with pytest.raises(LossDivergedError, match="at step 3") as err:
            guard.check(3, grad_norm=torch.tensor(1.0))
        assert err.value.code == "LOSS_DIVERGED" and any("learning_rate" in s for s in err.value.suggestions)
    guard = NonFiniteGuard(Args())
    guard.observe_loss(torch.tensor(1.0))
    guard.check(1, grad_norm=torch.tensor(1.0))
    guard.observe_loss(torch.tensor(1.0))
    with pytest.raises(LossDivergedError, match="another process"):
        guard.check(2, grad_norm=torch.tensor(1.0), reduce_max=lambda code: 3.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cli_exits_2_when_the_loss_diverges_but_stays_finite(tiny_specs, ner_data, tmp_path, backend, capsys):
    """A learning rate high enough to blow the loss up by orders of magnitude, not to NaN: exit 2, no model."""
    specs = _specs(tiny_specs, ner_data, backend, learning_rate=1e4, max_steps=12)
    _train_fails(specs, tmp_path, capsys, "LOSS_DIVERGED")
