"""Specs files and --set values read safely: duplicate keys, alias bombs and YAML 1.1 number quirks refused or
fixed before any value reaches the schema."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_assignment(assignment: str, example: str = "--set training.learning_rate=3e-5") -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value), the value parsed as YAML (3e-5, true, [a, b]; text stays
    text). Shared by ``--set`` and ``tunepipe predict --param``."""
    if "=" not in assignment:
        raise ConfigError(f"'{assignment}' is not of the form KEY=VALUE", field=assignment,
                          suggestions=[f"e.g. {example}"])
    path, _, text = assignment.partition("=")
    try:
        value = load_yaml(text, where=assignment) if text.strip() else None
    except yaml.YAMLError:
        value = text
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"'{assignment}' has an empty key", suggestions=[f"e.g. {example}"])
    return keys, value


def set_override(d: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override."""
    keys, value = parse_assignment(assignment)
    path = ".".join(keys)
    node = d
    for k in keys[:-1]:
        if isinstance(node.get(k), str) and k in ("model", "tokenizer"):
            node[k] = {"name_or_path": node[k]}
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"Cannot set '{path}': '{k}' is not a section", field=path)
    node[keys[-1]] = value


# ---- reading YAML / JSON: no silent surprises ---------------------------------------------------------------
MAX_YAML_VALUES = 100_000  # values after alias expansion; real specs have a few hundred


class SpecsYamlLoader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads ``3e-5`` (no dot) as a number, as YAML 1.2 and JSON do: PyYAML's YAML 1.1
    reads it as the *string* '3e-5', which a passed-through TrainingArguments field would receive as text."""


SpecsYamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                      list("-+0123456789"))


def load_yaml(text: str, file: str | None = None, where: str | None = None) -> Any:
    """Parse one YAML document, refusing (before building any Python object) what yaml.safe_load accepts
    silently: a key given twice in one mapping (the second would replace the first) and aliases that expand
    to more than MAX_YAML_VALUES values (an alias bomb: tiny to parse, huge once copied and hashed)."""
    loader = SpecsYamlLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_node(node, file, where)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_yaml_node(root: yaml.Node, file: str | None, where: str | None) -> None:
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    at = f" in {where}" if where else ""

    def size(node: yaml.Node, path: str) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ConfigError(f"Recursive YAML alias at '{path or '<top>'}'{at}: a value contains itself",
                              field=path or None, file=file, line=node.start_mark.line + 1,
                              suggestions=["remove the alias (*name) that points back to its own anchor"])
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                child = f"{path}.{name}" if path and name is not None else (name or path)
                if name is not None and key_node.tag != "tag:yaml.org,2002:merge":
                    line = key_node.start_mark.line + 1
                    if (key_node.tag, name) in seen:
                        raise ConfigError(
                            f"Duplicate key '{child}'{at}: it is given at line {seen[(key_node.tag, name)]} and "
                            f"again at line {line}; YAML would silently keep only the second", field=child,
                            file=file, line=line,
                            suggestions=["merge the two into one entry (or delete one of them)"])
                    seen[(key_node.tag, name)] = line
                total += size(key_node, child) + size(value_node, child)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                total += size(item, path)
        if total > MAX_YAML_VALUES:
            raise ConfigError(f"The YAML{at} expands to more than {MAX_YAML_VALUES:,} values through its aliases "
                              f"(at '{path or '<top>'}'): refused before it is built", field=path or None,
                              file=file, line=node.start_mark.line + 1,
                              suggestions=["write the values out, or use fewer nested aliases (*name)"])
        open_nodes.discard(key)
        sizes[key] = total
        return total

    size(root, "")


def load_json(text: str, file: str | None = None) -> Any:
    """json.loads, refusing a key given twice in one object (the second would replace the first silently)."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                hits = [m.start() for m in re.finditer(re.escape(json.dumps(key)) + r"\s*:", text)]
                line = text.count("\n", 0, hits[1]) + 1 if len(hits) > 1 else None
                raise ConfigError(f"Duplicate key '{key}': JSON would silently keep only the last one", field=key,
                                  file=file, line=line, suggestions=["merge the two into one entry"])
            out[key] = value
        return out

    return json.loads(text, object_pairs_hook=pairs)


def read_specs_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Specs file not found: {p}", file=str(p),
                          suggestions=["check the path", "`tunepipe init TASK` writes a starter file"])
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raw = p.read_bytes()
        raise ConfigError(f"Specs file is not valid UTF-8 (byte {e.start})", file=str(p),
                          line=raw[:e.start].count(b"\n") + 1, suggestions=["save it as UTF-8"]) from None
    try:
        data = load_json(text, str(p)) if p.suffix == ".json" else load_yaml(text, file=str(p))
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else None
        raise ConfigError(f"Invalid YAML: {e.problem}", file=str(p), line=line,
                          suggestions=["check indentation and `key: value` syntax on that line"]) from e
    except yaml.YAMLError as e:
        raise ConfigError(f"Invalid YAML: {e}", file=str(p), suggestions=["check the file's syntax"]) from e
    except RecursionError:
        raise ConfigError("Specs file is nested too deeply to read", file=str(p),
                          suggestions=["specs are a few levels deep: check for runaway brackets"]) from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"Invalid JSON: {e.msg}", file=str(p), line=e.lineno,
                          suggestions=["check commas and quotes on that line"]) from e
    if not isinstance(data, dict):
        raise ConfigError("Specs file must hold a mapping of keys to values", file=str(p),
                          suggestions=["start with `task: token_classification`"])
    return data
