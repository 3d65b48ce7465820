"""tunepipe writes only where it may (tunepipe/ownership.py): a fresh or empty directory, or one tunepipe wrote;
never the current, home or root directory, never over its inputs; one process at a time; the user's umask.

Every refusal is checked to leave the directory's files exactly as they were."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tunepipe.cli import main as cli_main


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its content hash (what a refusal must leave unchanged)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def write_specs(path: Path, specs: dict) -> Path:
    import yaml
    path.write_text(yaml.safe_dump(specs), encoding="utf-8")
    return path


def quick(specs: dict) -> dict:
    specs["training"].update(max_steps=2, eval_strategy="no", bf16=False)
    return specs


def user_project(root: Path) -> Path:
    """A directory of the user's own: a README, metrics they computed, a model/ folder with a file."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text("# my project\n")
    (root / "metrics.json").write_text('{"mine": 1}\n')
    (root / "model").mkdir(exist_ok=True)
    (root / "model" / "weights.bin").write_bytes(b"\x00" * 64)
    return root


def train_args(specs_file: Path, *extra: str) -> list[str]:
    return ["train", str(specs_file), *extra]


# ---- refused directories -----------------------------------------------------------------------------------
def _existing_user_dir(tmp_path, specs):
    specs["output_dir"] = str(user_project(tmp_path / "project"))
    return tmp_path / "project"


def _current_dir(tmp_path, specs, monkeypatch):
    project = user_project(tmp_path / "cwd")
    monkeypatch.chdir(project)
    specs["output_dir"] = "."
    return project


def _home_dir(tmp_path, specs, monkeypatch):
    home = user_project(tmp_path / "home")
    monkeypatch.setenv("HOME", str(home))
    specs["output_dir"] = "~"
    return home


def _base_model_dir(tmp_path, specs):
    from transformers import BertConfig, BertForTokenClassification
    base = tmp_path / "base"
    BertForTokenClassification(BertConfig(vocab_size=400, hidden_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=64)).save_pretrained(base)
    specs["model"] = {"name_or_path": str(base)}
    specs["output_dir"] = str(base)
    return base


def _dir_holding_data(tmp_path, specs, ner_data):
    import shutil
    project = tmp_path / "data-dir"
    project.mkdir()
    shutil.copy(ner_data["train"], project / "train.jsonl")
    specs["data"]["train"] = str(project / "train.jsonl")
    specs["output_dir"] = str(project)
    return project


REFUSALS = {
    "existing user directory": _existing_user_dir,
    "current directory": _current_dir,
    "home directory": _home_dir,
    "directory of the base model": _base_model_dir,
    "directory holding the training data": _dir_holding_data,
}


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "--overwrite"])
@pytest.mark.parametrize("case", list(REFUSALS))
def test_train_refuses_a_directory_it_did_not_write(case, overwrite, tmp_path, tiny_specs, ner_data, monkeypatch,
                                                    capsys):
    specs = quick(tiny_specs("token_classification", {"train": ner_data["train"]}))
    make = REFUSALS[case]
    params = make.__code__.co_varnames[:make.__code__.co_argcount]
    target = make(tmp_path, specs, **{k: v for k, v in {"monkeypatch": monkeypatch, "ner_data": ner_data}.items()
                                      if k in params})
    before = snapshot(target)
    specs_file = write_specs(tmp_path / "specs.yaml", specs)
    assert cli_main(train_args(specs_file, *(["--overwrite"] if overwrite else []))) == 2
    err = capsys.readouterr().err
    assert "[CONFIG_ERROR]" in err and "output_dir" in err
    assert snapshot(target) == before
    assert not (target / ".tunepipe.json").exists()


def test_the_filesystem_root_is_refused(tmp_path, tiny_specs, ner_data, capsys):
    specs = quick(tiny_specs("token_classification", {"train": ner_data["train"]}))
    specs["output_dir"] = "/"
    assert cli_main(train_args(write_specs(tmp_path / "specs.yaml", specs))) == 2
    assert "filesystem root" in capsys.readouterr().err


def test_a_symlink_loop_as_output_dir_is_a_config_error(tmp_path, tiny_specs, ner_data, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop")
    specs = quick(tiny_specs("token_classification", {"train": ner_data["train"]}))
    specs["output_dir"] = str(loop / "run")
    assert cli_main(train_args(write_specs(tmp_path / "specs.yaml", specs))) == 2
    assert "[CONFIG_ERROR]" in capsys.readouterr().err


# ---- what tunepipe may replace -----------------------------------------------------------------------------
def test_overwrite_replaces_a_previous_run_and_nothing_of_it_stays(tmp_path, tiny_specs, ner_data, cls_data,
                                                                   one_torch_thread):
    from tunepipe import FineTunePipeLine
    specs = quick(tiny_specs("token_classification", {"train": ner_data["train"]}))
    specs["peft"] = {"method": "lora", "r": 2}
    FineTunePipeLine(specs).run()
    out = Path(specs["output_dir"])
    assert (out / "adapter").is_dir() and (out / ".tunepipe.json").is_file()
    (out / "notes.txt").write_text("mine")
    full = quick(tiny_specs("token_classification", {"train": ner_data["train"]}))
    with pytest.raises(Exception) as err:
        FineTunePipeLine(full).run()
    assert getattr(err.value, "code", None) == "CONFIG_ERROR"
    assert (out / "adapter").is_dir()
    FineTunePipeLine({**full, "overwrite_output_dir": True}).run()
    assert (out / "model" / "config.json").is_file()
    assert not (out / "adapter").exists(), "the replaced run's adapter must not mix into the new run"
    assert (out / "notes.txt").read_text() == "mine", "files tunepipe did not write stay"


def test_overwrite_never_replaces_the_model_being_loaded(tmp_path, tiny_specs, ner_data, one_torch_thread, capsys):
    from tunepipe import FineTunePipeLine
    first = quick(tiny_specs("token_classification", {"train": ner_data["train"]}))
    FineTunePipeLine(first).run()
    out = Path(first["output_dir"])
    before = snapshot(out / "model")
    second = quick(tiny_specs("token_classification", {"train": ner_data["train"]}))
    second["model"] = {"name_or_path": str(out / "model")}
    specs_file = write_specs(tmp_path / "second.yaml", second)
    assert cli_main(train_args(specs_file, "--overwrite")) == 2
    assert "model being loaded" in capsys.readouterr().err
    assert snapshot(out / "model") == before


def test_an_empty_directory_is_fresh(tmp_path, tiny_specs, ner_data, one_torch_thread):
    from tunepipe import FineTunePipeLine
    specs = quick(tiny_specs("token_classification", {"train": ner_data["train"]}))
    Path(specs["output_dir"]).mkdir()
    FineTunePipeLine(specs).run()
    assert (Path(specs["output_dir"]) / "model" / "config.json").is_file()


def test_tilde_is_expanded_for_the_model_and_the_checkpoints(tmp_path, tiny_specs, ner_data, monkeypatch,
                                                              one_torch_thread):
    from tunepipe import FineTunePipeLine
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    specs = quick(tiny_specs("token_classification", {"train": ner_data["train"]}))
    specs["output_dir"] = "~/runs/ner"
    specs["training"].update(save_strategy="steps", save_steps=1)
    FineTunePipeLine(specs).run()
    assert (home / "runs" / "ner" / "model" / "config.json").is_file()
    assert any((home / "runs" / "ner" / "checkpoints").iterdir())
    assert not (tmp_path / "~").exists()
    assert not (home / "checkpoints").exists()


@pytest.mark.parametrize("peft", [None, "lora"])
def test_files_follow_the_users_umask(peft, tmp_path, tiny_specs, ner_data, one_torch_thread):
    """Saved models, adapters and checkpoints: 0755 directories and 0644 files under umask 022 (temporary
    directories and some writers give 0700 / 0600)."""
    from tunepipe import FineTunePipeLine
    old = os.umask(0o022)
    try:
        specs = quick(tiny_specs("token_classification", {"train": ner_data["train"]}))
        specs["training"].update(save_strategy="steps", save_steps=1)
        if peft:
            specs["peft"] = {"method": peft, "r": 2}
        FineTunePipeLine(specs).run()
    finally:
        os.umask(old)
    out = Path(specs["output_dir"])
    saved = [out / ("adapter" if peft else "model"), *sorted((out / "checkpoints").iterdir())]
    assert len(saved) > 1
    for directory in saved:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o755, directory
        assert {stat.S_IMODE(p.stat().st_mode) for p in directory.rglob("*") if p.is_file()} == {0o644}, directory


# ---- one writer at a time ----------------------------------------------------------------------------------
def test_a_second_run_into_a_locked_output_dir_is_refused(tmp_path, tiny_specs, ner_data, capsys):
    specs = quick(tiny_specs("token_classification", {"train": ner_data["train"]}))
    out = Path(specs["output_dir"])
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from tunepipe.ownership import claim_dir
        claim_dir({str(out)!r}, kind="run")
        print("held", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli_main(train_args(write_specs(tmp_path / "specs.yaml", specs))) == 2
        err = capsys.readouterr().err
        assert "another tunepipe process" in err and f"pid {holder.pid}" in err
        assert not (out / "model").exists()
    finally:
        holder.kill()
        holder.wait()


# ---- other commands that write -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tokenizer_dir, ner_data):
    from transformers import AutoTokenizer, BertConfig, BertModel

    from tunepipe import FineTunePipeLine
    root = tmp_path_factory.mktemp("lora")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=64)).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    FineTunePipeLine({"task": "token_classification", "output_dir": str(root / "run"),
                      "model": {"name_or_path": str(root / "base")}, "data": {"train": ner_data["train"]},
                      "peft": {"method": "lora", "r": 2},
                      "training": {"max_steps": 2, "eval_strategy": "no", "bf16": False, "save_strategy": "no",
                                   "disable_tqdm": True}}).run()
    return root


def test_merge_refuses_a_directory_it_did_not_write(lora_run, tmp_path, capsys):
    target = user_project(tmp_path / "mine")
    before = snapshot(target)
    assert cli_main(["merge", str(lora_run / "run"), "--to", str(target)]) == 2
    assert "[CONFIG_ERROR]" in capsys.readouterr().err
    assert snapshot(target) == before


def test_merge_refuses_the_base_model_directory(lora_run, capsys):
    before = snapshot(lora_run / "base")
    assert cli_main(["merge", str(lora_run / "run"), "--to", str(lora_run / "base")]) == 2
    assert snapshot(lora_run / "base") == before


def test_merge_replaces_its_own_previous_export(lora_run, tmp_path):
    target = tmp_path / "merged"
    assert cli_main(["merge", str(lora_run / "run"), "--to", str(target)]) == 0
    assert cli_main(["merge", str(lora_run / "run"), "--to", str(target)]) == 0
    assert cli_main(["merge", str(lora_run / "run")]) == 0
    assert (lora_run / "run" / "merged" / "config.json").is_file()


@pytest.mark.parametrize("where", ["input file", "model file", "existing file"])
def test_predict_output_never_replaces_an_input(where, lora_run, tmp_path, capsys):
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text(json.dumps({"text": "Ada lives here"}) + "\n")
    output = {"input file": inputs, "model file": lora_run / "run" / "adapter" / "adapter_config.json",
              "existing file": tmp_path / "old.jsonl"}[where]
    if where == "existing file":
        output.write_text("my notes\n")
    before = output.read_bytes()
    assert cli_main(["predict", "--model", str(lora_run / "run"), "--input", str(inputs),
                     "--output", str(output)]) == 2
    assert "[CONFIG_ERROR]" in capsys.readouterr().err
    assert output.read_bytes() == before


def test_predict_overwrite_replaces_a_previous_output(lora_run, tmp_path):
    output = tmp_path / "predictions.jsonl"
    output.write_text("old\n")
    assert cli_main(["predict", "--model", str(lora_run / "run"), "--input", "Ada lives here", "--output",
                     str(output), "--overwrite"]) == 0
    assert "entities" in json.loads(output.read_text().splitlines()[0])


def test_demo_refuses_a_directory_it_did_not_write(tmp_path, capsys):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "data").mkdir()
    (target / "data" / "train.jsonl").write_text('{"tokens": ["mine"], "ner_tags": ["O"]}\n')
    before = snapshot(target)
    assert cli_main(["demo", "--output-dir", str(target)]) == 2
    assert "[CONFIG_ERROR]" in capsys.readouterr().err
    assert snapshot(target) == before


def test_a_full_disk_during_merge_is_an_io_error_and_leaves_nothing(lora_run, tmp_path, monkeypatch, capsys):
    import errno

    import transformers

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full)
    target = tmp_path / "export"
    assert cli_main(["merge", str(lora_run / "run"), "--to", str(target)]) == 2
    err = capsys.readouterr().err
    assert "[IO_ERROR] Disk full while saving the merged model" in err and "free at least" in err
    assert not target.exists() or not any(p for p in target.iterdir() if p.name != ".tunepipe.json")
