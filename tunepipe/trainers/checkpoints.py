"""Checkpoints that resume exactly and can be trusted.

A checkpoint directory holds the model (or only the PEFT adapter) in safetensors, the optimizer, scheduler and
gradient-scaler states, the RNG states (python, numpy, torch, CUDA), the data position (epoch and batches consumed
in it), the TrainerState, and ``manifest.json``: the SHA-256 of every file plus the training-relevant specs and
their hash. :class:`CheckpointManager` writes it atomically (temporary directory, fsync, rename: a crash while
saving leaves the previous checkpoint usable), verifies it before loading (a missing manifest, a changed file or
changed training specs is a ``CHECKPOINT_ERROR`` that says what to do), finds the newest intact one for
``resume: auto`` (a damaged newer one is skipped with a warning), and removes old ones (``keep_last_n``) while
keeping the best (``keep_best``). A save that fills the disk is an ``IO_ERROR`` naming the space it needs, with
the partial write removed and the previous checkpoint untouched.

Loading is safe: weights come from safetensors and every other state from ``torch.load(weights_only=True)``; the
RNG states are stored as lists and tensors so that no pickled Python object is needed.

The hf backend keeps transformers' own ``checkpoint-N`` files (the Trainer restores them itself) and adds the same
manifest; the Accelerate and Lightning loops write ``step-N`` through :meth:`CheckpointManager.save_loop_state`.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import CheckpointError, TrainingError, TunepipeIOError
from ..output import follow_umask

log = logging.getLogger("tunepipe")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DATA_STATE = "data_state.json"
RNG_STATE = "rng_state.pth"
CHECKPOINT_DIR = re.compile(r"^(checkpoint|step)-(\d+)$")
LAYOUTS = {"checkpoint": "transformers-trainer", "step": "tunepipe-loop"}

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
NOT_TRAINING_DATA = {"train", "validation", "test", "max_eval_samples", "format"}


class DamagedCheckpoint(CheckpointError):
    """A checkpoint that is incomplete (no manifest), or whose files are missing, changed or truncated. Still a
    ``CHECKPOINT_ERROR``; ``resume: auto`` skips such a checkpoint for the newest intact one, while a checkpoint
    named explicitly stays an error. Other specs or other data are not damage: those stop ``resume: auto`` too."""


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
    import random

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
    import random

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


# ---- atomic directory writes ---------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- disk full while saving ------------------------------------------------------------------------------------
DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "storagefull", "not enough space")


def is_disk_full(exc: BaseException | None) -> bool:
    """ENOSPC / EDQUOT, also when a library re-raised it as its own error (safetensors reports the OS error in
    its message) or chained it."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(exc).lower() for text in DISK_FULL_TEXT):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def human_bytes(n: float | None) -> str:
    if n is None:
        return "an unknown amount"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def model_weight_bytes(model) -> int | None:
    """The bytes of the model's parameters as saved (their own dtypes)."""
    try:
        return sum(p.numel() * p.element_size() for p in model.parameters())
    except Exception:  # noqa: BLE001 - an estimate only
        return None


def model_checkpoint_bytes(model) -> int | None:
    """Weights + AdamW's two fp32 moments of the trainable parameters: a checkpoint's size when none was
    written yet to measure."""
    weights = model_weight_bytes(model)
    if weights is None:
        return None
    return weights + sum(2 * p.numel() * 4 for p in model.parameters() if p.requires_grad)


def free_bytes(path: Path) -> int | None:
    for p in [Path(path), *Path(path).parents]:
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def disk_full_error(exc: BaseException, target: Path, needed: int | None, how: str, what: str = "checkpoint",
                    previous: Path | None = None) -> TunepipeIOError | None:
    """The rule for a save that failed, in one place: a TunepipeIOError naming ``target``, the space the save
    needs (``how`` says how it was estimated) and the space free, when ``exc`` means a full disk; else None.
    torch.save reports a failed write without its OS error ("unexpected pos ..."), so a failed write also counts as
    a full disk when less space is free than the save needs. Call it after removing the partial write."""
    free = free_bytes(Path(target).parent)
    short_of_space = (isinstance(exc, (OSError, RuntimeError)) and needed is not None and free is not None
                      and free < needed)
    if not (is_disk_full(exc) or short_of_space):
        return None
    short = needed - free if needed is not None and free is not None and needed > free else needed
    suggestions = [f"free at least {human_bytes(short)} on the filesystem of {Path(target).parent}"]
    if what == "checkpoint":
        suggestions.append("or keep less on this disk: a larger training.save_steps, training.keep_last_n: 1")
    if previous is not None:
        suggestions.append(f"{previous} is intact: continue from it with `--set training.resume=auto` once there "
                           "is space")
    return TunepipeIOError(f"Disk full while saving the {what} {target}: it needs about {human_bytes(needed)} "
                           f"({how}) and {human_bytes(free)} are free; the partial write was removed"
                           + (f", {previous} is intact" if previous is not None else ""),
                           file=str(target), suggestions=suggestions)


@contextlib.contextmanager
def disk_full_as_io_error(target: Path, needed: int | None, how: str, what: str) -> Iterator[None]:
    """Around a save that removes its own partial write (``output.atomic_dir``): a full disk becomes the
    IO_ERROR of :func:`disk_full_error`. For the final model, e.g. ``with disk_full_as_io_error(target,
    model_weight_bytes(model), "the model's weights", "final model"): atomic_dir(target, write)``."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - anything else is re-raised unchanged
        error = disk_full_error(e, target, needed, how, what=what)
        if error is not None:
            raise error from e
        raise


class CheckpointManager:
    """Saves, verifies, lists, rotates and resolves checkpoints under ``directory`` (``<output_dir>/checkpoints``).

    ``specs`` supplies the training-relevant settings recorded in (and checked against) every manifest.
    ``keep_last_n``: complete checkpoints kept (None: all). ``keep_best``: never remove the checkpoint recorded as
    best (``TrainerState.best_model_checkpoint``, chosen by ``metric_for_best_model``).
    """

    def __init__(self, directory: str | Path, specs=None, *, keep_last_n: int | None = None, keep_best: bool = True,
                 prefix: str = "step", backend: str | None = None):
        self.directory = Path(directory)
        self.specs = specs
        self.keep_last_n = keep_last_n
        self.keep_best = keep_best
        self.prefix = prefix
        self.backend = backend or (getattr(specs, "backend", None) if specs is not None else None)

    @classmethod
    def for_specs(cls, specs, directory: str | Path | None = None, prefix: str = "step") -> "CheckpointManager":
        training = specs.training
        keep = getattr(training, "keep_last_n", None)
        keep = keep if keep is not None else training.save_total_limit
        return cls(directory or Path(specs.output_dir) / "checkpoints", specs, keep_last_n=keep,
                   keep_best=str(getattr(training, "keep_best", None)).lower() != "false", prefix=prefix)

    # ---- layout --------------------------------------------------------------------------------------------
    def path(self, step: int) -> Path:
        return self.directory / f"{self.prefix}-{step}"

    @staticmethod
    def step_of(path: Path) -> int | None:
        match = CHECKPOINT_DIR.match(Path(path).name)
        return int(match.group(2)) if match else None

    def checkpoints(self, complete: bool = True) -> list[Path]:
        """Checkpoint directories sorted by step; with ``complete`` only those whose manifest was written."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if p.is_dir() and self.step_of(p) is not None]
        if complete:
            found = [p for p in found if (p / MANIFEST).is_file()]
        return sorted(found, key=lambda p: (self.step_of(p), p.name))

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    # ---- writing -------------------------------------------------------------------------------------------
    def staging_dir(self, step: int) -> Path:
        """A fresh temporary directory next to the checkpoints (same filesystem: the final rename is atomic)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{self.prefix}-{step}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        return tmp

    def save(self, step: int, write: Callable[[Path], None], data_state: dict[str, Any] | None = None,
             tmp: Path | None = None, model=None) -> Path:
        """``write(tmpdir)`` then :meth:`seal`: never a half-written checkpoint under its final name. ``tmp``: a
        staging directory other processes already wrote into (their RNG states). A full disk is an ``IO_ERROR``
        naming the space needed (``model`` sizes it when no checkpoint exists yet to measure)."""
        tmp = Path(tmp) if tmp is not None else self.staging_dir(step)
        try:
            write(tmp)
            return self.seal(tmp, step, data_state)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            full = self.disk_full(e, step, model) if isinstance(e, Exception) else None
            if full is not None:
                raise full from e
            raise

    def disk_full(self, exc: BaseException, step: int, model=None) -> TunepipeIOError | None:
        """:func:`disk_full_error` for a save of ``step``: the space needed is the newest checkpoint's size, or
        the model's weights and optimizer moments when there is none yet to measure."""
        previous = self.latest()
        if previous is not None:
            needed, how = directory_bytes(previous), f"the size of {previous.name}"
        else:
            needed = model_checkpoint_bytes(model) if model is not None else None
            how = "weights plus optimizer state" if needed is not None else "no earlier checkpoint to measure"
        return disk_full_error(exc, self.path(step), needed, how, previous=previous)

    def seal(self, tmp: Path, step: int, data_state: dict[str, Any] | None = None) -> Path:
        """Add data_state.json and the manifest (file hashes, specs) to ``tmp``, fsync everything, and rename it to
        ``<prefix>-<step>``. The manifest is the last file written: a directory without one is incomplete."""
        tmp, target = Path(tmp), self.path(step)
        if data_state is not None:
            (tmp / DATA_STATE).write_text(json.dumps(data_state, indent=1), encoding="utf-8")
        follow_umask(tmp)  # some writers (safetensors) leave 0600 files: checkpoints get the user's umask too
        files = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            files[str(f.relative_to(tmp))] = {"sha256": file_sha256(f), "size": f.stat().st_size}
        manifest = {"format": FORMAT_VERSION, "step": step, "layout": LAYOUTS[self.prefix], "backend": self.backend,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": files}
        if self.specs is not None:
            relevant = training_relevant_specs(self.specs)
            manifest.update(specs_hash=specs_hash(relevant), specs=relevant)
        with open(tmp / MANIFEST, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        old = None
        if target.exists():  # the same step saved again (e.g. an epoch end that is also a save step)
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
        tmp.rename(target)
        _fsync_dir(self.directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def remove_partial(self) -> list[Path]:
        """Delete the temporary directories an interrupted save left behind (never a named checkpoint)."""
        removed = []
        if not self.directory.is_dir():
            return removed
        for p in self.directory.iterdir():
            if p.is_dir() and p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        return removed

    def rotate(self, best: str | Path | None = None) -> list[Path]:
        """Keep the newest ``keep_last_n`` complete checkpoints, and the best one when ``keep_best``. The best one
        counts among the n, but the newest one is never removed (``resume: auto`` continues from it): with
        ``keep_last_n: 1`` and an older best, both stay. The same rule on every backend."""
        if self.keep_last_n is None or self.keep_last_n <= 0:
            return []
        found = self.checkpoints()
        keep_best = Path(best).resolve() if best and self.keep_best else None
        removable = [p for p in found[:-1] if keep_best is None or p.resolve() != keep_best]
        removed = []
        while len(found) > self.keep_last_n and removable:
            victim = removable.pop(0)
            found.remove(victim)
            shutil.rmtree(victim, ignore_errors=True)
            removed.append(victim)
        return removed

    # ---- after the run: optimizer state dropped (training.keep_optimizer_state: false) ----------------------
    def drop_optimizer_state(self) -> int:
        """Remove the optimizer state (``optimizer.pt``: AdamW's two moments, twice the trainable weights) from
        every complete checkpoint once the run finished; the manifest is rewritten first (without those files,
        with ``optimizer_state: dropped``), so a crash in between leaves a checkpoint that still verifies. The
        scheduler, scaler and RNG states are kept: a few KB, and the step the schedule reached stays recorded.
        Returns the bytes freed."""
        freed = 0
        for path in self.checkpoints():
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
            dropped = [name for name in manifest.get("files", {}) if _is_optimizer_file(name)]
            if not dropped:
                continue
            freed += sum(manifest["files"][name].get("size", 0) for name in dropped)
            manifest["files"] = {k: v for k, v in manifest["files"].items() if k not in dropped}
            manifest["optimizer_state"] = "dropped"
            tmp = path / f".{MANIFEST}.tmp-{os.getpid()}"
            tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
            os.replace(tmp, path / MANIFEST)
            for name in dropped:
                target = path / name
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
                if target.parent != path and target.parent.is_dir() and not any(target.parent.iterdir()):
                    target.parent.rmdir()
        return freed

    @staticmethod
    def require_optimizer_state(path: Path, step: int, max_steps: int) -> None:
        """Resuming with steps left to train (``step < max_steps``) needs the optimizer state; a finished run's
        checkpoints hold none unless ``training.keep_optimizer_state`` was on: a CHECKPOINT_ERROR (before anything
        is changed) rather than an inexact resume. With nothing left to train, the weights alone do."""
        if step >= max_steps:
            return
        try:
            manifest = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if manifest.get("optimizer_state") == "dropped":
            raise CheckpointError(
                f"{path} holds no optimizer state: it was dropped when the run finished "
                "(training.keep_optimizer_state: false), so training cannot continue exactly from it",
                file=str(path), field="training.keep_optimizer_state",
                suggestions=["set training.keep_optimizer_state: true in runs you may want to continue",
                             "to train further, start a new run from the trained model (model.name_or_path: "
                             f"{Path(path).parent.parent / 'model'}) in another output_dir"])

    # ---- the loops' state (Accelerate, Lightning) ---------------------------------------------------------
    def shared_staging_dir(self, step: int) -> Path:
        """The staging directory every process of a multi-process run writes into (same name on every rank)."""
        return self.directory / f".{self.prefix}-{step}.tmp-shared"

    def save_loop_state(self, step: int, *, model, optimizer, scheduler, state, tokenizer=None, scaler=None,
                        data_state: dict[str, Any] | None = None, tmp: Path | None = None) -> Path:
        """``<prefix>-N``: save_pretrained weights (safetensors; the adapter only for PEFT models), optimizer,
        scheduler, scaler, RNG states, trainer_state.json, data position, manifest."""
        import torch

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            if scaler is not None:
                torch.save(scaler.state_dict(), tmp / "scaler.pt")
            torch.save(capture_rng_state(), tmp / RNG_STATE)
            state.save_to_json(str(tmp / "trainer_state.json"))

        return self.save(step, write, data_state, tmp=tmp, model=model)

    def load_loop_state(self, path: Path, *, model, optimizer=None, scheduler=None, scaler=None,
                        data_state: dict[str, Any] | None = None, restore_rng: bool = True, verify: bool = True,
                        rank: int = 0):
        """Verify, then restore what :meth:`save_loop_state` wrote. Returns (TrainerState, saved data state).
        With ``restore_rng=False`` the caller restores the RNG itself (:func:`restore_rng_state` of
        ``load_rng(path)``) at the point of the loop where it was saved."""
        from transformers import TrainerState
        path = Path(path)
        manifest = self.verify(path, data_state=data_state) if verify else json.loads((path / MANIFEST).read_text())
        if manifest.get("layout") != LAYOUTS["step"]:
            raise CheckpointError(f"{path} was written by transformers' Trainer (the hf backend)", file=str(path),
                                  field="training.resume",
                                  suggestions=["resume it with backend: hf", "or point training.resume at a "
                                                                              "checkpoints/step-N directory"])
        load_model_weights(path, model)
        if optimizer is not None and manifest.get("optimizer_state") != "dropped":  # the caller decides (resume)
            optimizer.load_state_dict(safe_load(path / "optimizer.pt", "optimizer state"))
        if scheduler is not None:
            scheduler.load_state_dict(safe_load(path / "scheduler.pt", "scheduler state"))
        if scaler is not None and (path / "scaler.pt").is_file():
            scaler.load_state_dict(safe_load(path / "scaler.pt", "gradient scaler state"))
        if restore_rng:
            restore_rng_state(load_rng(path, rank))
        state = TrainerState.load_from_json(str(path / "trainer_state.json"))
        saved_data = json.loads((path / DATA_STATE).read_text()) if (path / DATA_STATE).is_file() else {}
        return state, saved_data

    # ---- verification --------------------------------------------------------------------------------------
    def verify(self, path: str | Path, data_state: dict[str, Any] | None = None) -> dict[str, Any]:
        """Check a checkpoint before anything is loaded from it: complete (manifest present), intact (every file
        there with its recorded SHA-256), written by the same training specs and, when ``data_state`` is given,
        for the same data layout (examples, batches per epoch, processes). Returns the manifest."""
        path = Path(path)
        field = "training.resume"
        if not path.is_dir():
            raise CheckpointError(f"Checkpoint not found: {path}", file=str(path), field=field,
                                  suggestions=self._other_choices(path) + ["use `resume: auto` to pick the newest "
                                                                           "complete checkpoint"])
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise DamagedCheckpoint(f"{path} is incomplete: it has no {MANIFEST} (the save was interrupted, or it "
                                    "was not written by tunepipe)", file=str(path), field=field,
                                    suggestions=self._other_choices(path) + ["delete this directory"])
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            files = dict(manifest["files"])
        except (ValueError, KeyError, TypeError):
            raise DamagedCheckpoint(f"The manifest of {path} is unreadable", file=str(manifest_path), field=field,
                                    suggestions=self._other_choices(path) + ["delete this directory"]) from None
        for name, info in files.items():
            f = path / name
            if not f.is_file():
                raise DamagedCheckpoint(f"{path} is missing {name}", file=str(f), field=field,
                                        suggestions=self._other_choices(path) + ["delete this directory"])
            if f.stat().st_size != info.get("size") or file_sha256(f) != info.get("sha256"):
                raise DamagedCheckpoint(f"{f} is corrupt: its content does not match the manifest (truncated or "
                                        "changed after the save)", file=str(f), field=field,
                                        suggestions=self._other_choices(path) + ["delete this checkpoint"])
        if self.specs is not None and "specs_hash" in manifest:
            now = training_relevant_specs(self.specs)
            if specs_hash(now) != manifest["specs_hash"]:
                diffs = _differences(manifest.get("specs", {}), now)
                raise CheckpointError(
                    f"{path} was trained with different specs: " + "; ".join(diffs[:5])
                    + (f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else ""),
                    file=str(manifest_path), field=diffs[0].split(":")[0] if diffs else field,
                    suggestions=["resume with the specs the checkpoint was trained with (its manifest.json lists "
                                 "them under 'specs')", "or start a fresh run in another output_dir"])
        if data_state is not None and (path / DATA_STATE).is_file():
            saved = json.loads((path / DATA_STATE).read_text())
            for key in ("num_examples", "steps_in_epoch", "world_size"):
                if key in saved and key in data_state and saved[key] != data_state[key]:
                    raise CheckpointError(
                        f"{path} cannot continue this data: {key} is {saved[key]} in the checkpoint and "
                        f"{data_state[key]} now", file=str(path / DATA_STATE), field="data.train",
                        suggestions=["resume with the training data and number of processes of the original run",
                                     "or start a fresh run in another output_dir"])
        return manifest

    def _other_choices(self, path: Path) -> list[str]:
        others = [p for p in self.checkpoints() if p.resolve() != Path(path).resolve()]
        if others:
            return [f"resume from {others[-1]} (the newest complete checkpoint)"]
        return []

    # ---- resume: auto | <path> ----------------------------------------------------------------------------
    def resolve(self, resume: str | None) -> Path | None:
        """``None``: start fresh. ``auto``: the newest intact checkpoint here (a damaged newer one is skipped with
        a warning naming it and why), or fresh (logged) when there is none; every checkpoint damaged is an error,
        never a silent restart. A path: that checkpoint, verified (damaged: an error)."""
        if not resume:
            return None
        if str(resume).lower() in ("auto", "true", "latest"):
            return self._newest_intact()
        path = Path(resume)
        self.verify(path)
        log.warning("resuming from %s", path)
        return path

    def _newest_intact(self) -> Path | None:
        """Newest first, the first checkpoint that verifies. Only damage (no manifest, missing, changed or
        truncated files) is skipped: a checkpoint of other specs still stops the run."""
        self.remove_partial()
        found = self.checkpoints(complete=False)
        if not found:
            log.warning("resume: auto found no complete checkpoint in %s: starting fresh", self.directory)
            return None
        skipped: list[tuple[Path, str]] = []
        for path in reversed(found):
            try:
                self.verify(path)
            except DamagedCheckpoint as e:
                log.warning("resume: auto skips the damaged checkpoint %s: %s", path, e.message)
                skipped.append((path, e.message))
                continue
            if skipped:
                log.warning("resuming from %s, the newest intact checkpoint (skipped %s)", path,
                            ", ".join(p.name for p, _ in skipped))
            else:
                log.warning("resuming from %s", path)
            return path
        raise DamagedCheckpoint(
            f"resume: auto found no intact checkpoint in {self.directory}: "
            + "; ".join(f"{p.name}: {why}" for p, why in skipped[:3]) + (" ..." if len(skipped) > 3 else ""),
            file=str(self.directory), field="training.resume",
            suggestions=[f"delete the damaged checkpoints in {self.directory} to start the run afresh",
                         "or point training.resume at a checkpoint copied from elsewhere"])


def _is_optimizer_file(name: str) -> bool:
    """optimizer.pt (and .bin), FSDP's optimizer folders, per-rank optimizer shards."""
    first = name.split("/")[0]
    return first.startswith("optimizer") or "-optimizer" in first


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
