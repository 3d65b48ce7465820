"""Same tokenized features from two checkouts of tunepipe: a data-layer change that gives bit-identical training
and validation features cannot change the quality comparisons (benchmarks/recipe_vs_plain.py) it feeds.

    python benchmarks/same_features.py --other /path/to/older/checkout

Tokenizes 5,000 CoNLL-2003 sentences (NER) and the SST-2 training file with the bundled MiniLM tokenizer in each
checkout (a fresh process each, its own empty cache) and compares a hash of every split. Writes
benchmarks/results/data_same_features.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CHILD = r'''
import hashlib, json, sys
from tunepipe.data import DatasetModules
from tunepipe.modeling.models import TokenizerModules
from tunepipe.specs import load_specs
from tunepipe.tasks import get_task
out = {}
for name, spec in json.loads(sys.argv[1]).items():
    specs = load_specs(spec)
    task = get_task(specs.task)(specs)
    prepared = DatasetModules(specs, task).prepare(TokenizerModules(specs).load(task))
    for split, ds in prepared.items():
        d = ds.to_dict()
        out[f"{name}/{split}"] = [len(ds), hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()]
print("RESULT " + json.dumps(out))
'''


def features(tree: Path, cases: dict) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "PYTHONPATH": str(tree), "TUNEPIPE_CACHE_DIR": cache, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cases)], env=env, capture_output=True,
                              text=True, cwd=tempfile.gettempdir())
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", required=True, help="another checkout of tunepipe (its repository root)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    ner = work / "ner_train.jsonl"
    ner.write_text("\n".join((DATA / "conll2003" / "train.jsonl").read_text().splitlines()[:5000]) + "\n")
    cases = {"ner": {"task": "token_classification", "model": "minilm",
                     "data": {"train": str(ner), "validation": str(DATA / "conll2003" / "validation.jsonl")}},
             "sst2": {"task": "text_classification", "model": "minilm",
                      "data": {"train": str(DATA / "sst2" / "train.jsonl"),
                               "validation": str(DATA / "sst2" / "validation.jsonl")}}}
    here, there = features(ROOT, cases), features(Path(args.other).resolve(), cases)
    rows = {k: {"rows": here[k][0], "same": here[k] == there.get(k)} for k in here}
    for key, row in rows.items():
        print(f"{key:18} {row['rows']:>6} rows  {'identical' if row['same'] else 'DIFFERENT'}")
    out = ROOT / "benchmarks" / "results" / "data_same_features.json"
    out.write_text(json.dumps({"command": "python benchmarks/same_features.py --other <checkout>", "splits": rows,
                               "all_identical": all(r["same"] for r in rows.values())}, indent=1) + "\n")
    sys.exit(0 if all(r["same"] for r in rows.values()) else 1)


if __name__ == "__main__":
    main()
