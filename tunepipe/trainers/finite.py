"""No NaN / inf trains on silently: one rule, shared by every backend.

Each backend hands every micro-batch's loss to :meth:`NonFiniteGuard.observe_loss` and calls
:meth:`NonFiniteGuard.check` once per optimizer step, after backward (and clipping) and *before* the optimizer
steps. A non-finite loss, or a non-finite gradient norm when no gradient scaler is in use, raises
:class:`~tunepipe.errors.NonFiniteLossError` naming the step. Because the optimizer never steps on it, the weights
stay finite and no checkpoint is written after the bad step; the pipeline then saves no final model and the CLI
exits 2. With fp16's GradScaler, inf gradients on some steps are expected (the scaler skips those steps and lowers
its scale), so only the loss is checked there. A loss that stays finite but grows past ``DIVERGENCE_FACTOR``
times its first step's (at least 1.0) is :class:`~tunepipe.errors.LossDivergedError`: a cross-entropy of 100 or
more means the model puts e^-100 on the right answer, which no healthy run reaches, while a regression loss
scales with the reference.

The loss flags stay on the device and are read once per optimizer step (one sync, none per micro-batch); the
gradient norm is the one clipping computed, or one foreach norm when clipping is off.
"""
from __future__ import annotations

import logging
import math
import numbers
from pathlib import Path
from typing import Any, Callable

from ..errors import LossDivergedError, NonFiniteLossError

log = logging.getLogger("tunepipe")
DIVERGENCE_FACTOR = 100.0


def total_grad_norm(parameters) -> Any:
    """The 2-norm over every gradient (one foreach kernel per device and dtype); None without gradients."""
    import torch
    grads = [p.grad for p in parameters if getattr(p, "grad", None) is not None]
    if not grads:
        return None
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # DTensor (sharded gradients)


def _scaler_active(scaler) -> bool:
    if scaler is None:
        return False
    enabled = getattr(scaler, "is_enabled", None)
    return bool(enabled()) if callable(enabled) else True


class NonFiniteGuard:
    """Stops training at the first optimizer step whose loss (or, without a gradient scaler, gradient norm) is NaN
    or inf. ``args``: TrainingArguments or the loops' TrainingSettings (for the suggestions)."""

    def __init__(self, args):
        self.args = args
        self._losses: list[Any] = []
        self._reference = None  # the first checked step's mean loss, at least 1.0 (stays on the device)

    def observe_loss(self, loss) -> None:
        """Remember one micro-batch's loss (no device sync here)."""
        if loss is not None and hasattr(loss, "detach"):
            self._losses.append(loss.detach().float().reshape(-1))

    def check(self, step: int, *, grad_norm=None, parameters=None, scaler=None,
              reduce_max: Callable[[Any], float] | None = None,
              last_checkpoint: Callable[[], Path | None] | None = None) -> None:
        """Before optimizer step ``step``: raise NonFiniteLossError if this step's loss, or its gradients (unless
        ``scaler`` is active), are not finite. ``grad_norm``: the pre-clipping norm when clipping computed one,
        else it is computed from ``parameters``. ``reduce_max``: with several processes, the maximum of a tensor
        over the ranks, so that every rank stops at the same step."""
        import torch
        losses, self._losses = self._losses, []
        loss = torch.cat(losses) if losses else None
        device = loss.device if loss is not None else None
        check_grads = not _scaler_active(scaler)
        if check_grads and grad_norm is None and parameters is not None:
            grad_norm = total_grad_norm(parameters)
        if grad_norm is not None and not torch.is_tensor(grad_norm):
            grad_norm = torch.tensor(float(grad_norm), device=device)
        if device is None and grad_norm is not None:
            device = grad_norm.device
        code = torch.zeros((), dtype=torch.float32, device=device)
        if check_grads and grad_norm is not None:
            code = torch.where(torch.isfinite(grad_norm.float()).all().to(device), code, torch.ones_like(code))
        if loss is not None:
            finite = torch.isfinite(loss).all()
            code = torch.where(finite, code, torch.full_like(code, 2.0))
            mean = loss.mean()
            if self._reference is None:
                self._reference = mean.clamp(min=1.0)
            else:
                diverged = finite & (mean > DIVERGENCE_FACTOR * self._reference)
                code = torch.where(diverged, torch.full_like(code, 3.0), code)
        local = int(code.item())  # the one sync per optimizer step
        worst = int(reduce_max(code)) if reduce_max is not None else local
        if worst == 0:
            return
        if worst == 3:
            self._diverged(step, loss.mean() if local == 3 else None, last_checkpoint)
        if local == 2:
            kind, value = "loss", next(float(v) for v in loss.tolist() if not math.isfinite(v))
            what = f"The training loss is {value}"
        elif local == 1:
            kind, value = "gradients", float(grad_norm)
            what = f"The gradient norm is {value} (the loss is finite)"
        else:
            kind, value = "loss" if worst == 2 else "gradients", float("nan")
            what = f"The training {'loss' if worst == 2 else 'gradient norm'} is not finite on another process"
        checkpoint = last_checkpoint() if last_checkpoint is not None else None
        kept = (f"; the last checkpoint, {checkpoint}, was saved before it and is kept" if checkpoint
                else "; no checkpoint had been saved yet")
        raise NonFiniteLossError(
            f"{what} at step {step}: training stopped before that optimizer step, so the weights stayed finite"
            f"{kept}, and the final model is not saved", step=step, kind=kind, field="training.learning_rate",
            suggestions=self.suggestions(kind))

    def _diverged(self, step: int, mean, last_checkpoint) -> None:
        reference = float(self._reference) if self._reference is not None else float("nan")
        what = (f"The training loss is {float(mean):.4g} at step {step}" if mean is not None
                else f"The training loss diverged on another process at step {step}")
        checkpoint = last_checkpoint() if last_checkpoint is not None else None
        raise LossDivergedError(
            f"{what}, over {DIVERGENCE_FACTOR:g} times the first step's ({reference:.4g}): training diverged and "
            "was stopped before that optimizer step; "
            + (f"the last checkpoint, {checkpoint}, is kept" if checkpoint else "no checkpoint had been saved yet")
            + ", and the final model is not saved", step=step, kind="loss", field="training.learning_rate",
            suggestions=self.suggestions("loss"))

    def suggestions(self, kind: str) -> list[str]:
        args = self.args
        out = [f"lower training.learning_rate (now {getattr(args, 'learning_rate', '?')})"]
        if not getattr(args, "max_grad_norm", None) or args.max_grad_norm <= 0:
            out.append("clip gradients: training.max_grad_norm: 1.0")
        if getattr(args, "bf16", False) or getattr(args, "fp16", False):
            out.append("train in fp32 (training.bf16: false, training.fp16: false): half precision can overflow")
        out.append("check the training data: an empty, mislabelled or extreme example can make the loss "
                   "non-finite" if kind == "loss" else "check the model's custom layers and the training data")
        out.append("a run with other training settings cannot resume these checkpoints: start it in another "
                   "output_dir (or with --overwrite)")
        return out


def flag_non_finite_metrics(metrics: dict[str, Any], split: str) -> dict[str, Any]:
    """An evaluation that produced NaN / inf (loss or any metric) is not reported as if it were a result: the
    values stay as they are, a warning is logged, and ``metrics['warnings']`` names them (metrics.json keeps it).
    Evaluation runs after the final model was saved, so this warns rather than fails the run."""
    bad = sorted(k for k, v in metrics.items()
                 if isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isfinite(float(v)))
    if bad:
        text = (f"{split} evaluation produced non-finite values: " + ", ".join(f"{k}={metrics[k]}" for k in bad)
                + " (the model may have diverged, or evaluation overflowed in half precision)")
        log.warning(text)
        metrics["warnings"] = list(metrics.get("warnings") or []) + [text]
    return metrics
