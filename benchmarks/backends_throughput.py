"""The four training backends on the same job, side by side: throughput (ratios to the HF backend), and 2-process
DDP against 1 process with the same global batch and steps (validation F1 must stay within 1 point).

Job: token classification on CoNLL-2003 (../shared/data/conll2003) with the bundled MiniLM encoder
(``model: minilm``), tunepipe's defaults otherwise (length-grouped batches, bf16 autocast where the CPU has it).
Every run is a fresh ``python -m tunepipe train`` process, started the way a user starts it:

    1 process        python -m tunepipe train specs.yaml                       (every backend)
    2 processes      hf:          torchrun --nproc_per_node 2 -m tunepipe train specs.yaml
                     accelerate:  accelerate launch --multi_gpu --num_processes 2 -m tunepipe train specs.yaml
                     lightning*:  python -m tunepipe train specs.yaml   with distributed: {devices: 2, strategy: ddp}

    python benchmarks/backends_throughput.py                       # both parts
    python benchmarks/backends_throughput.py --part throughput --train-samples 800
    python benchmarks/backends_throughput.py --part ddp --train-samples 2000 --epochs 1 [--seeds 42 43 44]

Writes benchmarks/results/backends_throughput.json and benchmarks/results/backends_ddp_f1.json (with the load
average before and after: other jobs on the machine slow every backend, not evenly).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "conll2003"
RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ["hf", "accelerate", "lightning", "lightning+accelerate"]
BIN = Path(sys.executable).parent


def specs_for(backend: str, out: Path, args, per_device_batch: int, processes: int, evaluate: bool) -> dict:
    specs = {"task": "token_classification", "output_dir": str(out), "backend": backend, "model": "minilm",
             "data": {"train": str(DATA / "train.jsonl"), "validation": str(DATA / "validation.jsonl"),
                      "max_train_samples": args.train_samples, "max_eval_samples": args.eval_samples},
             "training": {"num_train_epochs": args.epochs, "per_device_train_batch_size": per_device_batch,
                          "per_device_eval_batch_size": 64, "learning_rate": args.lr, "logging_steps": 10,
                          "save_strategy": "no", "eval_strategy": "no", "disable_tqdm": True, "seed": args.seed,
                          "dataloader_pin_memory": False}}
    if not evaluate:
        specs["data"].pop("validation")
    if processes > 1 and backend.startswith("lightning"):
        specs["distributed"] = {"devices": processes, "strategy": "ddp"}
    return specs


def command(backend: str, processes: int, port: int) -> list[str]:
    if processes == 1 or backend.startswith("lightning"):
        return [sys.executable, "-m", "tunepipe", "train"]
    if backend == "hf":
        return [str(BIN / "torchrun"), "--nproc_per_node", str(processes), "--master_port", str(port),
                "-m", "tunepipe", "train"]
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines",
            "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
            "-m", "tunepipe", "train"]


def run(backend: str, work: Path, args, per_device_batch: int, processes: int, evaluate: bool, port: int) -> dict:
    name = f"{backend.replace('+', '_')}-{processes}p-{int(time.time() * 1000) % 100000}"
    out = work / name
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump(specs_for(backend, out, args, per_device_batch, processes, evaluate)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": str(args.threads)}
    start = time.time()
    proc = subprocess.run(command(backend, processes, port) + [str(config)], env=env, cwd=work,
                          capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"{backend} ({processes} processes) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    train = metrics["train"]
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    row = {"backend": backend, "processes": processes, "per_device_batch": per_device_batch,
           "global_batch": per_device_batch * processes, "steps": max(r["step"] for r in records),
           "train_runtime_s": train["train_runtime"], "train_samples_per_second": train["train_samples_per_second"],
           "train_loss": train["train_loss"], "process_wall_s": round(wall, 1),
           "log_steps": [r["step"] for r in records if "loss" in r],
           "losses": [round(r["loss"], 5) for r in records if "loss" in r]}
    if evaluate:
        row.update({k: metrics["validation"][k] for k in ("f1", "precision", "recall", "accuracy", "loss")})
    print(json.dumps({k: v for k, v in row.items() if k not in ("losses", "log_steps")}), flush=True)
    return row


def machine() -> dict:
    import torch
    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "platform": platform.platform()}


def throughput(args, work: Path) -> dict:
    """Each backend twice, the second pass in reverse order (drift from other jobs hits every backend alike);
    the faster of the two runs counts."""
    load_before = os.getloadavg()
    runs = []
    for order in (BACKENDS, list(reversed(BACKENDS)))[: args.repeats]:
        for backend in order:
            runs.append(run(backend, work, args, args.batch, 1, evaluate=False, port=0))
    best = {b: max((r for r in runs if r["backend"] == b), key=lambda r: r["train_samples_per_second"])
            for b in BACKENDS}
    hf = best["hf"]["train_samples_per_second"]
    table = {b: {"train_samples_per_second": r["train_samples_per_second"], "train_runtime_s": r["train_runtime_s"],
                 "process_wall_s": r["process_wall_s"], "ratio_to_hf": round(r["train_samples_per_second"] / hf, 3),
                 "train_loss": r["train_loss"]} for b, r in best.items()}
    print("\nthroughput (samples/s, best of %d; ratio to hf)" % args.repeats)
    for b, r in table.items():
        print(f"  {b:22s} {r['train_samples_per_second']:8.2f}   x{r['ratio_to_hf']:.3f}   loss {r['train_loss']:.4f}")
    return {"job": {"model": "minilm", "task": "token_classification", "train_samples": args.train_samples,
                    "epochs": args.epochs, "batch": args.batch, "threads": args.threads, "precision": "tunepipe "
                    "default (bf16 autocast where the CPU has AVX512-BF16)", "sampling": "group_by_length"},
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "machine": machine(),
            "best": table, "runs": runs}


def ddp_f1(args, work: Path) -> dict:
    """1 process with batch B against 2 processes with batch B/2 each: the same global batch and steps, per seed;
    the summary compares the means over the seeds (one seed moves F1 by several points at this budget)."""
    import numpy as np
    load_before = os.getloadavg()
    rows, per_seed = [], {}
    for seed in args.seeds:
        args.seed = seed
        for i, backend in enumerate(args.backends):
            single = run(backend, work, args, args.global_batch, 1, evaluate=True, port=29600 + i)
            double = run(backend, work, args, args.global_batch // 2, 2, evaluate=True, port=29610 + i)
            rows += [{**single, "seed": seed}, {**double, "seed": seed}]
            per_seed.setdefault(backend, []).append((100 * single["f1"], 100 * double["f1"]))
            print(f"seed {seed} {backend:22s} 1 process {100 * single['f1']:.2f}  2 processes "
                  f"{100 * double['f1']:.2f}  steps {single['steps']}/{double['steps']}", flush=True)
    table = {}
    for backend, pairs in per_seed.items():
        one, two = np.array(pairs).T
        diff = float(two.mean() - one.mean())
        table[backend] = {"f1_1_process_mean": round(float(one.mean()), 2), "f1_2_processes_mean":
                          round(float(two.mean()), 2), "difference_of_means_points": round(diff, 2),
                          "within_1_point": abs(diff) <= 1.0,
                          "per_seed_differences": [round(float(b - a), 2) for a, b in pairs],
                          "f1_1_process_per_seed": [round(float(a), 2) for a in one],
                          "f1_2_processes_per_seed": [round(float(b), 2) for b in two]}
    print(f"\nvalidation F1: 1 process vs 2-process DDP (same global batch and steps), seeds {args.seeds}")
    for b, r in table.items():
        print(f"  {b:22s} {r['f1_1_process_mean']:.2f}  {r['f1_2_processes_mean']:.2f}  "
              f"diff {r['difference_of_means_points']:+.2f} points  per seed {r['per_seed_differences']}")
    return {"job": {"model": "minilm", "task": "token_classification", "train_samples": args.train_samples,
                    "eval_samples": args.eval_samples, "epochs": args.epochs, "global_batch": args.global_batch,
                    "lr": args.lr, "threads_per_process": args.threads, "seeds": args.seeds},
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "machine": machine(),
            "summary": table, "runs": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["throughput", "ddp", "all"], default="all")
    p.add_argument("--train-samples", type=int, default=1000)
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--batch", type=int, default=16, help="throughput part: batch size")
    p.add_argument("--global-batch", type=int, default=32, help="ddp part: global batch (halved per process)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=42, help="throughput part")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44], help="ddp part")
    p.add_argument("--backends", nargs="+", default=BACKENDS, choices=BACKENDS, help="ddp part")
    p.add_argument("--attach", metavar="JSON", help="ddp part: keep an earlier result in the new file (as "
                                                    "'earlier'), for comparison")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads per process (1 avoids oversubscribing a shared machine)")
    p.add_argument("--repeats", type=int, default=2, choices=[1, 2])
    args = p.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"CoNLL-2003 data not found at {DATA}")
    RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tunepipe-backends-") as tmp:
        work = Path(tmp)
        if args.part in ("throughput", "all"):
            result = throughput(args, work)
            (RESULTS / "backends_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
        if args.part in ("ddp", "all"):
            result = {"command": "python benchmarks/backends_throughput.py " + " ".join(sys.argv[1:]),
                      **ddp_f1(args, work)}
            if args.attach:
                result["earlier"] = json.loads(Path(args.attach).read_text())
            (RESULTS / "backends_ddp_f1.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
