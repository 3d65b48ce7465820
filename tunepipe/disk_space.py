"""A save that fills the disk: recognised (ENOSPC, quota, torch's "unexpected pos" after a short write), and
turned into an IO_ERROR naming the space the save needs and the space that is free."""
from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path
from typing import Iterator

from .errors import TunepipeIOError

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
