"""What MLflow receives besides metrics: the specs as flat params within MLflow's limits, names it accepts, the
default store beside the run, and the loss plot logged as an artifact."""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("tunepipe")

TRUNCATION_MARKER = "...[truncated]"
_BAD_NAME_CHARS = re.compile(r"[^/\w.\- ]")


# ---- specs -> params ---------------------------------------------------------------------------------------------
def mlflow_limits() -> tuple[int, int]:
    """(param value length, key length) limits of the installed MLflow."""
    try:
        from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH
        return MAX_PARAM_VAL_LENGTH, MAX_ENTITY_KEY_LENGTH
    except ImportError:  # pragma: no cover - older layouts
        return 6000, 250


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dot keys; lists stay values. ``None`` leaves are dropped (the specs.yaml artifact has them)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        elif value is not None:
            out[name] = value
    return out


def clean_name(name: str, limit: int = 250) -> str:
    """A key MLflow accepts on every platform: slashes, word characters, periods, dashes, spaces."""
    return _BAD_NAME_CHARS.sub("_", str(name))[:limit]


def truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER


def specs_params(specs_dict: dict[str, Any], value_limit: int | None = None) -> tuple[dict[str, str], list[str]]:
    """(params, keys whose value was truncated) for ``specs.to_dict()``."""
    default_value_limit, key_limit = mlflow_limits()
    value_limit = value_limit or default_value_limit
    params, truncated = {}, []
    for key, value in flatten(specs_dict).items():
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        name = clean_name(key, key_limit)
        if len(text) > value_limit:
            truncated.append(name)
        params[name] = truncate(text, value_limit)
    return params, truncated


def default_tracking_uri(output_dir: Path) -> str:
    """A SQLite store under output_dir: MLflow 3 refuses new ``file:`` stores (deprecated), SQLite needs no
    server and ``mlflow ui --backend-store-uri`` opens it."""
    return f"sqlite:///{(Path(output_dir) / 'mlruns' / 'mlflow.db').resolve()}"


# ---- the loss plot -------------------------------------------------------------------------------------------------
def read_train_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_loss(train_log: Path, target: Path) -> Path | None:
    """Training (and evaluation) loss per step to ``target`` (PNG). None when matplotlib is not installed or the
    log has no loss. Uses matplotlib's object API, so a user's pyplot backend is left alone."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.info("matplotlib is not installed: no loss plot (pip install matplotlib)")
        return None
    records = read_train_log(train_log)
    series = {name: [(r["step"], r[name]) for r in records if isinstance(r.get(name), (int, float))
                     and "step" in r] for name in ("loss", "eval_loss")}
    if not series["loss"]:
        return None
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, points in series.items():
        if points:
            ax.plot(*zip(*points), marker="o" if name == "eval_loss" else None, markersize=3, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    os.replace(tmp, target)
    return target
