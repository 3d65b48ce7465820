"""``training.report_to``: transformers' reporting integrations (TensorBoard, Weights & Biases, ...).

The hf backend is transformers' Trainer, which builds the integrations' callbacks itself; tunepipe only checks the
names and packages first (a typed error before the model loads, not a RuntimeError after it) and points
TensorBoard's event files into ``<output_dir>/tensorboard``. The hand-written loops (accelerate, lightning,
lightning+accelerate) drive the same callback protocol, so TensorBoard's callback runs there too; the other
integrations read Trainer internals those loops do not have and are refused on them, never silently dropped.
MLflow has its own section (``tracking.mlflow``) on every backend.
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DependencyError

# integration -> (package to look for, extra that installs it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
LOOP_BACKEND_INTEGRATIONS = ("tensorboard",)
TENSORBOARD_DIR = "tensorboard"


def wanted(report_to: Any) -> list[str]:
    """report_to as a list of names ('none' and empty -> [])."""
    if report_to is None:
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    return [n for n in names if n not in ("none", None, "")]


def tensorboard_dir(output_dir: str | Path) -> Path:
    """Where TensorBoard event files go: $TENSORBOARD_LOGGING_DIR (transformers' variable), else the run's own."""
    env = os.environ.get("TENSORBOARD_LOGGING_DIR")
    return Path(os.path.expanduser(env)) if env else Path(output_dir) / TENSORBOARD_DIR


def check_report_to(specs) -> list[str]:
    """The integrations asked for, checked: known names, their package installed, the backend able to drive them.
    Raises ConfigError / DependencyError (IMPORT_ERROR, with the pip command)."""
    names = wanted(getattr(specs.training, "report_to", None))
    if not names:
        return []
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
    known = sorted(INTEGRATION_TO_CALLBACK)
    for name in names:
        if name == "all":
            if specs.backend != "hf":
                raise ConfigError(f"training.report_to: all is resolved by transformers' Trainer (backend hf); the "
                                  f"{specs.backend} backend needs the integrations named", field="training.report_to",
                                  suggestions=["report_to: tensorboard", "or backend: hf"])
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            close = difflib.get_close_matches(name, known, n=1)
            raise ConfigError(f"training.report_to: '{name}' is not a transformers integration",
                              field="training.report_to",
                              suggestions=[f"did you mean '{close[0]}'?" if close else "",
                                           f"known: {', '.join(known)}"])
        if name == "mlflow" and getattr(specs.tracking, "mlflow", None) is not None:
            raise ConfigError("training.report_to: mlflow and tracking.mlflow would log every run twice",
                              field="training.report_to",
                              suggestions=["keep tracking.mlflow (every backend, a guarded client) and drop "
                                           "mlflow from report_to"])
        if specs.backend != "hf" and name not in LOOP_BACKEND_INTEGRATIONS:
            raise ConfigError(f"training.report_to: {name} runs with transformers' Trainer only (backend hf); the "
                              f"{specs.backend} backend reports to {', '.join(LOOP_BACKEND_INTEGRATIONS)}",
                              field="training.report_to",
                              suggestions=["backend: hf", "or report_to: tensorboard",
                                           "or tracking.mlflow (every backend)"])
        package, extra = PACKAGES.get(name, (None, None))
        if package is not None and importlib.util.find_spec(package) is None:
            raise DependencyError(f"training.report_to: {name} needs the '{package}' package, which is not installed",
                                  field="training.report_to",
                                  suggestions=[f"pip install 'tunepipe[{extra}]'", f"or remove {name} from report_to"])
    return names


class _JsonArgs:
    """The loops' TrainingSettings seen as TrainingArguments by TensorBoard's callback (it records the arguments
    as JSON text)."""

    def __init__(self, args):
        self._args = args

    def __getattr__(self, name):
        return getattr(self._args, name)

    def to_json_string(self) -> str:
        return json.dumps(self._args.to_dict(), indent=2, default=str)


def loop_callbacks(specs, output_dir: str | Path) -> list:
    """Integration callbacks for the hand-written loops (the Trainer adds its own on the hf backend)."""
    if specs.backend == "hf" or "tensorboard" not in wanted(getattr(specs.training, "report_to", None)):
        return []
    from transformers.integrations import TensorBoardCallback  # heavy: only for runs that report to TensorBoard

    class LoopTensorBoardCallback(TensorBoardCallback):
        """transformers' TensorBoard callback, given the loops' settings object as it expects."""

        def on_train_begin(self, args, state, control, **kwargs):
            super().on_train_begin(_JsonArgs(args), state, control, **kwargs)

    callback = LoopTensorBoardCallback()
    callback.logging_dir = str(tensorboard_dir(output_dir))
    return [callback]


def point_trainer_callbacks(trainer, output_dir: str | Path) -> None:
    """On the hf backend: TensorBoard's event files into the run's directory (the Trainer would put them under
    checkpoints/, beside the rotated checkpoints)."""
    handler = getattr(trainer, "callback_handler", None)
    if handler is None:
        return
    from transformers.integrations import TensorBoardCallback
    for callback in handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(tensorboard_dir(output_dir))
