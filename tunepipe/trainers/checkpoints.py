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

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import CheckpointError, TunepipeIOError
from ..output import follow_umask
from .disk_space import (  # noqa: F401 - importable from here as before
    DISK_FULL_ERRNOS,
    disk_full_as_io_error,
    disk_full_error,
    directory_bytes,
    free_bytes,
    human_bytes,
    is_disk_full,
    model_checkpoint_bytes,
    model_weight_bytes,
)
from .run_state import (  # noqa: F401 - importable from here as before
    NOT_TRAINING_DATA,
    NOT_TRAINING_RELEVANT,
    NOT_TRAINING_SECTIONS,
    _differences,
    RNG_STATE,
    StopOnSignal,
    TrainingInterrupted,
    capture_rng_state,
    load_model_weights,
    load_rng,
    restore_rng_state,
    resume_setting,
    safe_load,
    save_rank_rng,
    specs_hash,
    training_relevant_specs,
)

log = logging.getLogger("tunepipe")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DATA_STATE = "data_state.json"
CHECKPOINT_DIR = re.compile(r"^(checkpoint|step)-(\d+)$")
LAYOUTS = {"checkpoint": "transformers-trainer", "step": "tunepipe-loop"}



class DamagedCheckpoint(CheckpointError):
    """A checkpoint that is incomplete (no manifest), or whose files are missing, changed or truncated. Still a
    ``CHECKPOINT_ERROR``; ``resume: auto`` skips such a checkpoint for the newest intact one, while a checkpoint
    named explicitly stays an error. Other specs or other data are not damage: those stop ``resume: auto`` too."""


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


class CheckpointManager:
    """Saves, verifies, lists, rotates and resolves checkpoints under ``directory`` (``<output_dir>/checkpoints``).

    ``specs`` supplies the training-relevant settings recorded in (and checked against) every manifest.
    ``keep_last_n``: complete checkpoints kept (None: all). ``keep_best``: never remove the checkpoint recorded as
    best (``TrainerState.best_model_checkpoint``, chosen by ``metric_for_best_model``).
    """

    def __init__(self, directory: str | Path, specs=None, *, keep_last_n: int | None = None, keep_best: bool = True,
                 prefix: str = "step"):
        self.directory = Path(directory)
        self.specs = specs
        self.keep_last_n = keep_last_n
        self.keep_best = keep_best
        self.prefix = prefix
        self.backend = getattr(specs, "backend", None)

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
    def save(self, step: int, write: Callable[[Path], Path | None], data_state: dict[str, Any] | None = None,
             model=None, *, main: bool = True, barrier: Callable[[], None] | None = None) -> Path:
        """Every process calls ``write(staging)``: a fresh directory next to the checkpoints (same filesystem: the
        final rename is atomic), the same for all processes; ``write`` returns the directory the checkpoint is in
        when not ``staging`` itself. The ``main`` process then seals it (:meth:`seal`): never a half-written
        checkpoint under its final name. ``barrier``: waits for every process (multi-process runs). A failed save
        leaves nothing behind; a full disk is an ``IO_ERROR`` naming the space needed (``model`` sizes it when no
        checkpoint exists yet to measure)."""
        barrier = barrier or (lambda: None)
        staging = self.directory / f".{self.prefix}-{step}.tmp-shared"
        if main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        barrier()
        try:
            written = write(staging) or staging
            barrier()
            if main:
                self.seal(written, step, data_state)
        except BaseException as e:
            if main:
                shutil.rmtree(staging, ignore_errors=True)
            full = self.disk_full(e, step, model) if isinstance(e, Exception) else None
            if full is not None:
                raise full from e
            raise
        if main:
            shutil.rmtree(staging, ignore_errors=True)  # what the writer left around the sealed directory
        barrier()
        return self.path(step)

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
    def save_loop_state(self, step: int, *, model, optimizer, scheduler, state, tokenizer=None, scaler=None,
                        data_state: dict[str, Any] | None = None, rank: int = 0,
                        barrier: Callable[[], None] | None = None) -> Path:
        """``<prefix>-N``: save_pretrained weights (safetensors; the adapter only for PEFT models), optimizer,
        scheduler, scaler, RNG states, trainer_state.json, data position, manifest. In a multi-process run every
        process calls it (with its ``rank`` and the ``barrier``): the others add their RNG states."""
        import torch

        def write(tmp: Path) -> None:
            if rank:  # dropout advances each rank's RNG differently
                save_rank_rng(tmp, rank)
                return
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            if scaler is not None:
                torch.save(scaler.state_dict(), tmp / "scaler.pt")
            torch.save(capture_rng_state(), tmp / RNG_STATE)
            state.save_to_json(str(tmp / "trainer_state.json"))

        return self.save(step, write, data_state, model, main=rank == 0, barrier=barrier)

    def load_loop_state(self, path: Path, *, model, optimizer=None, scheduler=None, scaler=None,
                        data_state: dict[str, Any] | None = None, restore_rng: bool = True, verify: bool = True):
        """Verify, then restore what :meth:`save_loop_state` wrote. Returns (TrainerState, saved data state).
        With ``restore_rng=False`` the caller restores the RNG itself (:func:`restore_rng_state` of
        ``load_rng(path)``) at the point of the loop where it was saved; ``verify=False``: the caller verified it."""
        from transformers import TrainerState
        path = Path(path)
        manifest = self.verify(path, data_state=data_state) if verify else json.loads((path / MANIFEST).read_text())
        self.check_layout(path, manifest)
        load_model_weights(path, model)
        if optimizer is not None and manifest.get("optimizer_state") != "dropped":  # the caller decides (resume)
            optimizer.load_state_dict(safe_load(path / "optimizer.pt", "optimizer state"))
        if scheduler is not None:
            scheduler.load_state_dict(safe_load(path / "scheduler.pt", "scheduler state"))
        if scaler is not None and (path / "scaler.pt").is_file():
            scaler.load_state_dict(safe_load(path / "scaler.pt", "gradient scaler state"))
        if restore_rng:
            restore_rng_state(load_rng(path))
        state = TrainerState.load_from_json(str(path / "trainer_state.json"))
        saved_data = json.loads((path / DATA_STATE).read_text()) if (path / DATA_STATE).is_file() else {}
        return state, saved_data

    def check_layout(self, path: Path, manifest: dict[str, Any]) -> None:
        """A checkpoint resumes on the backends that write its layout: transformers' Trainer (hf, ``checkpoint-N``)
        or the one loop (the others, ``step-N``)."""
        if manifest.get("layout") == LAYOUTS[self.prefix]:
            return
        if self.prefix == "step":
            raise CheckpointError(f"{path} was written by transformers' Trainer (the hf backend)", file=str(path),
                                  field="training.resume",
                                  suggestions=["resume it with backend: hf", "or point training.resume at a "
                                                                              "checkpoints/step-N directory"])
        raise CheckpointError(f"{path} was written by the {manifest.get('backend')} backend's loop, not by "
                              "transformers' Trainer", file=str(path), field="training.resume",
                              suggestions=[f"resume it with backend: {manifest.get('backend') or 'accelerate'}",
                                           "or point training.resume at a checkpoints/checkpoint-N directory"])

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


