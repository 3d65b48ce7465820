"""What the CLI checks before it works, and how predict pairs outputs with inputs: --device and output paths are
checked before any model loads; init never replaces a file it did not write; a file's predictions carry their
input line, and a bad input names its file and line; empty inputs are refused (CLI and server); --debug keeps the
exit status; merge suggests only what it accepts; every option's help says what it does and its default."""
import argparse
import csv
import json
import re
from pathlib import Path

import pytest

from conftest import TINY_BERT, close_to
from tunepipe.cli import build_parser, main

ONE_STEP = {"max_steps": 1, "eval_strategy": "no", "warmup_steps": 0, "save_strategy": "no", "disable_tqdm": True,
            "per_device_train_batch_size": 8, "dataloader_pin_memory": False}


def _run(tmp_path_factory, tokenizer_dir, task: str, data: dict, **sections) -> Path:
    from tunepipe import FineTunePipeLine
    out = tmp_path_factory.mktemp(task) / "run"
    specs = {"task": task, "output_dir": str(out), "model": {"from_config": dict(TINY_BERT)},
             "tokenizer": {"name_or_path": tokenizer_dir}, "data": data, "training": ONE_STEP, **sections}
    FineTunePipeLine(specs).train()
    return out


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory, tokenizer_dir, cls_data) -> Path:
    """A one-step text-classification run (the model reads 'text')."""
    return _run(tmp_path_factory, tokenizer_dir, "text_classification", {"train": cls_data["train"]})


def _error(capsys, argv, code: str) -> str:
    """Run the CLI in-process: a typed error, exit 2, no traceback; the error text."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"[{code}]" in err and "Traceback" not in err, err
    return err


# ---- 1. --device, checked before anything loads ---------------------------------------------------------------
def _machine(monkeypatch, cuda: int = 0, xpu: bool = False, mps: bool = False) -> None:
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    if hasattr(torch, "xpu"):
        monkeypatch.setattr(torch.xpu, "is_available", lambda: xpu)
        monkeypatch.setattr(torch.xpu, "device_count", lambda: int(xpu))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize("device, code", [("cuda", "CUDA_ERROR"), ("cuda:7", "CUDA_ERROR"), ("xpu", "CUDA_ERROR"),
                                          ("mps", "CUDA_ERROR"), ("gpu", "CONFIG_ERROR"), ("cuda:x", "CONFIG_ERROR"),
                                          ("CPU", "CONFIG_ERROR"), ("meta", "CONFIG_ERROR"), ("", "CONFIG_ERROR")])
def test_a_device_this_cpu_machine_lacks_is_a_typed_error(monkeypatch, device, code):
    from tunepipe.errors import TunepipeError
    from tunepipe.serving.model_loading import check_device
    _machine(monkeypatch)
    with pytest.raises(TunepipeError) as e:
        check_device(device, "--device")
    assert e.value.code == code and e.value.field == "--device"
    assert any("--device cpu" in s or "--device out" in s for s in e.value.suggestions)
    assert check_device("cpu", "--device") == "cpu" and check_device(None) == "cpu"


def test_device_index_out_of_range_names_the_devices_there_are(monkeypatch):
    from tunepipe.errors import CudaError
    from tunepipe.serving.model_loading import check_device
    _machine(monkeypatch, cuda=2)
    assert check_device("cuda:1") == "cuda:1" and check_device(None) == "cuda"
    with pytest.raises(CudaError) as e:
        check_device("cuda:2", "--device")
    assert "2 CUDA devices (cuda:0 to cuda:1)" in e.value.message and "use --device cuda:1" in e.value.suggestions


def _commands_with(option: str) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: p for name, p in sub.choices.items() if option in p._option_string_actions}


@pytest.mark.parametrize("command", sorted(_commands_with("--device")))
def test_every_command_checks_device_before_the_model(tmp_path, capsys, monkeypatch, command):
    """A model that does not exist: had anything been loaded first, the error would be MODEL_NOT_FOUND."""
    _machine(monkeypatch)
    parser = _commands_with("--device")[command]
    argv = [command, "--model", str(tmp_path / "no-model"), "--device", "cuda"]
    for action in parser._actions:
        if action.required and action.option_strings and action.dest != "model":
            argv += [action.option_strings[0], "hi"]
    err = _error(capsys, argv, "CUDA_ERROR")
    assert "--device cuda" in err and "-> use --device cpu" in err
    assert not list(tmp_path.iterdir())


# ---- 2. init --------------------------------------------------------------------------------------------------
def test_init_refuses_a_directory_with_or_without_force(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    for force in ([], ["--force"]):
        err = _error(capsys, ["init", "ner", "--output", str(tmp_path / "d"), *force], "IO_ERROR")
        assert "is a directory" in err and f"--output {tmp_path / 'd' / 'token_classification.yaml'}" in err
        assert "--force" not in err
    assert not list((tmp_path / "d").iterdir())


@pytest.mark.parametrize("name, content", [("train.jsonl", b'{"text": "a", "label": "b"}\n'), ("notes.txt", b"notes"),
                                           ("mine.yaml", b"# my specs\ntask: ner\n"), ("empty.yaml", b""),
                                           ("near.yaml", b"# tunepipe specs of mine\n")])
def test_init_force_never_replaces_a_file_init_did_not_write(tmp_path, capsys, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    for force in ([], ["--force"]):
        err = _error(capsys, ["init", "ner", "-o", str(path), *force], "IO_ERROR")
        assert str(path) in err and "not a starter file" in err
    assert path.read_bytes() == content


def test_init_force_replaces_its_own_starter_even_edited(tmp_path, capsys):
    path = tmp_path / "ner.yaml"
    assert main(["init", "ner", "-o", str(path)]) == 0
    written = path.read_text()
    path.write_text(written.replace("runs/token_classification", "runs/edited"))
    err = _error(capsys, ["init", "ner", "-o", str(path)], "IO_ERROR")
    assert "pass --force" in err
    assert main(["init", "qa", "-o", str(path), "--force"]) == 0
    assert path.read_text().startswith("# tunepipe specs for question_answering")
    assert "init` wrote" in _commands_with("--force")["init"].format_help()


# ---- 3. output paths in a missing directory -------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["predict", "--model", "{model}", "--input", "hi", "--output", "{out}"],
                                  ["init", "ner", "--output", "{out}"]])
def test_an_output_file_in_a_missing_directory_fails_first(tmp_path, capsys, argv):
    out = tmp_path / "missing" / "sub" / "p.jsonl"
    argv = [a.format(model=tmp_path / "no-model", out=out) for a in argv]
    err = _error(capsys, argv, "IO_ERROR")
    assert f"the directory {out.parent} does not exist" in err and f"mkdir -p {out.parent}" in err
    assert ".tmp-" not in err and not (tmp_path / "missing").exists()


def test_output_directory_checks(tmp_path):
    from tunepipe.errors import TunepipeIOError
    from tunepipe.output_paths import check_dir_parent, check_file_parent
    (tmp_path / "file").write_text("x")
    check_file_parent(tmp_path / "new.jsonl", "--output")
    check_dir_parent(tmp_path / "a" / "b", "--to")  # missing directories are made, as for output_dir
    with pytest.raises(TunepipeIOError, match="is a file, not a directory"):
        check_file_parent(tmp_path / "file" / "p.jsonl", "--output")
    with pytest.raises(TunepipeIOError, match="is a file, not a directory"):
        check_dir_parent(tmp_path / "file" / "a" / "b", "--to")


# ---- 4, 5, 6. predict: input lines, missing fields, empty inputs -----------------------------------------------
def _write(path: Path, texts: list[str | None]) -> Path:
    """``texts`` in the file's format; None is a blank line (.txt / .jsonl)."""
    if path.suffix == ".txt":
        path.write_text("".join(f"{t or ''}\n" for t in texts))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": t}) + "\n" if t is not None else "\n" for t in texts))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "text"])
            writer.writerows([[n, t] for n, t in enumerate(texts) if t is not None])
    else:
        path.write_text(json.dumps([{"text": t} for t in texts if t is not None]))
    return path


@pytest.mark.parametrize("name, texts, lines, blank", [
    ("in.txt", ["great hotel", None, "awful train", None, None, "nice"], [1, 3, 6], "blank lines 2, 4, 5"),
    ("in.jsonl", [None, "great hotel", "awful train", None], [2, 3], "blank line 1"),
    ("in.csv", ["great hotel", "awful train", "nice"], [2, 3, 4], None),
    ("in.json", ["great hotel", "awful train"], [1, 2], None)])
def test_each_prediction_carries_its_input_line(cls_run, tmp_path, capsys, name, texts, lines, blank):
    from tunepipe import InferencePipeLine
    path = _write(tmp_path / name, texts)
    assert main(["predict", "--model", str(cls_run), "--input", str(path), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    got = [json.loads(line) for line in captured.out.splitlines()]
    assert [g["line"] for g in got] == lines
    if blank:
        assert f"{blank} skipped" in captured.err
    else:
        assert "skipped" not in captured.err
    # in input order, each the prediction of its own text
    expected = InferencePipeLine(checkpoint=cls_run, device="cpu").predict([t for t in texts if t is not None])
    assert [{k: v for k, v in g.items() if k != "line"} for g in got] == close_to(expected)


@pytest.mark.parametrize("name, line", [("in.jsonl", 2), ("in.csv", 3), ("in.json", 2)])
def test_a_record_without_the_text_field_names_file_line_and_fields(cls_run, tmp_path, capsys, name, line):
    path = tmp_path / name
    rows = [{"text": "great hotel", "label": "pos"}, {"sentence": "awful train", "label": "neg"}]
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows))
    else:
        path.write_text("sentence,label\ngreat,pos\nawful train,neg\n")
        line = 2  # no record of this file has 'text': the first one is named
    err = _error(capsys, ["predict", "--model", str(cls_run), "--input", str(path)], "VALIDATION_ERROR")
    assert f"Field 'text' not found in the input on line {line}" in err and f"{path}:{line}" in err
    assert "fields present: label, sentence" in err


def test_a_record_of_the_wrong_type_names_its_line(cls_run, tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": 5}) + "\n")
    err = _error(capsys, ["predict", "--model", str(cls_run), "--input", str(path)], "VALIDATION_ERROR")
    assert "line 2 must be a text, got int" in err and f"{path}:2" in err


@pytest.mark.parametrize("value", ["", "   ", "\t\n"])
def test_an_empty_input_text_is_refused(cls_run, tmp_path, capsys, value):
    err = _error(capsys, ["predict", "--model", str(cls_run), "--input", value], "VALIDATION_ERROR")
    assert "--input is empty" in err and "field '--input'" in err
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": value}) + "\n")
    err = _error(capsys, ["predict", "--model", str(cls_run), "--input", str(path)], "VALIDATION_ERROR")
    assert "line 2 is empty" in err and f"{path}:2" in err


@pytest.mark.parametrize("item, problem", [("", "is empty"), (" \n", "is empty"), ([], "is empty"),
                                           (["a", " "], "holds an empty text"), (("a", ""), "holds an empty text"),
                                           ({"text": "", "id": "1"}, "is empty"), ("a", None), (["a", "b"], None),
                                           ({"text": "a", "id": ""}, None)])
def test_empty_inputs_by_shape(item, problem):
    from tunepipe.serving.model_loading import empty_input
    from tunepipe.specs import load_specs
    from tunepipe.tasks import get_task
    specs = {"model": "m", "output_dir": "o", "data": {"train": "x"}}
    task = get_task("text_classification")(load_specs({"task": "text_classification", **specs}))
    assert empty_input(task, item) == problem
    causal = get_task("causal_lm")(load_specs({"task": "causal_lm", **specs}))
    assert empty_input(causal, item) is None  # a causal LM continues an empty prompt


def test_the_server_refuses_empty_inputs_with_a_typed_400(cls_run):
    from fastapi.testclient import TestClient

    from tunepipe import InferencePipeLine
    from tunepipe.serving.serve import create_app
    with TestClient(create_app(InferencePipeLine(checkpoint=cls_run, device="cpu"))) as client:
        for inputs, n in [("", 1), ([""], 1), (["great", "  "], 2)]:
            r = client.post("/v1/predict", json={"inputs": inputs})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["code"] == "VALIDATION_ERROR" and f"Input {n} is empty" in error["message"]
        assert client.post("/v1/predict", json={"inputs": ["great"]}).status_code == 200


# ---- 7. --debug keeps the exit status ---------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["check", "{tmp}/no-specs.yaml"], ["init", "ner", "-o", "{tmp}"],
                                  ["predict", "--model", "{tmp}/m", "--input", "hi", "--device", "gpu"]])
def test_debug_shows_the_traceback_and_keeps_exit_status_2(tmp_path, capsys, argv):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    plain = capsys.readouterr().err
    assert main(["--debug", *argv]) == 2
    debug = capsys.readouterr().err
    assert "Traceback" not in plain and "Traceback" in debug
    assert plain.strip().splitlines()[0] in debug  # and the error itself, with its suggestions


def test_debug_keeps_exit_status_1_for_a_fault(monkeypatch, capsys):
    from tunepipe import cli

    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "tasks", broken)
    assert main(["tasks"]) == 1 and main(["--debug", "tasks"]) == 1
    assert "Traceback" in capsys.readouterr().err


# ---- 8. merge ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tokenizer_dir, cls_data) -> Path:
    return _run(tmp_path_factory, tokenizer_dir, "text_classification", {"train": cls_data["train"]},
                peft={"method": "lora", "r": 4})


def test_merge_suggests_only_what_merge_accepts(lora_run, tmp_path, capsys, monkeypatch):
    import tunepipe.serving.merge as merge
    monkeypatch.setattr(merge, "load_adapter", lambda *a, **k: pytest.fail("loaded before the checks"))
    accepted = set(_commands_with("--to")["merge"]._option_string_actions)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("x")
    for target, code in [(taken, "CONFIG_ERROR"), (tmp_path / "file" / "merged", "IO_ERROR")]:
        err = _error(capsys, ["merge", str(lora_run), "--to", str(target)], code)
        flags = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", err))
        assert flags <= accepted, flags - accepted
    assert (taken / "notes.txt").read_text() == "mine"


def test_merge_tells_not_found_from_not_an_adapter(cls_run, tmp_path, capsys):
    err = _error(capsys, ["merge", str(tmp_path / "nothere")], "MODEL_NOT_FOUND")
    assert f"{tmp_path / 'nothere'} not found" in err
    err = _error(capsys, ["merge", str(cls_run)], "MODEL_NOT_FOUND")
    assert "No PEFT adapter in" in err


# ---- 9. help ------------------------------------------------------------------------------------------------------
def _all_options():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    yield "tunepipe", parser
    yield from sub.choices.items()


@pytest.mark.parametrize("command, parser", list(_all_options()), ids=[c for c, _ in _all_options()])
def test_every_option_says_what_it_does_and_its_default(command, parser):
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        name = action.option_strings[0] if action.option_strings else action.dest
        assert action.help and len(action.help) > 15, f"{command} {name}: no help"
        assert "(with --dry-run for train)" not in action.help  # said what it does not do
        if action.default not in (None, False, [], argparse.SUPPRESS):
            assert "default" in action.help, f"{command} {name}: the help does not say its default"


def test_help_of_the_options_reported_without_one(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    assert re.search(r"--batch-size N\s+inputs per forward pass", text) and re.search(r"--port PORT\s+TCP port", text)
