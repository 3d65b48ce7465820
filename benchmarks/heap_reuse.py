"""`tunepipe train` with and without the heap reuse of tunepipe/heap_reuse.py, whole process, side by side.

The same NER job as recipe_vs_plain_process.py (bundled MiniLM, CoNLL-2003 sentences, tunepipe's defaults, lr 5e-5,
batch 16) runs as fresh processes, alternately with TUNEPIPE_HEAP_REUSE=0 and =1 (which goes first alternates too),
each with an empty tokenization cache. Reported per pair and as sums: wall, user and system seconds, minor page
faults and peak RSS of each process, and the F1 each run printed (the two must be equal: the setting changes where
freed memory goes, not one number of the computation).

    python benchmarks/heap_reuse.py                       # 2,000 sentences x 1 epoch, 4 pairs, 1 thread
    python benchmarks/heap_reuse.py --sentences 5000 --pairs 2 --threads 2

Writes benchmarks/results/heap_reuse.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from backends_throughput import DATA, RESULTS, machine
from recipe_vs_plain import read_jsonl
from recipe_vs_plain_process import ner_specs


def train_once(config: Path, cache: Path, reuse: bool, env: dict) -> dict:
    log = cache.with_suffix(".log")
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tunepipe", "train", str(config)], stdout=out,
                                stderr=subprocess.STDOUT, env={**env, "TUNEPIPE_HEAP_REUSE": "1" if reuse else "0",
                                                               "TUNEPIPE_CACHE_DIR": str(cache)})
        _, status, usage = os.wait4(proc.pid, 0)  # this process's own rusage, peak RSS included
    wall = time.perf_counter() - start
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"tunepipe train failed:\n{text[-4000:]}")
    f1 = re.search(r"^\s*f1\s+([0-9.]+)", text, re.MULTILINE)
    return {"wall_s": round(wall, 2), "user_s": round(usage.ru_utime, 2), "sys_s": round(usage.ru_stime, 2),
            "minor_faults": usage.ru_minflt, "max_rss_mb": round(usage.ru_maxrss / 1024),
            "f1": float(f1.group(1)) if f1 else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sentences", type=int, default=2000)
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    p.add_argument("--output", type=Path, default=RESULTS / "heap_reuse.json")
    args = p.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"CoNLL-2003 data not found at {DATA}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": str(args.threads)}
    pairs = []
    with tempfile.TemporaryDirectory(prefix="tunepipe-heap-") as tmp:
        work = Path(tmp)
        train = work / "train.jsonl"
        train.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(DATA / "train.jsonl", args.sentences)))
        for i in range(args.pairs):
            pair = {}
            for reuse in ((False, True) if i % 2 == 0 else (True, False)):
                name = "reuse" if reuse else "no_reuse"
                config = work / f"{name}-{i}.yaml"
                config.write_text(yaml.safe_dump(ner_specs(train, DATA / "validation.jsonl", work / f"{name}-{i}",
                                                           args.epochs, seed=42)))
                pair[name] = train_once(config, work / f"cache-{name}-{i}", reuse, env)
            pairs.append(pair)
            print(json.dumps(pair), flush=True)
    total = {side: {k: round(sum(p[side][k] for p in pairs), 2) for k in ("wall_s", "user_s", "sys_s", "minor_faults")}
             for side in ("no_reuse", "reuse")}
    summary = {"wall_ratio_no_reuse_over_reuse": round(total["no_reuse"]["wall_s"] / total["reuse"]["wall_s"], 3),
               "cpu_ratio_no_reuse_over_reuse": round(
                   (total["no_reuse"]["user_s"] + total["no_reuse"]["sys_s"])
                   / (total["reuse"]["user_s"] + total["reuse"]["sys_s"]), 3),
               "wall_ratio_per_pair": [round(p["no_reuse"]["wall_s"] / p["reuse"]["wall_s"], 3) for p in pairs],
               "max_rss_mb": {side: max(p[side]["max_rss_mb"] for p in pairs) for side in ("no_reuse", "reuse")},
               "same_f1": all(p["no_reuse"]["f1"] == p["reuse"]["f1"] for p in pairs), "totals": total}
    print(json.dumps(summary, indent=1))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "job": {"sentences": args.sentences, "epochs": args.epochs, "threads": args.threads, "model": "minilm",
                "task": "token_classification"},
        "summary": summary, "pairs": pairs, "loadavg": os.getloadavg(), "machine": machine(),
        "command": " ".join([Path(sys.executable).name] + sys.argv)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
