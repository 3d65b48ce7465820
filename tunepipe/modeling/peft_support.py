"""PEFT for every task: build the peft config from ``specs.peft`` and wrap the model (adapter_files.py saves
and reloads adapters, adapter_card.py writes how to load them).

Three rules keep a reloaded adapter predicting exactly what the trained one did:
- the task head (``classifier``, ``score``, ``qa_outputs``, a random MLM transform, resized embeddings) is found
  from the model's structure and listed in ``modules_to_save``, so it is trained and saved with the adapter;
- the base is referenced, never guessed: a pretrained base by its path/hub id, a base built ``from_config`` by a
  full-precision copy written to ``<output_dir>/base_model/`` (its initial weights are what LoRA was added to);
- a quantized base is reloaded with the same bitsandbytes settings, recorded in ``tunepipe_adapter.json``.
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path

from ..errors import ConfigError
from ..output import atomic_dir
from .adapter_files import (  # noqa: F401 - importable from here as before
    ADAPTER_INFO,
    BASE_MODEL_DIR,
    base_reference,
    is_adapter_dir,
    is_peft_model,
    load_adapter,
    load_adapter_tokenizer,
    read_adapter_info,
    resolve_base,
    save_adapter,
    trainable_parameters,
)
from .model_paths import resolve_model_path
from .model_structure import (  # noqa: F401 - importable from here as before
    backbone_target_regex,
    head_modules,
    linear_module_names,
    model_skeleton,
)
from .peft_names import (  # noqa: F401 - peft_enabled / peft_method importable from here as before
    check_config_keys,
    check_task_type,
    make_config,
    peft_enabled,
    peft_method,
    peft_task_type,
)
from .quantization import QuantizationManager
from .special_tokens import resized_embeddings

PROMPT_METHODS = ("prefix_tuning", "prompt_tuning", "p_tuning")
MERGEABLE_METHODS = ("lora", "qlora", "dora", "ia3")
# Outputs aligned with input positions: prepended virtual tokens shift them (peft does not realign token labels or
# answer positions, and causal-LM evaluation reads logits at the label positions).
_POSITIONAL_TASK_TYPES = ("TOKEN_CLS", "QUESTION_ANS", "CAUSAL_LM")


def skeleton_for_specs(specs, task):
    """A meta-device skeleton of the model the specs describe, for early checks; None when PEFT is off or the
    config cannot be read yet (the real load then reports the problem)."""
    if not peft_enabled(specs) or getattr(specs.model, "encoder_decoder", None):
        return None
    try:
        import transformers

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
    if method in PROMPT_METHODS and specs.model.encoder_decoder:
        # peft reads num_layers / token_dim from the top config, which a warm-started EncoderDecoderModel keeps
        # under config.encoder / config.decoder: it fails after the model loaded, asking for fields one by one
        raise ConfigError(f"peft.method '{method}' does not work with model.encoder_decoder (a warm-started "
                          "encoder-decoder): peft cannot read its layer count and width", field="peft.method",
                          suggestions=["use lora, dora or ia3 with model.encoder_decoder",
                                       f"or {method} with a seq2seq model of its own (e.g. t5, bart)"])
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
