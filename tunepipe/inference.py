"""InferencePipeLine: predictions from a trained run, a saved model, or a base model plus adapters, for every task.

The post-processing lives in each Task's ``predict`` (entities with character offsets, answers, generated text ...);
this module only finds the model and its task, loads it on the chosen device and dtype, checks what the caller
passes, and hands batches to the task. Tasks sort inputs by length inside ``predict`` and return results in input
order, so a mixed-length list costs little padding.
"""
from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from .errors import ConfigError, ModelNotFoundError, TaskTypeError

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
    from .models import BUNDLED_ALIASES, resolve_model_path
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
    from .tasks import get_task
    return get_task(name).name


def task_of_checkpoint(ck: Checkpoint) -> str | None:
    """The task recorded by training: specs.yaml, the config's ``tunepipe_task``, the adapter record, or the
    architecture name."""
    import yaml

    from .models import task_from_model_dir
    if ck.run_dir is not None:
        task = (yaml.safe_load((ck.run_dir / SPECS_FILE).read_text()) or {}).get("task")
        if task:
            return canonical_task(task)
    if ck.kind == "adapter":
        from .peft_support import read_adapter_info
        return canonical_task(read_adapter_info(ck.path).get("task"))
    return task_from_model_dir(ck.path) if Path(ck.path).is_dir() else None


def make_task(task_name: str, run_dir: Path | None = None, model_dir: str | Path | None = None):
    """A Task bound to the specs the model was trained with (specs.yaml), so max_length, QA settings and generation
    settings match training; without specs.yaml, the task defaults plus the model's saved generation config."""
    from .specs import load_specs
    from .tasks import get_task
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
    from .specs import GenerationSpec
    saved = json.loads((Path(model_dir) / "generation_config.json").read_text())
    return {k: v for k, v in saved.items() if k in GenerationSpec.model_fields and v is not None}


# ---- checking what the caller passes -----------------------------------------------------------------------
def is_single_input(inputs: Any) -> bool:
    """One input: a text, a record (dict) or a pair (tuple). A list is always a batch (pre-split words of one
    sentence: a list of lists)."""
    return isinstance(inputs, (str, dict, tuple))


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


def _check_spec_setting(key: str, value: Any) -> None:
    from pydantic import ValidationError as PydanticError

    from .specs import DataSpec
    if key in DataSpec.model_fields:
        try:
            DataSpec.model_validate({key: value})
        except PydanticError as e:
            raise ConfigError(f"Invalid prediction setting {key}={value!r}: {e.errors()[0]['msg']}", field=key,
                              suggestions=[f"see `data.{key}` in the specs reference"]) from None


def _check_generation_setting(key: str, value: Any) -> None:
    from pydantic import ValidationError as PydanticError
    from transformers import GenerationConfig

    from .specs import GenerationSpec
    if key in GenerationSpec.model_fields:
        try:
            GenerationSpec.model_validate({key: value})
        except PydanticError as e:
            raise ConfigError(f"Invalid generation setting {key}={value!r}: {e.errors()[0]['msg']}", field=key,
                              suggestions=[f"see `generation.{key}` in the specs reference"]) from None
        return
    if not hasattr(GenerationConfig(), key) or key in ("max_length",):
        import difflib
        close = difflib.get_close_matches(key, list(GenerationSpec.model_fields), n=1)
        raise ConfigError(f"Unknown generation setting '{key}'", field=key,
                          suggestions=[f"did you mean '{c}'?" for c in close] +
                          [f"settings: {', '.join(GenerationSpec.model_fields)}"])


# ---- devices and dtypes ------------------------------------------------------------------------------------
def default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: Any, device: str) -> Any:
    """None/'float32' -> None (keep full precision); 'auto' -> bfloat16 where the device runs it fast."""
    if dtype is None or str(dtype).replace("torch.", "").lower() in ("float32", "fp32"):
        return None
    if str(dtype).lower() in _INT8:
        return "int8"
    if str(dtype).lower() == "auto":
        from .type_utils import TypeUtils
        ok, note = TypeUtils.device_supports("bfloat16", device)
        return "bfloat16" if ok and note is None else None
    from .type_utils import TypeUtils
    return TypeUtils.dtype(dtype)


def place(model, device: str, dtype: Any):
    """Move and cast a loaded model (bf16 via TypeUtils.convert; int8 via QuantizationManager)."""
    from .quantization import QuantizationManager
    from .type_utils import TypeUtils
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

    from .load_policy import remote_code
    from .models import tokenizer_load_error
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **remote_code(trust_remote_code))
    except Exception as e:  # noqa: BLE001 - a damaged tokenizer.json: named with its line, like in training
        raise tokenizer_load_error(e, path, "model") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


# ---- the pipeline ------------------------------------------------------------------------------------------
class InferencePipeLine:
    """Predict with a trained model, for any task.

    ``InferencePipeLine(task_type, checkpoint, adapter_config=None, device=None, dtype=None, batch_size=32)``:
    ``checkpoint`` is a tunepipe output_dir, a saved model or adapter directory, 'minilm' or a hub id;
    ``task_type`` may be left out when training recorded it. ``adapter_config`` adds PEFT adapters on the
    checkpoint as base: one directory (used by default), or ``{name: directory}`` (each chosen per call with
    ``adapter=``; no adapter = the base model). ``dtype``: None (full precision), 'bfloat16', 'auto' (bf16 where
    the device runs it fast) or 'int8' (CPU dynamic quantization). ``trust_remote_code``: run code shipped with
    the model (its ``auto_map``); only this argument turns it on, never a setting saved in the model's folder.
    """

    def __init__(self, task_type: str | None = None, checkpoint: str | Path | None = None,
                 adapter_config: str | Path | dict[str, str] | Sequence[str] | None = None,
                 device: str | None = None, dtype: Any = None, batch_size: int = 32,
                 max_adapters_in_memory: int = 8, trust_remote_code: bool = False):
        if checkpoint is None:
            raise ConfigError("InferencePipeLine needs a checkpoint", field="checkpoint",
                              suggestions=["InferencePipeLine('token_classification', 'runs/ner')"])
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}", field="batch_size")
        self.checkpoint = resolve_checkpoint(checkpoint)
        self.batch_size = batch_size
        self.trust_remote_code = bool(trust_remote_code)
        self.device = device or default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        requested = canonical_task(task_type)
        recorded = task_of_checkpoint(self.checkpoint)
        if requested and recorded and requested != recorded and self.checkpoint.run_dir is not None:
            raise TaskTypeError(f"{checkpoint} was trained for {recorded}, not {requested}", field="task_type",
                                suggestions=[f"use task_type='{recorded}' or leave it out"])
        self.task_name = requested or recorded
        self.model = self.tokenizer = self.task = None
        self.adapters = None  # a MultiAdapterManager when adapters are in play
        self.default_adapter: str | None = None
        adapters = _adapter_mapping(adapter_config)
        if not adapters and self.checkpoint.kind != "base":
            self._load_single()
        else:
            self._load_with_adapters(adapters, max_adapters_in_memory)

    # ---- loading -------------------------------------------------------------------------------------------
    def _require_task(self) -> str:
        if not self.task_name:
            raise TaskTypeError(f"Cannot tell the task of {self.checkpoint.path}", field="task_type",
                                suggestions=["pass task_type (CLI: --task), e.g. 'token_classification'"])
        return self.task_name

    def _load_single(self) -> None:
        import transformers

        from .errors import ErrorHandler
        ck = self.checkpoint
        task = make_task(self._require_task(), ck.run_dir, ck.path if ck.kind == "model" else None)
        from .load_policy import remote_code
        from .models import adopt_model_config
        trust = self.trust_remote_code
        adopt_model_config(task, ck.path, **remote_code(trust))
        with ErrorHandler.guard(f"loading {ck.path}"):
            if ck.kind == "adapter":
                from .peft_support import load_adapter
                model, tokenizer = load_adapter(ck.path, task.auto_model_class, trust_remote_code=trust)
            else:
                model = getattr(transformers, task.auto_model_class).from_pretrained(ck.path, **remote_code(trust))
                tokenizer = load_tokenizer(ck.path, trust)
        if tokenizer is None:
            raise ModelNotFoundError(f"No tokenizer saved with {ck.path}", file=ck.path,
                                     suggestions=["save the tokenizer next to the model (save_pretrained)"])
        self.model = place(model, self.device, self.dtype).eval()
        self.tokenizer = tokenizer
        task.on_model_loaded(self.model)
        self.task = task

    def _load_with_adapters(self, adapters: dict[str, str], max_in_memory: int) -> None:
        from .adapters import MultiAdapterManager
        ck = self.checkpoint
        base, base_run = ck.path, ck.run_dir
        if ck.kind == "adapter":  # the run's own adapter is the default; its base is the shared base
            from .peft_support import read_adapter_info, resolve_base
            base, base_run = resolve_base(ck.path, read_adapter_info(ck.path)), None
        self.adapters = MultiAdapterManager(base, task_type=self.task_name, base_run_dir=base_run,
                                            max_adapters_in_memory=max_in_memory, device=self.device,
                                            dtype=self.dtype, trust_remote_code=self.trust_remote_code)
        if ck.kind == "adapter":
            adapters = {"default": ck.path, **adapters}
        for name, path in adapters.items():
            self.adapters.register_adapter(name, path)
        if ck.kind == "adapter" or set(adapters) == {"default"}:
            self.default_adapter = "default"
        for name in list(adapters)[:max_in_memory]:
            self.adapters.load_adapter(name)
        default = self.default_adapter
        if default is not None:
            self.task_name = self.task_name or self.adapters.task_name(default)

    # ---- predicting ----------------------------------------------------------------------------------------
    def predict(self, inputs: Any, adapter: str | None = None, batch_size: int | None = None, **kwargs) -> Any:
        """Structured results for one input (a text, a record, a pair) or a list of them, in input order.
        ``kwargs`` are the task's prediction settings (``all_scores``, ``top_k``, generation settings ...)."""
        single = is_single_input(inputs)
        items = [inputs] if single else list(inputs)
        results = self._predict(items, adapter, batch_size, kwargs) if items else []
        return results[0] if single else results

    def run(self, input_text: Any, adapter_id: str | None = None, **kwargs) -> Any:
        """The original design's entry point: ``predict`` with the adapter named ``adapter_id``."""
        return self.predict(input_text, adapter=adapter_id, **kwargs)

    def predict_grouped(self, inputs: Sequence[Any], adapters: Sequence[str | None],
                        batch_size: int | None = None, **kwargs) -> list[Any]:
        """One adapter name (or None) per input: inputs are grouped by adapter, each group runs as one batched
        call, and results come back in input order."""
        from .adapters import group_by_adapter
        return group_by_adapter(inputs, adapters, lambda items, name: self._predict(items, name, batch_size, kwargs))

    def predict_iter(self, inputs: Iterable[Any], adapter: str | None = None, chunk_size: int | None = None,
                     **kwargs) -> Iterator[list[Any]]:
        """Results chunk by chunk (for progress bars and long files); each chunk is length-sorted inside."""
        size = chunk_size or self.batch_size * 8
        chunk: list[Any] = []
        for item in inputs:
            chunk.append(item)
            if len(chunk) == size:
                yield self._predict(chunk, adapter, None, kwargs)
                chunk = []
        if chunk:
            yield self._predict(chunk, adapter, None, kwargs)

    def _predict(self, items: list[Any], adapter: str | None, batch_size: int | None, kwargs) -> list[Any]:
        batch_size = batch_size or self.batch_size
        if self.adapters is None:
            if adapter is not None:
                raise ConfigError(f"No adapters are loaded, so adapter '{adapter}' cannot be used", field="adapter",
                                  suggestions=["load adapters with adapter_config={name: directory}",
                                               "or leave adapter out"])
            check_predict_kwargs(self.task, kwargs)
            items = self.task.prepare_inputs(items)
            return self.task.predict(self.model, self.tokenizer, items, batch_size=batch_size, **kwargs)
        name = adapter if adapter is not None else self.default_adapter
        return self.adapters.predict(items, adapter=name, batch_size=batch_size, **kwargs)

    def task_for(self, adapter: str | None = None):
        """The Task that serves requests for ``adapter`` (None: the default adapter, else the model itself)."""
        if self.adapters is None:
            return self.task
        return self.adapters.set_adapter(adapter if adapter is not None else self.default_adapter)[2]

    def input_from_record(self, record: dict[str, Any], adapter: str | None = None) -> Any:
        """What predict takes, from one record of an input file: the columns the model was trained on, else a
        'text' field."""
        return self.inputs_from_records([record], [adapter])[0]

    def inputs_from_records(self, records: Sequence[Any], adapters: Sequence[str | None]) -> list[Any]:
        """``input_from_record`` for many records (each with its adapter's task); non-records pass through."""
        tasks: dict[str | None, Any] = {}
        out = []
        for record, adapter in zip(records, adapters):
            if not isinstance(record, dict):
                out.append(record)
                continue
            if adapter not in tasks:
                tasks[adapter] = self.task_for(adapter)
            value = tasks[adapter].input_from_record(record)
            out.append(record["text"] if value is None and isinstance(record.get("text"), str) else value)
        return out

    # ---- description ---------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint.path, "kind": self.checkpoint.kind, "task": self.task_name,
                "device": self.device, "dtype": str(self.dtype or "float32").replace("torch.", ""),
                "batch_size": self.batch_size, "default_adapter": self.default_adapter,
                "adapters": len(self.adapters.list_adapters()) if self.adapters else 0}


def _adapter_mapping(adapter_config) -> dict[str, str]:
    if adapter_config is None:
        return {}
    if isinstance(adapter_config, (str, Path)):
        return {"default": str(adapter_config)}
    if isinstance(adapter_config, dict):
        return {str(k): str(v) for k, v in adapter_config.items()}
    out: dict[str, str] = {}
    for path in adapter_config:
        name = Path(str(path)).name
        name = Path(str(path)).parent.name if name == "adapter" else name
        if name in out:
            raise ConfigError(f"Two adapters would be named '{name}'", field="adapter_config",
                              suggestions=["pass {name: directory} to name them"])
        out[name] = str(path)
    return out
