"""What evaluation reads and writes beside a run's own records: the metric names a task reports (checked before
training), and the results of `tunepipe evaluate`, added to metrics.json["evaluations"].
Other stages' modules are imported inside the functions that use them: this file is on the start-up
path of `tunepipe train`, where a specs typo is reported before they load (tests/test_import_placement.py)."""
from __future__ import annotations

from typing import Any


def reported_metrics(task, labels) -> set[str] | None:
    """Metric names the task's compute_metrics returns for these labels predicted perfectly; None when the probe
    does not apply (it must never stop a run the trainer could do)."""
    import numpy as np
    try:
        from transformers import EvalPrediction
        if labels and isinstance(labels[0], list):
            width = max(len(row) for row in labels)
            label_ids = np.array([list(row) + [-100] * (width - len(row)) for row in labels])
        else:
            label_ids = np.array(labels)
        predictions = np.where(label_ids < 0, 0, label_ids).astype(np.int64)
        metrics = task.compute_metrics(EvalPrediction(predictions=predictions, label_ids=label_ids))
    except Exception:  # noqa: BLE001
        return None
    return set(metrics) | {"loss", "runtime", "samples_per_second", "steps_per_second"}


def adopt_trained_labels(task, model_dir) -> None:
    """The label set of a model tunepipe saved (its config records the task), so that evaluating it needs no pass
    over the training data to infer them. Adapters and other folders: unchanged (the training data tells)."""
    import json
    from pathlib import Path
    config = Path(model_dir) / "config.json"
    if task.labels is not None or not getattr(task, "uses_labels", False) or not config.is_file():
        return
    try:
        saved = json.loads(config.read_text(encoding="utf-8"))
        id2label = {int(k): v for k, v in saved["id2label"].items()} if saved.get("tunepipe_task") else None
    except (ValueError, KeyError, AttributeError, TypeError):
        return
    if id2label:
        task.labels = [id2label[i] for i in range(len(id2label))]


def add_evaluation(output_dir, metrics: dict[str, Any], model_dir, data) -> dict[str, Any]:
    """`tunepipe evaluate`'s results beside the run's records: appended to metrics.json["evaluations"] (time,
    model folder, the files each split was read from, its metrics); the run's own sections (validation, test,
    train) are kept as training wrote them. Returns the entry."""
    import json
    import time
    from pathlib import Path

    from .output import write_json
    path = Path(output_dir) / "metrics.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError:
        record = {}
    if not isinstance(record, dict):
        record = {}
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": str(model_dir),
             "data": {split: sorted(str(f) for f in data.records[split].files)
                      for split in metrics if split in data.records},
             "metrics": {split: {k: v for k, v in m.items() if k != "epoch"} for split, m in metrics.items()}}
    evaluations = record.get("evaluations")
    record["evaluations"] = (evaluations if isinstance(evaluations, list) else []) + [entry]
    write_json(path, record)
    return entry
