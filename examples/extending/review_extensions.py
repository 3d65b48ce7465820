"""Your own code in a tunepipe run, without editing tunepipe (docs/extending.md): used by
examples/text_classification_extended.yaml as 'examples/extending/review_extensions.py:<function>'."""
import re

import numpy as np


def normalise(record):
    """data.preprocess: called on each record as it is read, before tunepipe checks it. Return the record (a dict)
    or None to drop it."""
    text = re.sub(r"\s+", " ", str(record.get("text") or "")).strip().lower()
    if len(text.split()) < 3:
        return None  # too short to say anything: dropped (not an error)
    return {**record, "text": text}


def negative_recall(p):
    """metrics: called after the task's own metrics with a tunepipe.extensions.MetricInputs (predictions, label_ids,
    task, split, metrics). Returns extra metrics; their names must differ from the task's (accuracy, macro_f1)."""
    preds, labels = np.asarray(p.predictions), np.asarray(p.label_ids)
    negative = p.task.labels.index("negative")
    wanted = labels == negative
    return {"negative_recall": float((preds[wanted] == negative).mean()) if wanted.any() else 0.0}
