"""How many tokens a model can read, and one rule that holds every length setting to it.

A sequence longer than a model's learned position table fails deep inside the forward pass ("The expanded size
of the tensor (304) must match the existing size (128)"), after the data was read, the model loaded, and maybe
hours of training done. The rule, applied the same way for every task:

* when the specs are resolved and the model's config can be read without loading the model (model.from_config,
  a local directory, the bundled encoder), a task's *default* length is lowered to the model's limit
  (``Task.fit_default_lengths``): the user asked for nothing longer;
* once the model is loaded for training or evaluation, a length setting still over the limit is a ConfigError
  naming the field (``check_lengths``); when predicting, a default (or unset) length is lowered to the limit,
  a setting the user chose is refused the same way;
* after tokenizing, a sequence over the limit (a length left unset, or a task that does not truncate) is a
  ConfigError naming the field and the record's file and line (``check_sequences``).

Only learned or fixed position tables are hard limits. Rotary models (LLaMA, Qwen, GPT-NeoX ...) also carry
``max_position_embeddings``, but longer inputs run (with lower quality), so those get a warning; relative
positions (T5, DeBERTa-v3) and ALiBi (BLOOM) have no limit at all.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .model_paths import encoder_decoder_sides, resolve_model_path

log = logging.getLogger("tunepipe")

# Position ids start after the padding index (create_position_ids_from_input_ids): a table of N rows holds
# N - pad_token_id - 1 tokens (RoBERTa's 514 -> 512).
PADDING_OFFSET_TYPES = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm",
                        "data2vec-text", "ibert", "longformer", "luke", "mpnet", "xmod", "markuplm", "lilt",
                        "layoutlmv3", "esm"}
# Sinusoidal tables that grow on demand: no limit.
SELF_EXTENDING_TYPES = {"m2m_100", "nllb-moe", "fsmt", "speech_to_text"}
VIRTUAL_TOKEN_METHODS = ("prompt_tuning", "p_tuning")  # PEFT methods that prepend num_virtual_tokens embeddings


@dataclass(frozen=True)
class PositionLimit:
    tokens: int  # the longest sequence the model reads
    hard: bool  # True: a learned/fixed table (longer crashes); False: rotary (longer runs, quality drops)
    source: str  # the config key it comes from


@dataclass(frozen=True)
class LengthSetting:
    """A specs value that bounds the sequences one side of the model reads."""
    field: str  # dotted specs path, e.g. "data.max_length"
    value: int | None  # None: unset (the tokenizer decides)
    side: str = "input"  # "input" (encoder / the only stack) or "output" (decoder of an encoder-decoder)
    extra: int = 0  # positions used beyond the value (a decoder start token before generated tokens)


def virtual_tokens(peft: Any) -> int:
    """Positions a PEFT section puts before the input: prompt / p-tuning's num_virtual_tokens, else 0."""
    if not isinstance(peft, dict) or peft.get("method") not in VIRTUAL_TOKEN_METHODS:
        return 0
    from ..specs.schema import PeftSpec
    n = peft.get("num_virtual_tokens", PeftSpec.model_fields["num_virtual_tokens"].default)
    return n if isinstance(n, int) and n > 0 else 0


def config_limit(config: Any) -> PositionLimit | None:
    """The position limit of one (non-composite) config object, or None when it has none."""
    def get(key: str) -> Any:
        return getattr(config, key, None)

    for source in ("max_position_embeddings", "n_positions"):
        n = get(source)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            break
    else:
        return None
    model_type = str(get("model_type") or "")
    if model_type in SELF_EXTENDING_TYPES or get("position_biased_input") is False:  # DeBERTa-v2/v3: relative
        return None
    keys = set(config.to_dict()) if hasattr(config, "to_dict") else set(vars(config))
    rotary = any("rope" in k or "rotary" in k for k in keys) or get("position_embedding_type") == "rotary"
    if model_type in PADDING_OFFSET_TYPES:
        pad = get("pad_token_id")
        n -= (pad if isinstance(pad, int) and pad >= 0 else 1) + 1
    return PositionLimit(n, hard=not rotary, source=source)


def side_limits(config: Any) -> dict[str, PositionLimit | None]:
    """{"input": limit, "output": limit}: an EncoderDecoderModel's two configs, else one limit for both sides."""
    encoder, decoder = getattr(config, "encoder", None), getattr(config, "decoder", None)
    if getattr(config, "model_type", None) == "encoder-decoder" and hasattr(encoder, "to_dict") and hasattr(
            decoder, "to_dict"):
        return {"input": config_limit(encoder), "output": config_limit(decoder)}
    one = config_limit(config)
    return {"input": one, "output": one}


def limits_for_model_section(model: Any) -> dict[str, PositionLimit | None] | None:
    """The limits of the model a specs ``model`` section names, when its config can be read without loading the
    model or the network (from_config, local directories, the bundled encoder); None otherwise."""
    if not isinstance(model, dict):
        return None
    try:
        from transformers import AutoConfig
        if model.get("encoder_decoder"):
            configs = [_local_config(side) for side in encoder_decoder_sides(model["encoder_decoder"])]
            if any(c is None for c in configs):
                return None
            return {"input": config_limit(configs[0]), "output": config_limit(configs[1])}
        if isinstance(model.get("from_config"), dict):
            cfg = dict(model["from_config"])
            model_type = cfg.pop("model_type", None)
            return side_limits(AutoConfig.for_model(model_type, **cfg)) if model_type else None
        config = _local_config(model.get("name_or_path"))
        return side_limits(config) if config is not None else None
    except Exception:  # noqa: BLE001 - unreadable here: loading the model reports it with context
        return None


def _local_config(name: Any):
    from transformers import AutoConfig

    if not isinstance(name, str):
        return None
    path = resolve_model_path(name)
    if not path or not (Path(path) / "config.json").is_file():
        return None
    return AutoConfig.from_pretrained(path, trust_remote_code=False)


def default_value(task, field: str) -> Any:
    """The value ``field`` has when the user does not set it: the task's default, else the specs schema's."""
    from ..specs.schema import SECTIONS
    section, key = field.split(".", 1)
    defaults = type(task).default_specs().get(section, {})
    if key in defaults:
        return defaults[key]
    model = SECTIONS.get(section)
    info = model.model_fields.get(key) if model is not None else None
    return info.default if info is not None else None


def _set(specs, field: str, value: int) -> None:
    section, key = field.split(".", 1)
    setattr(getattr(specs, section), key, value)


def check_lengths(task, config, predicting: bool = False) -> dict[str, PositionLimit | None]:
    """Hold the task's length settings to the model's position limits (see the module docstring); remembers the
    limits on the task (``task.position_limits``) for ``check_sequences``."""
    limits = side_limits(config)
    task.position_limits = limits
    peft = getattr(task.specs, "peft", None)
    virtual = virtual_tokens(peft.model_dump() if peft is not None else None)
    for setting in task.length_settings():
        limit = limits.get(setting.side)
        if limit is None:
            continue
        if virtual and setting.side == "input":  # prompt tuning puts its virtual tokens before the input
            setting = LengthSetting(setting.field, setting.value, setting.side, setting.extra + virtual)
        tokens = None if setting.value is None else setting.value + setting.extra
        if tokens is not None and tokens <= limit.tokens:
            continue
        if not limit.hard:
            if tokens is not None:
                log.warning("%s=%s is longer than the %s positions this rotary model was trained on (%s): it "
                            "runs, but quality may drop", setting.field, setting.value, limit.tokens, limit.source)
            continue
        allowed = limit.tokens - setting.extra
        if predicting and (setting.value is None or setting.value == default_value(task, setting.field)):
            _set(task.specs, setting.field, allowed)
            log.info("%s lowered from %s to %s: the model reads at most %s positions", setting.field,
                     setting.value if setting.value is not None else "unset", allowed, limit.tokens)
            continue
        if setting.value is None:
            continue  # training: check_sequences refuses any tokenized sequence that does not fit
        raise ConfigError(
            f"{setting.field} is {setting.value}"
            + (f" (+{setting.extra} {'virtual tokens' if virtual and setting.side == 'input' else 'start token'})"
               if setting.extra else "")
            + f", longer than the model's {limit.tokens} positions ({limit.source} in its config): a longer "
              "sequence would crash inside the model", field=setting.field,
            suggestions=[f"set {setting.field}: {allowed} (or less)",
                         "or use a model with more positions"
                         + (" (for a model built from config, raise model.from_config."
                            f"{limit.source})" if getattr(task.specs.model, "from_config", None) else "")])
    return limits


def check_sequences(task, dataset, split: str, origins: list[tuple[str, int]] | None = None) -> None:
    """After tokenizing: refuse a sequence longer than the model reads (``task.position_limits``, set by
    ``check_lengths``), naming the length setting and, where rows map one to one to records, the record."""
    limits = getattr(task, "position_limits", None)
    if not limits:
        return
    columns = {"input_ids": "input"}
    if getattr(task, "generative", False) and not getattr(task, "decoder_only", True):
        columns["labels"] = "output"
    for column, side in columns.items():
        limit = limits.get(side)
        if limit is None or not limit.hard or column not in dataset.column_names or len(dataset) == 0:
            continue
        longest, row = _longest(dataset, column)
        if longest <= limit.tokens:
            continue
        setting = next((s for s in task.length_settings() if s.side == side), None)
        field = setting.field if setting else "data.max_length"
        file, line = origins[row] if origins is not None and len(origins) == len(dataset) else (None, None)
        raise ConfigError(f"A {split} sequence has {longest} tokens, more than the model's {limit.tokens} positions "
                          f"({limit.source}): it would crash inside the model", field=field, file=file, line=line,
                          suggestions=[f"set {field}: {limit.tokens - (setting.extra if setting else 0)} (longer "
                                       "sequences are then truncated)", "or shorten that record"])


def _longest(dataset, column: str) -> tuple[int, int]:
    """(length, row) of the longest list in ``column``, read from the Arrow table without Python lists."""
    try:
        import numpy as np
        import pyarrow.compute as pc
        lengths = pc.list_value_length(dataset.data.column(column)).to_numpy(zero_copy_only=False)
        row = int(np.argmax(lengths))
        return int(lengths[row]), row
    except Exception:  # noqa: BLE001 - a layout pyarrow does not take: count in Python
        lengths = [len(x) for x in dataset[column]]
        row = max(range(len(lengths)), key=lengths.__getitem__)
        return lengths[row], row
