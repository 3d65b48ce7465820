"""One exception hierarchy for everything a user can get wrong, and a mapper for library exceptions.

Every error carries a stable ``code`` (for scripts and tests), the ``field`` / ``file`` / ``line`` at fault
when there is one, and ``suggestions`` a person can act on. The CLI prints these instead of a traceback.
"""
from __future__ import annotations

import contextlib
import errno
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
        return TrainingError(f"{name}{where}: {text.splitlines()[0] if text else ''}",
                             suggestions=["Re-run with --debug for the full traceback"])

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
