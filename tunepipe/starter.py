"""`tunepipe init TASK`: a commented starter specs file built from the task's own defaults."""
from __future__ import annotations

import json

import yaml

COMMENTS = {
    "task": "which task; `tunepipe tasks` lists them",
    "output_dir": "model/, specs.yaml, metrics.json, train_log.jsonl and a model card go here",
    "model": "local dir, hub id, or 'minilm' (the bundled pretrained encoder); or from_config: {model_type: bert, ...}",
    "data": "jsonl / json / csv / tsv / parquet / txt / CoNLL files, or a datasets hub id",
    "training": "transformers TrainingArguments names; bf16 'auto' = on where the device runs it fast",
    "backend": "hf (transformers Trainer)",
}


def starter_yaml(task_cls) -> str:
    defaults = task_cls.default_specs()
    body = {
        "task": task_cls.name,
        "output_dir": f"runs/{task_cls.name}",
        "model": {"name_or_path": "minilm"},
        "data": {"train": "data/train.jsonl", "validation": "data/validation.jsonl", **defaults.get("data", {})},
        "training": {"num_train_epochs": 3, "learning_rate": 5.0e-5, **defaults.get("training", {}),
                     "bf16": "auto"},
        "backend": "hf",
    }
    lines = [f"# tunepipe specs for {task_cls.name}: {task_cls.description}",
             "# Run: tunepipe train THIS_FILE [--set training.learning_rate=3e-5]", ""]
    for key, value in body.items():
        if key in COMMENTS:
            lines.append(f"# {COMMENTS[key]}")
        lines.append(yaml.safe_dump({key: value}, sort_keys=False).rstrip())
        if key == "data":
            # json keeps a record on one line (yaml would fold a text holding a newline onto several)
            example = json.dumps(task_cls.example_data, ensure_ascii=False)
            lines.append(f"  # one record looks like: {example}")
    return "\n".join(lines) + "\n"
