"""What MultiAdapterManager knows of an adapter before loading it, read from its folder alone (no weights, no peft)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelNotFoundError, TaskTypeError
from ..modeling.peft_support import read_adapter_info, resolve_base
from ..tasks import get_task
from .model_loading import canonical_task

_TASK_BY_PEFT_TYPE = {"TOKEN_CLS": "token_classification", "SEQ_CLS": "text_classification",
                      "QUESTION_ANS": "question_answering", "CAUSAL_LM": "causal_lm",
                      "SEQ_2_SEQ_LM": "text_generation"}


@dataclass
class AdapterRecord:
    """An adapter the manager knows: what its folder records, then (once loaded) its group, task and tokenizer."""
    name: str
    path: Path
    task_name: str
    auto_model_class: str
    model_kwargs: dict[str, Any]
    peft_type: str
    base_model: str | None
    vocab_size: int | None
    loaded: bool = False
    load_count: int = 0
    loaded_at: float | None = None
    last_used: float | None = None
    group: tuple | None = None
    task: Any = None
    tokenizer: Any = None


def local_adapter_dir(path: str | Path) -> Path:
    """An adapter directory (or a run's ``adapter/``); a hub id is downloaded where there is a network."""
    p = Path(str(path)).expanduser()
    if p.is_dir():
        if (p / "adapter" / "adapter_config.json").is_file():
            p = p / "adapter"
        if not (p / "adapter_config.json").is_file():
            raise ModelNotFoundError(f"No PEFT adapter in {p}", file=str(p),
                                     suggestions=["pass a directory with adapter_config.json, or a run's output_dir"])
        return p
    if str(path).startswith((".", "/", "~")) or p.exists() or str(path).count("/") != 1:
        raise ModelNotFoundError(f"Adapter directory not found: {path}", file=str(path),
                                 suggestions=["check the path", "or pass a hub id like 'user/adapter'"])
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(str(path)))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, ...
        raise ModelNotFoundError(f"Cannot fetch adapter '{path}' from the hub: {str(e).splitlines()[0]}",
                                 file=str(path), suggestions=["no network? download it and pass the directory"]
                                 ) from None


def read_adapter(name: str, path: str | Path, task: str | None = None,
                 base_task: str | None = None) -> AdapterRecord:
    """The record of the adapter at ``path``, not loaded. Its task: ``task``, else the one it records, else its peft
    task type's, else ``base_task``; its base: the one it records (None when that cannot be resolved)."""
    directory = local_adapter_dir(path)
    info = read_adapter_info(directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    task_name = canonical_task(task or info.get("task") or _TASK_BY_PEFT_TYPE.get(config.get("task_type"))
                               or base_task)
    if not task_name:
        raise TaskTypeError(f"Cannot tell the task of the adapter in {directory}", field="task",
                            suggestions=["pass task= when registering it"])
    kwargs = dict(info.get("model_kwargs") or {})
    if "id2label" in kwargs:
        kwargs["id2label"] = {int(k): v for k, v in kwargs["id2label"].items()}
    try:
        recorded_base = resolve_base(directory, info)
    except ModelNotFoundError:
        recorded_base = None
    return AdapterRecord(
        name=name, path=directory, task_name=task_name,
        auto_model_class=info.get("auto_model_class") or get_task(task_name).auto_model_class,
        model_kwargs=kwargs, peft_type=str(config.get("peft_type", "")).upper(),
        base_model=recorded_base, vocab_size=info.get("vocab_size"))


def same_model(a: str, b: str) -> bool:
    """Whether two base model names (paths or hub ids) name the same model."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b
