"""peft's own parameter names in the ``peft:`` section, beside tunepipe's.

Users copy peft configs (``lora_alpha``, ``lora_dropout``, ``use_dora``, ``init_lora_weights``, ``task_type``...).
``normalise_peft`` turns any such section into one canonical form, which is what a run's specs.yaml records:

- a peft name for what tunepipe models is moved to tunepipe's field (``lora_alpha`` -> ``alpha``, ``lora_dropout``
  -> ``dropout``, ``use_dora: true`` -> ``method: dora``, ``peft_type`` -> ``method``); given both ways with
  different values it is a ConfigError naming both;
- any other field of the method's peft config class (``LoraConfig``, ``IA3Config``, ``PromptTuningConfig``, ...)
  goes to ``peft.config``, which is passed to that class; a key of another method's class, or a typo, is refused
  (with "did you mean" among that class's fields);
- ``peft.config`` with a ``peft_type`` stays what it was: a complete peft config with peft's defaults (any peft
  type), checked against its class the same way.

The class fields are read from peft's source files (no import of peft, torch or transformers: a typo is reported in
milliseconds), falling back to importing peft where the source cannot be read that way.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..suggest import suggest

# tunepipe method -> (peft source file, config class)
METHOD_CLASSES = {"lora": ("tuners/lora/config.py", "LoraConfig"), "qlora": ("tuners/lora/config.py", "LoraConfig"),
                  "dora": ("tuners/lora/config.py", "LoraConfig"), "ia3": ("tuners/ia3/config.py", "IA3Config"),
                  "prefix_tuning": ("tuners/prefix_tuning/config.py", "PrefixTuningConfig"),
                  "prompt_tuning": ("tuners/prompt_tuning/config.py", "PromptTuningConfig"),
                  "p_tuning": ("tuners/p_tuning/config.py", "PromptEncoderConfig")}
METHOD_BY_PEFT_TYPE = {"LORA": "lora", "IA3": "ia3", "PREFIX_TUNING": "prefix_tuning",
                       "PROMPT_TUNING": "prompt_tuning", "P_TUNING": "p_tuning"}
# peft's name -> tunepipe's field (names that are the same in both need no entry)
ALIASES = {"lora_alpha": "alpha", "lora_dropout": "dropout"}
# the tunepipe fields each method reads (the others only with their default value)
_LORA = ("r", "alpha", "dropout", "bias", "target_modules", "modules_to_save")
_PROMPT = ("num_virtual_tokens", "modules_to_save")
METHOD_FIELDS = {"lora": _LORA, "qlora": _LORA, "dora": _LORA, "ia3": ("target_modules", "modules_to_save"),
                 "prefix_tuning": _PROMPT, "prompt_tuning": _PROMPT, "p_tuning": _PROMPT}
# PeftConfig fields tunepipe fills itself
MANAGED = ("base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version")
_BASES_FILE = "config.py"  # PeftConfigMixin, PeftConfig, PromptLearningConfig


def _peft_root() -> Path | None:
    spec = importlib.util.find_spec("peft")
    return Path(spec.origin).parent if spec is not None and spec.origin else None


@functools.lru_cache(maxsize=None)
def class_fields(method: str) -> frozenset[str]:
    """The init fields of the peft config class of ``method`` (a tunepipe method name)."""
    file, name = METHOD_CLASSES[method]
    root = _peft_root()
    names = _fields_from_source(root, file, name) if root is not None else None
    if names is not None:
        return names

    import peft
    return frozenset(f.name for f in dataclasses.fields(getattr(peft, name)) if f.init)


def _fields_from_source(root: Path, file: str, name: str) -> frozenset[str] | None:
    """Annotated attributes of a ``@dataclass`` class and its bases (searched in its file and peft/config.py)."""
    try:
        trees = [ast.parse((root / f).read_text(encoding="utf-8")) for f in (file, _BASES_FILE)]
    except (OSError, SyntaxError, ValueError):
        return None
    classes = {n.name: n for tree in trees for n in tree.body if isinstance(n, ast.ClassDef)}
    names: set[str] = set()

    def visit(cls_name: str) -> bool:
        cls = classes.get(cls_name)
        if cls is None:
            return cls_name == "PushToHubMixin"  # a plain mixin of huggingface_hub, no fields
        if "dataclass" not in [ast.unparse(d) for d in cls.decorator_list]:
            return False
        for node in cls.body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                call = node.value if isinstance(node.value, ast.Call) else None
                if "ClassVar" in ast.unparse(node.annotation) or call is not None and any(
                        k.arg == "init" and isinstance(k.value, ast.Constant) and k.value.value is False
                        for k in call.keywords):
                    continue
                names.add(node.target.id)
        return all(isinstance(b, ast.Name) and visit(b.id) for b in cls.bases)

    return frozenset(names) if visit(name) and names else None


def _all_methods_fields() -> dict[str, frozenset[str]]:
    return {m: class_fields(m) for m in ("lora", "ia3", "prefix_tuning", "prompt_tuning", "p_tuning")}


def _suggest(key: str, allowed) -> list[str]:
    return suggest(key, set(allowed))


def _same(a: Any, b: Any) -> bool:
    return a == b and type(a) is type(b) or (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                             and not isinstance(a, bool) and not isinstance(b, bool) and a == b)


def _put(out: dict[str, Any], field: str, value: Any, source: str, given: dict[str, str]) -> None:
    """Set tunepipe's ``field`` from ``source`` (a dotted specs path), refusing a different value given elsewhere."""
    if field in out and field in given and not _same(out[field], value):
        raise ConfigError(f"peft.{given[field]} is {out[field]!r} but {source} is {value!r}: they are the same setting",
                          field=source, suggestions=[f"keep one of peft.{given[field]} and {source}"])
    out[field] = value
    given[field] = source.removeprefix("peft.")


def _method_of_peft_type(value: Any, field: str) -> str:
    method = METHOD_BY_PEFT_TYPE.get(str(value).upper())
    if method is None:
        raise ConfigError(f"{field}: {value!r} is not a method tunepipe names (peft.method)", field=field,
                          suggestions=[f"peft.method takes: {', '.join(sorted(METHOD_CLASSES))}",
                                       f"for another peft method write the whole config under peft.config with "
                                       f"peft_type: {value}"])
    return method


def normalise_peft(section: dict[str, Any], tunepipe_fields: dict[str, Any]) -> dict[str, Any]:
    """The canonical ``peft:`` section (see the module docstring). ``tunepipe_fields``: PeftSpec's fields and their
    defaults. Idempotent: a normalised section normalises to itself."""
    out: dict[str, Any] = {}
    given: dict[str, str] = {}  # tunepipe field -> the key it was read from
    native: dict[str, tuple[Any, str]] = {}  # peft field -> (value, where)
    for key, value in section.items():
        if key in tunepipe_fields and key != "config":
            _put(out, key, value, f"peft.{key}", given)
        elif key != "config":
            native[key] = (value, f"peft.{key}")
    raw = section.get("config")
    if raw is not None and not isinstance(raw, dict):
        return {**out, **{k: v for k, (v, _) in native.items()}, "config": raw}  # pydantic names the type error
    raw = dict(raw or {})
    if "peft_type" in raw:
        return _raw_section(out, native, raw, tunepipe_fields)
    if raw and out.get("method", tunepipe_fields["method"]) == "none" and "peft_type" not in native:
        _needs_method(native)
        return {**out, "config": raw}  # no peft_type, no method: check_peft_specs asks for the peft_type
    for key, value in raw.items():
        if key in native:
            if not _same(native[key][0], value):
                raise ConfigError(f"{native[key][1]} is {native[key][0]!r} but peft.config.{key} is {value!r}",
                                  field=f"peft.config.{key}",
                                  suggestions=[f"keep one of {native[key][1]} and peft.config.{key}"])
            continue
        native[key] = (value, f"peft.config.{key}")
    if "peft_type" in native:
        value, where = native.pop("peft_type")
        _put(out, "method", _method_of_peft_type(value, where), where, given)
    if "use_dora" in native:
        value, where = native.pop("use_dora")
        method = out.get("method", tunepipe_fields["method"])
        if value is True and method in ("lora", "dora"):
            out["method"] = "dora"
            given.setdefault("method", where.removeprefix("peft."))
        elif value is not False or method == "dora":
            raise ConfigError(f"{where}: {value!r} contradicts peft.method: {method!r}", field=where,
                              suggestions=["DoRA is `peft.method: dora` (use_dora: true with method lora means the "
                                           "same)", "tunepipe's qlora is LoRA: for DoRA on a quantized base use "
                                           "method dora with quantization.load_in_4bit"])
    method = out.get("method", tunepipe_fields["method"])
    passed: dict[str, Any] = {}
    for key, (value, where) in native.items():
        field = ALIASES.get(key, key)
        if field in tunepipe_fields and field not in ("config", "method"):
            _put(out, field, value, where, given)
        elif key in MANAGED:
            raise ConfigError(f"{where} is set by tunepipe (from the run and its base model)", field=where,
                              suggestions=[f"remove {where}"])
        else:
            _check_native(key, where, method)
            passed[key] = value
    if method == "none":
        _needs_method({k: native[k] for k in passed})
    _check_foreign_fields(out, given, method, tunepipe_fields)
    if passed:
        out["config"] = passed
    return out


def _needs_method(native: dict[str, tuple[Any, str]]) -> None:
    for key, (_, where) in native.items():
        raise ConfigError(f"{where} is a setting of peft's config classes, but peft.method is none (PEFT off)",
                          field=where, suggestions=["set peft.method (lora, dora, ia3, prompt_tuning, ...)",
                                                    f"or remove {where}"])


def _check_native(key: str, where: str, method: str) -> None:
    """``key`` must be a field of the method's peft config class (any of ours when PEFT is off)."""
    if key == "task_type":
        return  # checked against the task when the task is known (check_task_type)
    fields = _all_methods_fields()
    own = class_fields(method) if method in METHOD_CLASSES else frozenset().union(*fields.values())
    if key in own:
        return
    others = sorted(m for m, f in fields.items() if key in f and m != method)
    if others:
        raise ConfigError(f"{where} belongs to {' / '.join(others)}, not to peft.method '{method}'", field=where,
                          suggestions=[f"remove {where}, or set peft.method: {others[0]}"])
    known = set(own) | set(ALIASES)
    raise ConfigError(f"Unknown key '{where}': not a tunepipe peft setting nor a field of peft's "
                      f"{METHOD_CLASSES.get(method, ('', 'config classes'))[1]}", field=where,
                      suggestions=_suggest(key, known) or [f"see peft's {METHOD_CLASSES.get(method, ('', 'LoraConfig'))[1]}"])


def _check_foreign_fields(out: dict[str, Any], given: dict[str, str], method: str,
                          tunepipe_fields: dict[str, Any]) -> None:
    """A tunepipe field the method does not read, set to another value than its default, would be ignored."""
    used = METHOD_FIELDS.get(method)
    if used is None:  # method none: PEFT is off, nothing is read
        return
    for field, value in out.items():
        if field in ("method", "config") or field in used or _same(value, tunepipe_fields[field]):
            continue
        where = f"peft.{given.get(field, field)}"
        users = sorted(m for m, f in METHOD_FIELDS.items() if field in f and m not in ("qlora", "dora"))
        raise ConfigError(f"{where} does not apply to peft.method '{method}' (it is a setting of "
                          f"{' / '.join(users)}): it would be ignored", field=where,
                          suggestions=[f"remove {where}", f"or set peft.method: {users[0]}"])


def _raw_section(out: dict[str, Any], native: dict[str, tuple[Any, str]], raw: dict[str, Any],
                 tunepipe_fields: dict[str, Any]) -> dict[str, Any]:
    """``peft.config`` with a ``peft_type``: a complete peft config. tunepipe's fields (other than their defaults)
    and peft names beside it would be ignored: refused."""
    for key, (_, where) in native.items():
        raise ConfigError(f"{where} is beside a complete peft.config (with peft_type): it would be ignored",
                          field=where, suggestions=[f"move it into peft.config as {key}"])
    method = out.get("method", "none")
    ptype = str(raw["peft_type"]).upper()
    if method != "none" and METHOD_BY_PEFT_TYPE.get(ptype) not in (method, "lora" if method in ("dora", "qlora")
                                                                   else None):
        raise ConfigError(f"peft.method '{method}' contradicts peft.config.peft_type '{raw['peft_type']}'",
                          field="peft.config.peft_type", suggestions=["keep one of them"])
    for field, value in out.items():
        if field != "method" and not _same(value, tunepipe_fields[field]):
            raise ConfigError(f"peft.{field} is beside a complete peft.config (with peft_type): it would be ignored",
                              field=f"peft.{field}",
                              suggestions=[f"move it into peft.config (peft's name: "
                                           f"{ {v: k for k, v in ALIASES.items()}.get(field, field)})"])
    bad = [k for k in raw if k in MANAGED]
    if bad:
        raise ConfigError(f"peft.config.{bad[0]} is set by tunepipe", field=f"peft.config.{bad[0]}",
                          suggestions=[f"remove peft.config.{bad[0]}"])
    if METHOD_BY_PEFT_TYPE.get(ptype):
        m = METHOD_BY_PEFT_TYPE[ptype]
        for key in raw:
            if key not in ("peft_type", "task_type") and key not in class_fields(m):
                _check_native(key, f"peft.config.{key}", m)
    return {**out, "config": raw}


def check_config_keys(cls, raw: dict[str, Any], field: str = "peft.config") -> None:
    """Every key of ``raw`` is an init field of the (imported) peft config class ``cls``: for peft types tunepipe
    does not name, checked when peft is imported."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in raw:
        if key not in names:
            raise ConfigError(f"Unknown key '{field}.{key}' for peft's {cls.__name__}", field=f"{field}.{key}",
                              suggestions=_suggest(key, names) or [f"{cls.__name__} takes: {', '.join(sorted(names))}"])


def check_task_type(config: dict[str, Any] | None, task_type: str | None, task_name: str) -> None:
    """A ``task_type`` the user gave must be the one tunepipe derives from the task (it decides which head peft
    saves and which model class loads the adapter)."""
    given = (config or {}).get("task_type")
    if given is None:
        return
    if str(getattr(given, "value", given)).upper() != str(task_type).upper():
        raise ConfigError(f"peft task_type {given!r} does not fit task {task_name}, whose peft task type is "
                          f"{task_type!r}", field="peft.config.task_type",
                          suggestions=["remove task_type: tunepipe sets it from the task"] + (
                              [f"or write task_type: {task_type}"] if task_type else []))


def make_config(cls, kwargs: dict[str, Any], field: str = "peft"):
    """``cls(**kwargs)``, peft's refusal as a ConfigError."""
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"peft rejected the {cls.__name__} settings: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}", field=field,
                          suggestions=[f"check the values against peft's {cls.__name__}"]) from None


def peft_enabled(specs) -> bool:
    return specs.peft.method != "none" or bool(specs.peft.config)


def peft_method(specs) -> str:
    """The method name, for raw configs too (``lora`` for a raw LORA config, else the peft type in lower case)."""
    if specs.peft.config and (specs.peft.method == "none" or "peft_type" in specs.peft.config):
        ptype = str(specs.peft.config.get("peft_type", "")).lower()
        return {"lora": "dora" if specs.peft.config.get("use_dora") else "lora"}.get(ptype, ptype)
    return specs.peft.method


# Fallback when a Task does not declare ``peft_task_type``: peft's task type from the model class it uses.
_TASK_TYPE_BY_AUTO_CLASS = {"AutoModelForTokenClassification": "TOKEN_CLS",
                            "AutoModelForSequenceClassification": "SEQ_CLS",
                            "AutoModelForQuestionAnswering": "QUESTION_ANS",
                            "AutoModelForSeq2SeqLM": "SEQ_2_SEQ_LM", "AutoModelForCausalLM": "CAUSAL_LM"}
_AUTO_CLASS_BY_TASK_TYPE = {v: k for k, v in _TASK_TYPE_BY_AUTO_CLASS.items()}


def peft_task_type(task) -> str | None:
    value = getattr(task, "peft_task_type", None)
    return value if value is not None else _TASK_TYPE_BY_AUTO_CLASS.get(task.auto_model_class)


# ---- model structure --------------------------------------------------------------------------------------------
