"""InferencePipeLine: predictions from a trained run, a saved model, or a base model plus adapters, for every task.

The post-processing lives in each Task's ``predict`` (entities with character offsets, answers, generated text ...);
finding the model, its task and its device is model_loading's (shared with MultiAdapterManager and the server);
this module loads one model, or hands a base plus adapters to MultiAdapterManager, and passes batches to the task.
Tasks sort inputs by length inside ``predict`` and return results in input order, so a mixed-length list costs
little padding.
"""
from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ..errors import ConfigError, ErrorHandler, ModelNotFoundError, TaskTypeError, TunepipeError, ValidationError
from ..modeling.models import adopt_model_config
from ..modeling.peft_support import load_adapter, read_adapter_info, resolve_base
from .adapters import MultiAdapterManager, group_by_adapter
from .load_policy import remote_code
from .model_loading import (Checkpoint, canonical_task, check_device, check_predict_kwargs,  # noqa: F401 (API)
                            default_device, is_single_input, load_tokenizer, make_task, place, resolve_checkpoint,
                            resolve_dtype, task_of_checkpoint)

log = logging.getLogger("tunepipe")


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
        self.device = check_device(device)  # before anything loads
        self.checkpoint = resolve_checkpoint(checkpoint)
        self.batch_size = batch_size
        self.trust_remote_code = bool(trust_remote_code)
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
        ck = self.checkpoint
        task = make_task(self._require_task(), ck.run_dir, ck.path if ck.kind == "model" else None)
        trust = self.trust_remote_code
        adopt_model_config(task, ck.path, **remote_code(trust))
        with ErrorHandler.guard(f"loading {ck.path}"):
            if ck.kind == "adapter":
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
        ck = self.checkpoint
        base, base_run = ck.path, ck.run_dir
        if ck.kind == "adapter":  # the run's own adapter is the default; its base is the shared base
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

    def inputs_from_records(self, records: Sequence[Any], adapters: Sequence[str | None],
                            origins: Sequence[tuple[str, int] | None] | None = None) -> list[Any]:
        """``input_from_record`` for many records (each with its adapter's task); non-records pass through.
        ``origins``: the (file, line) of each record, named in errors. A record without the field the model reads
        is an error naming that field and the fields the record has, as training names a missing column."""
        tasks: dict[str | None, Any] = {}
        out = []
        origins = list(origins) if origins is not None else [None] * len(records)
        for n, (record, adapter, origin) in enumerate(zip(records, adapters, origins)):
            if not isinstance(record, dict):
                out.append(record)
                continue
            if adapter not in tasks:
                tasks[adapter] = self.task_for(adapter)
            try:
                value = tasks[adapter].input_from_record(record)
            except TunepipeError as e:
                raise at_origin(e, origin) from None
            value = record["text"] if value is None and isinstance(record.get("text"), str) else value
            if value is None or (isinstance(value, dict) and any(v is None for v in value.values())):
                raise _missing_field(tasks[adapter], record, origin, n)
            out.append(value)
        return out

    # ---- description ---------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint.path, "kind": self.checkpoint.kind, "task": self.task_name,
                "device": self.device, "dtype": str(self.dtype or "float32").replace("torch.", ""),
                "batch_size": self.batch_size, "default_adapter": self.default_adapter,
                "adapters": len(self.adapters.list_adapters()) if self.adapters else 0}


def at_origin(error: TunepipeError, origin: tuple[str, int] | None) -> TunepipeError:
    """``error`` located at the input's file and line, when it names no place of its own."""
    if origin is not None and not error.file:
        error.file, error.line = origin
    return error


def _missing_field(task, record: dict[str, Any], origin: tuple[str, int] | None, n: int) -> ValidationError:
    """The fields of the model's input (the columns it was trained on, less its labels / targets) missing from
    ``record``, with the fields the record has."""
    outputs = {task.column("label"), task.column("target")}
    expected = [c for c in task.required_columns() if c not in outputs]
    missing = [c for c in expected if record.get(c) is None] or expected
    present = sorted(str(k) for k in record)
    where = f"input on line {origin[1]}" if origin else f"input record {n + 1}"
    close = difflib.get_close_matches(missing[0], present, n=1, cutoff=0.5) if missing else []
    fields = " and ".join(f"'{c}'" for c in missing)
    message = (f"Field {fields} not found in the {where}" if len(missing) == 1 else
               f"Fields {fields} not found in the {where}" if missing else
               f"The {where} has none of the fields the {task.name} model reads")
    return ValidationError(message, file=origin[0] if origin else None, line=origin[1] if origin else None,
                           suggestions=[f"did you mean '{close[0]}'? rename it to '{missing[0]}'" if close else "",
                                        f"fields present: {', '.join(present) or 'none'}",
                                        f"the model reads {fields} (the column{'s' if len(missing) > 1 else ''} it "
                                        "was trained on): rename the field in the file" if missing else "",
                                        "or give a .txt file: one text per line" if len(expected) == 1 else ""])


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
