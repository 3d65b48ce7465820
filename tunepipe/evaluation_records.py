"""What evaluation reads and writes beside a run's own records: the metric names a task reports (checked before
training), and the results of `tunepipe evaluate`, added to metrics.json["evaluations"]."""
from __future__ import annotations


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
