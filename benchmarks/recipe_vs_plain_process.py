"""Whole process, side by side: `tunepipe train` at its defaults against the plain run_ner recipe (plain_run_ner.py).

Issue 13's acceptance: on 2,000 and 5,000 CoNLL-2003 sentences at 1 and 2 epochs, same model (the bundled
MiniLM), learning rate and batch size, tunepipe's F1 must be ≥ plain's (mean of 3 seeds, no worse than −0.2 points)
and its whole-process wall time ≤ half of plain's.

Each run is a fresh process, timed from launch to exit: imports, reading and tokenizing the data, training, saving
the model, evaluating. tunepipe starts with an empty tokenization cache (a user's first run; a second run of the same
data would be faster). Both saved models are then scored by the same code, which shares nothing with either side
(backends_defaults.score: plain transformers, fp32, first sub-token of each word, seqeval F1 on the 1,000
validation sentences). The two sides alternate within each (size, epochs, seed), the side that goes first
alternating too, so drift in the machine's load hits both alike; CPU seconds of each process are recorded beside
wall seconds.

    python benchmarks/recipe_vs_plain_process.py                      # 2 sizes x 2 epoch counts x seeds 42 43 44
    python benchmarks/recipe_vs_plain_process.py --threads 1                  # while other jobs share the CPUs
    python benchmarks/recipe_vs_plain_process.py --sizes 2000 --epochs 1 --seeds 42 --output /tmp/x.json

Writes benchmarks/results/ner_vs_plain_process.json.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from backends_defaults import score
from backends_throughput import DATA, RESULTS, machine
from recipe_vs_plain import read_jsonl

HERE = Path(__file__).resolve().parent
LEARNING_RATE, BATCH_SIZE = 5e-5, 16  # tunepipe's token-classification defaults, given to both sides


def timed(cmd: list[str], env: dict, cwd: Path) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}


def ner_specs(train: Path, validation: Path, out: Path, epochs: float, seed: int) -> dict:
    """tunepipe's defaults for the job, with the learning rate and batch size given to both sides."""
    return {"task": "token_classification", "output_dir": str(out), "model": "minilm",
            "data": {"train": str(train), "validation": str(validation)},
            "training": {"num_train_epochs": epochs, "seed": seed, "learning_rate": LEARNING_RATE,
                         "per_device_train_batch_size": BATCH_SIZE}}


def run_tunepipe(train: Path, validation: Path, out: Path, epochs: float, seed: int, env: dict,
                 overrides: list[str] = ()) -> dict:
    config = out.with_suffix(".yaml")
    config.write_text(yaml.safe_dump(ner_specs(train, validation, out, epochs, seed)))
    cache = out.parent / f"{out.name}-cache"  # empty: the user's first run
    times = timed([sys.executable, "-m", "tunepipe", "train", str(config)]
                  + [arg for override in overrides for arg in ("--set", override)],
                  {**env, "TUNEPIPE_CACHE_DIR": str(cache)}, out.parent)
    return {**times, "model_dir": str(out / "model")}


def run_plain(train: Path, validation: Path, out: Path, epochs: float, seed: int, env: dict) -> dict:
    from tunepipe.modeling.model_paths import bundled_model_dir
    times = timed([sys.executable, str(HERE / "plain_run_ner.py"), "--model", str(bundled_model_dir()),
                   "--train", str(train), "--validation", str(validation), "--output", str(out),
                   "--epochs", str(epochs), "--lr", str(LEARNING_RATE), "--batch-size", str(BATCH_SIZE),
                   "--seed", str(seed)], env, out.parent)
    return {**times, "model_dir": str(out)}


def summarise(runs: list[dict]) -> list[dict]:
    import numpy as np
    rows = []
    for size, epochs in sorted({(r["train_sentences"], r["epochs"]) for r in runs}):
        group = [r for r in runs if (r["train_sentences"], r["epochs"]) == (size, epochs)]
        f1 = {side: [100 * r[side]["f1"] for r in group] for side in ("tunepipe", "plain")}
        wall = {side: sum(r[side]["wall_s"] for r in group) for side in ("tunepipe", "plain")}
        cpu = {side: sum(r[side]["cpu_s"] for r in group) for side in ("tunepipe", "plain")}
        delta = float(np.mean(f1["tunepipe"]) - np.mean(f1["plain"]))
        # the seeds are paired: the spread of the per-seed differences says how far the mean can be trusted
        diffs = np.subtract(f1["tunepipe"], f1["plain"])
        error = float(np.std(diffs, ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else None
        rows.append({"train_sentences": size, "epochs": epochs, "seeds": [r["seed"] for r in group],
                     "f1_tunepipe_mean": round(float(np.mean(f1["tunepipe"])), 2),
                     "f1_plain_mean": round(float(np.mean(f1["plain"])), 2),
                     "f1_tunepipe_per_seed": [round(v, 2) for v in f1["tunepipe"]],
                     "f1_plain_per_seed": [round(v, 2) for v in f1["plain"]],
                     "f1_delta_points": round(delta, 2), "f1_ok": delta >= -0.2,
                     "f1_delta_standard_error": None if error is None else round(error, 2),
                     "wall_ratio_plain_over_tunepipe": round(wall["plain"] / wall["tunepipe"], 2),
                     "cpu_ratio_plain_over_tunepipe": round(cpu["plain"] / cpu["tunepipe"], 2),
                     "wall_ok": wall["tunepipe"] <= wall["plain"] / 2})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000])
    p.add_argument("--epochs", type=float, nargs="+", default=[1, 2])
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (OMP_NUM_THREADS), for both sides and the scoring; default: "
                        "torch's own choice. On a shared machine 1 avoids OpenMP threads waiting on each other")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a specs override for the tunepipe side only (tunepipe train --set), e.g. "
                        "training.train_sampling_strategy=random; repeatable")
    p.add_argument("--only-tunepipe", action="store_true",
                   help="run the tunepipe side alone (an ablation); the summary then has no plain columns")
    p.add_argument("--output", type=Path, default=RESULTS / "ner_vs_plain_process.json")
    args = p.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"CoNLL-2003 data not found at {DATA}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
        env["OMP_NUM_THREADS"] = str(args.threads)
    validation_rows = read_jsonl(DATA / "validation.jsonl")
    load_before, runs, turn = os.getloadavg(), [], 0
    with tempfile.TemporaryDirectory(prefix="tunepipe-vs-plain-") as tmp:
        work = Path(tmp)
        validation = DATA / "validation.jsonl"
        for size in args.sizes:
            train = work / f"train-{size}.jsonl"
            train.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(DATA / "train.jsonl", size)))
            for epochs in args.epochs:
                for seed in args.seeds:
                    row = {"train_sentences": size, "epochs": epochs, "seed": seed}
                    sides = [("tunepipe", functools.partial(run_tunepipe, overrides=args.overrides)),
                             ("plain", run_plain)][:1 if args.only_tunepipe else 2]
                    for name, runner in (sides if turn % 2 == 0 else sides[::-1]):
                        row[name] = runner(train, validation, work / f"{name}-{size}-{epochs}-{seed}", epochs, seed,
                                           env)
                        row[name].update(score(row[name].pop("model_dir"), validation_rows))
                    turn += 1
                    runs.append(row)
                    print(json.dumps(row), flush=True)
    if args.only_tunepipe:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"overrides": args.overrides, "runs": runs, "machine": machine(),
                                           "command": " ".join([Path(sys.executable).name] + sys.argv)}, indent=2))
        return
    table = summarise(runs)
    print("\nsentences epochs  F1 tunepipe  F1 plain  delta (± s.e.)  wall plain/tunepipe  cpu plain/tunepipe")
    for r in table:
        error = "" if r["f1_delta_standard_error"] is None else f"± {r['f1_delta_standard_error']:.2f}"
        print(f"{r['train_sentences']:9d} {r['epochs']:6g}  {r['f1_tunepipe_mean']:11.2f}  {r['f1_plain_mean']:8.2f}"
              f"  {r['f1_delta_points']:+5.2f} {error:7s}  {r['wall_ratio_plain_over_tunepipe']:19.2f}"
              f"  {r['cpu_ratio_plain_over_tunepipe']:18.2f}")
    result = {"job": {"model": "minilm", "task": "token_classification", "learning_rate": LEARNING_RATE,
                      "batch_size": BATCH_SIZE, "threads": args.threads, "tunepipe_overrides": args.overrides,
                      "tunepipe": "defaults otherwise (python -m tunepipe train)",
                      "plain": "benchmarks/plain_run_ner.py (run_ner.py's defaults)",
                      "scoring": "backends_defaults.score on the validation split"},
              "summary": table, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "machine": machine(), "command": " ".join([Path(sys.executable).name] + sys.argv), "runs": runs}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
