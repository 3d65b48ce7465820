"""Writing the output directory: atomic saves (temp dir + rename), specs, metrics, model card."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import TunepipeIOError

RUN_MARKER = "specs.yaml"


def ensure_writable(output_dir: Path, fingerprint: str | None = None, overwrite: bool = True) -> None:
    """Fail before training, not after, when output_dir cannot be written."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as e:
        raise TunepipeIOError(f"Cannot write to output_dir {output_dir}: {e.strerror or e}", field="output_dir",
                              suggestions=["choose another output_dir", "check the directory's permissions"]) from None


def atomic_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmpdir)`` then swap tmpdir into ``target``: readers never see a half-written directory."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
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


def atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    atomic_text(path, json.dumps(data, indent=2, sort_keys=False, default=float) + "\n")


def model_card(specs, task_obj, metrics: dict[str, Any], base_model: str, n_train: int) -> str:
    task = specs.task
    auto_cls = task_obj.auto_model_class
    rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                     for k, v in (metrics.get("validation") or {}).items() if not k.endswith("_support"))
    train_src = specs.to_dict()["data"]["train"]
    return f"""---
library_name: transformers
pipeline_tag: {task.replace('_', '-')}
tags: [tunepipe, {task}]
---
# {Path(specs.output_dir).name}

Fine-tuned with [tunepipe](https://pypi.org/project/tunepipe/) for **{task}**.

- Base model: `{base_model}`
- Training data: `{train_src}` ({n_train} examples)
- Epochs: {specs.training.num_train_epochs}, learning rate: {specs.training.learning_rate},
  batch size: {specs.training.per_device_train_batch_size}, backend: {specs.backend}

## Validation metrics
| metric | value |
|---|---|
{rows or '| (no validation data) | |'}

## Load it
```python
from transformers import AutoTokenizer, {auto_cls}
tokenizer = AutoTokenizer.from_pretrained("{Path(specs.output_dir) / 'model'}")
model = {auto_cls}.from_pretrained("{Path(specs.output_dir) / 'model'}")
```
or with tunepipe: `tunepipe predict --model {specs.output_dir} --input "some text"`.
The full resolved specs are in `specs.yaml`, per-step logs in `train_log.jsonl`.
"""
