"""Start-up of `tunepipe predict` and of a specs typo (issue 15), guarded without timing: what a fresh process
imports, and how often Python's cyclic GC walks the heap on the way. benchmarks/startup.py has the seconds."""
import gc
import json
import subprocess
import sys

import pytest
import yaml

from tunepipe.cli import main

# never needed to predict with a full (non-PEFT) model, nor to report a specs typo
NOT_FOR_PREDICT = ("peft", "lightning", "mlflow", "datasets", "sklearn", "bitsandbytes", "torchao", "seqeval",
                   "sacrebleu", "rouge_score", "pandas", "pyarrow")
REPORT = ("import json, sys\n"
          "print('RESULT ' + json.dumps({'heavy': sorted(m for m in %r if m in sys.modules), **result}))\n")
SENTENCE = "Greta Varga flew from Lisbon to meet Bluefin Robotics ."


def fresh(code: str, heavy=NOT_FOR_PREDICT + ("torch", "transformers")) -> dict:
    """Run ``code`` (which sets ``result``) in a new interpreter; the packages of ``heavy`` it imported, and result."""
    p = subprocess.run([sys.executable, "-c", "result = {}\n" + code + "\n" + REPORT % (heavy,)],
                       capture_output=True, text=True, timeout=300)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, p.stderr[-3000:]
    return {**json.loads(line[len("RESULT "):]), "stderr": p.stderr}


def test_modules_of_the_predict_path_import_nothing_heavy():
    """Importing the CLI and every module predict runs through loads neither torch nor anything predict never
    uses: each command imports what it needs, when it needs it."""
    got = fresh("import tunepipe.cli, tunepipe.console, tunepipe.errors, tunepipe.serving.inference, "
                "tunepipe.serving.adapters, tunepipe.serving.model_loading, tunepipe.serving.shared_base, "
                "tunepipe.modeling.models, tunepipe.serving.load_policy, tunepipe.modeling.peft_support, "
                "tunepipe.modeling.quantization, tunepipe.modeling.type_utils, tunepipe.modeling.limits, "
                "tunepipe.data, tunepipe.specs, tunepipe.tasks, tunepipe.ownership\n"
                "from tunepipe.tasks import get_task, task_names\n"
                "[get_task(name) for name in task_names()]")
    assert got["heavy"] == []


def test_specs_typo_is_reported_before_torch(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: {learning_rte: 1e-4}\n")
    got = fresh(f"from tunepipe.cli import main\nresult['rc'] = main(['train', {str(bad)!r}])")
    assert got["rc"] == 2
    assert "learning_rte" in got["stderr"] and "did you mean 'learning_rate'" in got["stderr"]
    assert got["heavy"] == []  # no torch, no transformers: the typo is found in the specs alone


@pytest.fixture(scope="module")
def ner_run(tmp_path_factory, tokenizer_dir, ner_data):
    from conftest import TINY_BERT

    from tunepipe.pipeline import FineTunePipeLine
    out = tmp_path_factory.mktemp("startup") / "run"
    FineTunePipeLine({"task": "token_classification", "output_dir": str(out),
                      "model": {"from_config": dict(TINY_BERT)}, "tokenizer": {"name_or_path": tokenizer_dir},
                      "data": {"train": ner_data["train"]},
                      "training": {"max_steps": 2, "per_device_train_batch_size": 8, "save_strategy": "no",
                                   "disable_tqdm": True}}).run()
    return out


PREDICT_AS_PROGRAM = """import gc, io, sys, contextlib
full = [0]
gc.callbacks.append(lambda phase, info: full.__setitem__(0, full[0] + (phase == 'stop' and info['generation'] == 2)))
import tunepipe.cli
sys.argv = ['tunepipe', 'predict', '--model', %r, '--input', %r]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    result['rc'] = tunepipe.cli.main()  # argv=None: main is the process, as the console script runs it
result.update(prediction=out.getvalue(), full_collections=full[0], frozen=gc.get_freeze_count(),
              threshold=gc.get_threshold())
"""


def test_predict_process(ner_run, capsys):
    """A `tunepipe predict` process imports nothing it does not use, walks the whole heap with the cyclic GC at most
    once while torch/transformers import and the model loads (6 times before: ~0.6 s), and leaves the objects to
    the OS at exit (frozen: ~0.9 s of interpreter shutdown before); the prediction is the in-process one."""
    got = fresh(PREDICT_AS_PROGRAM % (str(ner_run), SENTENCE))
    assert got["rc"] == 0, got["stderr"][-2000:]
    assert got["heavy"] == ["torch", "transformers"]
    assert got["full_collections"] <= 1
    assert got["frozen"] > 0
    assert tuple(got["threshold"]) == gc.get_threshold()  # the default thresholds are back after the command

    before = (gc.get_threshold(), gc.get_freeze_count())
    assert main(["predict", "--model", str(ner_run), "--input", SENTENCE]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(got["prediction"])
    assert (gc.get_threshold(), gc.get_freeze_count()) == before  # a caller of main() keeps its own GC


def test_specs_of_the_run_need_no_trainer(ner_run):
    """Binding the run's task to its specs.yaml (what predict does) imports no trainer, peft or datasets."""
    specs = yaml.safe_load((ner_run / "specs.yaml").read_text())
    assert specs["task"] == "token_classification"
    got = fresh("import sys\nfrom tunepipe.serving.model_loading import make_task, resolve_checkpoint, task_of_checkpoint\n"
                f"ck = resolve_checkpoint({str(ner_run)!r})\n"
                "result['task'] = make_task(task_of_checkpoint(ck), ck.run_dir, ck.path).name\n"
                "result['trainers'] = sorted(m for m in sys.modules if m.startswith('tunepipe.trainers'))",
                heavy=NOT_FOR_PREDICT)
    assert got["task"] == "token_classification"
    assert got["heavy"] == [] and got["trainers"] == []
