"""The CLI: fast --help, train/predict/evaluate end to end, and user errors without tracebacks."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunepipe.cli import main


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tunepipe", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_help_is_lazy():
    code = ("import sys, time; t = time.perf_counter(); from tunepipe.cli import build_parser; "
            "build_parser().format_help(); print(time.perf_counter() - t, 'torch' in sys.modules, "
            "'transformers' in sys.modules, 'pydantic' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1:] == ["False", "False", "False"]
    assert float(out[0]) < 0.5
    result = run_cli("--help")
    assert result.returncode == 0 and "tunepipe train" in result.stdout


def test_train_predict_evaluate_via_cli(tmp_path, tiny_specs, ner_data):
    config = tmp_path / "ner.yaml"
    specs = tiny_specs("token_classification", {"train": ner_data["train"], "validation": ner_data["validation"]})
    config.write_text(yaml.safe_dump(specs))
    out = tmp_path / "cli-run"
    result = run_cli("train", str(config), "--set", "training.num_train_epochs=2", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "validation metrics" in result.stdout and "f1" in result.stdout
    assert yaml.safe_load((out / "specs.yaml").read_text())["training"]["num_train_epochs"] == 2
    assert (out / "model" / "model.safetensors").is_file()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in log)

    result = run_cli("predict", "--model", str(out), "--input", "Greta Varga moved to Lisbon .")
    assert result.returncode == 0, result.stderr[-2000:]
    pred = json.loads(result.stdout.strip().splitlines()[-1])
    assert pred["tokens"] == ["Greta", "Varga", "moved", "to", "Lisbon", "."] and len(pred["tags"]) == 6

    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"tokens": ["Rosa", "left", "Cork"]}) + "\n" + json.dumps({"tokens": ["Hi"]}) + "\n")
    result = run_cli("predict", "--model", str(out / "model"), "--input", str(inputs), "--output",
                     str(tmp_path / "p.jsonl"))
    assert result.returncode == 0, result.stderr[-2000:]
    preds = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [p["tokens"] for p in preds] == [["Rosa", "left", "Cork"], ["Hi"]]

    result = run_cli("evaluate", str(config), "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "f1" in json.loads((out / "metrics.json").read_text())["validation"]


def _error_case(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert "->" in err  # at least one suggestion
    return err


def _config(tmp_path, specs) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(specs))
    return str(path)


def test_misspelt_key(tmp_path, capsys, ner_data):
    cfg = _config(tmp_path, {"task": "ner", "model": "minilm", "data": {"train": ner_data["train"]},
                             "trainig": {"learning_rate": 1e-4}})
    err = _error_case(capsys, ["train", cfg])
    assert "CONFIG_ERROR" in err and "'trainig'" in err and "did you mean 'training'" in err


def test_missing_data_file(tmp_path, capsys):
    cfg = _config(tmp_path, {"task": "ner", "model": "minilm", "output_dir": str(tmp_path / "o"),
                             "data": {"train": str(tmp_path / "trian.jsonl")}})
    (tmp_path / "train.jsonl").write_text("{}\n")
    err = _error_case(capsys, ["train", cfg])
    assert "DATASET_LOAD_ERROR" in err and "trian.jsonl" in err and "train.jsonl" in err
    assert not (tmp_path / "o").exists()  # nothing written on failure


def test_label_column_that_does_not_exist(tmp_path, capsys, ner_data):
    cfg = _config(tmp_path, {"task": "ner", "model": "minilm", "output_dir": str(tmp_path / "o"),
                             "data": {"train": ner_data["train"], "label_column": "ner_tag"}})
    err = _error_case(capsys, ["train", cfg])
    assert "'ner_tag' not found" in err and "data.label_column" in err and "ner_tags" in err
    assert not (tmp_path / "o").exists()


def test_malformed_jsonl_line(tmp_path, capsys, ner_data):
    lines = Path(ner_data["train"]).read_text().splitlines()
    lines[4] = lines[4][:-3]  # cut the closing of line 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    cfg = _config(tmp_path, {"task": "ner", "model": "minilm", "output_dir": str(tmp_path / "o"),
                             "data": {"train": str(bad)}})
    err = _error_case(capsys, ["train", cfg])
    assert f"{bad}:5" in err and "Malformed JSON" in err
    assert not (tmp_path / "o").exists()


def test_bad_record_names_file_and_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"tokens": ["a", "b"], "ner_tags": ["O", "O"]}) + "\n"
                    + json.dumps({"tokens": ["a", "b"], "ner_tags": ["O"]}) + "\n")
    cfg = _config(tmp_path, {"task": "ner", "model": "minilm", "data": {"train": str(data)}})
    err = _error_case(capsys, ["train", cfg])
    assert "VALIDATION_ERROR" in err and f"{data}:2" in err and "2 tokens but 1 tags" in err


def test_debug_shows_traceback(tmp_path):
    cfg = _config(tmp_path, {"task": "ner", "model": "minilm", "data": {"train": "nope.jsonl"}})
    result = run_cli("--debug", "train", cfg)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_tasks_and_init(tmp_path, capsys):
    assert main(["tasks"]) == 0
    listing = capsys.readouterr().out
    assert "token_classification" in listing and "text_classification" in listing
    target = tmp_path / "ner.yaml"
    assert main(["init", "ner", "-o", str(target)]) == 0
    text = target.read_text()
    assert text.startswith("# tunepipe specs for token_classification")
    from tunepipe.specs import load_specs
    assert load_specs(target).task == "token_classification"
    assert main(["init", "ner", "-o", str(target)]) == 2  # refuses to overwrite
    with pytest.raises(SystemExit):
        main(["init"])
