"""What a run is beside its weights: the specs that must not change before it resumes, its RNG states (stored so
that ``torch.load(weights_only=True)`` reads them), and SIGTERM / SIGINT turned into "finish the step, save, stop"."""
from __future__ import annotations

import hashlib
import json
import logging
import random
import signal
import threading
from pathlib import Path
from typing import Any, Callable

from ..errors import CheckpointError, TrainingError

log = logging.getLogger("tunepipe")
RNG_STATE = "rng_state.pth"
# TrainingSpec keys that do not change the trained weights: changing them between a run and its resumption is
# allowed (logging, saving, evaluation, data loading mechanics, where things are written).
NOT_TRAINING_RELEVANT = {
    "resume", "resume_from_checkpoint", "keep_last_n", "keep_best", "keep_optimizer_state", "save_strategy", "save_steps",
    "save_total_limit", "save_only_model", "save_on_each_node", "logging_steps", "logging_strategy",
    "logging_first_step", "logging_dir", "logging_nan_inf_filter", "disable_tqdm", "report_to", "run_name",
    "eval_strategy", "eval_steps", "eval_delay", "eval_on_start", "per_device_eval_batch_size",
    "eval_accumulation_steps", "eval_do_concat_batches", "metric_for_best_model", "greater_is_better",
    "load_best_model_at_end", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
    "dataloader_prefetch_factor", "push_to_hub", "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo",
    "prediction_loss_only", "include_num_input_tokens_seen", "ignore_data_skip", "skip_memory_metrics",
    "log_level", "log_level_replica", "log_on_each_node", "output_dir", "overwrite_output_dir", "project",
    "trackio_space_id", "batch_eval_metrics", "include_for_metrics", "torch_empty_cache_steps",
}
NOT_TRAINING_SECTIONS = {"output_dir", "overwrite_output_dir", "tracking", "generation", "distributed", "backend"}
NOT_TRAINING_DATA = {"train", "validation", "test", "max_eval_samples", "format", "cache"}


class TrainingInterrupted(TrainingError):
    """Training stopped on SIGTERM / SIGINT after saving a checkpoint; rerun with ``resume: auto``."""
    code = "TRAINING_INTERRUPTED"


# ---- what must not change between a run and its resumption --------------------------------------------------
def training_relevant_specs(specs) -> dict[str, Any]:
    """The part of the specs that changes the trained weights: task, model, tokenizer, data preparation, PEFT,
    quantization and the optimisation settings. Paths, logging, saving and evaluation settings are left out."""
    d = specs.to_dict()
    out = {k: v for k, v in d.items() if k not in NOT_TRAINING_SECTIONS}
    out["data"] = {k: v for k, v in d.get("data", {}).items() if k not in NOT_TRAINING_DATA}
    out["training"] = {k: v for k, v in d.get("training", {}).items() if k not in NOT_TRAINING_RELEVANT}
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def specs_hash(relevant: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def _differences(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key, "<unset>"), now.get(key, "<unset>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {a!r} in the checkpoint, {b!r} now")
    return out


def resume_setting(specs) -> str | None:
    """``training.resume`` (auto | path), or its older name ``training.resume_from_checkpoint``."""
    training = specs.training
    value = getattr(training, "resume", None) or getattr(training, "resume_from_checkpoint", None)
    if value is True:
        return "auto"
    return str(value) if value else None


# ---- RNG states in forms torch.load(weights_only=True) accepts -----------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    import numpy as np
    import torch
    version, keys, gauss = random.getstate()
    kind, np_keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(keys), gauss],
             "numpy": {"kind": kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.random.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.random.set_rng_state_all(cuda)
        else:
            torch.cuda.random.set_rng_state(cuda[0])


def safe_load(path: Path, what: str, map_location="cpu"):
    """``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary pickled objects."""
    import torch
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is a damaged checkpoint for the user
        raise CheckpointError(f"Cannot read the {what} in {path}: {str(e).splitlines()[0]}", file=str(path),
                              suggestions=["resume from an earlier checkpoint, or delete this one"]) from None


def save_rank_rng(directory: Path, rank: int) -> None:
    """Process ``rank``'s RNG states next to rank 0's (dropout advances each rank's RNG differently)."""
    import torch
    torch.save(capture_rng_state(), Path(directory) / f"rng_state_{rank}.pth")


def load_rng(path: Path, rank: int = 0) -> dict[str, Any]:
    """This process's RNG states: ``rng_state_<rank>.pth`` in a multi-process checkpoint, else rank 0's."""
    own = Path(path) / f"rng_state_{rank}.pth"
    return safe_load(own if rank and own.is_file() else Path(path) / RNG_STATE, "RNG state")


def load_model_weights(path: Path, model) -> None:
    """Load the weights ``save_pretrained`` wrote in ``path`` (safetensors) into ``model`` (full model or PEFT
    adapter)."""
    from safetensors.torch import load_file
    path = Path(path)
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict
        adapter = path / "adapter_model.safetensors"
        if not adapter.is_file():
            raise CheckpointError(f"No adapter weights (adapter_model.safetensors) in {path}", file=str(path),
                                  suggestions=["resume with the specs the checkpoint was trained with (peft)"])
        set_peft_model_state_dict(model, load_file(str(adapter)))
        return
    state = {}
    for f in sorted(path.glob("*.safetensors")):  # model.safetensors or its shards
        state.update(load_file(str(f)))
    if not state:
        raise CheckpointError(f"No weights (*.safetensors) in {path}", file=str(path),
                              suggestions=["point to a checkpoint written by tunepipe (checkpoints/step-N)"])
    result = model.load_state_dict(state, strict=False)  # tied weights are saved once
    if result.unexpected_keys:
        raise CheckpointError(f"The weights in {path} do not fit this model (e.g. {result.unexpected_keys[0]})",
                              file=str(path), suggestions=["resume with the specs the checkpoint was trained with"])


# ---- the loops' checkpoint files (Accelerate, Lightning): CheckpointManager.save_loop_state / load_loop_state ----
def write_loop_state(directory: Path, *, model, optimizer, scheduler, state, tokenizer=None, scaler=None,
                     rank: int = 0) -> None:
    """save_pretrained weights (safetensors; the adapter only for PEFT models), tokenizer, optimizer, scheduler,
    scaler, RNG states and trainer_state.json; a process other than rank 0 adds only its RNG states."""
    import torch
    if rank:  # dropout advances each rank's RNG differently
        save_rank_rng(directory, rank)
        return
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    torch.save(scheduler.state_dict(), directory / "scheduler.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), directory / "scaler.pt")
    torch.save(capture_rng_state(), directory / RNG_STATE)
    state.save_to_json(str(directory / "trainer_state.json"))


def read_loop_state(path: Path, manifest: dict[str, Any], *, model, optimizer=None, scheduler=None, scaler=None,
                    restore_rng: bool = True):
    """Restore what :func:`write_loop_state` wrote into the objects given; the optimizer's state unless the
    manifest says it was dropped (resuming then needs none). Returns the TrainerState."""
    from transformers import TrainerState
    path = Path(path)
    load_model_weights(path, model)
    if optimizer is not None and manifest.get("optimizer_state") != "dropped":
        optimizer.load_state_dict(safe_load(path / "optimizer.pt", "optimizer state"))
    if scheduler is not None:
        scheduler.load_state_dict(safe_load(path / "scheduler.pt", "scheduler state"))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(safe_load(path / "scaler.pt", "gradient scaler state"))
    if restore_rng:
        restore_rng_state(load_rng(path))
    return TrainerState.load_from_json(str(path / "trainer_state.json"))


# ---- SIGTERM / SIGINT: finish the step, save, stop ----------------------------------------------------------
class StopOnSignal:
    """While active, SIGTERM and SIGINT only set ``requested``; the training loop checks it after each optimizer
    step, saves a checkpoint and stops. A second SIGINT raises KeyboardInterrupt as usual. Handlers are installed
    only in the main thread and restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum
        log.warning("received %s: finishing the current step, then saving a checkpoint",
                    signal.Signals(signum).name)

    def synced(self, reduce_max: Callable[[int], int] | None = None) -> bool:
        """Whether to stop now; with ``reduce_max`` (multi-process) every rank decides the same."""
        flag = 1 if self.requested is not None else 0
        return bool(reduce_max(flag)) if reduce_max is not None else bool(flag)

    def interrupted(self, step: int, checkpoint: Path | None) -> TrainingInterrupted:
        name = signal.Signals(self.requested).name if self.requested else "a signal"
        where = f"; checkpoint saved to {checkpoint}" if checkpoint else ""
        return TrainingInterrupted(f"Training stopped by {name} after step {step}{where}",
                                   suggestions=["continue with `--set training.resume=auto` (or `resume: auto` in "
                                                "the training section of the specs)"])
