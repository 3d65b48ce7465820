"""Data at scale: peak memory, time to the first optimizer step and second-run setup time, map-style vs streaming,
as the training file grows from 10^4 to 5·10^6 NER sentences (MiniLM, 3 steps; each run a fresh process).

    python benchmarks/data_scale.py [--sizes 10000 100000 1000000 5000000] [--map-max 1000000]

The files repeat the CoNLL-2003 training sentences (../shared/data/conll2003) with one word varied per copy, so no
two sentences of a copy are the same text. Map-style runs twice with the same cache folder: the first reads,
checks and tokenizes everything, the second finds both in the cache. Memory is read from /proc while the run goes:
``peak_rss_mb`` is the kernel's high-water mark of the resident set (VmHWM), ``peak_anon_mb`` the largest
anonymous part (RssAnon: memory the process allocated, without the pages of memory-mapped Arrow files, which are
page cache the kernel drops under pressure). Writes benchmarks/results/data_scale.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONLL = ROOT.parent / "shared" / "data" / "conll2003"
RESULTS = ROOT / "benchmarks" / "results"
LABELS = ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
VARIANTS = ["new", "old", "big", "small", "red", "blue", "north", "south", "early", "late"]


def build(path: Path, size: int) -> Path:
    """``size`` sentences: CoNLL training sentences in turn, copy k with word k % len varied (an O word gets a
    suffix from VARIANTS), so that sentences of one copy are not repeated verbatim."""
    if path.is_file() and path.stat().st_size > 0:
        return path
    base = [json.loads(line) for line in (CONLL / "train.jsonl").read_text().splitlines() if line.strip()]
    base = [{"tokens": r["tokens"], "ner_tags": r["ner_tags"]} for r in base if r["tokens"]]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(size):
            copy, row = divmod(i, len(base))
            record = base[row]
            if copy:
                tokens = list(record["tokens"])
                k = copy % len(tokens)
                if record["ner_tags"][k] == "O":
                    tokens[k] = f"{tokens[k]}-{VARIANTS[copy % len(VARIANTS)]}"
                record = {"tokens": tokens, "ner_tags": record["ner_tags"]}
            f.write(json.dumps(record) + "\n")
    tmp.rename(path)
    return path


CHILD = r'''
import json, os, resource, sys, threading, time
import psutil
start = psutil.Process().create_time()
peak = {"anon": 0, "hwm": 0}
def sample():
    while True:
        status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
        kb = lambda key: int(status.get(key, "0 kB").split()[0])
        peak["anon"] = max(peak["anon"], kb("RssAnon"))
        peak["hwm"] = max(peak["hwm"], kb("VmHWM"))
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
from transformers import TrainerCallback
from tunepipe.pipeline import FineTunePipeLine
specs = json.loads(sys.argv[1])
first = {}
class FirstStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        first.setdefault("t", time.time() - start)
pipe = FineTunePipeLine(specs)
t = time.time()
pipe.setup()
setup_s = time.time() - t
handler = pipe.trainer if hasattr(pipe.trainer, "add_callback") else pipe.trainer.handler
handler.add_callback(FirstStep())
pipe.train()
time.sleep(0.1)
print("RESULT " + json.dumps({"setup_s": round(setup_s, 2), "first_step_s": round(first["t"], 2),
                              "peak_rss_mb": round(max(peak["hwm"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024),
                              "peak_anon_mb": round(peak["anon"] / 1024),
                              "steps": pipe.train_result.global_step,
                              "cache": dict(pipe.data.cache_hits)}))
'''


def run(train: Path, validation: Path, mode: str, cache: Path, out: Path, steps: int) -> dict:
    specs = {"task": "token_classification", "output_dir": str(out), "model": "minilm", "backend": "accelerate",
             "data": {"train": str(train), "validation": str(validation), "labels": LABELS, "max_eval_samples": 200,
                      "streaming": mode == "streaming"},
             "training": {"max_steps": steps, "per_device_train_batch_size": 16, "save_strategy": "no",
                          "eval_strategy": "no", "disable_tqdm": True, "logging_steps": 1}}
    env = {**os.environ, "TUNEPIPE_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(specs)], env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 5_000_000])
    parser.add_argument("--map-max", type=int, default=1_000_000, help="largest size also run map-style")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["streaming", "map"], choices=["streaming", "map"])
    parser.add_argument("--work", default="/tmp/tunepipe-data-scale", help="where the files and caches go")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    validation = work / "validation.jsonl"
    validation.write_text((CONLL / "validation.jsonl").read_text())
    rows = []
    for size in args.sizes:
        t = time.time()
        train = build(work / f"train-{size}.jsonl", size)
        print(f"{size:>9,} sentences: {train.stat().st_size / 2**20:,.0f} MiB (built in {time.time() - t:.0f} s)",
              flush=True)
        modes = [m for m in args.modes if m == "streaming" or size <= args.map_max]
        for mode in modes:
            cache = work / f"cache-{mode}-{size}"
            subprocess.run(["rm", "-rf", str(cache), str(work / "run")])
            first = run(train, validation, mode, cache, work / "run", args.steps)
            subprocess.run(["rm", "-rf", str(work / "run")])
            second = run(train, validation, mode, cache, work / "run", args.steps)
            subprocess.run(["rm", "-rf", str(cache), str(work / "run")])
            row = {"size": size, "mode": mode, "first": first, "second": second,
                   "second_setup_ratio": round(second["setup_s"] / max(first["setup_s"], 1e-9), 3)}
            rows.append(row)
            print(f"  {mode:9} peak RSS {first['peak_rss_mb']:>5} MB (anon {first['peak_anon_mb']:>5}), first step "
                  f"{first['first_step_s']:>6.1f} s, setup {first['setup_s']:>6.1f} s -> second run "
                  f"{second['setup_s']:.1f} s ({row['second_setup_ratio']:.1%})", flush=True)
    summary = {}
    for mode in ("streaming", "map"):
        mine = [r for r in rows if r["mode"] == mode]
        if len(mine) >= 2:
            low, high = mine[0], mine[-1]
            summary[mode] = {
                "sizes": [low["size"], high["size"]],
                "peak_rss_growth": round(high["first"]["peak_rss_mb"] / low["first"]["peak_rss_mb"] - 1, 3),
                "peak_anon_growth": round(high["first"]["peak_anon_mb"] / low["first"]["peak_anon_mb"] - 1, 3),
                "max_first_step_s": max(r["first"]["first_step_s"] for r in mine),
                "max_peak_rss_mb": max(r["first"]["peak_rss_mb"] for r in mine),
                "second_setup_ratio_at_largest": high["second_setup_ratio"]}
    print(json.dumps(summary, indent=1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"command": "python benchmarks/data_scale.py " + " ".join(sys.argv[1:]), "model": "minilm (bundled)",
              "backend": "accelerate", "steps": args.steps, "batch": 16, "cpus": os.cpu_count(),
              "rows": rows, "summary": summary}
    (RESULTS / "data_scale.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
