"""What a model or adapter folder's own metadata may decide when tunepipe loads it.

Folders travel: a colleague's adapter, a download, a run directory copied from a shared disk. Their metadata files
(``tunepipe_adapter.json``, ``adapter_config.json``, a run's ``specs.yaml``, ``config.json``'s ``auto_map``) are
data, not instructions. So, in one place:

- remote code runs only when the *caller* asks for it (their own specs, ``--trust-remote-code``, an argument);
  every transformers call gets an explicit ``trust_remote_code`` (``None`` would let transformers prompt on a
  terminal, and a user answering "y" to a prompt caused by a downloaded folder is not a choice);
- from an adapter's record only the head description survives (labels, problem type, ``is_decoder``), each
  checked for type; ``subfolder``, ``code_revision``, ``trust_remote_code``, ``gguf_file``... never reach
  ``from_pretrained``;
- a base referenced *relative* to the adapter is honoured only as tunepipe writes it (``../base_model`` beside the
  adapter), never as a path that climbs elsewhere, and never resolved against the current directory (peft would:
  ``./base_model`` in ``adapter_config.json`` is read by tunepipe as that same folder beside the adapter);
- peft settings that import a module named in the file (``megatron_core``) are refused;
- the ``metrics:`` and ``data.preprocess`` functions a run's ``specs.yaml`` names are never imported when the run
  is loaded (predict, serve, merge: model_loading.make_task builds a bare Task); only a run built from the
  caller's own specs imports them (extensions.build_task, in FineTunePipeLine).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import ConfigError

# from_pretrained keyword arguments an adapter record may carry, with the check each value must pass.
_HEAD_KWARGS = {
    "num_labels": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1_000_000,
    "id2label": lambda v: isinstance(v, dict) and all(str(k).isdigit() and isinstance(x, str) for k, x in v.items()),
    "label2id": lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, int)
                                                       for k, x in v.items()),
    "problem_type": lambda v: v in ("regression", "single_label_classification", "multi_label_classification"),
    "is_decoder": lambda v: isinstance(v, bool),
}
_QUANTIZATION_CHECKS = {
    "bits": lambda v: v in (4, 8, None),
    "quant_type": lambda v: v in ("nf4", "fp4", None),
    "double_quant": lambda v: isinstance(v, bool) or v is None,
    "compute_dtype": lambda v: v in ("float16", "bfloat16", "float32", None),
    "skip_modules": lambda v: v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
}
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/\-]{0,127}$")
RELATIVE_BASE = "../base_model"  # the only relative base reference tunepipe writes (see peft_support.save_adapter)
# The same folder as adapter_config.json names it for plain peft, which resolves it against the current directory:
# the run directory, where the model card's snippets run.
PEFT_RELATIVE_BASE = "./base_model"


def remote_code(trust: bool) -> dict[str, bool]:
    """The ``trust_remote_code`` argument for a transformers call, always explicit."""
    return {"trust_remote_code": bool(trust)}


def sanitize_adapter_info(info: Any, source: str | Path) -> dict[str, Any]:
    """An adapter record (``tunepipe_adapter.json``) reduced to what a folder may decide: the task, its model
    class, the head description and the base reference. Anything else is dropped, silently where harmless."""
    if not isinstance(info, dict):
        raise ConfigError(f"{source} does not hold a JSON object", file=str(source),
                          suggestions=["re-save the adapter with tunepipe, or remove the file to load it as a plain "
                                       "peft adapter"])
    out: dict[str, Any] = {}
    for key in ("task", "auto_model_class", "peft_method", "base_model"):
        if isinstance(info.get(key), str):
            out[key] = info[key]
    if not re.fullmatch(r"AutoModel(For[A-Za-z0-9]+)?", out.get("auto_model_class", "AutoModel")):
        out.pop("auto_model_class")  # it names a transformers attribute: only the Auto classes
    if info.get("base_model_relative") == RELATIVE_BASE:
        out["base_model_relative"] = RELATIVE_BASE
    if isinstance(info.get("revision"), str) and _REVISION.match(info["revision"]):
        out["revision"] = info["revision"]
    if isinstance(info.get("vocab_size"), int) and not isinstance(info["vocab_size"], bool) \
            and 0 < info["vocab_size"] <= 10_000_000:
        out["vocab_size"] = info["vocab_size"]
    kwargs = info.get("model_kwargs") if isinstance(info.get("model_kwargs"), dict) else {}
    out["model_kwargs"] = {k: v for k, v in kwargs.items() if k in _HEAD_KWARGS and _HEAD_KWARGS[k](v)}
    quant = info.get("quantization")
    if isinstance(quant, dict) and all(k in _QUANTIZATION_CHECKS and _QUANTIZATION_CHECKS[k](v)
                                       for k, v in quant.items()) and quant.get("bits"):
        out["quantization"] = quant
    else:
        out["quantization"] = None
    return out


def relative_base(adapter_dir: str | Path, info: dict[str, Any]) -> Path | None:
    """The base copy beside the adapter (``<run>/base_model``), when the record points there and it exists."""
    if info.get("base_model_relative") != RELATIVE_BASE:
        return None
    adapter_dir = Path(adapter_dir).resolve()
    base = (adapter_dir / RELATIVE_BASE).resolve()
    if base.parent != adapter_dir.parent or not (base / "config.json").is_file():
        return None  # a symlinked base_model that leads elsewhere is not "beside the adapter"
    return base


def check_peft_config(adapter_dir: str | Path) -> dict[str, Any]:
    """``adapter_config.json``, refused when it asks peft to import a module it names (Megatron settings)."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"The adapter's adapter_config.json cannot be read: {e}", file=str(path),
                          suggestions=["copy the adapter again, or re-save it with save_pretrained"]) from None
    if not isinstance(cfg, dict):
        raise ConfigError("adapter_config.json does not hold a JSON object", file=str(path))
    if cfg.get("megatron_config") or cfg.get("megatron_core") not in (None, "megatron.core"):
        raise ConfigError("The adapter's config asks peft to import a module (megatron_core / megatron_config); "
                          "tunepipe does not load such adapters", field="megatron_config", file=str(path),
                          suggestions=["remove megatron_config and megatron_core from adapter_config.json if you "
                                       "trust where the adapter comes from"])
    return cfg
