"""The plain recipe as a user runs it: transformers' examples/pytorch/token-classification/run_ner.py, cut to what
that script does with its defaults for a local JSON Lines file, and no tunepipe code.

load_dataset("json") → tokenize with label_all_tokens=False (first sub-token labelled, the rest -100) → random
batches padded per batch (DataCollatorForTokenClassification) → fp32 Trainer (its default checkpoints every 500 steps) → save_model → evaluate with seqeval
(default mode, as run_ner's compute_metrics). recipe_vs_plain_process.py runs it as its own process and times it.

    python benchmarks/plain_run_ner.py --model DIR --train train.jsonl --validation validation.jsonl --output OUT \
        [--epochs 1 --lr 5e-5 --batch-size 16 --seed 42]
"""
from __future__ import annotations

import argparse
import json

import numpy as np
from datasets import load_dataset
from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score
from transformers import (AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification, Trainer,
                          TrainingArguments, set_seed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--validation", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()
    set_seed(args.seed)
    raw = load_dataset("json", data_files={"train": args.train, "validation": args.validation})
    labels = sorted({tag for tags in raw["train"]["ner_tags"] for tag in tags})
    label_to_id = {label: i for i, label in enumerate(labels)}
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def tokenize_and_align_labels(examples):
        enc = tokenizer(examples["tokens"], truncation=True, is_split_into_words=True)
        all_labels = []
        for i, tags in enumerate(examples["ner_tags"]):
            previous, row = None, []
            for word in enc.word_ids(batch_index=i):
                row.append(-100 if word is None or word == previous else label_to_id[tags[word]])
                previous = word
            all_labels.append(row)
        enc["labels"] = all_labels
        return enc

    columns = raw["train"].column_names
    train = raw["train"].map(tokenize_and_align_labels, batched=True, remove_columns=columns)
    validation = raw["validation"].map(tokenize_and_align_labels, batched=True, remove_columns=columns)
    model = AutoModelForTokenClassification.from_pretrained(
        args.model, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label_to_id)

    def compute_metrics(prediction):
        predicted = np.argmax(prediction.predictions, axis=2)
        y_pred = [[labels[p] for p, t in zip(ps, ts) if t != -100] for ps, ts in zip(predicted, prediction.label_ids)]
        y_true = [[labels[t] for t in ts if t != -100] for ts in prediction.label_ids]
        return {"precision": precision_score(y_true, y_pred), "recall": recall_score(y_true, y_pred),
                "f1": f1_score(y_true, y_pred), "accuracy": accuracy_score(y_true, y_pred)}

    training_args = TrainingArguments(output_dir=args.output, per_device_train_batch_size=args.batch_size,
                                      learning_rate=args.lr, num_train_epochs=args.epochs, seed=args.seed,
                                      report_to="none")
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=validation,
                      processing_class=tokenizer, data_collator=DataCollatorForTokenClassification(tokenizer),
                      compute_metrics=compute_metrics)
    result = trainer.train()
    trainer.save_model()
    metrics = {**result.metrics, **trainer.evaluate()}
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
