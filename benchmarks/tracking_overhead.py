"""What the resource monitor and MLflow tracking cost a training loop, side by side.

Job: a tiny BERT from config on generated NER data (tunepipe.demo), one thread, so that a step takes milliseconds
and every logging step's work shows. ``--logging-steps 1`` (the default) is the worst case: one MLflow request per
optimizer step. Modes, interleaved and repeated:

    none            tracking.resources: false, no MLflow
    monitor         the resource monitor only (the default)
    mlflow-server   monitor + MLflow against a real `mlflow server` on localhost (started here)
    mlflow-sqlite   monitor + MLflow in the default local SQLite store under output_dir

Timed: the trainer's own ``train_runtime`` (the training loop with its callbacks; setup, the store's table creation
and the artifact uploads after training are not in it). Reported: median seconds per mode, ratio to ``none``, and
the extra milliseconds per logging step.

    python benchmarks/tracking_overhead.py [--steps 200] [--logging-steps 1] [--repeats 3]

Writes benchmarks/results/tracking_overhead.json (``_log<N>.json`` for other logging intervals) with the load average before and after (other jobs on the
machine slow every mode, not evenly).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
RESULTS = Path(__file__).resolve().parent / "results"
TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 128}
MODES = ["none", "monitor", "mlflow-server", "mlflow-sqlite"]


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=1):
                return proc, uri
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("mlflow server did not start")


def specs_for(mode: str, out: Path, data: dict, tokenizer: str, args, uri: str) -> dict:
    specs = {"task": "token_classification", "output_dir": str(out), "model": {"from_config": dict(TINY_BERT)},
             "tokenizer": {"name_or_path": tokenizer}, "data": {"train": data["train"]},
             "training": {"max_steps": args.steps, "per_device_train_batch_size": 8, "learning_rate": 1e-3,
                          "logging_steps": args.logging_steps, "save_strategy": "no", "eval_strategy": "no",
                          "disable_tqdm": True, "dataloader_pin_memory": False, "seed": 0},
             "tracking": {"resources": mode != "none"}}
    if mode == "mlflow-server":
        specs["tracking"]["mlflow"] = {"tracking_uri": uri, "experiment": "overhead"}
    elif mode == "mlflow-sqlite":
        specs["tracking"]["mlflow"] = {"experiment": "overhead"}
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--logging-steps", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from tunepipe import FineTunePipeLine
    from tunepipe.demo import make_demo_ner
    from tunepipe.tiny import train_wordpiece_tokenizer
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="tracking-overhead-"))
    data = make_demo_ner(work / "data", n_train=512, n_validation=16)
    texts = [" ".join(json.loads(line)["tokens"]) for line in open(data["train"])]
    train_wordpiece_tokenizer(texts, work / "tok", vocab_size=400)
    (work / "server").mkdir()
    server, uri = start_server(work / "server")
    times: dict[str, list[float]] = {m: [] for m in MODES}
    try:
        for repeat in range(args.repeats + 1):  # the first round warms up (imports, allocator) and is dropped
            for mode in MODES:
                pipe = FineTunePipeLine(specs_for(mode, work / f"{mode}-{repeat}", data, str(work / "tok"), args,
                                                  uri))
                pipe.setup()
                result = pipe.train()
                if repeat:
                    times[mode].append(result.train_metrics["train_runtime"])
                print(f"round {repeat} {mode:14s} {result.train_metrics['train_runtime']:.3f} s", flush=True)
    finally:
        os.killpg(server.pid, 9)
        server.wait()
    logs = args.steps // args.logging_steps
    median = {m: statistics.median(v) for m, v in times.items()}
    report = {
        "job": f"tiny BERT (2 layers, hidden 32), generated NER, batch 8, {args.steps} steps, logging every "
               f"{args.logging_steps} step(s), 1 thread",
        "seconds": times, "median_seconds": median,
        "ratio_to_none": {m: round(median[m] / median["none"], 3) for m in MODES},
        "extra_ms_per_logging_step": {m: round(1000 * (median[m] - median["none"]) / logs, 2) for m in MODES},
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "cpus": os.cpu_count(),
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
    }
    import mlflow
    report["mlflow"] = mlflow.__version__
    RESULTS.mkdir(exist_ok=True)
    name = "tracking_overhead.json" if args.logging_steps == 1 else f"tracking_overhead_log{args.logging_steps}.json"
    (RESULTS / name).write_text(json.dumps(report, indent=2) + "\n")
    for m in MODES:
        print(f"{m:14s} median {median[m]:.3f} s  x{report['ratio_to_none'][m]:.3f}  "
              f"+{report['extra_ms_per_logging_step'][m]:.2f} ms per logging step")
    print(f"load average before {load_before}, after {report['loadavg_after']}")


if __name__ == "__main__":
    main()
