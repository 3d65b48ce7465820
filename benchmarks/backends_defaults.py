"""The same NER job on the four backends at default settings, scored by code that shares nothing with tunepipe.

Issue 13: at default settings (bf16 autocast where the CPU has it, length-grouped batches in shuffled order,
token-weighted loss, dropout on) the backends must train the same model. Job: the bundled MiniLM
(``model: minilm``), token classification, the first 2,000 CoNLL-2003 sentences of ../shared/data/conll2003, 1
epoch, every other setting left at tunepipe's default, one seed at a time. Each run is a fresh
``python -m tunepipe train`` process (launched as backends_throughput.py launches a 1-process run). The saved
``model/`` is then loaded with plain transformers and scored on the validation split: the label of each word's first
sub-token, seqeval F1 (default mode, as run_ner.py reports it).

    python benchmarks/backends_defaults.py --threads 1                       # 4 backends x seeds 42 43 44
    python benchmarks/backends_defaults.py --backends hf lightning --seeds 42 --output /tmp/before.json

Acceptance: every backend's mean F1 within 0.5 points of hf's. Writes benchmarks/results/backends_defaults.json
(per run: F1, training loss, the logged loss curve's largest relative difference to hf's, times; per backend: mean,
spread, difference to hf). ``--attach NAME=JSON`` copies an earlier result of this script (e.g. one made on the code
before a fix) into the new one under ``NAME``, for comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from backends_throughput import BACKENDS, DATA, RESULTS, command, machine
from recipe_vs_plain import read_jsonl

PER_WORD_BATCH = 32


def specs_for(backend: str, out: Path, train: Path, seed: int, epochs: float) -> dict:
    """Only what the job names, plus a loss logged at every step to compare the curves; everything else is
    tunepipe's default (no validation in training: scoring is done here)."""
    return {"task": "token_classification", "output_dir": str(out), "backend": backend, "model": "minilm",
            "data": {"train": str(train)},
            "training": {"num_train_epochs": epochs, "seed": seed, "save_strategy": "no", "disable_tqdm": True,
                         "logging_steps": 1}}


def train(backend: str, seed: int, train_file: Path, work: Path, args) -> dict:
    out = work / f"{backend.replace('+', '_')}-{seed}"
    config = work / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump(specs_for(backend, out, train_file, seed, args.epochs)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": str(args.threads)}
    start = time.time()
    proc = subprocess.run(command(backend, 1, 0) + [str(config)], env=env, cwd=work, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"{backend} seed {seed} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    final = next(r for r in records if "train_loss" in r)
    return {"backend": backend, "seed": seed, "model_dir": str(out / "model"), "process_wall_s": round(wall, 1),
            "train_runtime_s": final["train_runtime"], "train_loss": final["train_loss"],
            "steps": max(r["step"] for r in records), "losses": [r["loss"] for r in records if "loss" in r]}


def score(model_dir: str, rows: list[dict]) -> dict:
    """seqeval F1 of the first-sub-token predictions; plain transformers, fp32, no tunepipe code."""
    import torch
    from seqeval.metrics import f1_score, precision_score, recall_score
    from transformers import AutoModelForTokenClassification, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForTokenClassification.from_pretrained(model_dir).eval()
    id2label = model.config.id2label
    y_true, y_pred = [], []
    for i in range(0, len(rows), PER_WORD_BATCH):
        batch = rows[i:i + PER_WORD_BATCH]
        enc = tokenizer([r["tokens"] for r in batch], is_split_into_words=True, truncation=True, padding=True,
                        return_tensors="pt")
        with torch.no_grad():
            ids = model(**enc).logits.argmax(-1)
        for j, r in enumerate(batch):
            first = {}
            for position, word in enumerate(enc.word_ids(j)):
                if word is not None and word not in first:
                    first[word] = id2label[int(ids[j, position])]
            y_true.append(list(r["ner_tags"]))
            y_pred.append([first.get(w, "O") for w in range(len(r["tokens"]))])  # a truncated word counts as O
    return {"f1": float(f1_score(y_true, y_pred)), "precision": float(precision_score(y_true, y_pred)),
            "recall": float(recall_score(y_true, y_pred))}


def curve_difference(losses: list[float], reference: list[float]) -> float | None:
    """Largest relative difference between two logged loss curves (None if they log different steps)."""
    if len(losses) != len(reference):
        return None
    return max((abs(a - b) / abs(b) for a, b in zip(losses, reference) if b), default=0.0)


def summarise(runs: list[dict], backends: list[str], seeds: list[int]) -> dict:
    import numpy as np
    table = {}
    by = {(r["backend"], r["seed"]): r for r in runs}
    for backend in backends:
        f1 = [100 * by[backend, s]["f1"] for s in seeds]
        row = {"f1_mean": round(float(np.mean(f1)), 3), "f1_std": round(float(np.std(f1)), 3),
               "f1_min": round(float(min(f1)), 3), "f1_max": round(float(max(f1)), 3), "f1_per_seed": [round(float(v), 3) for v in f1]}
        if "hf" in backends:
            diffs = [100 * (by[backend, s]["f1"] - by["hf", s]["f1"]) for s in seeds]
            row["f1_mean_minus_hf"] = round(row["f1_mean"] - table["hf"]["f1_mean"] if backend != "hf" else 0.0, 3)
            row["f1_minus_hf_per_seed"] = [round(float(d), 3) for d in diffs]
            row["within_0.5_of_hf"] = abs(row["f1_mean_minus_hf"]) <= 0.5
            row["loss_curve_max_rel_diff_to_hf"] = [by[backend, s]["loss_curve_max_rel_diff_to_hf"] for s in seeds]
        table[backend] = row
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", nargs="+", default=BACKENDS, choices=BACKENDS)
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    p.add_argument("--train-samples", type=int, default=2000)
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for training and scoring (shared machine)")
    p.add_argument("--output", type=Path, default=RESULTS / "backends_defaults.json")
    p.add_argument("--attach", action="append", default=[], metavar="NAME=JSON",
                   help="copy an earlier result of this script into this one under NAME")
    args = p.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"CoNLL-2003 data not found at {DATA}")
    import torch
    torch.set_num_threads(args.threads)
    backends = ["hf"] + [b for b in args.backends if b != "hf"] if "hf" in args.backends else args.backends
    validation = read_jsonl(DATA / "validation.jsonl")
    load_before, runs = os.getloadavg(), []
    with tempfile.TemporaryDirectory(prefix="tunepipe-defaults-") as tmp:
        work = Path(tmp)
        train_file = work / "train.jsonl"  # the first N sentences, fields as given (tokens, ner_tags, ...)
        train_file.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(DATA / "train.jsonl",
                                                                                 args.train_samples)))
        for seed in args.seeds:
            reference = None
            for backend in backends:
                run = train(backend, seed, train_file, work, args)
                start = time.time()
                run.update(score(run.pop("model_dir"), validation), score_s=round(time.time() - start, 1))
                if backend == "hf":
                    reference = run["losses"]
                run["loss_curve_max_rel_diff_to_hf"] = (curve_difference(run["losses"], reference)
                                                        if reference is not None else None)
                runs.append(run)
                print(json.dumps({k: v for k, v in run.items() if k != "losses"}), flush=True)
    table = summarise(runs, backends, args.seeds)
    print(f"\nvalidation F1 (points), {len(args.seeds)} seed(s) {args.seeds}: mean, std, difference to hf")
    for backend, row in table.items():
        print(f"  {backend:22s} {row['f1_mean']:7.3f}  ±{row['f1_std']:.3f}  {row.get('f1_mean_minus_hf', 0):+.3f}"
              f"  per seed {row['f1_per_seed']}")
    result = {"job": {"model": "minilm", "task": "token_classification", "train_samples": args.train_samples,
                      "epochs": args.epochs, "seeds": args.seeds, "threads": args.threads,
                      "settings": "tunepipe defaults (bf16 autocast where the CPU has AVX512-BF16, group_by_length, "
                                  "token-weighted loss, dropout 0.1, batch 16, lr 5e-5, no warmup)",
                      "scoring": f"plain transformers, first sub-token, seqeval F1 on all {len(validation)} "
                                 "validation sentences"},
              "f1": table, "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "machine": machine(),
              "command": " ".join([Path(sys.executable).name] + sys.argv), "runs": runs}
    for item in args.attach:
        name, _, path = item.partition("=")
        result[name] = json.loads(Path(path).read_text())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
