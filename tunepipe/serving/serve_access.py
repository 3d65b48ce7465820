"""Who may use `tunepipe serve`, apart from the app itself: the API key, binding without one, adapter paths."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError, TunepipeError

API_KEY_ENV = "TUNEPIPE_API_KEY"
MIN_KEY_CHARS = 16


class AdapterPathError(TunepipeError):
    code = "ADAPTER_PATH_REFUSED"


# ---- who may bind where, with which key -------------------------------------------------------------------
def read_api_key(key: str | None = None, key_file: str | None = None) -> str | None:
    """The key from --api-key, else --api-key-file, else $TUNEPIPE_API_KEY; None when none is set."""
    if key is not None and key_file:
        raise ConfigError("Give --api-key or --api-key-file, not both", field="api_key")
    given = "--api-key" if key is not None else "--api-key-file" if key_file else None
    if key_file:
        try:
            key = Path(key_file).expanduser().read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ConfigError(f"Cannot read the API key file {key_file}: {e.strerror}", field="api_key_file",
                              suggestions=["check the path and its permissions"]) from None
    if given is None:
        key = os.environ.get(API_KEY_ENV)
        given = API_KEY_ENV if key is not None else None
    if given is not None and not (key or "").strip():
        # a key was asked for: an empty one must not turn authentication off
        raise ConfigError(f"{given} gives an empty API key" + (f" ({key_file} holds no key)" if key_file else ""),
                          field="api_key_file" if key_file else "api_key",
                          suggestions=["put the key in it: python -c 'import secrets; print(secrets.token_urlsafe(32))'",
                                       "or leave the key out to serve on 127.0.0.1 only, without authentication"])
    if key is None:
        return None
    key = key.strip()
    if len(key) < MIN_KEY_CHARS or not key.isascii() or not key.isprintable() or " " in key:
        raise ConfigError(f"The API key must be at least {MIN_KEY_CHARS} printable ASCII characters without spaces",
                          field="api_key", suggestions=["make one: python -c 'import secrets; "
                                                        "print(secrets.token_urlsafe(32))'"])
    return key


def check_bind(host: str, api_key: str | None) -> None:
    """Without a key the server answers anyone who reaches it: loopback only."""
    from .serve_guard import is_loopback
    if api_key is None and not is_loopback(host):
        raise ConfigError(f"Refusing to bind --host {host} without an API key: anyone who can reach it could use it",
                          field="host", suggestions=[f"set {API_KEY_ENV} (or --api-key-file FILE) to require a key",
                                                     "or bind 127.0.0.1 and put a reverse proxy in front "
                                                     "(docs/serving.md)"])


# ---- which adapter directories a client may name -----------------------------------------------------------
def real_roots(roots: Sequence[str | Path]) -> list[str]:
    """The real paths of the server's adapter roots (each must be an existing directory)."""
    out = []
    for root in roots:
        real = os.path.realpath(os.path.expanduser(str(root)))
        if not os.path.isdir(real):
            raise ConfigError(f"Adapter root {root} is not a directory", field="adapter_root",
                              suggestions=["give an existing directory holding adapters"])
        out.append(real)
    return out


def _under(path: str, roots: list[str]) -> bool:
    return any(os.path.commonpath([path, root]) == root for root in roots)


def _contents_under(directory: str, roots: list[str]) -> bool:
    """Every file and folder in ``directory`` is really under the roots: a link inside an adapter folder (its
    weights, its config) must not read a file from elsewhere."""
    for folder, dirs, files in os.walk(directory):
        for name in dirs + files:
            if not _under(os.path.realpath(os.path.join(folder, name)), roots):
                return False
    return True


def adapter_dir_under(path: str, roots: list[str]) -> str:
    """The real adapter directory ``path`` names, if it lies under one of ``roots``. One answer for outside the
    roots, missing, not a directory and not an adapter: the route must not tell which paths exist. Checked here,
    before the adapter manager sees the path (it would take a name that is not a directory as a hub id)."""
    refused = AdapterPathError(f"'{path[:200]}' is not an adapter directory under this server's adapter roots",
                               field="path", suggestions=["give an adapter directory (or a run's output_dir) inside "
                                                          "an --adapter-root of the server, absolute or relative "
                                                          "to the root"])
    if not path or "\x00" in path or len(path) > 4096:
        raise refused
    try:
        candidates = [path] if os.path.isabs(path) else [os.path.join(root, path) for root in roots]
        for candidate in candidates:
            real = os.path.realpath(candidate)
            for _ in range(4):  # a run's output_dir holds adapter/; follow it as the manager would
                if not _under(real, roots) or not os.path.isdir(real):
                    break
                inner = os.path.join(real, "adapter")
                if os.path.isfile(os.path.join(inner, "adapter_config.json")):
                    real = os.path.realpath(inner)
                    continue
                if os.path.isfile(os.path.join(real, "adapter_config.json")) and _contents_under(real, roots):
                    return real
                break
    except (OSError, ValueError):
        pass
    raise refused
