"""One exception hierarchy for everything a user can get wrong, and a mapper for library exceptions.

Every error carries a stable ``code`` (for scripts and tests), the ``field`` / ``file`` / ``line`` at fault
when there is one, and ``suggestions`` a person can act on. The CLI prints these instead of a traceback.
"""
from __future__ import annotations

import contextlib
import errno
import json
from pathlib import Path
from typing import Iterable, Iterator


class TunepipeError(Exception):
    code = "TUNEPIPE_ERROR"

    def __init__(self, message: str, *, suggestions: Iterable[str] = (), field: str | None = None,
                 file: str | None = None, line: int | None = None):
        self.message = message
        self.suggestions = [s for s in suggestions if s]
        self.field = field
        self.file = file
        self.line = line
        super().__init__(self.render())

    def location(self) -> str:
        parts = []
        if self.field:
            parts.append(f"field '{self.field}'")
        if self.file:
            parts.append(f"{self.file}:{self.line}" if self.line else str(self.file))
        return ", ".join(parts)

    def render(self) -> str:
        where = self.location()
        text = f"[{self.code}] {self.message}" + (f" ({where})" if where else "")
        for s in self.suggestions:
            text += f"\n  -> {s}"
        return text


class ConfigError(TunepipeError):
    code = "CONFIG_ERROR"


class ValidationError(TunepipeError):
    code = "VALIDATION_ERROR"


class DatasetLoadError(TunepipeError):
    code = "DATASET_LOAD_ERROR"


class ModelNotFoundError(TunepipeError):
    code = "MODEL_NOT_FOUND"


class TaskTypeError(TunepipeError):
    code = "TASK_TYPE_ERROR"


class ModelError(TunepipeError):
    """A model or tokenizer that exists but cannot be used as given (damaged files, tokenizer and model that do not
    fit each other)."""
    code = "MODEL_ERROR"


class TunepipeMemoryError(TunepipeError):
    code = "MEMORY_ERROR"


class DependencyError(TunepipeError):
    code = "IMPORT_ERROR"


class CudaError(TunepipeError):
    code = "CUDA_ERROR"


class CheckpointError(TunepipeError):
    code = "CHECKPOINT_ERROR"


class TrainingError(TunepipeError):
    code = "TRAINING_ERROR"


class NonFiniteLossError(TrainingError):
    """The training loss or the gradients became NaN / inf: training stopped before the optimizer step, so the
    weights and the checkpoints already written stay finite. ``step``: the optimizer step that failed; ``kind``:
    'loss' or 'gradients'."""
    code = "NON_FINITE_LOSS"

    def __init__(self, message: str, *, step: int | None = None, kind: str | None = None, **kwargs):
        self.step, self.kind = step, kind
        super().__init__(message, **kwargs)


class LossDivergedError(NonFiniteLossError):
    """The training loss stayed finite but grew past ``DIVERGENCE_FACTOR`` times its first step's (a learning rate
    far too high): stopped like a NaN, because such a model is no result either."""
    code = "LOSS_DIVERGED"


class TunepipeIOError(TunepipeError):
    code = "IO_ERROR"


class BackendNotAvailableError(ConfigError):
    """A backend that is designed but not shipped in this version."""


class ErrorHandler:
    """Maps exceptions from torch / transformers / datasets / the OS to tunepipe errors.

    Use as ``with ErrorHandler.guard("loading the model"):`` around calls into libraries; tunepipe errors pass through.
    """

    @staticmethod
    def translate(exc: BaseException, context: str = "") -> TunepipeError:
        if isinstance(exc, TunepipeError):
            return exc
        where = f" while {context}" if context else ""
        text = str(exc)
        name = type(exc).__name__
        if isinstance(exc, MemoryError) or "out of memory" in text.lower() or name == "OutOfMemoryError":
            return TunepipeMemoryError(
                f"Out of memory{where}: {text.splitlines()[0] if text else name}",
                suggestions=["Lower training.per_device_train_batch_size and raise gradient_accumulation_steps",
                             "Lower data.max_length",
                             "Turn on training.gradient_checkpointing, or use peft: {method: lora}"])
        if isinstance(exc, ImportError):
            missing = getattr(exc, "name", None) or text
            return DependencyError(f"A required package is missing{where}: {missing}",
                                   suggestions=[f"pip install {missing}  (or the tunepipe extra that provides it)"])
        if "CUDA" in text and ("not available" in text or "no kernel image" in text or "driver" in text.lower()):
            return CudaError(f"CUDA problem{where}: {text.splitlines()[0]}",
                             suggestions=["Run on a machine with a supported NVIDIA GPU, or choose a CPU-capable option"])
        if isinstance(exc, PermissionError) or (isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EROFS)):
            return TunepipeIOError(f"Permission denied{where}: {getattr(exc, 'filename', '') or text}",
                                   suggestions=["Choose an output_dir you can write to"])
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return TunepipeIOError(f"Disk full{where}", suggestions=["Free disk space or lower checkpoint frequency"])
        loop = _symlink_loop(exc)
        if loop is not None:
            return TunepipeIOError(f"Symbolic link loop{where}: {loop} points (through other links) back to itself",
                                   file=loop, suggestions=["remove or fix the link, or use another path"])
        if isinstance(exc, FileNotFoundError) and exc.filename:
            return TunepipeIOError(f"File or directory not found{where}: {exc.filename}", file=str(exc.filename),
                                   suggestions=["check the path (it may have been moved or deleted while running)"])
        damaged = _damaged_file(exc, context)
        if damaged is not None:
            return damaged
        return TrainingError(f"{name}{where}: {text.splitlines()[0] if text else ''}",
                             suggestions=["Re-run with --debug for the full traceback"])

    @staticmethod
    def is_internal(error: TunepipeError) -> bool:
        """True for translate's catch-all (an exception no rule knows: a bug to report, exit code 1); every typed
        error is something the user or the machine can fix (exit code 2)."""
        return type(error) is TrainingError and bool(error.suggestions) and "--debug" in error.suggestions[-1]

    @staticmethod
    @contextlib.contextmanager
    def guard(context: str = "") -> Iterator[None]:
        try:
            yield
        except TunepipeError:
            raise
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - the point is to translate everything
            raise ErrorHandler.translate(exc, context) from exc


def _symlink_loop(exc: BaseException) -> str | None:
    """The path of a symlink loop: OSError ELOOP, or pathlib's RuntimeError('Symlink loop from ...') (< 3.13)."""
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return str(exc.filename or "")
    text = str(exc)
    if isinstance(exc, RuntimeError) and text.startswith("Symlink loop from "):
        return text[len("Symlink loop from "):].strip("'\"")
    return None


def _damaged_file(exc: BaseException, context: str) -> TunepipeError | None:
    """A JSON file that does not parse while loading a model / tokenizer / adapter directory (the context names
    it): the file and line, instead of 'JSONDecodeError: Expecting value'. tokenizers' 'untagged enum' means a
    tokenizer.json this version of tokenizers cannot read."""
    text = str(exc)
    untagged = "untagged enum" in text
    if not isinstance(exc, json.JSONDecodeError) and not untagged:
        return None
    words = [w.strip("'\"") for w in context.split()]
    directory = next((Path(w) for w in words if w and Path(w).is_dir()), None)
    suggestions = ["copy the files again (an interrupted copy or download cuts files short), or re-save them "
                   "with save_pretrained"]
    if directory is not None:
        for path in sorted(directory.glob("*.json")):
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                return ModelError(f"{path.name} is damaged: {str(e).splitlines()[0]}", file=str(path),
                                  line=getattr(e, "lineno", None), suggestions=suggestions)
        if untagged and (directory / "tokenizer.json").is_file():
            return ModelError(f"tokenizer.json cannot be read by this version of tokenizers: {text.splitlines()[0]}",
                              file=str(directory / "tokenizer.json"), suggestions=suggestions)
    if not context.startswith("loading"):
        return None  # a JSON error elsewhere: not known to be a damaged file
    return ModelError(f"A damaged JSON file while {context}: {text.splitlines()[0] if text else type(exc).__name__}",
                      line=getattr(exc, "lineno", None), suggestions=suggestions)
