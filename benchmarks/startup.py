"""Start-up of `tunepipe predict` and of a specs typo, in fresh processes (issue 15).

    python benchmarks/startup.py                       # N=5 of each, results in benchmarks/results/startup.json
    python benchmarks/startup.py --baseline HEAD~1     # the same, interleaved with the tunepipe of another commit

Trains a tiny MiniLM NER run once under --work (3 steps on examples/data/ner; reused while its specs are the same),
then times N fresh processes of
  - `tunepipe predict --model RUN --input "<one sentence>"` (the console script, as a user runs it),
  - `tunepipe train bad.yaml` with `training: {learning_rte: 1e-4}` (must fail with CONFIG_ERROR, exit 2),
  - the floor: a plain transformers script doing the same prediction (AutoTokenizer, AutoModelFor..., one forward),
and reports median and max wall seconds, the import-time top 10 of a predict (python -X importtime), and one
predict's phases (imports, locating the model, specs, tokenizer, model, forward, output, exit) with the seconds the
cyclic GC took and the heavy packages it imported. With --baseline REV, REV's tunepipe/ (git archive) runs the same
commands through PYTHONPATH, interleaved with the working tree's, so both see the same machine load.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SENTENCE = "Ada Lovelace worked with Charles Babbage in London ."
HEAVY = ("peft", "accelerate", "lightning", "datasets", "mlflow", "bitsandbytes", "torchao", "sklearn", "seqeval",
         "sacrebleu", "rouge_score", "pandas", "pyarrow", "scipy", "torch", "transformers")

RUN_SPECS = f"""task: token_classification
output_dir: {{run}}
model: minilm
data:
  train: {ROOT}/examples/data/ner/train.jsonl
  validation: {ROOT}/examples/data/ner/validation.jsonl
  text_column: tokens
  label_column: ner_tags
  max_length: 64
training:
  max_steps: 3
  per_device_train_batch_size: 8
  save_strategy: "no"
  eval_strategy: "no"
  disable_tqdm: true
"""
TYPO_SPECS = "training: {learning_rte: 1e-4}\n"

FLOOR = """import json, sys, torch
from transformers import AutoModelForTokenClassification, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForTokenClassification.from_pretrained(sys.argv[1]).eval()
with torch.inference_mode():
    ids = model(**tok([sys.argv[2]], return_tensors="pt")).logits.argmax(-1)[0].tolist()
print(json.dumps([model.config.id2label[i] for i in ids]))
"""

# One predict through cli.main as the console script runs it (argv=None), with the steps of
# InferencePipeLine._load_single wrapped in timers; printed as one JSON line on stderr.
PHASES = r"""import gc, json, sys, time
t0 = time.perf_counter()
gc_time, gc_start = [0.0], [0.0]
def _gc(phase, info):
    if phase == "start": gc_start[0] = time.perf_counter()
    else: gc_time[0] += time.perf_counter() - gc_start[0]
gc.callbacks.append(_gc)
import tunepipe.cli, tunepipe.serving.inference as inf, tunepipe.modeling.models as models
phases = {"import tunepipe.cli + inference": time.perf_counter() - t0}
def timed(owner, name, label):
    fn = getattr(owner, name)
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            phases[label] = phases.get(label, 0.0) + time.perf_counter() - t
    setattr(owner, name, wrapper)
timed(inf, "resolve_checkpoint", "locate the model")
timed(inf, "default_device", "default_device (imports torch)")
timed(inf, "task_of_checkpoint", "task of the run (specs.yaml)")
timed(inf, "make_task", "task bound to the run's specs")
for owner in (inf, models):  # inference binds it at import, or (older code) reads it from models when it runs
    if hasattr(owner, "adopt_model_config"):
        timed(owner, "adopt_model_config", "model config")
timed(inf, "load_tokenizer", "tokenizer")
timed(inf, "place", "place on device")
timed(inf.InferencePipeLine, "_load_single", "_load_single")
timed(inf.InferencePipeLine, "predict_grouped", "forward + post-processing")
sys.argv = ["tunepipe"] + sys.argv[1:]
try:
    rc = tunepipe.cli.main()
finally:
    single = phases.pop("_load_single", 0.0)
    phases["model (imports transformers' model classes, reads the weights)"] = single - sum(
        phases.get(k, 0.0) for k in ("task of the run (specs.yaml)", "task bound to the run's specs", "model config",
                                     "tokenizer", "place on device"))
    main_s = time.perf_counter() - t0
    phases["rest of the command (input, output)"] = main_s - sum(phases.values())
    heavy = sorted(m for m in HEAVY if m in sys.modules)
    print("PHASES " + json.dumps({"phases": phases, "main_s": main_s, "gc_s": gc_time[0], "end": time.time(),
                                  "heavy_modules": heavy}), file=sys.stderr, flush=True)
"""


def run_dir(work: Path) -> Path:
    """The tiny run, trained once; a finished one with the same specs is reused."""
    run = work / "run"
    specs = RUN_SPECS.format(run=run)
    specs_file = work / "run.yaml"
    if (run / "model" / "config.json").is_file() and specs_file.is_file() and specs_file.read_text() == specs:
        return run
    if run.exists():
        shutil.rmtree(run)
    specs_file.write_text(specs)
    print(f"training the tiny run in {run} ...", flush=True)
    subprocess.run([tunepipe_command()[0], "train", str(specs_file)], check=True, env=env(None),
                   stdout=subprocess.DEVNULL)
    return run


def tunepipe_command() -> list[str]:
    script = Path(sys.executable).with_name("tunepipe")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "tunepipe"]


def env(source: Path | None) -> dict[str, str]:
    out = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if source is not None:
        out["PYTHONPATH"] = os.pathsep.join([str(source)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return out


def timed_run(cmd: list[str], environ: dict[str, str], expect_rc: int = 0, expect: str | None = None) -> float:
    start = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=environ)
    wall = time.perf_counter() - start
    if p.returncode != expect_rc or (expect is not None and expect not in p.stdout + p.stderr):
        raise SystemExit(f"{' '.join(cmd)}: exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return wall


def summary(walls: list[float]) -> dict:
    return {"runs_s": [round(w, 3) for w in walls], "median_s": round(statistics.median(walls), 3),
            "max_s": round(max(walls), 3)}


def import_top(run: Path, environ: dict[str, str], n: int = 10) -> dict:
    """Top ``n`` imports of one predict by cumulative time, outermost first-imports only (python -X importtime)."""
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "tunepipe", "predict", "--model", str(run),
                        "--input", SENTENCE], capture_output=True, text=True, env=environ)
    rows = []
    for line in p.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        parts = line[len("import time:"):].split("|")
        self_us, cum_us, name = int(parts[0]), int(parts[1]), parts[2].rstrip()
        rows.append((name.lstrip(), len(name) - len(name.lstrip()), self_us, cum_us))
    outer = sorted((r for r in rows if r[1] == 1), key=lambda r: -r[3])
    by_self = sorted(rows, key=lambda r: -r[2])
    return {"total_import_s": round(sum(r[3] for r in outer) / 1e6, 3),
            "top_cumulative": [{"module": r[0], "cumulative_s": round(r[3] / 1e6, 3)} for r in outer[:n]],
            "top_self": [{"module": r[0], "self_s": round(r[2] / 1e6, 3)} for r in by_self[:n]]}


def phases(run: Path, environ: dict[str, str]) -> dict:
    code = f"HEAVY = {HEAVY!r}\n" + PHASES
    start = time.time()
    p = subprocess.run([sys.executable, "-c", code, "predict", "--model", str(run), "--input", SENTENCE],
                       capture_output=True, text=True, env=environ)
    end_wall = time.time()
    line = next((x for x in p.stderr.splitlines() if x.startswith("PHASES ")), None)
    if p.returncode != 0 or line is None:
        raise SystemExit(f"phases run failed: exit {p.returncode}\n{p.stderr[-3000:]}")
    data = json.loads(line[len("PHASES "):])
    return {"wall_s": round(end_wall - start, 3),
            "phases_s": {k: round(v, 3) for k, v in data["phases"].items()},
            "interpreter start (python, site)": round(end_wall - start - data["main_s"] - (end_wall - data["end"]), 3),
            "exit after main_s": round(end_wall - data["end"], 3),
            "cyclic_gc_during_main_s": round(data["gc_s"], 3),
            "heavy_modules_imported": data["heavy_modules"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "tunepipe-startup"),
                        help="work folder: the tiny run, the typo specs, a baseline's sources")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline", metavar="REV", help="also time the tunepipe/ of this git revision")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "startup.json"))
    args = parser.parse_args()
    work = Path(args.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    run = run_dir(work)
    bad = work / "bad.yaml"
    bad.write_text(TYPO_SPECS)
    floor_script = work / "floor.py"
    floor_script.write_text(FLOOR)

    sides = {"current": None}
    if args.baseline:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.baseline], check=True,
                             capture_output=True, text=True).stdout.strip()
        source = work / f"baseline-{rev}"
        if not (source / "tunepipe" / "__init__.py").is_file():
            source.mkdir(parents=True, exist_ok=True)
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "tunepipe"], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
        sides = {f"baseline {rev}": source, "current": None}

    cli = tunepipe_command()
    predict_cmd = cli + ["predict", "--model", str(run), "--input", SENTENCE]
    typo_cmd = cli + ["train", str(bad)]
    floor_cmd = [sys.executable, str(floor_script), str(run / "model"), SENTENCE]
    load_before = os.getloadavg()
    walls: dict[str, list[float]] = {}
    for _ in range(max(1, args.runs)):  # interleaved: every side sees the same load
        for name, source in sides.items():
            walls.setdefault(f"predict {name}", []).append(timed_run(predict_cmd, env(source), 0, '"entities"'))
            walls.setdefault(f"typo {name}", []).append(timed_run(typo_cmd, env(source), 2, "learning_rte"))
        walls.setdefault("floor", []).append(timed_run(floor_cmd, env(None)))
    load_after = os.getloadavg()

    import torch
    import transformers
    results = {
        "command": " ".join(["tunepipe", "predict", "--model", "RUN", "--input", json.dumps(SENTENCE)]),
        "typo_command": "tunepipe train bad.yaml  # " + TYPO_SPECS.strip(),
        "floor_command": "python floor.py RUN/model SENTENCE  # plain transformers: tokenizer, model, one forward",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "torch_threads": torch.get_num_threads(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in load_after]},
        "runs": args.runs,
        "wall": {k: summary(v) for k, v in walls.items()},
        "import_time": import_top(run, env(None)),
        "phases_of_one_predict": phases(run, env(None)),
    }
    for name, source in sides.items():
        if source is not None:
            results[f"phases_of_one_predict {name}"] = phases(run, env(source))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")

    print(f"\n{os.cpu_count()} CPUs, load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    for name, w in results["wall"].items():
        print(f"  {name:<28} median {w['median_s']:6.2f} s   max {w['max_s']:6.2f} s   ({len(w['runs_s'])} runs)")
    print(f"\nimport time of one predict: {results['import_time']['total_import_s']:.2f} s; top 10 (cumulative):")
    for row in results["import_time"]["top_cumulative"]:
        print(f"  {row['cumulative_s']:6.3f} s  {row['module']}")
    ph = results["phases_of_one_predict"]
    print(f"\nphases of one predict ({ph['wall_s']:.2f} s wall):")
    print(f"  {ph['interpreter start (python, site)']:6.3f} s  interpreter start")
    for name, seconds in ph["phases_s"].items():
        print(f"  {seconds:6.3f} s  {name}")
    print(f"  {ph['exit after main_s']:6.3f} s  exit after main")
    print(f"  (cyclic GC during main: {ph['cyclic_gc_during_main_s']:.3f} s; heavy packages imported: "
          f"{', '.join(ph['heavy_modules_imported'])})")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
