"""MultiAdapterManager: one base model in memory, many PEFT adapters, switched per request.

How adapters share the base. peft keeps many adapters in one ``PeftModel`` only when they need the same model class,
the same head shape and the same peft method: a NER head (9 labels) and a sentiment head (2 labels) cannot both live
in one ``modules_to_save`` wrapper (peft copies the original head per adapter, and the shapes differ). So adapters
are grouped by (model class, head settings, peft type); each group is one ``PeftModel`` with its own head, and every
group's model gets the *same* backbone module (``model.<base_model_prefix>``). The base is read from disk once
(shared_base.SharedBase): each group's model is built around its tensors in memory, not loaded again. peft injects
the adapter layers of all groups into that shared backbone, one ``ModuleDict`` entry per adapter name.

Why switching is checked. ``set_adapter`` on one group only touches that group's tuner type, and leaves layers of
other groups (or a prompt-learning group) in whatever state the last request left; a switch that "succeeds" while
another adapter still computes is the classic silent failure. Every request therefore sets the active adapter on
*every* adapter layer and head wrapper of the model it runs (layers without that adapter become inactive), then
verifies the state, and raises if anything disagrees.

Adapters trained on a quantized base (QLoRA) run here on the full-precision shared base, as after merging; load one
alone with ``InferencePipeLine(checkpoint=<adapter dir>)`` to run it on its quantized base. What an adapter's folder
records (task, head, peft type, base), read before any loading, is in adapter_records.py.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import ConfigError, ModelNotFoundError, TaskTypeError, TunepipeError, ValidationError
from ..modeling.models import adopt_model_config, resolve_model_path
from ..modeling.peft_support import load_adapter_tokenizer
from .adapter_records import (  # noqa: F401 - local_adapter_dir importable from here as before
    AdapterRecord, local_adapter_dir, read_adapter, same_model)
from .merge import merge_and_unload
from .model_loading import (canonical_task, check_device, check_predict_kwargs, load_tokenizer, make_task, place,
                            resolve_dtype)
from .shared_base import SharedBase

log = logging.getLogger("tunepipe")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


class AdapterNotFoundError(TunepipeError):
    code = "ADAPTER_NOT_FOUND"


class AdapterSwitchError(TunepipeError):
    code = "ADAPTER_SWITCH_ERROR"


@dataclass
class _Group:
    key: tuple
    model: Any
    adapters: list[str] = field(default_factory=list)


class MultiAdapterManager:
    """Register adapters by name, load each once, switch per request, evict the least recently used.

    ``base_model``: a model directory, 'minilm' or a hub id (default: the first adapter's recorded base).
    ``task_type``: the task of the base model itself (for requests with no adapter).
    """

    def __init__(self, base_model: str | None = None, task_type: str | None = None, base_run_dir: Path | None = None,
                 max_adapters_in_memory: int = 8, device: str | None = None, dtype: Any = None,
                 trust_remote_code: bool = False):
        if max_adapters_in_memory < 1:
            raise ConfigError("max_adapters_in_memory must be at least 1", field="max_adapters_in_memory")
        self.base = resolve_model_path(base_model) if base_model else None
        self.task_type = canonical_task(task_type)
        self.base_run_dir = base_run_dir
        self.trust_remote_code = bool(trust_remote_code)  # the caller's choice; an adapter's record never sets it
        self.max_adapters_in_memory = max_adapters_in_memory
        self.device = check_device(device)  # before anything loads
        self.dtype = resolve_dtype(dtype, self.device)
        if self.dtype == "int8":
            raise ConfigError("int8 quantization applies to one merged model, not to a base shared by adapters",
                              field="dtype", suggestions=["merge the adapter (tunepipe merge) and serve the merged "
                                                          "model with dtype int8", "or use dtype bfloat16"])
        self.total_loads = 0
        self.active: str | None = None
        self._adapters: dict[str, AdapterRecord] = {}
        self._groups: dict[tuple, _Group] = {}
        self._shared: SharedBase | None = None  # the base, read from disk once, and its shared backbone
        self._base_task = self._base_tokenizer = None
        self._lock = threading.RLock()

    # ---- registry ------------------------------------------------------------------------------------------
    def register_adapter(self, name: str, path: str | Path, task: str | None = None) -> dict[str, Any]:
        """Record an adapter under ``name`` (not loaded yet: ``load_adapter`` or the first request loads it)."""
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ConfigError(f"Invalid adapter name {name!r}", field="adapter",
                              suggestions=["use letters, digits, '_', '-', '.' (up to 64 characters)"])
        with self._lock:
            if name in self._adapters:
                raise ConfigError(f"An adapter named '{name}' is already registered", field="adapter",
                                  suggestions=["choose another name", f"or unregister '{name}' first"])
            record = read_adapter(name, path, task, self.task_type)
            if self.base is None:
                if record.base_model is None:
                    raise ModelNotFoundError(f"No base model given and the adapter in {record.path} names none",
                                             suggestions=["pass base_model"])
                self.base = record.base_model
            elif record.base_model and not same_model(record.base_model, self.base):
                warnings.warn(f"Adapter '{name}' was trained on {record.base_model}; it runs here on {self.base}",
                              stacklevel=2)
            self._adapters[name] = record
            return self._describe(record)

    def unregister_adapter(self, name: str) -> None:
        with self._lock:
            record = self._get(name)
            if record.loaded:
                self.unload_adapter(name)
            del self._adapters[name]

    def list_adapters(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self._describe(a) for a in sorted(self._adapters.values(), key=lambda a: a.name)]

    def task_name(self, name: str) -> str:
        return self._get(name).task_name

    @property
    def load_counts(self) -> dict[str, int]:
        return {name: a.load_count for name, a in self._adapters.items()}

    def _describe(self, a: AdapterRecord) -> dict[str, Any]:
        return {"name": a.name, "path": str(a.path), "task": a.task_name, "peft_type": a.peft_type,
                "loaded": a.loaded, "active": self.active == a.name and a.loaded, "load_count": a.load_count,
                "loaded_at": a.loaded_at, "last_used": a.last_used, "base_model": a.base_model}

    def _get(self, name: str) -> AdapterRecord:
        if name not in self._adapters:
            known = ", ".join(sorted(self._adapters)) or "none"
            raise AdapterNotFoundError(f"No adapter named '{name}'", field="adapter",
                                       suggestions=[f"registered adapters: {known}"])
        return self._adapters[name]

    # ---- loading and eviction ------------------------------------------------------------------------------
    def load_adapter(self, name: str) -> None:
        """Load ``name`` into memory (once; a loaded adapter is not loaded again), evicting the least recently
        used adapter when ``max_adapters_in_memory`` are loaded."""
        from peft import PeftModel

        with self._lock:
            record = self._get(name)
            if record.loaded:
                return
            self._make_room(keep=name)
            group = self._group_for(record.auto_model_class, record.model_kwargs, record.peft_type)
            vocab = self._shared_base().backbone.get_input_embeddings().num_embeddings
            if record.vocab_size and vocab and record.vocab_size != vocab:
                self._drop_if_empty(group)
                raise ConfigError(f"Adapter '{name}' was trained with a resized vocabulary ({record.vocab_size} "
                                  f"tokens, base {vocab}); it cannot share the base", field="adapter",
                                  suggestions=[f"load it alone: InferencePipeLine(checkpoint='{record.path}')"])
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if isinstance(group.model, PeftModel):
                        group.model.set_adapter(group.adapters[0], inference_mode=True)  # peft state: own adapter
                        group.model.load_adapter(str(record.path), adapter_name=name, is_trainable=False)
                    else:
                        group.model = PeftModel.from_pretrained(group.model, str(record.path), adapter_name=name,
                                                                is_trainable=False)
            except (OSError, ValueError, RuntimeError, KeyError) as e:
                self._drop_if_empty(group)
                raise ConfigError(f"peft cannot load adapter '{name}' on {self.base}: {str(e).splitlines()[0]}",
                                  field="adapter", file=str(record.path),
                                  suggestions=["check that the adapter was trained on this base model"]) from None
            group.model = place(group.model, self.device, self.dtype).eval()
            group.adapters.append(name)
            run_dir = record.path.parent if record.path.name == "adapter" else None
            record.task = make_task(record.task_name, run_dir)
            record.task.on_model_loaded(group.model)
            record.tokenizer = (load_adapter_tokenizer(record.path, self.base, self.trust_remote_code)
                                or self._tokenizer_of_base())
            record.loaded, record.group = True, group.key
            record.load_count += 1
            self.total_loads += 1
            record.loaded_at = time.time()
            log.info("loaded adapter %s (%s) from %s", name, record.task_name, record.path)

    def unload_adapter(self, name: str) -> None:
        """Free an adapter's weights; it stays registered and is loaded again on its next use."""
        with self._lock:
            record = self._get(name)
            if not record.loaded:
                return
            group = self._groups[record.group]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                group.model.set_adapter(name, inference_mode=True)
                group.model.delete_adapter(name)
            group.adapters.remove(name)
            if group.adapters:
                group.model.set_adapter(group.adapters[0], inference_mode=True)
            self._drop_if_empty(group)
            record.loaded, record.group, record.task, record.tokenizer = False, None, None, None
            if self.active == name:
                self.active = None

    def _make_room(self, keep: str) -> None:
        loaded = [a for a in self._adapters.values() if a.loaded and a.name != keep]
        while len(loaded) >= self.max_adapters_in_memory:
            oldest = min(loaded, key=lambda a: (a.last_used or a.loaded_at or 0.0))
            log.info("evicting adapter %s (least recently used)", oldest.name)
            self.unload_adapter(oldest.name)
            loaded.remove(oldest)

    def _drop_if_empty(self, group: _Group) -> None:
        from peft import PeftModel
        if not group.adapters and isinstance(group.model, PeftModel):
            self._groups.pop(group.key, None)  # its head goes; the shared backbone stays

    def _group_for(self, auto_model_class: str, model_kwargs: dict[str, Any], family: str | None) -> _Group:
        """The model that holds adapters of this class/head/peft type: built on the base read once from disk, its
        backbone the one shared by every group (shared_base)."""
        key = (auto_model_class, json.dumps(model_kwargs, sort_keys=True, default=str), family)
        if key in self._groups:
            return self._groups[key]
        group = _Group(key, self._shared_base().build(auto_model_class, model_kwargs))
        self._groups[key] = group
        return group

    def _shared_base(self) -> SharedBase:
        if self.base is None:
            raise ModelNotFoundError("No base model", suggestions=["pass base_model or register an adapter first"])
        if self._shared is None:
            self._shared = SharedBase(self.base, self.device, self.dtype, self.trust_remote_code)
        return self._shared

    @property
    def base_loads(self) -> int:
        """How many times the base model was read from disk: 1 once anything is loaded, whatever the tasks."""
        return self._shared.loads if self._shared is not None else 0

    def _tokenizer_of_base(self):
        if self._base_tokenizer is None:
            self._base_tokenizer = load_tokenizer(self.base, self.trust_remote_code)
        return self._base_tokenizer

    # ---- switching -----------------------------------------------------------------------------------------
    def set_adapter(self, name: str | None, task: str | None = None):
        """Make ``name`` the only adapter computing (None: the base model, adapters off) and verify it; loads the
        adapter if needed. Returns (model, tokenizer, task) to predict with."""
        with self._lock:
            if name is None:
                task_name = canonical_task(task) or self.task_type
                if not task_name:
                    raise TaskTypeError("The base model has no task of its own", field="task",
                                        suggestions=["name an adapter", "or pass the base model's task_type"])
                fresh = self._base_task is None or self._base_task.name != task_name
                if fresh:
                    base_dir = self.base if Path(self.base).is_dir() else None
                    self._base_task = make_task(task_name, self.base_run_dir, base_dir)
                    # seq2seq: the base's config tells encoder-decoder from decoder-only
                    adopt_model_config(self._base_task, self.base, trust_remote_code=self.trust_remote_code)
                group = self._group_for(self._base_task.auto_model_class, {}, None)
                if fresh:
                    self._base_task.on_model_loaded(group.model)
                self._switch(group, None)
                self.active = None
                return group.model, self._tokenizer_of_base(), self._base_task
            record = self._get(name)
            if task is not None and canonical_task(task) != record.task_name:
                raise TaskTypeError(f"Adapter '{name}' is a {record.task_name} adapter, not {task}", field="task")
            self.load_adapter(name)
            group = self._groups[record.group]
            self._switch(group, name)
            self.active = name
            record.last_used = time.time()
            return group.model, record.tokenizer, record.task

    def _switch(self, group: _Group, name: str | None) -> None:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import AuxiliaryTrainingWrapper
        target = [name] if name else []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if name is not None and isinstance(group.model, PeftModel):
                group.model.set_adapter(name, inference_mode=True)
            for module in group.model.modules():
                if isinstance(module, BaseTunerLayer):
                    if module.active_adapters != target:
                        module.set_adapter(target, inference_mode=True)  # without `name`: computes nothing
                    if module.disable_adapters:
                        module.enable_adapters(True)
                elif isinstance(module, AuxiliaryTrainingWrapper):
                    want = target if name in module._adapters else []
                    if module.active_adapters != want:
                        module.set_adapter(want, inference_mode=True)
        self._verify(group, name)

    @staticmethod
    def _verify(group: _Group, name: str | None) -> None:
        """Raise unless exactly ``name`` computes in every adapter layer and head wrapper of the group's model."""
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import AuxiliaryTrainingWrapper
        target = [name] if name else []
        wrong, found = [], False
        for module_name, module in group.model.named_modules():
            if isinstance(module, BaseTunerLayer):
                if list(module.active_adapters) != target or module.merged or module.disable_adapters:
                    wrong.append(module_name)
                found = found or (name is not None and name in module._all_available_adapter_names())
            elif isinstance(module, AuxiliaryTrainingWrapper):
                want = target if name in module._adapters else []
                if list(module.active_adapters) != want:
                    wrong.append(module_name)
                found = found or name in module._adapters
        if name is not None and isinstance(group.model, PeftModel):
            if group.model.active_adapter != name:
                wrong.append("PeftModel.active_adapter")
            found = found or name in getattr(group.model, "prompt_encoder", {})
        if name is not None and not found:
            wrong.append(f"no weights of '{name}' in the model")
        if wrong:
            raise AdapterSwitchError(f"Switching to {name or 'the base model'} did not take effect in: "
                                     f"{', '.join(wrong[:5])}" + (" ..." if len(wrong) > 5 else ""),
                                     suggestions=["this is a bug: please report it with the adapter configs"])

    # ---- predicting and exporting --------------------------------------------------------------------------
    def predict(self, inputs: Sequence[Any], adapter: str | None = None, batch_size: int = 32,
                task: str | None = None, **kwargs) -> list[Any]:
        """The task's structured results for a list of inputs, with ``adapter`` (None: the base model)."""
        with self._lock:
            model, tokenizer, task_obj = self.set_adapter(adapter, task)
            check_predict_kwargs(task_obj, kwargs)
            items = task_obj.prepare_inputs(list(inputs))
            return task_obj.predict(model, tokenizer, items, batch_size=batch_size, **kwargs)

    def predict_grouped(self, inputs: Sequence[Any], adapters: Sequence[str | None], batch_size: int = 32,
                        **kwargs) -> list[Any]:
        """One adapter name per input; each adapter's inputs run as one batched call; results in input order."""
        with self._lock:
            return group_by_adapter(inputs, adapters, lambda items, name: self.predict(
                items, adapter=name, batch_size=batch_size, **kwargs))

    def merge_adapter(self, name: str, target: str | Path | None = None) -> Path:
        """Write ``name`` merged into its full-precision base as a standalone model (tunepipe.merge); returns the
        directory (default: the run's ``merged/``, or ``<adapter dir>-merged``)."""
        record = self._get(name)
        if target is None and record.path.name != "adapter":
            target = record.path.with_name(record.path.name + "-merged")
        return merge_and_unload(record.path, target)


def group_by_adapter(inputs: Sequence[Any], adapters: Sequence[str | None],
                     run: Callable[[list[Any], str | None], list[Any]]) -> list[Any]:
    """Split a mixed batch by adapter, ``run`` each part once, and put the results back in input order."""
    if len(adapters) != len(inputs):
        raise ValidationError(f"{len(inputs)} inputs but {len(adapters)} adapter names",
                              suggestions=["give one adapter name per input"])
    groups: dict[str | None, list[int]] = {}
    for i, name in enumerate(adapters):
        groups.setdefault(name, []).append(i)
    out: list[Any] = [None] * len(inputs)
    for name, idx in groups.items():
        for i, result in zip(idx, run([inputs[i] for i in idx], name)):
            out[i] = result
    return out
