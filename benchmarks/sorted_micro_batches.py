"""Could random batches keep length groups' speed? Each random batch of 16 sorted by length and run as k
micro-batches (forward + backward each, losses weighted by their share of the batch, one optimizer step), which
gives exactly the gradient of the random batch, with less padding.

Measured per optimizer step on the bundled MiniLM (token classification, bf16 autocast, 1 CPU thread) over the
first 5,000 CoNLL-2003 training sentences, for: random batches; tunepipe's length groups of 8 batches; random
batches split into k = 2, 3, 4 sorted micro-batches. The sequence runs twice, interleaved, so machine drift hits
every variant alike; the table gives each one's median ms per step and its time over the length groups'.

    python benchmarks/sorted_micro_batches.py [--steps 60]

Writes benchmarks/results/sorted_micro_batches.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from backends_throughput import DATA, RESULTS, machine
from recipe_vs_plain import read_jsonl
from transformers import AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification

from tunepipe.modeling.model_paths import bundled_model_dir
from tunepipe.trainers.data import EpochSeededLengthGroupedSampler

BATCH = 16


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per variant and pass")
    p.add_argument("--sentences", type=int, default=5000)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model_dir = str(bundled_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = read_jsonl(DATA / "train.jsonl", args.sentences)
    enc = tokenizer([r["tokens"] for r in rows], is_split_into_words=True, truncation=True)
    features = [{"input_ids": ids, "attention_mask": mask, "labels": [0] * len(ids)}
                for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
    lengths = [len(f["input_ids"]) for f in features]
    collator = DataCollatorForTokenClassification(tokenizer)
    model = AutoModelForTokenClassification.from_pretrained(model_dir, num_labels=9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    shuffled = np.random.default_rng(0).permutation(len(lengths)).tolist()
    grouped = EpochSeededLengthGroupedSampler(BATCH, lengths, seed=0, group_batches=8).indices(0)

    def micro_batches(batch: list[int], k: int) -> list[list[int]]:
        ordered = sorted(batch, key=lengths.__getitem__)
        return [part.tolist() for part in np.array_split(np.array(ordered), k)]

    def step(parts: list[list[int]]) -> None:
        total = sum(len(part) for part in parts)
        for part in parts:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(**collator([features[i] for i in part])).loss
            (loss * len(part) / total).backward()
        optimizer.step()
        optimizer.zero_grad()

    def ms_per_step(order: list[int], k: int) -> float:
        batches = [order[i:i + BATCH] for i in range(0, BATCH * (args.steps + 1), BATCH)]
        step(micro_batches(batches[0], k))  # warm-up
        start = time.perf_counter()
        for batch in batches[1:]:
            step(micro_batches(batch, k))
        return 1000 * (time.perf_counter() - start) / args.steps

    variants = {"random": (shuffled, 1), "length groups of 8": (grouped, 1), "random, 2 sorted micro-batches":
                (shuffled, 2), "random, 3 sorted micro-batches": (shuffled, 3), "random, 4 sorted micro-batches":
                (shuffled, 4)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(2):
        for name, (order, k) in variants.items():
            times[name].append(ms_per_step(order, k))
            print(f"{name:34s} {times[name][-1]:7.1f} ms/step", flush=True)
    base = statistics.median(times["length groups of 8"])
    summary = {name: {"ms_per_step": round(statistics.median(t), 1),
                      "time_over_length_groups": round(statistics.median(t) / base, 2)} for name, t in times.items()}
    print("\nmedian ms per optimizer step, and time over length groups of 8:")
    for name, row in summary.items():
        print(f"  {name:34s} {row['ms_per_step']:7.1f}   x{row['time_over_length_groups']:.2f}")
    out = RESULTS / "sorted_micro_batches.json"
    out.write_text(json.dumps({"what": __doc__.split("\n\n")[0], "command": "python benchmarks/sorted_micro_batches.py",
                               "sentences": args.sentences, "steps_per_pass": args.steps, "machine": machine(),
                               "summary": summary, "runs_ms_per_step": times}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
