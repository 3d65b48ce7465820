"""Where tunepipe may write: one rule for every command that writes a directory or a file.

tunepipe writes only into a fresh (or empty) directory, or one that holds what tunepipe wrote before (a marker
file says so). It never writes into the current directory, the home directory, the filesystem root or one of
their ancestors, nor over the inputs of the command (data files, the model or tokenizer being loaded, a
prediction input). ``--overwrite`` replaces a previous tunepipe run of other specs; it never makes a directory
tunepipe did not write writable. Inside a directory it owns, tunepipe replaces only the files it wrote: the marker
records the files of every directory it saved there (model/, adapter/, merged/), checkpoints list theirs in their
manifests, and a file a user added to one of them stops the replacement instead of being deleted. A lock file
keeps two processes from writing one directory at once.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterable

from .errors import ConfigError, TunepipeIOError

MARKER = ".tunepipe.json"
LOCK = ".tunepipe.lock"  # the pid of the process holding the directory's lock, while it runs
WRITTEN = "written"  # marker key: directory saved inside the owned one -> the files tunepipe wrote in it
TEMPORARY = re.compile(r"^\..+\.(tmp|old)-")  # an atomic write's staging or replaced directory
_HELD: dict[str, list] = {}  # resolved dir -> [fd, depth]: a process may claim its own directory again


def expand(path: str | Path) -> Path:
    """``~`` expanded (users write ``~/runs/x``; a literal ``./~`` directory is never what they meant)."""
    return Path(os.path.expanduser(str(path)))


def resolved(path: str | Path, field: str) -> Path:
    try:
        return expand(path).resolve()
    except (RuntimeError, OSError) as e:  # a symlink loop
        raise ConfigError(f"{field} {path} cannot be resolved: {e}", field=field, file=str(path),
                          suggestions=["remove the symlink loop, or choose another directory"]) from None


def _forbidden(path: Path) -> str | None:
    """Why ``path`` is never a directory to write a run into, or None."""
    home = Path.home().resolve()
    cwd = Path.cwd().resolve()
    if path == Path(path.anchor):
        return "is the filesystem root"
    if path == home:
        return "is your home directory"
    if path == cwd:
        return "is the current directory"
    if path in cwd.parents or path in home.parents:
        return "holds the current or home directory"
    return None


def read_marker(directory: Path) -> dict | None:
    """What tunepipe recorded in ``directory`` (its kind), or None when tunepipe did not write it."""
    try:
        data = json.loads((directory / MARKER).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        pass
    return {"kind": "run", "legacy": True} if _legacy_run(directory) else None


def _legacy_run(directory: Path) -> bool:
    """A run written before the marker existed: specs.yaml beside a model or adapter tunepipe saved."""
    if not (directory / "specs.yaml").is_file():
        return False
    try:
        if "tunepipe_task" in json.loads((directory / "model" / "config.json").read_text(encoding="utf-8")):
            return True
    except (OSError, ValueError):
        pass
    return (directory / "adapter" / "tunepipe_adapter.json").is_file() or any(
        (directory / "checkpoints").glob("*/manifest.json"))


def write_marker(directory: Path, kind: str) -> None:
    if (directory / MARKER).is_file():
        return
    (directory / MARKER).write_text(json.dumps({"kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                                WRITTEN: {}}) + "\n", encoding="utf-8")


def record_written(saved: Path) -> None:
    """After tunepipe saved the directory ``saved`` inside a directory it owns: remember the files in it, so that
    replacing it later can tell them from files a user put there."""
    marker = saved.parent / MARKER
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # not inside a directory tunepipe owns
    if not isinstance(data, dict):
        return
    data.setdefault(WRITTEN, {})[saved.name] = _files(saved)
    tmp = marker.with_name(f"{MARKER}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data) + "\n", encoding="utf-8")
    os.replace(tmp, marker)


def _files(root: Path) -> list[str]:
    return sorted(str(f.relative_to(root)) for f in root.rglob("*") if f.is_file() or f.is_symlink())


def foreign_files(directory: Path, entries: Iterable[str]) -> list[str]:
    """The files under ``entries`` of the tunepipe directory ``directory`` that tunepipe did not write (paths
    relative to it). A top-level file entry is tunepipe's by its name; a saved directory is checked against the
    marker's record of it (one saved before records existed has none: nothing to check), ``checkpoints`` against
    each checkpoint's manifest, ``tensorboard`` holds event files."""
    marker = read_marker(directory) or {}
    written = marker.get(WRITTEN) or {}
    foreign: list[str] = []
    for name in entries:
        root = directory / name
        if not root.is_dir() or root.is_symlink():
            continue
        if name == "checkpoints":
            foreign += [f"{name}/{rel}" for rel in _foreign_in_checkpoints(root)]
        elif name == "tensorboard":
            foreign += [f"{name}/{rel}" for rel in _files(root) if "tfevents" not in Path(rel).name]
        elif name in written:
            known = set(written[name])
            foreign += [f"{name}/{rel}" for rel in _files(root) if rel not in known]
    return foreign


def _foreign_in_checkpoints(root: Path) -> list[str]:
    out = []
    for child in sorted(root.iterdir()):
        if child.is_dir() and TEMPORARY.match(child.name):
            continue  # an interrupted save of tunepipe's
        try:
            known = set(json.loads((child / "manifest.json").read_text(encoding="utf-8"))["files"]) | {
                "manifest.json"}
        except (OSError, ValueError, KeyError, TypeError):
            out.append(child.name + ("/" if child.is_dir() else ""))  # not a checkpoint tunepipe sealed
            continue
        out += [f"{child.name}/{rel}" for rel in _files(child) if rel not in known]
    return out


def check_removable(directory: Path, entries: Iterable[str], field: str = "output_dir") -> None:
    """Refuse to replace ``entries`` of ``directory`` while they hold files tunepipe did not write."""
    foreign = foreign_files(directory, entries)
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise ConfigError(f"{field} {directory} holds files tunepipe did not write where it would replace its "
                          f"previous output ({shown}): tunepipe deletes only what it wrote", field=field,
                          file=str(directory / foreign[0].rstrip("/")),
                          suggestions=[f"move them out of {directory}, then run again", f"or choose another {field}"])


def _contains(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def check_inputs(target: Path, inputs: dict[str, Iterable[str | Path]], writes: Iterable[str], field: str) -> None:
    """Refuse a target that is an input, lies inside one, or holds one: anywhere in a directory tunepipe did not
    write, under one of the entries it writes in one it did."""
    writes = set(writes)
    owned = target.is_dir() and read_marker(target) is not None
    for what, paths in inputs.items():
        for raw in paths:
            if raw is None:
                continue
            p = expand(raw)
            if not p.exists():
                continue
            p = p.resolve()
            if _contains(p, target):
                where = "is" if p == target else "lies inside"
                raise ConfigError(f"{field} {target} {where} the {what} ({p}): writing there would replace it",
                                  field=field, file=str(p),
                                  suggestions=[f"choose another {field}, e.g. runs/<name>"])
            if target in p.parents:
                rel = p.relative_to(target)
                if not owned or rel.parts[0] in writes:
                    raise ConfigError(f"{field} {target} holds the {what} ({rel}): writing there would replace it",
                                      field=field, file=str(p),
                                      suggestions=[f"choose another {field} (e.g. runs/<name>)",
                                                   f"or move the {what} out of it"])


def check_claim(path: str | Path, *, kind: str, writes: Iterable[str] = (), inputs: dict | None = None,
                field: str = "output_dir") -> Path:
    """Refuse a directory tunepipe may not write (see the module docstring); creates nothing. Returns the
    resolved directory."""
    target = resolved(path, field)
    why = _forbidden(target)
    if why:
        raise ConfigError(f"{field} {path} {why}: tunepipe writes into a directory of its own", field=field,
                          file=str(target), suggestions=[f"set {field} to a new directory, e.g. runs/<name>"])
    if target.exists() and not target.is_dir():
        raise TunepipeIOError(f"{field} {path} is a file, not a directory", field=field, file=str(target),
                              suggestions=[f"choose another {field} (a directory)"])
    check_inputs(target, inputs or {}, writes, field)
    if not is_main_process():  # rank 0 checks (and may be creating the directory right now)
        return target
    entries = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
    if entries:
        marker = read_marker(target)
        if marker is None:
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise ConfigError(f"{field} {path} already holds files that tunepipe did not write ({shown})",
                              field=field, file=str(target),
                              suggestions=[f"choose a new or empty directory for {field}",
                                           "--overwrite replaces only a previous tunepipe run, never other files"])
        if marker.get("kind") != kind:
            raise ConfigError(f"{field} {path} holds a tunepipe {marker.get('kind')}, not a {kind}", field=field,
                              file=str(target), suggestions=[f"choose another {field}"])
    return target


def make_claimed(target: Path, *, kind: str, field: str = "output_dir", lock: bool = True) -> Path:
    """Create ``target`` (checked by check_claim), mark it as tunepipe's and, with ``lock``, take its lock."""
    try:
        target.mkdir(parents=True, exist_ok=True)
        if is_main_process():
            write_marker(target, kind)
    except OSError as e:
        raise TunepipeIOError(f"Cannot write to {field} {target}: {e.strerror or e}", field=field, file=str(target),
                              suggestions=[f"choose another {field}", "check the directory's permissions"]) from None
    if lock:
        acquire(target, field)
    return target


def claim_dir(path: str | Path, *, kind: str, writes: Iterable[str] = (), inputs: dict | None = None,
              field: str = "output_dir", lock: bool = True) -> Path:
    """check_claim, then make_claimed: the directory is tunepipe's to write from here on."""
    target = check_claim(path, kind=kind, writes=writes, inputs=inputs, field=field)
    return make_claimed(target, kind=kind, field=field, lock=lock)


def is_main_process() -> bool:
    """Rank 0 of a launched job (torchrun, accelerate launch, Lightning's own launcher) or a lone process."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def acquire(directory: Path, field: str = "output_dir") -> None:
    """Take ``directory``'s write lock (again, for the process that holds it); other ranks of a launched job
    share rank 0's lock. A second process gets a clear error instead of writing into the same files.

    The lock is an advisory flock on the directory itself (the kernel drops it when the process dies: no stale
    lock after a crash); ``.tunepipe.lock`` only tells the holder's pid while it runs."""
    key = str(directory)
    if key in _HELD:
        _HELD[key][1] += 1
        return
    if not is_main_process():
        return
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no lock, as before
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return  # a filesystem without flock on directories (some network mounts): run unlocked
        try:
            holder = (directory / LOCK).read_text().strip()
        except OSError:
            holder = ""
        raise ConfigError(f"{field} {directory} is being written by another tunepipe process"
                          f"{f' (pid {holder})' if holder.isdigit() else ''}", field=field, file=str(directory),
                          suggestions=["wait for that run to finish, or choose another output_dir"]) from None
    try:
        (directory / LOCK).write_text(str(os.getpid()))
    except OSError:
        pass
    _HELD[key] = [fd, 1]


def release(directory: Path) -> None:
    key = str(directory)
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] <= 0:
        (directory / LOCK).unlink(missing_ok=True)
        os.close(held[0])
        del _HELD[key]


def remove_entries(directory: Path, entries: Iterable[str]) -> None:
    """Delete what a previous tunepipe run wrote (named entries only), before a run that replaces it; refused
    while they hold files a user added (:func:`check_removable`)."""
    entries = list(entries)
    check_removable(directory, entries)
    for name in entries:
        p = directory / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def check_output_file(path: str | Path, *, inputs: dict[str, Iterable[str | Path]], overwrite: bool,
                      field: str = "--output") -> Path:
    """A file to write: never an input or a file inside a model being loaded; an existing file only with
    ``overwrite`` (tunepipe cannot tell a predictions file it wrote from one it did not)."""
    target = resolved(path, field)
    if target.is_dir():
        raise ConfigError(f"{field} {path} is a directory", field=field, file=str(target),
                          suggestions=[f"give {field} a file name, e.g. predictions.jsonl"])
    for what, paths in inputs.items():
        for raw in paths:
            if raw is None or not expand(raw).exists():
                continue
            p = expand(raw).resolve()
            if _contains(p, target):
                raise ConfigError(f"{field} {path} {'is' if p == target else 'lies inside'} the {what}: writing it "
                                  "would replace it", field=field, file=str(target),
                                  suggestions=[f"write to another file, e.g. {target.stem}.predictions.jsonl"])
    if target.exists() and not overwrite:
        raise ConfigError(f"{field} {path} already exists", field=field, file=str(target),
                          suggestions=["pass --overwrite to replace it", "or choose another file"])
    return target
