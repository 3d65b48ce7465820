"""Checks that an output path can be written, made before any work (loading a model, merging, predicting), so that
a wrong path fails in a second and names the directory at fault, not a temporary file after the work was done."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import TunepipeIOError
from .output import first_missing_dir


def check_file_parent(path: Path, field: str) -> None:
    """An output file's directory exists and can be written, checked before any work: a file is written into an
    existing directory (a typo in its path makes no new directories), and a missing one is named, not the
    temporary file that would have failed to open there after the work was done."""
    parent = Path(os.path.abspath(path)).parent
    if not parent.exists():
        missing = first_missing_dir(parent) or parent
        raise TunepipeIOError(f"{field} {path}: the directory {parent} does not exist", field=field,
                              file=str(missing), suggestions=[f"create it first: mkdir -p {parent}",
                                                              f"or give {field} a file in an existing directory"])
    if not parent.is_dir():
        raise TunepipeIOError(f"{field} {path}: {parent} is a file, not a directory", field=field, file=str(parent),
                              suggestions=[f"give {field} a file in a directory"])
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TunepipeIOError(f"{field} {path}: cannot write to the directory {parent} (permission denied)",
                              field=field, file=str(parent),
                              suggestions=[f"give {field} a file in a directory you can write to"])


def check_dir_parent(path: Path, field: str) -> None:
    """An output directory can be made: its nearest existing ancestor is a directory this process can write to
    (missing directories above it are created, as for output_dir). Checked before the work, not after."""
    ancestor = next((p for p in [Path(os.path.abspath(path)), *Path(os.path.abspath(path)).parents]
                     if p.exists()), None)
    if ancestor is None or ancestor == Path(os.path.abspath(path)):
        return
    if not ancestor.is_dir():
        raise TunepipeIOError(f"{field} {path}: {ancestor} is a file, not a directory", field=field,
                              file=str(ancestor), suggestions=[f"choose another {field}"])
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise TunepipeIOError(f"{field} {path}: cannot create it, {ancestor} is not writable (permission denied)",
                              field=field, file=str(ancestor),
                              suggestions=[f"choose a {field} under a directory you can write to"])
