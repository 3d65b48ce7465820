"""A run trained again into its own output_dir: a fresh history (no log lines or checkpoints of the old run mixed
into the new one), an unfinished run continued or explicitly started over (never silently discarded), and files a
user put inside tunepipe's directories (model/, checkpoints/) never deleted by a replacement."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tunepipe.cli import main as cli_main
from test_ownership import quick, snapshot, train_args, write_specs


def _specs(tiny_specs, ner_data, **training):
    specs = quick(tiny_specs("token_classification", {"train": ner_data["train"]}))
    specs["training"].update({"save_strategy": "steps", "save_steps": 1, "logging_steps": 1, **training})
    return specs


def _trained(tmp_path, tiny_specs, ner_data) -> tuple[Path, Path]:
    """(specs file, output_dir) of a finished run with a checkpoint per step."""
    specs = _specs(tiny_specs, ner_data)
    specs_file = write_specs(tmp_path / "specs.yaml", specs)
    assert cli_main(train_args(specs_file)) == 0
    return specs_file, Path(specs["output_dir"])


def _files(out: Path) -> dict[str, str]:
    """What a refusal must leave as it was (its error goes to tunepipe.log)."""
    return {k: v for k, v in snapshot(out).items() if k != "tunepipe.log"}


def _log_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_the_same_specs_trained_again_start_a_fresh_history(tmp_path, tiny_specs, ner_data, one_torch_thread):
    specs_file, out = _trained(tmp_path, tiny_specs, ner_data)
    first_log = _log_steps(out)
    old = {p.name: (p / "manifest.json").stat().st_mtime_ns for p in (out / "checkpoints").iterdir()}
    assert cli_main(train_args(specs_file)) == 0
    assert _log_steps(out) == first_log, "the old run's log lines must not stay in the new run's log"
    marker = json.loads((out / ".tunepipe.json").read_text())
    assert set(marker["written"]["model"]) == {str(p.relative_to(out / "model"))
                                               for p in (out / "model").rglob("*") if p.is_file()}
    new = {p.name: (p / "manifest.json").stat().st_mtime_ns for p in (out / "checkpoints").iterdir()}
    assert sorted(new) == sorted(old) and all(new[k] != old[k] for k in new), "the old run's checkpoints must go"


def test_an_unfinished_run_is_continued_or_started_over_never_discarded(tmp_path, tiny_specs, ner_data, capsys,
                                                                          one_torch_thread):
    specs_file, out = _trained(tmp_path, tiny_specs, ner_data)
    shutil.rmtree(out / "model")  # what an interrupted run leaves: checkpoints, no final model, no specs.yaml
    (out / "specs.yaml").unlink()
    before = _files(out)
    for command in ("train", "check"):
        assert cli_main([command, str(specs_file)]) == 2
        err = capsys.readouterr().err
        assert "unfinished run" in err and "checkpoint-2" in err and "training.resume=auto" in err and "--overwrite" in err
    assert _files(out) == before
    assert cli_main(train_args(specs_file, "--set", "training.resume=auto")) == 0
    assert (out / "model" / "config.json").is_file()
    shutil.rmtree(out / "model")
    assert cli_main(train_args(specs_file, "--overwrite")) == 0
    assert (out / "model" / "config.json").is_file() and _log_steps(out) == [1, 2, 2]


def test_files_a_user_added_inside_tunepipes_directories_are_never_deleted(tmp_path, tiny_specs, ner_data, capsys,
                                                                            one_torch_thread):
    specs_file, out = _trained(tmp_path, tiny_specs, ner_data)
    checkpoint = sorted((out / "checkpoints").iterdir())[0]
    added = [out / "model" / "my_notes.txt", out / "model" / "extra" / "keep.txt", checkpoint / "eval.txt",
             out / "checkpoints" / "notes.txt"]
    for i, path in enumerate(added):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"mine {i}")
        before = _files(out)
        for extra in ((), ("--overwrite",), ("--overwrite", "--set", "training.learning_rate=1e-4")):
            assert cli_main(train_args(specs_file, *extra)) == 2
            err = capsys.readouterr().err
            assert "did not write" in err and str(path.relative_to(out)) in err, err
            assert _files(out) == before
        path.unlink()
    assert cli_main(train_args(specs_file, "--overwrite")) == 0


def test_a_failed_run_leaves_no_empty_skeleton(tmp_path, tiny_specs, ner_data, one_torch_thread):
    """NaN at step 2, nothing saved: the output_dir this run created goes; with a logged step, the log and the
    curve of the failure stay, and no empty checkpoints/ beside them."""
    for logging_steps, kept in ((1000, None), (1, {".tunepipe.json", "train_log.jsonl", "training_curves.svg"})):
        specs = _specs(tiny_specs, ner_data, learning_rate=1e30, save_strategy="no", logging_steps=logging_steps,
                       max_steps=6)
        out = Path(specs["output_dir"]) / "new" / "run"
        specs["output_dir"] = str(out)
        assert cli_main(train_args(write_specs(tmp_path / "specs.yaml", specs))) == 2
        if kept is None:
            assert not out.parent.exists(), "the directories the failed run created must go"
        else:
            assert {p.name for p in out.iterdir()} - {"tunepipe.log"} == kept


def test_resuming_a_finished_run_keeps_its_training_metrics(tmp_path, tiny_specs, ner_data, one_torch_thread):
    """A scheduler that restarts a finished job with resume: auto must not erase what its training measured."""
    for backend in ("hf", "accelerate"):
        specs = _specs(tiny_specs, ner_data)
        specs["backend"] = backend
        specs["output_dir"] = str(tmp_path / backend)
        specs_file = write_specs(tmp_path / f"{backend}.yaml", specs)
        assert cli_main(train_args(specs_file)) == 0
        trained = json.loads((tmp_path / backend / "metrics.json").read_text())["train"]
        assert "train_loss" in trained
        assert cli_main(train_args(specs_file, "--set", "training.resume=auto")) == 0
        assert json.loads((tmp_path / backend / "metrics.json").read_text())["train"] == trained, backend
