"""NER inference: tunepipe's InferencePipeLine vs transformers.pipeline("token-classification",
aggregation_strategy="simple"), side by side on the same fine-tuned MiniLM and the same 1,000 CoNLL-2003 validation
sentences (joined with single spaces, the raw text both get).

A fine-tune comes first (reused when its output exists: --retrain to redo it). Throughput: the transformers
pipeline's call as the issue states it vs tunepipe's default call, in alternating rounds (hf, tunepipe, hf,
tunepipe) so load from other processes hits both alike; the best round of each is compared. Entity agreement
compares (label, start, end) character spans per sentence under the same aggregation rule: tunepipe's
aggregation_strategy="simple" against transformers' "simple", and tunepipe's default "first" (a word takes its
first piece's label, the piece training labels) against transformers' "first". Both are also scored against the
gold spans. Writes benchmarks/results/inference_ner.json.

    python benchmarks/inference_ner.py [--train-samples 5000 --epochs 3 --rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "conll2003"
RESULTS = Path(__file__).resolve().parent / "results"


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def fine_tune(args) -> tuple[Path, dict]:
    """A MiniLM NER fine-tune through FineTunePipeLine (recipe_vs_plain's NER budget: F1 ~0.88)."""
    out = Path(args.output_dir)
    if (out / "model" / "config.json").is_file() and not args.retrain:
        metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
        return out, {"reused": True, "validation_f1": metrics.get("validation", {}).get("f1")}
    from tunepipe import FineTunePipeLine
    specs = {"task": "token_classification", "output_dir": str(out), "model": "minilm",
             "data": {"train": str(DATA / "train.jsonl"), "validation": str(DATA / "validation.jsonl"),
                      "max_train_samples": args.train_samples, "max_eval_samples": 1000, "max_length": 128},
             "training": {"num_train_epochs": args.epochs, "learning_rate": 1e-4, "per_device_train_batch_size": 16,
                          "save_strategy": "no", "eval_strategy": "no", "logging_steps": 50, "disable_tqdm": True}}
    start = time.perf_counter()
    pipe = FineTunePipeLine(specs)
    pipe.run()
    return out, {"reused": False, "seconds": round(time.perf_counter() - start, 1),
                 "train_samples": args.train_samples, "epochs": args.epochs,
                 "validation_f1_1000": pipe.metrics.get("validation", {}).get("f1")}


def gold_spans(rows: list[dict]) -> list[set]:
    from tunepipe.tasks.token_classification import spans_from_tags
    out = []
    for r in rows:
        starts, pos = [], 0
        for w in r["tokens"]:
            starts.append(pos)
            pos += len(w) + 1
        out.append({(kind, starts[a], starts[b - 1] + len(r["tokens"][b - 1]))
                    for kind, a, b in spans_from_tags(r["ner_tags"])})
    return out


def span_sets(predictions: list[list[dict]], label_key: str) -> list[set]:
    return [{(e[label_key], e["start"], e["end"]) for e in ents} for ents in predictions]


def prf(pred: list[set], gold: list[set]) -> dict[str, float]:
    tp = sum(len(p & g) for p, g in zip(pred, gold))
    n_pred, n_gold = sum(map(len, pred)), sum(map(len, gold))
    p, r = tp / max(n_pred, 1), tp / max(n_gold, 1)
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(2 * p * r / max(p + r, 1e-12), 4)}


def agreement(ours: list[set], hf: list[set], texts: list[str]) -> dict:
    """Span-level agreement and a classification of every disagreement."""
    both = sum(len(a & b) for a, b in zip(ours, hf))
    union = sum(len(a | b) for a, b in zip(ours, hf))
    kinds: Counter = Counter()
    examples: dict[str, list] = {}
    for text, a, b in zip(texts, ours, hf):
        only_a, only_b = a - b, b - a
        for e in only_a:
            overlap = [f for f in only_b if f[1] < e[2] and e[1] < f[2]]
            if not overlap:
                kind = "only_tunepipe"
            elif any(f[0] == e[0] for f in overlap):
                kind = "same_label_other_boundaries"
            else:
                kind = "same_place_other_label"
            kinds[kind] += 1
            if len(examples.setdefault(kind, [])) < 5:
                examples[kind].append({"text": text, "tunepipe": [e[0], text[e[1]:e[2]]],
                                       "transformers": [[f[0], text[f[1]:f[2]]] for f in overlap]})
        for f in only_b:
            if not any(e[1] < f[2] and f[1] < e[2] for e in only_a):
                kinds["only_transformers"] += 1
                if len(examples.setdefault("only_transformers", [])) < 5:
                    examples["only_transformers"].append({"text": text, "transformers": [f[0], text[f[1]:f[2]]]})
    return {"identical_entities": both, "entities_tunepipe": sum(map(len, ours)), "entities_transformers":
            sum(map(len, hf)), "span_agreement_jaccard": round(both / max(union, 1), 4),
            "span_agreement_f1": prf(ours, hf)["f1"],
            "sentences_identical": round(sum(a == b for a, b in zip(ours, hf)) / len(ours), 4),
            "disagreements": dict(kinds), "examples": examples}


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/bench-inference-ner-5k")
    parser.add_argument("--train-samples", type=int, default=5000)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--retrain", action="store_true")
    args = parser.parse_args()
    load_start = os.getloadavg()
    run_dir, training = fine_tune(args)
    print(f"model: {run_dir} {training}", flush=True)

    import torch
    import transformers

    from tunepipe import InferencePipeLine
    rows = read_jsonl(DATA / "validation.jsonl", args.sentences)
    texts = [" ".join(r["tokens"]) for r in rows]
    model_dir = str(run_dir / "model")
    hf = transformers.pipeline("token-classification", model=model_dir, aggregation_strategy="simple")
    ours = InferencePipeLine(checkpoint=run_dir)  # its defaults: fp32, batch 32, length-sorted
    hf(texts[:4])
    ours.predict(texts[:4])  # warm-up

    times: dict[str, list[float]] = {"transformers": [], "tunepipe": []}
    for r in range(args.rounds):
        t, hf_out = timed(lambda: hf(texts))
        times["transformers"].append(t)
        t, our_out = timed(lambda: ours.predict(texts))
        times["tunepipe"].append(t)
        print(f"round {r + 1}: transformers {times['transformers'][-1]:.1f}s, tunepipe {times['tunepipe'][-1]:.1f}s",
              flush=True)
    extra = {}
    t, simple_out = timed(lambda: ours.predict(texts, aggregation_strategy="simple"))
    extra["tunepipe_simple"] = {"seconds": round(t, 2), "sentences_per_second": round(len(rows) / t, 1)}
    hf_first = transformers.pipeline("token-classification", model=model_dir, aggregation_strategy="first")
    t, first_out = timed(lambda: hf_first(texts))
    extra["transformers_first"] = {"seconds": round(t, 2), "sentences_per_second": round(len(rows) / t, 1)}
    t, words_out = timed(lambda: ours.predict([r["tokens"] for r in rows]))
    extra["tunepipe_pre_split_words"] = {"seconds": round(t, 2), "sentences_per_second": round(len(rows) / t, 1)}
    bf16 = InferencePipeLine(checkpoint=run_dir, dtype="bfloat16")
    bf16.predict(texts[:4])
    t, bf16_out = timed(lambda: bf16.predict(texts))
    extra["tunepipe_bf16"] = {"seconds": round(t, 2), "sentences_per_second": round(len(rows) / t, 1),
                              "span_agreement_with_fp32_f1": prf(span_sets([o["entities"] for o in bf16_out], "label"),
                                                                 span_sets([o["entities"] for o in our_out], "label")
                                                                 )["f1"]}

    gold = gold_spans(rows)
    ours_spans = span_sets([o["entities"] for o in our_out], "label")
    simple_spans = span_sets([o["entities"] for o in simple_out], "label")
    words_spans = span_sets([o["entities"] for o in words_out], "label")
    hf_spans = span_sets(hf_out, "entity_group")
    first_spans = span_sets(first_out, "entity_group")
    best = {k: min(v) for k, v in times.items()}
    result = {
        "benchmark": "NER inference: InferencePipeLine vs transformers token-classification pipeline",
        "model": "bundled MiniLM (all-MiniLM-L6-v2 encoder) fine-tuned on CoNLL-2003 train",
        "training": training,
        "sentences": len(rows),
        "transformers_call": 'pipeline("token-classification", model=dir, aggregation_strategy="simple")(texts)',
        "tunepipe_call": "InferencePipeLine(checkpoint=run_dir).predict(texts)  # aggregation_strategy='first'",
        "seconds_per_round": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "sentences_per_second": {k: round(len(rows) / v, 1) for k, v in best.items()},
        "throughput_ratio_tunepipe_over_transformers": round(best["transformers"] / best["tunepipe"], 2),
        "throughput_ratio_median_rounds": round(statistics.median(times["transformers"]) /
                                                statistics.median(times["tunepipe"]), 2),
        "throughput_ratio_same_rule_simple": round(best["transformers"] / extra["tunepipe_simple"]["seconds"], 2),
        "agreement_same_rule": {
            "simple": agreement(simple_spans, hf_spans, texts),
            "first": agreement(ours_spans, first_spans, texts)},
        "agreement_default_calls_first_vs_simple": agreement(ours_spans, hf_spans, texts),
        "agreement_pre_split_words_vs_transformers_first": agreement(words_spans, first_spans, texts),
        "gold_entity_scores": {"tunepipe_first": prf(ours_spans, gold), "tunepipe_simple": prf(simple_spans, gold),
                               "transformers_simple": prf(hf_spans, gold), "transformers_first": prf(first_spans, gold),
                               "tunepipe_pre_split_words": prf(words_spans, gold)},
        "extra": extra,
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                        "machine": platform.machine(), "loadavg_start": [round(x, 2) for x in load_start],
                        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                        "note": "other processes share this machine; both recipes ran interleaved in one process"},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "inference_ner.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"\nthroughput: tunepipe {result['sentences_per_second']['tunepipe']} sent/s, transformers "
          f"{result['sentences_per_second']['transformers']} sent/s -> ratio "
          f"{result['throughput_ratio_tunepipe_over_transformers']}x (same rule, simple: "
          f"{result['throughput_ratio_same_rule_simple']}x)")
    for rule, a in result["agreement_same_rule"].items():
        print(f"entities, both '{rule}': span F1 {a['span_agreement_f1']}, identical sentences "
              f"{a['sentences_identical']}, disagreements {a['disagreements']}")
    print("gold F1: " + ", ".join(f"{k} {v['f1']}" for k, v in result["gold_entity_scores"].items()))

if __name__ == "__main__":
    main()
