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
Listing, verifying and resolving ``resume`` are :class:`~tunepipe.trainers.resume.CheckpointDirectory`'s (resume.py).
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import TunepipeIOError
from ..output import follow_umask
from ..disk_space import directory_bytes, disk_full_error, model_checkpoint_bytes
from .resume import DATA_STATE, LAYOUTS, MANIFEST, CheckpointDirectory, file_sha256
from .run_state import read_loop_state, specs_hash, training_relevant_specs, write_loop_state

FORMAT_VERSION = 1


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


class CheckpointManager(CheckpointDirectory):
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

    def rotate(self, best: str | Path | None = None) -> None:
        """Keep the newest ``keep_last_n`` complete checkpoints, and the best one when ``keep_best``. The best one
        counts among the n, but the newest one is never removed (``resume: auto`` continues from it): with
        ``keep_last_n: 1`` and an older best, both stay. The same rule on every backend."""
        if self.keep_last_n is None or self.keep_last_n <= 0:
            return
        found = self.checkpoints()
        keep_best = Path(best).resolve() if best and self.keep_best else None
        removable = [p for p in found[:-1] if keep_best is None or p.resolve() != keep_best]
        while len(found) > self.keep_last_n and removable:
            victim = removable.pop(0)
            found.remove(victim)
            shutil.rmtree(victim, ignore_errors=True)

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

    # ---- the loops' state (Accelerate, Lightning): the files are run_state.write_loop_state's ---------------
    def save_loop_state(self, step: int, *, data_state: dict[str, Any] | None = None, rank: int = 0,
                        barrier: Callable[[], None] | None = None, **objects) -> Path:
        """``<prefix>-N`` holding ``objects`` (model, optimizer, scheduler, state; tokenizer, scaler: optional) as
        :func:`write_loop_state` writes them, the data position and the manifest. In a multi-process run every
        process calls it, with its ``rank`` and the ``barrier``: the others add their RNG states."""
        return self.save(step, functools.partial(write_loop_state, rank=rank, **objects), data_state,
                         objects["model"], main=rank == 0, barrier=barrier)

    def load_loop_state(self, path: Path, *, data_state: dict[str, Any] | None = None, verify: bool = True,
                        **objects):
        """Verify, then restore what :meth:`save_loop_state` wrote into ``objects`` (model; optimizer, scheduler,
        scaler, restore_rng: optional, see :func:`read_loop_state`). Returns (TrainerState, saved data state).
        With ``restore_rng=False`` the caller restores the RNG itself (:func:`restore_rng_state` of
        ``load_rng(path)``) at the point of the loop where it was saved; ``verify=False``: the caller verified it."""
        path = Path(path)
        manifest = self.verify(path, data_state=data_state) if verify else json.loads((path / MANIFEST).read_text())
        self.check_resumable(path, manifest)
        state = read_loop_state(path, manifest, **objects)
        saved_data = json.loads((path / DATA_STATE).read_text()) if (path / DATA_STATE).is_file() else {}
        return state, saved_data



def _is_optimizer_file(name: str) -> bool:
    """optimizer.pt (and .bin), FSDP's optimizer folders, per-rank optimizer shards."""
    first = name.split("/")[0]
    return first.startswith("optimizer") or "-optimizer" in first


