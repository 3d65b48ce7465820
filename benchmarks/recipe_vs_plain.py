"""tunepipe's default recipe vs the plain transformers recipe (run_ner.py / run_glue.py style), side by side.

Same model (bundled MiniLM), data, epochs, learning rate and batch size. Prints validation quality for both and the
training-throughput ratio, and writes benchmarks/results/<task>_vs_plain.json.

    python benchmarks/recipe_vs_plain.py --task ner  --max-train 5000 [--epochs 3 --lr 1e-4 --seeds 42 43 44]
    python benchmarks/recipe_vs_plain.py --task sst2 --max-train 8000 [--epochs 2 --lr 5e-5 --seeds 42 43 44]

With several seeds both recipes run once per seed (each side gets the same seed) and the verdict compares the
mean scores: on 5000 CoNLL sentences the seed alone moved F1 by 0.6-0.9 points, more than the bar we check.
Throughput is given per wall second and per CPU second (the latter is steadier when the machine is shared).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


# ---------------------------------------------------------------------------------------------------------------
# The plain recipe: what run_ner.py / run_glue.py do (random batches padded per batch, fp32, default collator).
# ---------------------------------------------------------------------------------------------------------------
def plain_ner(model_dir, train, val, args, out):
    import datasets
    from seqeval.metrics import f1_score
    from transformers import (AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification,
                              Trainer, TrainingArguments, set_seed)
    set_seed(args.seed)
    labels = sorted({t for r in train for t in r["ner_tags"]})
    l2i = {l: i for i, l in enumerate(labels)}
    tok = AutoTokenizer.from_pretrained(model_dir)

    def tokenize_and_align_labels(batch):
        enc = tok(batch["tokens"], truncation=True, is_split_into_words=True)
        all_labels = []
        for i, tags in enumerate(batch["ner_tags"]):
            prev, row = None, []
            for w in enc.word_ids(i):
                row.append(-100 if w is None or w == prev else l2i[tags[w]])
                prev = w
            all_labels.append(row)
        enc["labels"] = all_labels
        return enc

    cols = ["tokens", "ner_tags"]
    tr = datasets.Dataset.from_list([{k: r[k] for k in cols} for r in train]).map(
        tokenize_and_align_labels, batched=True, remove_columns=cols)
    va = datasets.Dataset.from_list([{k: r[k] for k in cols} for r in val]).map(
        tokenize_and_align_labels, batched=True, remove_columns=cols)
    model = AutoModelForTokenClassification.from_pretrained(
        model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=l2i)
    targs = TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch_size,
                              per_device_eval_batch_size=32, learning_rate=args.lr, num_train_epochs=args.epochs,
                              seed=args.seed, save_strategy="no", report_to="none", logging_steps=50,
                              disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=tr, data_collator=DataCollatorForTokenClassification(tok),
                      processing_class=tok)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    pred = trainer.predict(va)
    p = pred.predictions.argmax(-1)
    y_true = [[labels[l] for l in lr if l != -100] for lr in pred.label_ids]
    y_pred = [[labels[pp] for pp, l in zip(pr, lr) if l != -100] for pr, lr in zip(p, pred.label_ids)]
    return {"f1": float(f1_score(y_true, y_pred)), "train_seconds": seconds, "train_cpu_seconds": cpu}


def plain_cls(model_dir, train, val, args, out):
    import datasets
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, set_seed)
    set_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    n_labels = len({r["label"] for r in train})

    def prep(rows):
        ds = datasets.Dataset.from_list([{"text": r["text"], "label": r["label"]} for r in rows])
        return ds.map(lambda b: tok(b["text"], truncation=True, max_length=128), batched=True, remove_columns=["text"])

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=n_labels)
    targs = TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch_size,
                              per_device_eval_batch_size=32, learning_rate=args.lr, num_train_epochs=args.epochs,
                              seed=args.seed, save_strategy="no", report_to="none", logging_steps=50,
                              disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=prep(train), data_collator=DataCollatorWithPadding(tok),
                      processing_class=tok)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    pred = trainer.predict(prep(val))
    acc = float((pred.predictions.argmax(-1) == pred.label_ids).mean())
    return {"accuracy": acc, "train_seconds": seconds, "train_cpu_seconds": cpu}


# ---------------------------------------------------------------------------------------------------------------
# tunepipe's default recipe: only the shared settings are given; everything else is tunepipe's defaults.
# ---------------------------------------------------------------------------------------------------------------
def tunepipe_run(task, train, val, args, out):
    from tunepipe import FineTunePipeLine
    specs = {"task": task, "output_dir": out, "model": "minilm",
             "data": {"train": train, "validation": val},
             "training": {"num_train_epochs": args.epochs, "learning_rate": args.lr, "seed": args.seed,
                          "per_device_train_batch_size": args.batch_size, "save_strategy": "no",
                          "eval_strategy": "no", "disable_tqdm": True}}
    if task == "text_classification":
        specs["data"]["max_length"] = 128
    pipe = FineTunePipeLine(specs, overrides=args.overrides)
    pipe.setup()
    t0, c0 = time.perf_counter(), time.process_time()
    pipe.train()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    metrics = pipe.evaluate(splits=("validation",))["validation"]
    return {"f1" if task == "token_classification" else "accuracy":
            metrics["f1" if task == "token_classification" else "accuracy"], "train_seconds": seconds,
            "train_cpu_seconds": cpu}


def reused_plain_runs(args, n_train: int) -> dict[int, dict]:
    """Plain runs per seed from an earlier result file, after checking that its settings are these."""
    earlier = json.loads(Path(args.plain_from).read_text())
    for key, value in (("task", args.task), ("n_train", n_train), ("epochs", args.epochs),
                       ("learning_rate", args.lr), ("batch_size", args.batch_size)):
        if earlier.get(key) != value:
            raise SystemExit(f"--plain-from {args.plain_from}: {key} is {earlier.get(key)!r}, this run's is {value!r}")
    runs = {r["seed"]: r["plain_transformers"] for r in earlier["runs"]}
    missing = [s for s in args.seeds if s not in runs]
    if missing:
        raise SystemExit(f"--plain-from {args.plain_from}: no plain run for seed(s) {missing}")
    return runs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["ner", "sst2"], required=True)
    ap.add_argument("--epochs", type=float, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-train", type=int, default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="change one of tunepipe's defaults, to see what it is worth (e.g. training.bf16=false); "
                         "the result is then written to <task>_vs_plain_<setting>.json")
    ap.add_argument("--only-tunepipe", action="store_true", help="skip the plain recipe (variant experiments)")
    ap.add_argument("--plain-from", metavar="JSON", help="reuse the plain runs of an earlier result with the same "
                    "task, data size, epochs, learning rate, batch size and seeds (the plain recipe does not change "
                    "with tunepipe; it is deterministic per seed)")
    args = ap.parse_args()
    from tunepipe.modeling.models import bundled_model_dir
    model_dir = str(bundled_model_dir())
    if args.task == "ner":
        folder, metric, plain, task = DATA / "conll2003", "f1", plain_ner, "token_classification"
        args.epochs, args.lr = args.epochs or 3, args.lr or 1e-4
    else:
        folder, metric, plain, task = DATA / "sst2", "accuracy", plain_cls, "text_classification"
        args.epochs, args.lr = args.epochs or 2, args.lr or 5e-5
    train = read_jsonl(folder / "train.jsonl", args.max_train)
    val = read_jsonl(folder / "validation.jsonl")
    n_train = len(train)
    load_before = os.getloadavg()
    reused = reused_plain_runs(args, n_train) if args.plain_from else None
    runs = []
    for seed in args.seeds:
        args.seed = seed
        with tempfile.TemporaryDirectory() as tmp:
            ours = tunepipe_run(task, train, val, args, f"{tmp}/tunepipe")
            if reused:
                base = reused[seed]
            elif args.only_tunepipe:
                base = {metric: float("nan"), "train_seconds": float("nan"), "train_cpu_seconds": float("nan")}
            else:
                base = plain(model_dir, train, val, args, f"{tmp}/plain")
        for r in (ours, base):
            r["train_samples_per_second"] = n_train * args.epochs / r["train_seconds"]
            r["train_samples_per_cpu_second"] = n_train * args.epochs / r["train_cpu_seconds"]
        runs.append({"seed": seed, "tunepipe": ours, "plain_transformers": base,
                     "quality_delta_points": 100 * (ours[metric] - base[metric]), "loadavg_after": os.getloadavg()})
        print(f"seed {seed}: {metric} tunepipe {ours[metric]:.4f} vs plain {base[metric]:.4f}; throughput x"
              f"{ours['train_samples_per_second'] / base['train_samples_per_second']:.2f} (wall) x"
              f"{ours['train_samples_per_cpu_second'] / base['train_samples_per_cpu_second']:.2f} (cpu)", flush=True)

    def mean(side, key):
        return float(np.mean([r[side][key] for r in runs]))

    ours_q, base_q = mean("tunepipe", metric), mean("plain_transformers", metric)
    result = {
        "task": args.task, "data": str(folder.name), "n_train": n_train, "n_validation": len(val),
        "epochs": args.epochs, "learning_rate": args.lr, "batch_size": args.batch_size, "seeds": args.seeds,
        "metric": metric, "tunepipe_overrides": args.overrides, "runs": runs,
        "tunepipe_mean": ours_q, "plain_mean": base_q,
        "tunepipe_std": float(np.std([r["tunepipe"][metric] for r in runs])),
        "plain_std": float(np.std([r["plain_transformers"][metric] for r in runs])),
        "quality_delta_points": 100 * (ours_q - base_q),
        "throughput_ratio": mean("tunepipe", "train_samples_per_second")
        / mean("plain_transformers", "train_samples_per_second"),
        "throughput_ratio_cpu_seconds": mean("tunepipe", "train_samples_per_cpu_second")
        / mean("plain_transformers", "train_samples_per_cpu_second"),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "plain_runs_from": args.plain_from,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
    }
    print(f"{args.task}: validation {metric} (mean of {len(runs)} seeds): tunepipe {ours_q:.4f} vs plain "
          f"{base_q:.4f} (delta {result['quality_delta_points']:+.2f} points)")
    print(f"{args.task}: training throughput ratio x{result['throughput_ratio']:.2f} per wall second, "
          f"x{result['throughput_ratio_cpu_seconds']:.2f} per CPU second")
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = ("_" + "_".join(o.replace("training.", "").replace("=", "-") for o in args.overrides)
              if args.overrides else "") + ("_tunepipe_only" if args.only_tunepipe else "")
    (RESULTS / f"{args.task}_vs_plain{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
