"""Writing the output directory: atomic saves (temp dir + rename), specs, metrics, model card."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError, TunepipeIOError
from .ownership import MARKER, check_removable, record_written

RUN_MARKER = "specs.yaml"  # the specs a run was trained with (ownership.MARKER says that tunepipe wrote the dir)
# What a run writes (and replaces) inside output_dir; what `tunepipe evaluate` writes there.
RUN_ENTRIES = ("model", "adapter", "checkpoints", "merged", RUN_MARKER, "README.md", "metrics.json", "train_log.jsonl",
               "training_curves.svg", "tensorboard")
EVALUATION_ENTRIES = ("metrics.json",)  # its results go to metrics.json["evaluations"], beside the run's
# Settings that do not change what a run trains: rerunning with other values is the same run.
SAME_RUN_KEYS = ("output_dir", "overwrite_output_dir", "tracking.", "training.resume", "training.keep_",
                 "training.save_total_limit", "training.logging_steps", "training.disable_tqdm")


def first_missing_dir(path: Path) -> Path | None:
    """The top-most directory of ``path`` that does not exist yet (what a failed run must remove again)."""
    missing = None
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing = p
    return missing


def previous_run_differs(output_dir: Path, specs) -> list[str]:
    """The settings in which the run already in ``output_dir`` differs from ``specs`` (empty: the same run, or
    none). A run of other specs is not silently replaced (its model would no longer match its specs.yaml, logs
    and card): without ``overwrite_output_dir`` that is an error."""
    marker = output_dir / RUN_MARKER
    if not marker.is_file():
        return []
    from .specs import load_specs
    try:
        previous = dict(_flat(load_specs(marker).to_dict()))
    except Exception as e:  # noqa: BLE001 - any unreadable marker is "another run"
        previous, unreadable = None, e
    hints = ["choose another output_dir", "or set overwrite_output_dir: true (tunepipe train --overwrite) to "
                                          "replace that run"]
    if previous is None:
        if getattr(specs, "overwrite_output_dir", False):
            return ["specs.yaml"]
        raise ConfigError(f"output_dir {output_dir} holds a run whose specs.yaml cannot be read ({unreadable})",
                          field="output_dir", file=str(marker), suggestions=hints)
    current = dict(_flat(specs.to_dict()))
    differ = [k for k in sorted(set(previous) | set(current)) if not k.startswith(SAME_RUN_KEYS)
              and previous.get(k) != current.get(k)]
    if differ and not getattr(specs, "overwrite_output_dir", False):
        shown = ", ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in differ[:3])
        raise ConfigError(f"output_dir {output_dir} holds a run trained with other specs ({shown}"
                          f"{', ...' if len(differ) > 3 else ''})", field="output_dir", file=str(marker),
                          suggestions=hints)
    return differ


def _flat(d: dict[str, Any], prefix: str = ""):
    for key, value in d.items():
        if isinstance(value, dict) and value:
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def ensure_writable(output_dir: Path) -> None:
    """Fail before training, not after, when output_dir cannot be written."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as e:
        raise TunepipeIOError(f"Cannot write to output_dir {output_dir}: {e.strerror or e}", field="output_dir",
                              suggestions=["choose another output_dir", "check the directory's permissions"]) from None


def atomic_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmpdir)`` then swap tmpdir into ``target``: readers never see a half-written directory. Inside a
    directory tunepipe owns, a ``target`` holding files a user added is not replaced, and the files written are
    recorded in the marker (ownership.record_written)."""
    owned = (target.parent / MARKER).is_file()
    if owned and target.exists():
        check_removable(target.parent, [target.name])
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        follow_umask(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if owned:
        record_written(target)


def current_umask() -> int:
    """The process umask, read without changing it where the OS tells it (/proc), else set-and-restore."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(root: Path) -> None:
    """Give a tree written through temporary files (mkdtemp: 0700, some writers: 0600) the permissions the
    user's umask gives any other file: a saved model is as readable as the rest of their files."""
    mask = current_umask()
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    atomic_text(path, json.dumps(data, indent=2, sort_keys=False, default=float) + "\n")


def model_card(specs, task_obj, metrics: dict[str, Any], base_model: str, n_train: int,
               load_section: str | None = None, metadata: dict[str, Any] | None = None, base_note: str = "",
               curves: str | None = None) -> str:
    """The run's README.md. ``load_section`` replaces the "Load it" section (a PEFT run has ``adapter/``, not
    ``model/``); ``metadata`` adds to the front matter (``library_name: peft``, ``base_model``); ``base_note``
    follows the base model's name (where it comes from); ``curves`` is the training-curves image beside the card
    (a relative path, so the card shows it wherever the run folder is copied or pushed)."""
    task = specs.task
    auto_cls = task_obj.auto_model_class
    rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                     for k, v in (metrics.get("validation") or {}).items() if not k.endswith("_support"))
    train_src = specs.to_dict()["data"]["train"]
    front = {"library_name": "transformers", "pipeline_tag": task.replace('_', '-'), "tags": ["tunepipe", task],
             **{k: v for k, v in (metadata or {}).items() if k != "tags"}}
    front["tags"] = front["tags"] + [t for t in (metadata or {}).get("tags", []) if t not in front["tags"]]
    front_text = "\n".join(f"{k}: [{', '.join(v)}]" if isinstance(v, list) else f"{k}: {v}" for k, v in front.items())
    load = load_section if load_section is not None else f"""
## Load it
```python
from transformers import AutoTokenizer, {auto_cls}
tokenizer = AutoTokenizer.from_pretrained("{Path(specs.output_dir) / 'model'}")
model = {auto_cls}.from_pretrained("{Path(specs.output_dir) / 'model'}")
```
or with tunepipe: `tunepipe predict --model {specs.output_dir} --input "some text"`.
"""
    curves_section = f"\n## Training curves\n![training curves]({curves})\n" if curves else ""
    return f"""---
{front_text}
---
# {Path(specs.output_dir).name}

Fine-tuned with [tunepipe](https://pypi.org/project/tunepipe/) for **{task}**.

- Base model: `{base_model}`{f" {base_note}" if base_note else ""}
- Training data: `{train_src}` ({n_train} examples)
- Epochs: {specs.training.num_train_epochs}, learning rate: {specs.training.learning_rate},
  batch size: {specs.training.per_device_train_batch_size}, backend: {specs.backend}

## Validation metrics
| metric | value |
|---|---|
{rows or '| (no validation data) | |'}
{curves_section}{load}
The full resolved specs are in `specs.yaml`, per-step logs in `train_log.jsonl`.
"""
