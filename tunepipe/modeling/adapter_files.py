"""A PEFT run's adapter folder: written (adapter weights, tokenizer, ``tunepipe_adapter.json`` naming the base so it
loads elsewhere, a short README) and read back on its base, quantized as it was trained."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ModelNotFoundError
from ..output import atomic_dir
from ..serving.load_policy import (PEFT_RELATIVE_BASE, RELATIVE_BASE, check_peft_config, relative_base, remote_code,
                                   sanitize_adapter_info)
from .model_paths import BUNDLED_HUB_ID, bundled_copy, bundled_model_dir
from .model_structure import head_modules
from .peft_names import _AUTO_CLASS_BY_TASK_TYPE, peft_method
from .quantization import QuantizationManager, _output_embedding_names
from .type_utils import parameter_count

ADAPTER_INFO = "tunepipe_adapter.json"
BASE_MODEL_DIR = "base_model"


# ---- saving ---------------------------------------------------------------------------------------
def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights counted as the parameters they hold."""
    trainable = sum(parameter_count(p) for p in model.parameters() if p.requires_grad)
    return trainable, sum(parameter_count(p) for p in model.parameters())


def save_adapter(model, tokenizer, target: str | Path, specs, task) -> Path:
    """Adapter-only ``save_pretrained`` layout + tokenizer + ``tunepipe_adapter.json`` (base reference), atomically.

    The base is named so that the run still loads after it is copied to another machine (``base_reference``), in
    ``adapter_config.json`` too (what plain peft and ``AutoPeftModelFor<Task>`` read); ``README.md`` is a short card
    of ours instead of peft's empty template."""
    target = Path(target)
    ref = base_reference(model.peft_config["default"].base_model_name_or_path or _base_name(model),
                         specs.output_dir, specs.model.revision)
    vocab = model.get_input_embeddings().num_embeddings
    quantization = QuantizationManager(specs).describe()
    if quantization:  # what stayed in full precision, so that the card's BitsAndBytesConfig can say it
        quantization["skip_modules"] = _full_precision_modules(model, quantization.get("skip_modules"))
    info = {
        "task": task.name, "auto_model_class": task.auto_model_class, "peft_method": peft_method(specs),
        "base_model": ref["base_model"], "base_model_relative": ref["base_model_relative"],
        "revision": ref["revision"], "trust_remote_code": specs.model.trust_remote_code,
        "model_kwargs": _jsonable(task.model_kwargs()),
        "vocab_size": vocab, "quantization": quantization,
    }

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        config_file = tmp / "adapter_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = ref["name_or_path"]
        config["revision"] = ref["revision"]
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / ADAPTER_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(adapter_readme(info, config.get("task_type")), encoding="utf-8")

    atomic_dir(target, write)
    return target


# A base loaded from the hub cache by path: .../models--<org>--<name>/snapshots/<commit>
_HUB_SNAPSHOT = re.compile(r"/models--([^/]+)/snapshots/([0-9a-f]{40})$")


def base_reference(base: str | None, output_dir: str | Path, revision: str | None = None) -> dict[str, Any]:
    """How an adapter names its base, so that the run loads wherever it is copied.

    ``kind`` is ``run`` for the base copy inside the run (``base_model/``: ``./base_model`` for peft, relative to the
    run directory, ``../base_model`` in tunepipe's record, relative to the adapter), ``hub`` for a hub model (its id;
    the bundled MiniLM and a hub-cache snapshot folder are recorded by their hub id, the snapshot with its commit),
    ``local`` for a folder of the user's own: its absolute path, the last resort (it does not travel)."""
    ref = {"kind": None, "name_or_path": base or None, "base_model": base or None, "base_model_relative": None,
           "revision": revision}
    if not base:
        return ref
    path = Path(base).expanduser()
    if not path.is_dir():
        return {**ref, "kind": "hub"}
    path = path.resolve()
    if path == Path(output_dir).resolve() / BASE_MODEL_DIR:
        return {**ref, "kind": "run", "name_or_path": PEFT_RELATIVE_BASE, "base_model": None,
                "base_model_relative": RELATIVE_BASE, "revision": None}
    bundled = bundled_model_dir()
    if bundled is not None and path == bundled.resolve():
        return {**ref, "kind": "hub", "name_or_path": BUNDLED_HUB_ID, "base_model": BUNDLED_HUB_ID, "revision": None}
    snapshot = _HUB_SNAPSHOT.search(path.as_posix())
    if snapshot:
        repo = snapshot[1].replace("--", "/")
        return {**ref, "kind": "hub", "name_or_path": repo, "base_model": repo, "revision": revision or snapshot[2]}
    return {**ref, "kind": "local", "name_or_path": str(path), "base_model": str(path), "revision": None}


def base_kind(info: dict[str, Any]) -> str | None:
    """``run`` / ``hub`` / ``local`` (see ``base_reference``) for a sanitized adapter record."""
    if info.get("base_model_relative"):
        return "run"
    base = info.get("base_model")
    if not base:
        return None
    return "local" if Path(base).is_absolute() or base.startswith(("./", "../", "~")) else "hub"


def _full_precision_modules(model, requested: list[str] | None) -> list[str]:
    """The modules a quantized load keeps in full precision (QuantizationManager.load_kwargs): the task head, the
    output embeddings and the user's ``skip_modules``."""
    base = model.get_base_model()
    return sorted(set(requested or []) | set(head_modules(base)) | set(_output_embedding_names(base)))


def _base_name(model) -> str | None:
    base = model.get_base_model()
    return getattr(base, "name_or_path", None) or getattr(base.config, "_name_or_path", None) or None


def _jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = dict(kwargs)
    if "id2label" in out:
        out["id2label"] = {str(k): v for k, v in out["id2label"].items()}
    return out


def read_adapter_info(path: str | Path) -> dict[str, Any]:
    """tunepipe's record next to the adapter, for a plain peft adapter what adapter_config.json tells; reduced to
    what a folder may decide (load_policy: no remote code, no load arguments beyond the head description)."""
    path = Path(path)
    cfg = check_peft_config(path)
    if (path / ADAPTER_INFO).is_file():
        try:
            raw = json.loads((path / ADAPTER_INFO).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"The adapter record cannot be read: {e}", file=str(path / ADAPTER_INFO),
                              suggestions=["re-save the adapter with tunepipe, or remove the file to load it as "
                                           "a plain peft adapter"]) from None
        return sanitize_adapter_info(raw, path / ADAPTER_INFO)
    base = cfg.get("base_model_name_or_path")
    record = {"base_model": base if isinstance(base, str) else None,
              "auto_model_class": _AUTO_CLASS_BY_TASK_TYPE.get(str(cfg.get("task_type") or ""))}
    if base == PEFT_RELATIVE_BASE:  # tunepipe's run-relative name: the run's base_model/ beside the adapter
        record.update(base_model=None, base_model_relative=RELATIVE_BASE)
    return sanitize_adapter_info(record, path / "adapter_config.json")


def resolve_base(path: str | Path, info: dict[str, Any]) -> str:
    """The base model for an adapter: the copy next to it (from_config runs), else the recorded path or hub id
    (the bundled MiniLM's hub id read as the bundled copy when the package is installed: no network needed)."""
    beside = relative_base(path, info)
    if beside is not None:
        return str(beside)
    base = info.get("base_model")
    if info.get("base_model_relative") and not base:
        raise ModelNotFoundError(f"The adapter in {path} was trained on its run's own base model, "
                                 f"'{BASE_MODEL_DIR}/' beside it, which is not there (or leads outside the run)",
                                 file=str(path),
                                 suggestions=["copy the whole run directory (adapter/ and base_model/ together)",
                                              "or pass the base model explicitly (tunepipe predict --model BASE "
                                              "--adapter NAME=DIR)"])
    if not base:
        raise ModelNotFoundError(f"The adapter in {path} does not name its base model", file=str(path),
                                 suggestions=["set base_model_name_or_path in adapter_config.json",
                                              "or pass the base model explicitly (tunepipe predict --model BASE "
                                              "--adapter NAME=DIR)"])
    return bundled_copy(base) or base


def load_adapter(path: str | Path, auto_model_class: str | None = None, full_precision: bool = False,
                 trust_remote_code: bool = False):
    """(PeftModel, tokenizer) for an adapter directory, on its base loaded as it was trained (quantized or not),
    or in full precision (``full_precision=True``, for merging). Remote code runs only when the caller says so:
    an adapter folder from elsewhere must not switch it on by itself."""
    import transformers
    from peft import PeftModel

    path = Path(path)
    if not is_adapter_dir(path):
        raise ModelNotFoundError(f"No adapter in {path}", file=str(path),
                                 suggestions=["run `tunepipe train` with a peft section first"])
    info = read_adapter_info(path)
    cls_name = auto_model_class or info.get("auto_model_class")
    if not cls_name:
        raise ModelNotFoundError(f"Cannot tell which model class the adapter in {path} needs", file=str(path),
                                 suggestions=["pass the task (tunepipe predict --task ...)"])
    auto_cls = getattr(transformers, cls_name)
    base = resolve_base(path, info)
    kwargs = dict(info.get("model_kwargs") or {})
    if "id2label" in kwargs:
        kwargs["id2label"] = {int(k): v for k, v in kwargs["id2label"].items()}
    kwargs.update({k: info[k] for k in ("revision",) if info.get(k)})
    kwargs.update(remote_code(trust_remote_code))
    qm = QuantizationManager.from_info(info.get("quantization"))
    try:
        if qm.enabled and not full_precision:
            model = qm.load(auto_cls, base, **kwargs)
        else:
            model = auto_cls.from_pretrained(base, **kwargs)
    except OSError as e:
        raise ModelNotFoundError(f"Cannot load the adapter's base model '{base}': {str(e).splitlines()[0]}",
                                 field="base_model", file=str(path / ADAPTER_INFO),
                                 suggestions=["make the base model available at that path/hub id"]) from None
    vocab = info.get("vocab_size")
    if vocab and model.get_input_embeddings().num_embeddings != vocab:
        model.resize_token_embeddings(vocab)
    model = PeftModel.from_pretrained(model, str(path))
    model.eval()
    return model, load_adapter_tokenizer(path, base, trust_remote_code)


def load_adapter_tokenizer(adapter: Path, base: str, trust_remote_code: bool = False):
    """The tokenizer saved with the adapter, else the base model's, else None (an adapter saved without one).
    A tokenizer that needs remote code the caller did not allow is skipped like a missing one."""
    import transformers

    for source in (adapter, base):
        if (Path(source) / "tokenizer_config.json").is_file() or not Path(source).exists():
            try:
                return transformers.AutoTokenizer.from_pretrained(source, **remote_code(trust_remote_code))
            except (OSError, ValueError):
                continue
    return None


# ---- model cards ----------------------------------------------------------------------------------------------
# The AutoPeftModel class for each peft task type; None (no task type: MLM) uses the generic one, which reads the
# model class from adapter_config.json's auto_mapping.


def adapter_readme(info: dict[str, Any], task_type: str | None) -> str:
    """``adapter/README.md``: a short card pointing at the run's, instead of peft's empty template."""
    base = info.get("base_model")
    relative = bool(info.get("base_model_relative"))
    front = ["---", "library_name: peft"] + ([f"base_model: {base}"] if base and not relative
                                             and not Path(base).is_absolute() else [])
    front += [f"tags: [tunepipe, {info.get('task')}, {info.get('peft_method')}]", "---"]
    id2label = (info.get("model_kwargs") or {}).get("id2label") or {}
    labels = [id2label[k] for k in sorted(id2label, key=int)]
    shown_labels = ", ".join(labels[:20]) + (f", ... ({len(labels) - 20} more)" if len(labels) > 20 else "")
    shown_base = "the run's `base_model/` (`../base_model`)" if relative else f"`{base}`"
    return "\n".join(front) + f"""
# {info.get('peft_method')} adapter for {info.get('task')}

A PEFT adapter trained with [tunepipe](https://pypi.org/project/tunepipe/) on {shown_base}
(task type `{task_type}`{f", {len(labels)} labels: {shown_labels}" if labels else ""}).
The run's model card, `../README.md`, has its metrics and the code to load it (plain peft, `AutoPeftModel...`,
tunepipe). `tunepipe_adapter.json` is tunepipe's record of the task, labels and base model.
"""
