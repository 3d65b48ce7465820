"""One rule for every count in the specs (steps, batch sizes, checkpoints kept): whole numbers in a sane range, or
a fraction of all steps where transformers takes one."""
from __future__ import annotations

import math
from typing import Any

from ..errors import ConfigError

MAX_STEPS = 10 ** 9  # far beyond any real run; larger values are typos (1e30) that overflow step arithmetic
# key -> (smallest whole value, fraction of all steps allowed (0 < x < 1), values allowed besides)
STEP_COUNT_RULES: dict[str, tuple[int, bool, tuple]] = {
    "max_steps": (1, False, (-1,)), "gradient_accumulation_steps": (1, False, ()),
    "per_device_train_batch_size": (1, False, ()), "per_device_eval_batch_size": (1, False, ()),
    "save_steps": (1, True, ()), "eval_steps": (1, True, (None,)), "logging_steps": (1, True, ()),
    "warmup_steps": (1, True, (0,)), "keep_last_n": (1, False, (None,)), "save_total_limit": (1, False, (None,)),
    "length_group_batches": (1, False, ()),
}
STEP_COUNT_HINTS = {
    "max_steps": "-1 (the default) trains for num_train_epochs; a positive number stops after that many steps",
    "save_steps": "to save no checkpoints set training.save_strategy: no",
    "eval_steps": "to evaluate only per epoch set training.eval_strategy: epoch",
    "logging_steps": "e.g. 25 (steps) or 0.05 (a fraction of all steps)",
    "keep_last_n": "keep at least 1 checkpoint (needed to resume); to write none set training.save_strategy: no",
    "save_total_limit": "keep at least 1 checkpoint; to write none set training.save_strategy: no",
}


def check_count(field: str, value: Any, minimum: int, fraction: bool, also: tuple = ()) -> None:
    """One rule for every count in the specs: a whole number >= ``minimum`` and <= MAX_STEPS, or (``fraction``)
    a ratio in (0, 1), or one of ``also``. Non-numbers are left to the type check, which names them."""
    if value is None or isinstance(value, str) or (not isinstance(value, bool) and value in also):
        return
    key = field.rsplit(".", 1)[-1]
    hints = [STEP_COUNT_HINTS[key]] if key in STEP_COUNT_HINTS else []
    if isinstance(value, bool):  # pydantic would read true as 1
        raise ConfigError(f"{field} is a count, not true/false (got {value})", field=field,
                          suggestions=hints or [f"set {field} to a whole number"])
    if not isinstance(value, (int, float)):
        return
    if not math.isfinite(value):
        raise ConfigError(f"{field} must be a finite number, got {value}", field=field,
                          suggestions=hints or [f"set {field} to a whole number"])
    if fraction and 0 < value < 1:
        return
    allowed = " or ".join([f"a whole number >= {minimum}"] + (["a fraction of all steps in (0, 1)"] if fraction
                                                                else []) + [repr(a) for a in also if a is not None])
    if value != int(value):
        raise ConfigError(f"{field} is a count and must be {allowed}, got {value}", field=field,
                          suggestions=[f"write a whole number, e.g. {field}: {max(minimum, round(value))}"] + hints)
    if value < minimum:
        raise ConfigError(f"{field}: {value!r} is not allowed: it must be {allowed}", field=field,
                          suggestions=hints or [f"set {field} to {minimum} or more"])
    if value > MAX_STEPS:
        raise ConfigError(f"{field}: {value:g} is absurdly large (over {MAX_STEPS:,}); was it a typo?", field=field,
                          suggestions=[f"set {field} to a realistic value"] + hints)
