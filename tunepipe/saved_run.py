"""A finished run on disk: its model or adapter saved and loaded back, curves, card (kept out of pipeline.py).
Other stages' modules are imported inside the functions that use them: this file is on the start-up
path of `tunepipe train`, where a specs typo is reported before they load (tests/test_import_placement.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ConfigError, ErrorHandler

# What a run of the same specs trained again (no training.resume) replaces before it trains: the previous run's
# history, so its checkpoints and log lines do not mix with the new run's. Its model stays until the new one
# replaces it, atomically, at the end.
HISTORY_ENTRIES = ("checkpoints", "train_log.jsonl", "metrics.json", "README.md", "training_curves.svg",
                   "tensorboard", "merged")


def train_metrics(output_dir: Path) -> dict[str, Any] | None:
    """The training metrics the run in ``output_dir`` recorded (metrics.json), if any."""
    import json
    try:
        metrics = json.loads((Path(output_dir) / "metrics.json").read_text(encoding="utf-8")).get("train")
    except (OSError, ValueError, AttributeError):
        return None
    return metrics if isinstance(metrics, dict) and metrics else None


def remove_failed_leftovers(output_dir: Path, created: Path | None) -> None:
    """After training failed: an empty checkpoints/ goes, and an output_dir this run created goes whole when
    nothing of the run is in it (no checkpoint, log or curve: only tunepipe's marker and lock)."""
    import shutil

    from .ownership import LOCK, MARKER
    output_dir = Path(output_dir)
    checkpoints = output_dir / "checkpoints"
    if checkpoints.is_dir() and not checkpoints.is_symlink() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()
    if created is not None and output_dir.is_dir() and all(p.name in (MARKER, LOCK) for p in output_dir.iterdir()):
        shutil.rmtree(created, ignore_errors=True)


def replaced_entries(output_dir: Path, specs) -> tuple[list[str], bool]:
    """(the entries of a previous run in ``output_dir`` that a fresh start removes when training starts, whether
    it replaces all of that run). A run of other specs goes whole (with --overwrite; without, previous_run_differs
    refuses); the same specs trained again replace its history. An unfinished run (checkpoints, no final model) is
    refused: continuing it is what was likely meant. Files a user added are never removed (check_removable)."""
    from .output import RUN_ENTRIES, previous_run_differs
    from .ownership import check_removable
    output_dir = Path(output_dir)
    replace_all = bool(previous_run_differs(output_dir, specs)) or bool(getattr(specs, "overwrite_output_dir", False))
    if replace_all:
        entries = [e for e in RUN_ENTRIES if e != "specs.yaml"]
    else:
        saved = sorted((output_dir / "checkpoints").glob("*-*/manifest.json"),
                       key=lambda p: int(p.parent.name.rsplit("-", 1)[1]) if p.parent.name[-1].isdigit() else -1)
        if saved and not ((output_dir / "model").is_dir() or (output_dir / "adapter").is_dir()):
            raise ConfigError(f"output_dir {output_dir} holds an unfinished run (checkpoints up to "
                              f"{saved[-1].parent.name}, no final model): starting afresh would discard them",
                              field="training.resume", file=str(saved[-1].parent),
                              suggestions=["continue it: tunepipe train SPECS --set training.resume=auto",
                                           "or start it over: tunepipe train SPECS --overwrite"])
        entries = list(HISTORY_ENTRIES)
    entries = [e for e in entries if (output_dir / e).exists() or (output_dir / e).is_symlink()]
    check_removable(output_dir, entries + ["model", "adapter", "merged"])  # those two go at the end if kept now
    return entries, replace_all


def save_model(model, tokenizer, specs, task, output_dir: Path) -> Path:
    """The trained model (or a PEFT run's adapter) and specs.yaml, written atomically into output_dir."""
    from .output import atomic_dir, atomic_text
    from .modeling.peft_support import is_peft_model, save_adapter
    if is_peft_model(model):  # adapter only (+ base reference); `tunepipe merge` exports a full model
        target = output_dir / "adapter"
        with ErrorHandler.guard(f"saving the adapter to {target}"):
            save_adapter(model, tokenizer, target, specs, task)
            atomic_text(output_dir / "specs.yaml", specs.to_yaml())
        return target
    target = output_dir / "model"

    def write(tmp: Path) -> None:
        model.config.tunepipe_task = task.name  # lets `tunepipe predict` find the task
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    from .disk_space import disk_full_as_io_error, model_weight_bytes
    with ErrorHandler.guard(f"saving the model to {target}"), disk_full_as_io_error(
            target, model_weight_bytes(model), "the model's weights", "final model"):
        atomic_dir(target, write)
        atomic_text(output_dir / "specs.yaml", specs.to_yaml())
    return target


def load_trained(specs, task, output_dir: Path, model_dir: str | Path | None = None):
    """``(model, tokenizer)`` of a saved run (output_dir/model or /adapter, or ``model_dir``), told to the task."""
    import transformers

    from .modeling.peft_support import is_adapter_dir, load_adapter, peft_enabled
    path = Path(model_dir or output_dir / ("adapter" if peft_enabled(specs) else "model"))
    from .modeling.models import adopt_model_config
    adopt_model_config(task, path, trust_remote_code=specs.model.trust_remote_code)
    if is_adapter_dir(path):  # PEFT run: base model (quantized as trained) + adapter
        with ErrorHandler.guard(f"loading the adapter in {path}"):
            model, tokenizer = load_adapter(path, task.auto_model_class,
                                            trust_remote_code=specs.model.trust_remote_code)
        task.on_model_loaded(model)
        return model, tokenizer
    if not (path / "config.json").is_file():
        from .errors import ModelNotFoundError
        raise ModelNotFoundError(f"No trained model in {path}", file=str(path),
                                 suggestions=["run `tunepipe train` first, or pass the model directory"])
    auto_cls = getattr(transformers, task.auto_model_class)
    trust = {"trust_remote_code": specs.model.trust_remote_code}  # the caller's specs, explicit
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, **trust)
    model = auto_cls.from_pretrained(path, **trust)
    task.on_model_loaded(model)
    return model, tokenizer


def write_curves(specs, task, output_dir: Path):
    """training_curves.svg from train_log.jsonl, which every backend writes; never fails the run."""
    from .tracking.plots import write_training_curves
    metric = specs.training.metric_for_best_model or \
        task.default_specs().get("training", {}).get("metric_for_best_model")
    return write_training_curves(output_dir, metric, f"{output_dir.name} — {task.name}")


def write_card(specs, task, output_dir: Path, metrics: dict[str, Any], datasets: dict[str, Any]) -> None:
    """README.md: the model card of the run, with its metrics (and curves, where they were drawn)."""
    from .output import atomic_text, model_card
    from .tracking.plots import CURVES_FILE
    curves = CURVES_FILE if (output_dir / CURVES_FILE).is_file() else None
    n_train = len(datasets["train"]) if hasattr(datasets.get("train"), "__len__") else 0
    base = specs.model.name_or_path or f"from_config({(specs.model.from_config or {}).get('model_type')})"
    from .modeling.adapter_card import adapter_card
    from .modeling.peft_support import peft_enabled
    if peft_enabled(specs):  # an adapter/ to load, on a base named as the adapter records it
        peft_card = adapter_card(output_dir, task, specs)
        card = model_card(specs, task, metrics, peft_card["base"], n_train,
                          load_section=peft_card["load"], metadata=peft_card["metadata"],
                          base_note=peft_card["base_note"], curves=curves)
    else:
        card = model_card(specs, task, metrics, base, n_train, curves=curves)
    atomic_text(output_dir / "README.md", card)
