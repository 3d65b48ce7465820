"""Finding a saved model and binding it to its task, shared by every entry point that loads one for prediction
(InferencePipeLine, MultiAdapterManager, the server): where the model is (a run, a model or adapter folder, an
alias, a hub id), which task and settings it was trained with, what a caller may pass to its task's ``predict``,
and which device and dtype it runs in. What a folder's own metadata may decide is load_policy's rule.
"""
from __future__ import annotations

import difflib
import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, CudaError, ModelNotFoundError, TaskTypeError, ValidationError
from ..modeling.models import BUNDLED_ALIASES, resolve_model_path, task_from_model_dir, tokenizer_load_error
from ..modeling.peft_support import read_adapter_info
from ..modeling.quantization import QuantizationManager
from ..modeling.type_utils import TypeUtils
from ..tasks import get_task
from .load_policy import remote_code

log = logging.getLogger("tunepipe")
SPECS_FILE = "specs.yaml"
_GENERATIVE_CLASSES = ("AutoModelForSeq2SeqLM", "AutoModelForCausalLM")
_INT8 = ("int8", "dynamic_int8", "qint8")


# ---- where the model is ------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """What ``checkpoint`` points at: a full model (``model``), a PEFT adapter (``adapter``), or a base model with no
    task head of its own (``base``); ``run_dir`` is the tunepipe output_dir holding specs.yaml, when there is one."""
    kind: str
    path: str
    run_dir: Path | None = None


def _run_dir_of(path: Path) -> Path | None:
    if path.name in ("model", "adapter", "merged") and (path.parent / SPECS_FILE).is_file():
        return path.parent
    return path if (path / SPECS_FILE).is_file() else None


def resolve_checkpoint(checkpoint: str | Path) -> Checkpoint:
    """A tunepipe output_dir, a saved model directory, an adapter directory, 'minilm', or a hub id."""
    name = str(checkpoint)
    if name.lower() in BUNDLED_ALIASES:
        return Checkpoint("base", resolve_model_path(name))
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "model" / "config.json").is_file():
            return Checkpoint("model", str(path / "model"), path)
        if (path / "adapter" / "adapter_config.json").is_file():
            return Checkpoint("adapter", str(path / "adapter"), path)
        if (path / "adapter_config.json").is_file():
            return Checkpoint("adapter", str(path), _run_dir_of(path))
        if (path / "config.json").is_file():
            return Checkpoint("model", str(path), _run_dir_of(path))
        raise ModelNotFoundError(f"No model in {path}", file=str(path),
                                 suggestions=["pass a tunepipe output_dir (with model/ or adapter/), a directory "
                                              "with config.json, or an adapter directory (adapter_config.json)"])
    if name.startswith((".", "/", "~")) or path.exists():
        raise ModelNotFoundError(f"Model directory not found: {name}", file=name,
                                 suggestions=["check the path", "use 'minilm' for the bundled pretrained encoder"])
    return Checkpoint("model", name)  # a hub id: from_pretrained fetches it where there is a network


# ---- which task, with which settings -----------------------------------------------------------------------
def canonical_task(name: str | None) -> str | None:
    if name is None:
        return None
    return get_task(name).name


def task_of_checkpoint(ck: Checkpoint) -> str | None:
    """The task recorded by training: specs.yaml, the config's ``tunepipe_task``, the adapter record, or the
    architecture name."""
    import yaml

    if ck.run_dir is not None:
        task = (yaml.safe_load((ck.run_dir / SPECS_FILE).read_text()) or {}).get("task")
        if task:
            return canonical_task(task)
    if ck.kind == "adapter":
        return canonical_task(read_adapter_info(ck.path).get("task"))
    return task_from_model_dir(ck.path) if Path(ck.path).is_dir() else None


def make_task(task_name: str, run_dir: Path | None = None, model_dir: str | Path | None = None):
    """A Task bound to the specs the model was trained with (specs.yaml), so max_length, QA settings and generation
    settings match training; without specs.yaml, the task defaults plus the model's saved generation config."""
    from ..specs import load_specs
    if run_dir is not None and (Path(run_dir) / SPECS_FILE).is_file():
        # a run directory's specs describe the data and the head; they never switch on remote code (load_policy)
        specs = load_specs(Path(run_dir) / SPECS_FILE,
                           overrides=[f"output_dir={run_dir}", "model.trust_remote_code=false"])
        if specs.task != task_name:
            raise TaskTypeError(f"The run in {run_dir} was trained for {specs.task}, not {task_name}",
                                field="task", suggestions=[f"use task_type='{specs.task}' (or leave it out)"])
    else:
        raw: dict[str, Any] = {"task": task_name, "output_dir": str(run_dir or ".")}
        generation = _saved_generation(model_dir)
        if generation:
            raw["generation"] = generation
        specs = load_specs(raw)
    return get_task(task_name)(specs)


def _saved_generation(model_dir: str | Path | None) -> dict[str, Any]:
    """Generation settings that save_pretrained wrote (generation_config.json), in GenerationSpec names."""
    if model_dir is None or not (Path(model_dir) / "generation_config.json").is_file():
        return {}
    from ..specs import GenerationSpec
    saved = json.loads((Path(model_dir) / "generation_config.json").read_text())
    return {k: v for k, v in saved.items() if k in GenerationSpec.model_fields and v is not None}


# ---- checking what the caller passes -----------------------------------------------------------------------
def is_single_input(inputs: Any) -> bool:
    """One input: a text, a record (dict) or a pair (tuple). A list is always a batch (pre-split words of one
    sentence: a list of lists)."""
    return isinstance(inputs, (str, dict, tuple))


def empty_input(task, item: Any) -> str | None:
    """Why ``item`` gives the model nothing to read ('is empty', "has an empty 'context'"), or None. Training data
    refuses empty texts, so a prediction on one is a caller's mistake (an empty shell variable, a blank field),
    not a result; a causal LM continues an empty prompt from its bos token, so there it is an input."""
    if task.auto_model_class == "AutoModelForCausalLM":
        return None
    if isinstance(item, dict):  # what the task reads of a record (other fields of it do not matter)
        try:
            item = task.input_from_record(item)
        except Exception:  # noqa: BLE001 - a record the task cannot read is prepare_input's to refuse
            return None
    if isinstance(item, str):
        return "is empty" if not item.strip() else None
    if isinstance(item, (list, tuple)):
        if not item:
            return "is empty"
        return "holds an empty text" if any(isinstance(x, str) and not x.strip() for x in item) else None
    if isinstance(item, dict):
        blank = [k for k, v in item.items() if isinstance(v, str) and not v.strip()]
        return f"has an empty '{blank[0]}'" if blank else None
    return None


def refuse_empty(task, items: list[Any], where=lambda n: f"Input {n + 1}", field: str = "inputs") -> None:
    """A ValidationError naming the first empty input of ``items`` (``where(n)`` names input n)."""
    for n, item in enumerate(items):
        problem = empty_input(task, item)
        if problem:
            raise ValidationError(f"{where(n)} {problem}: nothing to predict", field=field,
                                  suggestions=["give a text (training data refuses empty texts as well)"])


def check_predict_kwargs(task, kwargs: dict[str, Any]) -> None:
    """Refuse settings the task's predict does not take, or values of the wrong type, with the accepted names."""
    if not kwargs:
        return
    params = inspect.signature(task.predict).parameters
    named = {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
             and n not in ("model", "tokenizer", "inputs", "batch_size")}
    open_ended = any(p.kind == p.VAR_KEYWORD for p in params.values())
    generative = task.auto_model_class in _GENERATIVE_CLASSES
    unknown = []
    for key, value in kwargs.items():
        if key in named:
            _check_type(key, value, named[key].default)
        elif generative and open_ended:
            _check_generation_setting(key, value)
        elif open_ended:  # e.g. QA's n_best_size: the task checks the names, the specs field checks the value
            _check_spec_setting(key, value)
        elif not open_ended:
            unknown.append(key)
    if unknown:
        accepted = sorted(named) or ["(none)"]
        raise ConfigError(f"Unknown prediction setting(s) for {task.name}: {', '.join(sorted(unknown))}",
                          field=unknown[0], suggestions=[f"{task.name} accepts: {', '.join(accepted)}"])


def _check_type(key: str, value: Any, default: Any) -> None:
    """A setting whose default is a bool or a number takes a value of that kind."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"Prediction setting '{key}' must be true or false, got {value!r}", field=key,
                              suggestions=[f"e.g. {key}={str(default).lower()}"])
    elif isinstance(default, (int, float)):
        kinds = int if isinstance(default, int) else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ConfigError(f"Prediction setting '{key}' must be {'an integer' if kinds is int else 'a number'}, "
                              f"got {value!r}", field=key,
                              suggestions=[f"e.g. {key}={default}"])
        if value <= 0 and default > 0:
            raise ConfigError(f"Prediction setting '{key}' must be positive, got {value!r}", field=key,
                              suggestions=[f"e.g. {key}={default}"])


def _check_section_setting(section: str, key: str, value: Any, what: str) -> bool:
    """Whether ``key`` is a field of the specs section ``section``; its value checked by that section's rules."""
    from pydantic import ValidationError as PydanticError

    from ..specs import SECTIONS
    spec = SECTIONS[section]
    if key not in spec.model_fields:
        return False
    try:
        spec.model_validate({key: value})
    except PydanticError as e:
        raise ConfigError(f"Invalid {what} {key}={value!r}: {e.errors()[0]['msg']}", field=key,
                          suggestions=[f"see `{section}.{key}` in the specs reference"]) from None
    return True


def _check_spec_setting(key: str, value: Any) -> None:
    _check_section_setting("data", key, value, "prediction setting")


def _check_generation_setting(key: str, value: Any) -> None:
    from transformers import GenerationConfig

    from ..specs import GenerationSpec
    if _check_section_setting("generation", key, value, "generation setting"):
        return
    if not hasattr(GenerationConfig(), key) or key in ("max_length",):
        close = difflib.get_close_matches(key, list(GenerationSpec.model_fields), n=1)
        raise ConfigError(f"Unknown generation setting '{key}'", field=key,
                          suggestions=[f"did you mean '{c}'?" for c in close] +
                          [f"settings: {', '.join(GenerationSpec.model_fields)}"])


# ---- devices and dtypes ------------------------------------------------------------------------------------
def default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


_DEVICE_NAMES = {"cuda": "CUDA", "xpu": "XPU", "mps": "MPS"}
_DEVICE_ALIASES = {"gpu": "cuda", "nvidia": "cuda", "cuda0": "cuda:0", "apple": "mps", "metal": "mps", "intel": "xpu"}


def check_device(device: str | None, field: str = "device") -> str:
    """The device to run on (None: cuda when available, else cpu), checked before any model loads: a misspelt
    device, or one this machine does not have, fails at once and names what there is, instead of as a torch
    assertion after minutes of loading. cpu, cuda, xpu and mps are the devices prediction runs on."""
    if device is None:
        return default_device()
    import torch
    text = str(device).strip()
    cli = field.startswith("--")

    def use(value: str | None) -> str:
        return (f"use {field} {value}" if cli else f"use {field}='{value}'") if value else \
            (f"or leave {field} out" if cli else f"or leave {field} unset") + " (cuda when available, else cpu)"

    try:
        kind, index = torch.device(text).type, torch.device(text).index
    except (RuntimeError, ValueError, TypeError):
        meant = _DEVICE_ALIASES.get(text.lower(), text.lower())
        hint = [f"did you mean {use(meant)[4:]}?"] if meant != text and _parses(torch, meant) else []
        raise ConfigError(f"{field} {text!r} is not a device", field=field,
                          suggestions=hint + ["devices: cpu, cuda, cuda:N (the N-th GPU), xpu, mps", use(None)]) \
            from None
    if kind == "cpu":
        return text
    if kind not in _DEVICE_NAMES:
        raise ConfigError(f"{field} {text}: prediction runs on cpu, cuda, xpu or mps, not {kind}", field=field,
                          suggestions=[use("cpu"), use(None)])
    count = _device_count(torch, kind)
    if count == 0:
        built = " (this torch is built without CUDA)" if kind == "cuda" and torch.version.cuda is None else ""
        raise CudaError(f"{field} {text}: this machine has no {_DEVICE_NAMES[kind]} device{built}", field=field,
                        suggestions=[use("cpu"), use(None)])
    if index is not None and index >= count:
        raise CudaError(f"{field} {text}: this machine has {count} {_DEVICE_NAMES[kind]} device"
                        f"{'s' if count > 1 else ''} ({kind}:0{f' to {kind}:{count - 1}' if count > 1 else ''})",
                        field=field, suggestions=[use(f"{kind}:{count - 1}" if count > 1 else kind), use(None)])
    return text


def _parses(torch, text: str) -> bool:
    try:
        torch.device(text)
        return True
    except (RuntimeError, ValueError, TypeError):
        return False


def _device_count(torch, kind: str) -> int:
    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "xpu":
        xpu = getattr(torch, "xpu", None)
        return xpu.device_count() if xpu is not None and xpu.is_available() else 0
    mps = getattr(torch.backends, "mps", None)
    return 1 if mps is not None and mps.is_available() else 0


def resolve_dtype(dtype: Any, device: str) -> Any:
    """None/'float32' -> None (keep full precision); 'auto' -> bfloat16 where the device runs it fast."""
    if dtype is None or str(dtype).replace("torch.", "").lower() in ("float32", "fp32"):
        return None
    if str(dtype).lower() in _INT8:
        return "int8"
    if str(dtype).lower() == "auto":
        ok, note = TypeUtils.device_supports("bfloat16", device)
        return "bfloat16" if ok and note is None else None
    return TypeUtils.dtype(dtype)


def place(model, device: str, dtype: Any):
    """Move and cast a loaded model (bf16 via TypeUtils.convert; int8 via QuantizationManager)."""
    quantized = QuantizationManager.is_quantized(model)
    if dtype == "int8":
        if str(device).split(":")[0] != "cpu":
            raise ConfigError("int8 inference (torch dynamic quantization) runs on CPU only", field="dtype",
                              suggestions=["use dtype='bfloat16' on GPU", "or device='cpu'"])
        return QuantizationManager.quantize_for_inference(model, "dynamic_int8")
    if dtype is not None:
        if quantized:
            raise ConfigError("The model is loaded quantized (as it was trained); it cannot be cast", field="dtype",
                              suggestions=["leave dtype unset for a QLoRA adapter",
                                           "or merge it first: tunepipe merge"])
        return TypeUtils.convert(model, dtype, device)
    if not quantized and next(model.parameters()).device.type != str(device).split(":")[0]:
        model = model.to(device)
    return model


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **remote_code(trust_remote_code))
    except Exception as e:  # noqa: BLE001 - a damaged tokenizer.json: named with its line, like in training
        raise tokenizer_load_error(e, path, "model") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer
