"""What a user sees during and after a run: training_curves.svg on every backend (and in the card), a quiet CLI
with a metrics table and a last line that says where the run is, errors logged in the run's own directory only,
training.report_to (TensorBoard, W&B) and a generation progress bar per batch."""
import json
import os
import random
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from tunepipe.cli import main
from tunepipe.pipeline import FineTunePipeLine

SVG = "{http://www.w3.org/2000/svg}"


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def _series(svg: Path, label: str):
    """(polyline points, marker count) of one series of the chart, over all its panels; None when not drawn."""
    root = ET.parse(svg).getroot()  # a parse error fails the test: the file must be well-formed XML
    assert root.tag == f"{SVG}svg"
    groups = [g for g in root.iter(f"{SVG}g") if g.get("data-series") == label]
    if not groups:
        return None
    points = [p for g in groups for line in g.findall(f"{SVG}polyline") for p in line.get("points").split()]
    return points, sum(len(g.findall(f"{SVG}circle")) for g in groups)


# ---- the plot ------------------------------------------------------------------------------------------------------
def test_curves_have_one_point_per_logged_step_and_the_card_shows_them(tiny_specs, ner_data, one_torch_thread):
    specs = tiny_specs("token_classification", ner_data, training={"num_train_epochs": 2, "logging_steps": 1})
    pipe = FineTunePipeLine(specs)
    pipe.run()
    run = Path(specs["output_dir"])
    log, svg = _log(run), run / "training_curves.svg"
    losses = [r for r in log if "loss" in r]
    evals = [r for r in log if "eval_loss" in r]
    assert len(losses) == 24 and len(evals) == 2  # 96 examples / 8 per batch x 2 epochs; one evaluation per epoch
    points, _ = _series(svg, "training loss")
    assert len(points) == len(losses)
    # the drawn points keep the logged order and values: y rises where the loss falls (SVG y points down)
    ys = [float(p.split(",")[1]) for p in points]
    for i in range(1, len(losses)):
        if losses[i]["loss"] != losses[i - 1]["loss"]:
            assert (ys[i] < ys[i - 1]) == (losses[i]["loss"] > losses[i - 1]["loss"])
    assert _series(svg, "evaluation loss")[1] == 2
    assert _series(svg, "evaluation f1")[1] == 2  # the task's main metric, one marker per evaluation
    assert _series(svg, "final evaluation")[1] == 2  # final loss and final f1, one in each panel
    assert "![training curves](training_curves.svg)" in (run / "README.md").read_text()


@pytest.mark.parametrize("backend", ["hf", "accelerate", "lightning"])
def test_every_backend_writes_the_curves(backend, tiny_specs, ner_data, one_torch_thread):
    if backend == "lightning":
        pytest.importorskip("lightning")
    specs = tiny_specs("token_classification", ner_data, backend=backend, training={"max_steps": 4})
    FineTunePipeLine(specs).run()
    run = Path(specs["output_dir"])
    points, _ = _series(run / "training_curves.svg", "training loss")
    assert len(points) == len([r for r in _log(run) if "loss" in r]) == 2  # logging_steps 2 of 4 steps


def test_curves_skip_broken_lines_and_non_finite_values_and_stay_small(tmp_path):
    from tunepipe.tracking.plots import MAX_POINTS, write_training_curves
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 30_001)]
    lines += [json.dumps({"step": 30_001, "loss": float("nan")}), '{"step": 30002, "lo']  # NaN, a cut line
    (tmp_path / "train_log.jsonl").write_text("\n".join(lines) + "\n")
    svg = write_training_curves(tmp_path, metric="f1")
    points, _ = _series(svg, "training loss")
    assert MAX_POINTS // 2 < len(points) <= MAX_POINTS + 1
    xs = [float(p.split(",")[0]) for p in points]
    assert xs == sorted(xs) and xs[-1] > xs[-2]  # thinned in order, the last finite step kept
    assert _series(svg, "evaluation f1") is None  # no evaluation reported f1: no metric panel
    assert svg.stat().st_size < 400_000
    assert write_training_curves(tmp_path / "nothing") is None  # no log: no plot, no error


# ---- the CLI: quiet, a metrics table, where the run is -------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained_bert(tmp_path_factory, tokenizer_dir):
    """A tiny BERT saved without a task head: token classification loads it with a new head, the case transformers
    prints its LOAD REPORT table for."""
    from transformers import AutoTokenizer, BertConfig, BertModel
    out = tmp_path_factory.mktemp("bert")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


# A stand-in library emits a FutureWarning while the command runs (no library does on this tiny run), next to one
# attributed to tunepipe, which must always show.
CLI = textwrap.dedent("""
    import sys, warnings
    import tunepipe.pipeline as p
    setup = p.FineTunePipeLine.setup
    def noisy_setup(self, *a, **k):
        warnings.warn_explicit("old_arg is deprecated", FutureWarning, "fake_lib.py", 1, module="fake_lib")
        warnings.warn_explicit("tunepipe notice", FutureWarning, "tunepipe/x.py", 1, module="tunepipe.x")
        return setup(self, *a, **k)
    p.FineTunePipeLine.setup = noisy_setup
    from tunepipe.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True, timeout=300, env=env)


def test_cli_run_is_quiet_prints_a_table_and_says_where_the_run_is(tmp_path, ner_data, pretrained_bert):
    out = tmp_path / "run"
    config = tmp_path / "ner.yaml"
    config.write_text(yaml.safe_dump({
        "task": "token_classification", "output_dir": str(out), "model": pretrained_bert,
        "data": {"train": ner_data["train"], "validation": ner_data["validation"]},
        "training": {"max_steps": 4, "logging_steps": 2, "per_device_train_batch_size": 8, "save_strategy": "no",
                     "dataloader_pin_memory": False}}))
    result = _cli("train", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOAD REPORT" not in result.stderr and "old_arg is deprecated" not in result.stderr
    assert "FutureWarning: tunepipe notice" in result.stderr  # tunepipe's own warnings stay
    table = result.stdout[result.stdout.index("validation metrics"):].splitlines()
    assert table[1].split() == ["metric", "value"]
    rows = {line.split()[0]: line.split()[1] for line in table[3:] if len(line.split()) == 2}
    metrics = json.loads((out / "metrics.json").read_text())["validation"]
    assert float(rows["f1"]) == pytest.approx(metrics["f1"], abs=1e-4) and "LOC_support" not in rows
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"tunepipe: run saved in {out} — open {out / 'README.md'}, {out / 'training_curves.svg'}"
    assert (out / "training_curves.svg").is_file() and not (out / "tunepipe.log").exists()

    debug = _cli("--debug", "train", str(config), "--set", "training.max_steps=1", "--set", "data.validation=null",
                 "--output-dir", str(tmp_path / "debug"))
    assert debug.returncode == 0, debug.stderr[-3000:]
    assert "LOAD REPORT" in debug.stderr and "FutureWarning: old_arg is deprecated" in debug.stderr


def test_final_line_names_the_mlflow_ui_command(tmp_path):
    from tunepipe.console import run_summary
    from tunepipe.specs import load_specs
    from tunepipe.tracking.mlflow_run import MlflowTracker
    specs = load_specs({"task": "ner", "model": "m", "output_dir": str(tmp_path), "data": {"train": "x"},
                        "tracking": {"mlflow": {}}})
    tracker = MlflowTracker(specs.tracking.mlflow, specs, tmp_path)
    line = run_summary(tmp_path, type("T", (), {"mlflow": tracker})())
    assert line.startswith(f"run saved in {tmp_path} — open {tmp_path / 'README.md'}")
    assert line.endswith(f"; MLflow: mlflow ui --backend-store-uri sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db")
    assert "TensorBoard: tensorboard --logdir " + str(tmp_path / "tensorboard") in run_summary(
        tmp_path, None, ["tensorboard"])


# ---- errors in the run's own log ----------------------------------------------------------------------------------
def _bad_config(tmp_path, output_dir) -> str:
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"tokens": ["a", "b"], "ner_tags": ["O"]}) + "\n")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"task": "ner", "model": "minilm", "output_dir": str(output_dir),
                                    "data": {"train": str(data)}}))
    return str(path)


def test_a_failing_run_into_its_own_directory_appends_to_tunepipe_log(tmp_path, capsys):
    from tunepipe.ownership import write_marker
    run = tmp_path / "run"
    run.mkdir()
    write_marker(run, "run")
    config = _bad_config(tmp_path, run)
    for _ in range(2):
        assert main(["train", config]) == 2
    err = capsys.readouterr().err
    assert "VALIDATION_ERROR" in err  # the console message stays
    text = (run / "tunepipe.log").read_text()
    entries = [e for e in text.split("\n\n") if e.strip()]
    assert len(entries) == 2  # appended, not replaced
    head, message = entries[0].splitlines()[:2]
    assert head[:4].isdigit() and head.endswith(f"tunepipe train {config}")  # time, then the command
    assert message.startswith("error: [VALIDATION_ERROR]") and "2 tokens but 1 tags" in entries[0]


def test_no_log_where_tunepipe_does_not_own_the_directory(tmp_path, capsys):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    assert main(["train", _bad_config(tmp_path, theirs)]) == 2
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]
    missing = tmp_path / "missing"
    assert main(["train", _bad_config(tmp_path, missing)]) == 2
    assert not missing.exists()  # never created just to hold a log
    assert "VALIDATION_ERROR" in capsys.readouterr().err


def test_the_log_is_never_written_through_a_symlink(tmp_path, capsys):
    from tunepipe.ownership import write_marker
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere.txt"
    run.mkdir()
    write_marker(run, "run")
    elsewhere.write_text("untouched\n")
    (run / "tunepipe.log").symlink_to(elsewhere)
    assert main(["train", _bad_config(tmp_path, run)]) == 2
    assert elsewhere.read_text() == "untouched\n"
    assert "VALIDATION_ERROR" in capsys.readouterr().err


# ---- training.report_to ------------------------------------------------------------------------------------------
def _scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    runs = [p.parent for p in logdir.rglob("events.out.tfevents.*")]
    assert runs, f"no event files under {logdir}"
    values = []
    for run in set(runs):
        acc = EventAccumulator(str(run))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values += [(e.step, e.value) for e in acc.Scalars(tag)]
    return sorted(values)


@pytest.mark.parametrize("backend", ["hf", "accelerate"])
def test_tensorboard_gets_every_logged_loss_in_the_run_directory(backend, tiny_specs, ner_data, one_torch_thread):
    pytest.importorskip("tensorboard")
    specs = tiny_specs("token_classification", ner_data, backend=backend,
                       training={"max_steps": 4, "logging_steps": 1, "report_to": "tensorboard"})
    FineTunePipeLine(specs).run()
    run = Path(specs["output_dir"])
    logged = [(r["step"], r["loss"]) for r in _log(run) if "loss" in r]
    assert len(logged) == 4
    got = _scalars(run / "tensorboard", "train/loss")
    assert [s for s, _ in got] == [s for s, _ in logged]
    assert [v for _, v in got] == pytest.approx([v for _, v in logged], rel=1e-5)
    assert not list((run / "checkpoints").rglob("events.out.tfevents.*"))


def test_report_to_is_checked_before_anything_runs(tiny_specs, ner_data, monkeypatch):
    import importlib.util

    from tunepipe.tracking import reporting
    from tunepipe.errors import ConfigError, DependencyError
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(reporting.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    specs = tiny_specs("token_classification", ner_data, training={"report_to": ["tensorboard"]})
    with pytest.raises(DependencyError) as e:
        FineTunePipeLine(specs).run()
    assert e.value.code == "IMPORT_ERROR" and "pip install 'tunepipe[tensorboard]'" in e.value.render()
    assert not Path(specs["output_dir"]).exists()  # refused before the run directory was made

    def check(backend="hf", **training):
        from tunepipe.specs import load_specs
        return reporting.check_report_to(load_specs({"task": "ner", "model": "m", "data": {"train": "x"},
                                                      "backend": backend, "training": training}))

    with pytest.raises(ConfigError, match="did you mean 'tensorboard'"):
        check(report_to="tensorbord")
    with pytest.raises(ConfigError, match="backend hf") as e:
        check("lightning", report_to="wandb")  # W&B's callback needs the Trainer: refused, not dropped
    assert e.value.field == "training.report_to"
    with pytest.raises(ConfigError, match="twice"):
        from tunepipe.specs import load_specs
        reporting.check_report_to(load_specs({"task": "ner", "model": "m", "data": {"train": "x"},
                                              "training": {"report_to": "mlflow"}, "tracking": {"mlflow": {}}}))
    assert check(report_to="none") == [] and check(report_to=["none"]) == []
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(DependencyError, match=r"pip install 'tunepipe\[wandb\]'"):
            check(report_to="wandb")


# ---- generation progress ------------------------------------------------------------------------------------------
def test_generation_bar_moves_per_batch_and_per_decoding_step(capsys):
    import torch
    from transformers import TrainerControl, TrainerState

    from tunepipe.tracking.progress import GenerationProgress
    progress = GenerationProgress(max_new_tokens=8, eval_batch_size=4)
    model = torch.nn.Linear(2, 2).eval()
    progress.watch(model)
    progress.REFRESH_S = 0.0
    args, state, control = None, TrainerState(), TrainerControl()
    model(torch.zeros(1, 2))  # not armed: predictions after training stay quiet
    assert progress.bar is None
    progress.arm("validation", list(range(10)))  # 10 examples in batches of 4: 3 batches
    for _ in range(3):
        for _ in range(5):
            model(torch.zeros(1, 2))
        assert progress.steps == 5
        progress.on_prediction_step(args, state, control)
    bar = progress.bar
    assert (bar.n, bar.total) == (3, 3)
    progress.on_evaluate(args, state, control)
    progress.disarm()
    assert progress.bar is None
    err = capsys.readouterr().err
    assert "generating validation" in err and "decoding step 5/8" in err and "3/3" in err


def test_generation_bar_on_a_loop_backend(tmp_path, capsys, one_torch_thread):
    """The accelerate loop showed no evaluation bar at all: now one per evaluation, a tick per generated batch."""
    rng = random.Random(0)
    words = "man woman dog cat red blue big small runs sits eats the a on park house".split()
    rows = [{"translation": {"en": " ".join(rng.choice(words) for _ in range(4)), "de": "x"}} for _ in range(40)]
    data = tmp_path / "mt.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from tunepipe.tiny import train_unigram_tokenizer
    train_unigram_tokenizer([r["translation"]["en"] for r in rows] * 3 + ["x"], tmp_path / "tok", vocab_size=60)
    specs = {"task": "translation", "output_dir": str(tmp_path / "run"), "backend": "accelerate",
             "model": {"from_config": {"model_type": "t5", "d_model": 16, "d_ff": 32, "num_layers": 1,
                                       "num_heads": 2, "d_kv": 8}},
             "tokenizer": {"name_or_path": str(tmp_path / "tok")},
             "data": {"train": str(data), "validation": str(data), "source_lang": "en", "target_lang": "de"},
             "training": {"max_steps": 1, "per_device_eval_batch_size": 8, "save_strategy": "no",
                          "eval_strategy": "no", "dataloader_pin_memory": False},
             "generation": {"max_new_tokens": 4}}
    FineTunePipeLine(specs).run()
    err = capsys.readouterr().err.replace("\r", "\n")
    assert "generating validation: 100%" in err and "5/5" in err  # 40 examples in batches of 8
