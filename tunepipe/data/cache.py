"""Where read and tokenized splits are kept between runs, and the fingerprints that say when they still hold.

An entry is a folder named by a hash of everything its content depends on: the data files (path, size,
modification time), the reading settings, tunepipe's data and task code, and for tokenized splits the tokenizer
and the task's preprocessing settings. Entries are written under a temporary name and renamed when complete, so
a killed run never leaves a half entry that a later run would trust. ``TUNEPIPE_CACHE_DIR`` moves the cache
(default ``~/.cache/tunepipe``); ``tunepipe cache clear`` (or deleting the folder) empties it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import tunepipe

DONE = "done.json"
TAG = "CACHEDIR.TAG"  # the cache-directory tag standard (backup tools skip it); also how clear() knows it is ours
TAG_TEXT = "Signature: 8a477f597d28d172789f06886806bc55\n# tunepipe tokenization cache: safe to delete\n"


def cache_root() -> Path:
    configured = os.environ.get("TUNEPIPE_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "tunepipe"


def datasets_dir() -> Path:
    return cache_root() / "datasets"


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()[:24]


@lru_cache(maxsize=1)
def code_version() -> str:
    """A hash of the code that reads and preprocesses data: a changed reader or task invalidates its entries."""
    root = Path(tunepipe.__file__).parent
    digest = hashlib.sha256(getattr(tunepipe, "__version__", "").encode())
    for folder in ("data", "tasks"):
        for path in sorted((root / folder).glob("*.py")):
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides how the tokenizer cuts text: its vocabulary and rules (without the truncation / padding
    state a fast tokenizer keeps from its last call), special tokens and the settings that change encodings."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:
        spec = sorted(tokenizer.get_vocab().items())
    settings = {k: getattr(tokenizer, k, None) for k in ("padding_side", "truncation_side", "model_max_length",
                                                          "add_prefix_space", "do_lower_case")}
    return fingerprint(type(tokenizer).__name__, spec, settings, tokenizer.special_tokens_map,
                       [str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()])


def lookup(kind: str, key: str) -> Path | None:
    entry = datasets_dir() / kind / key
    return entry if (entry / DONE).is_file() else None


def store(kind: str, key: str, build: Callable[[Path], dict[str, Any]]) -> Path:
    """Build an entry in a temporary folder and rename it into place; ``build`` writes the files and returns
    what goes into done.json. When another process finished the same entry first, its entry is kept."""
    final = datasets_dir() / kind / key
    final.parent.mkdir(parents=True, exist_ok=True)
    if not (datasets_dir() / TAG).is_file():
        (datasets_dir() / TAG).write_text(TAG_TEXT)
    tmp = final.with_name(f".{key}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        info = build(tmp)
        write_info(tmp, info)
        try:
            os.rename(tmp, final)
        except OSError:  # an entry of that name exists: complete (lookup) or a leftover without done.json
            if (final / DONE).is_file():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_info(entry: Path, info: dict[str, Any]) -> None:
    (entry / DONE).write_text(json.dumps(info, default=repr))


def read_info(entry: Path) -> dict[str, Any]:
    return json.loads((entry / DONE).read_text())


def scratch_dir() -> tempfile.TemporaryDirectory:
    """For splits that are not cached (data.cache: false, hub data, records in memory): removed with the run."""
    return tempfile.TemporaryDirectory(prefix="tunepipe-data-")


def clear() -> int:
    """Remove every cache entry; returns the bytes freed. Only a folder tunepipe tagged as its cache is removed."""
    root = datasets_dir()
    if not (root / TAG).is_file() or (root / TAG).read_text() != TAG_TEXT:
        return 0
    freed = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0
    shutil.rmtree(root, ignore_errors=True)
    return freed
