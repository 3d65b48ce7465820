"""Which checkpoint a run resumes from, and whether it can be trusted: the checkpoint directories in step order,
verification before anything is loaded (complete, intact, same training specs, same data layout, this backend's
layout, the optimizer state a continued run needs), and ``resume: auto | <path>`` resolved to the newest intact
checkpoint (a damaged newer one is skipped with a warning). The writing side is :class:`CheckpointManager`
(checkpoints.py), which extends :class:`CheckpointDirectory`."""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .run_state import _differences, specs_hash, training_relevant_specs

log = logging.getLogger("tunepipe")

MANIFEST = "manifest.json"
DATA_STATE = "data_state.json"
CHECKPOINT_DIR = re.compile(r"^(checkpoint|step)-(\d+)$")
LAYOUTS = {"checkpoint": "transformers-trainer", "step": "tunepipe-loop"}


class DamagedCheckpoint(CheckpointError):
    """A checkpoint that is incomplete (no manifest), or whose files are missing, changed or truncated. Still a
    ``CHECKPOINT_ERROR``; ``resume: auto`` skips such a checkpoint for the newest intact one, while a checkpoint
    named explicitly stays an error. Other specs or other data are not damage: those stop ``resume: auto`` too."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class CheckpointDirectory:
    """The checkpoints ``<prefix>-N`` under ``directory``, read: listed, verified and resolved for ``resume``.
    ``specs``: the training specs every manifest is checked against (None: not checked)."""

    directory: Path
    specs: Any = None
    prefix: str = "step"

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

    def remove_partial(self) -> None:
        """Delete the temporary directories an interrupted save left behind (never a named checkpoint)."""
        if not self.directory.is_dir():
            return
        for p in self.directory.iterdir():
            if p.is_dir() and p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
                shutil.rmtree(p, ignore_errors=True)

    # ---- verification --------------------------------------------------------------------------------------
    def check_resumable(self, path: Path, manifest: dict[str, Any], max_steps: int | None = None) -> None:
        """Before anything is loaded from ``path``: it has the layout this backend writes (transformers' Trainer:
        ``checkpoint-N``; the one loop: ``step-N``) and, with steps left to train (``step < max_steps``), its
        optimizer state. A finished run's checkpoints hold none unless ``training.keep_optimizer_state`` was on: a
        CHECKPOINT_ERROR rather than an inexact resume. With nothing left to train, the weights alone do."""
        if manifest.get("layout") != LAYOUTS[self.prefix]:
            if self.prefix == "step":
                raise CheckpointError(f"{path} was written by transformers' Trainer (the hf backend)",
                                      file=str(path), field="training.resume",
                                      suggestions=["resume it with backend: hf", "or point training.resume at a "
                                                                                  "checkpoints/step-N directory"])
            backend = manifest.get("backend")
            raise CheckpointError(f"{path} was written by the {backend} backend's loop, not by transformers' Trainer",
                                  file=str(path), field="training.resume",
                                  suggestions=[f"resume it with backend: {backend or 'accelerate'}",
                                               "or point training.resume at a checkpoints/checkpoint-N directory"])
        left = max_steps is not None and manifest.get("step", 0) < max_steps
        if left and manifest.get("optimizer_state") == "dropped":
            raise CheckpointError(
                f"{path} holds no optimizer state: it was dropped when the run finished "
                "(training.keep_optimizer_state: false), so training cannot continue exactly from it",
                file=str(path), field="training.keep_optimizer_state",
                suggestions=["set training.keep_optimizer_state: true in runs you may want to continue",
                             "to train further, start a new run from the trained model (model.name_or_path: "
                             f"{Path(path).parent.parent / 'model'}) in another output_dir"])

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
