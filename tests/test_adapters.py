"""MultiAdapterManager on a tiny pretrained-style base: two NER adapters trained on different data and a
classification adapter (another head) share one backbone; each request gets exactly its own adapter's output,
switching back restores it bit for bit, nothing is loaded twice, LRU eviction and reload are exact, the base runs
with adapters off, batches naming several adapters are grouped, and a switch that does not happen is caught."""
import json

import pytest
import torch

from conftest import close_to
from tunepipe.serving.adapters import AdapterNotFoundError, AdapterSwitchError, MultiAdapterManager
from tunepipe.errors import ConfigError, ModelNotFoundError

TEXTS = ["Greta Varga moved to Lisbon .", "Shares of Alder Foods rose after Omar spoke in Cork .", "Hi"]
REVIEWS = ["a warm and funny film", "a dull and lifeless film"]
LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 128}


def train_adapter(out, base, task, data, seed):
    from tunepipe import FineTunePipeLine
    pipe = FineTunePipeLine({
        "task": task, "output_dir": str(out), "model": {"name_or_path": str(base)}, "data": data,
        "peft": {"method": "lora", "r": 4},
        "training": {"max_steps": 16, "eval_strategy": "no", "bf16": False, "learning_rate": 1e-2, "seed": seed,
                     "per_device_train_batch_size": 8, "save_strategy": "no", "disable_tqdm": True}})
    pipe.setup()
    pipe.train()
    return pipe


def save_headless_base(tokenizer_dir, target):
    """A tiny BertModel without a head (seed 0) and its tokenizer: the base adapters are trained on."""
    from transformers import AutoTokenizer, BertConfig, BertModel
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **TINY)).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_dir, ner_data, cls_data):
    """A headless base (BertModel + tokenizer), NER adapters 'a' and 'b' on different data, classifier 'c'."""
    from tunepipe.demo import make_demo_ner
    root = tmp_path_factory.mktemp("adapters")
    save_headless_base(tokenizer_dir, root / "base")
    other = make_demo_ner(root / "other-ner", n_train=96, n_validation=4, seed=99)
    rows = [json.loads(line) for line in open(other["train"])]
    for r in rows:  # different data: here every word outside a name is MISC
        r["ner_tags"] = ["B-MISC" if t == "O" else t for t in r["ner_tags"]]
    (root / "other-ner" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ner = {"labels": LABELS}  # one label set: 'a' and 'b' share a head shape, so one PeftModel holds both
    pipes = {"a": train_adapter(root / "a", root / "base", "token_classification",
                                {"train": ner_data["train"], **ner}, 1),
             "b": train_adapter(root / "b", root / "base", "token_classification", {"train": other["train"], **ner}, 2),
             "c": train_adapter(root / "c", root / "base", "text_classification", {"train": cls_data["train"]}, 3)}
    expected = {"a": pipes["a"].predict(TEXTS), "b": pipes["b"].predict(TEXTS), "c": pipes["c"].predict(REVIEWS)}
    return {"root": root, "base": root / "base", "pipes": pipes, "expected": expected,
            "dirs": {k: str(p.output_dir) for k, p in pipes.items()}}


def inputs_for(name):
    return REVIEWS if name == "c" else TEXTS


def logits(model, tokenizer, texts):
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.clone()


def test_each_adapter_gives_its_own_output_and_switching_back_is_exact(runs):
    from tunepipe import InferencePipeLine
    ip = InferencePipeLine(checkpoint=runs["base"], adapter_config=runs["dirs"])
    manager = ip.adapters
    assert manager.load_counts == {"a": 1, "b": 1, "c": 1}  # loaded once, up front
    first = {name: ip.predict(inputs_for(name), adapter=name) for name in "abc"}
    assert first == runs["expected"]  # exactly what each trained model predicted in memory
    assert first["a"] != first["b"]  # different training data, different outputs
    assert [t["tags"] for t in first["a"]] != [t["tags"] for t in first["b"]]

    model_a, tok, _ = manager.set_adapter("a")
    la = logits(model_a, tok, TEXTS)
    model_b, _, _ = manager.set_adapter("b")
    assert model_b is model_a  # one PeftModel holds both NER adapters
    lb = logits(model_b, tok, TEXTS)
    assert not torch.allclose(la, lb)
    manager.set_adapter("c")
    manager.set_adapter("a")
    assert torch.equal(logits(model_a, tok, TEXTS), la)  # switching back restores it bit for bit

    for name in "abcabccba":
        assert ip.run(inputs_for(name), adapter_id=name) == runs["expected"][name]
    assert manager.load_counts == {"a": 1, "b": 1, "c": 1} and manager.total_loads == 3
    listed = {a["name"]: a for a in manager.list_adapters()}
    assert all(a["loaded"] and a["last_used"] for a in listed.values())
    assert [n for n, a in listed.items() if a["active"]] == ["a"]
    assert listed["c"]["task"] == "text_classification" and listed["a"]["peft_type"] == "LORA"


def test_lru_eviction_and_reload_are_exact(runs):
    manager = MultiAdapterManager(str(runs["base"]), max_adapters_in_memory=2)
    for name in "abc":
        manager.register_adapter(name, runs["dirs"][name])
    assert manager.load_counts == {"a": 0, "b": 0, "c": 0}  # registered, not loaded
    assert manager.predict(TEXTS, adapter="a") == runs["expected"]["a"]
    assert manager.predict(TEXTS, adapter="b") == runs["expected"]["b"]
    assert manager.predict(REVIEWS, adapter="c") == runs["expected"]["c"]  # evicts 'a', least recently used
    loaded = {a["name"]: a["loaded"] for a in manager.list_adapters()}
    assert loaded == {"a": False, "b": True, "c": True}
    assert manager.predict(TEXTS, adapter="a") == runs["expected"]["a"]  # reloaded: identical
    assert manager.load_counts == {"a": 2, "b": 1, "c": 1}
    assert {a["name"] for a in manager.list_adapters() if a["loaded"]} == {"a", "c"}  # 'b' went next
    assert manager.predict(TEXTS, adapter="b") == runs["expected"]["b"]

    manager.unload_adapter("b")
    assert not next(a for a in manager.list_adapters() if a["name"] == "b")["loaded"]
    manager.unregister_adapter("c")
    with pytest.raises(AdapterNotFoundError) as e:
        manager.predict(REVIEWS, adapter="c")
    assert "a, b" in e.value.suggestions[0]


def save_full_tagger(base, labels, target, seed: int):
    """A fine-tuned-looking token classifier (a random head of ``labels``) saved with its tokenizer: a full model
    to use as the base under adapters."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer
    torch.manual_seed(seed)
    full = AutoModelForTokenClassification.from_pretrained(base, num_labels=len(labels),
                                                           id2label=dict(enumerate(labels)))
    full.config.tunepipe_task = "token_classification"
    full.save_pretrained(target)
    AutoTokenizer.from_pretrained(base).save_pretrained(target)
    return target


def test_base_model_runs_with_adapters_disabled(runs, tmp_path):
    """A fine-tuned full model as the base: no adapter = that model exactly; an adapter in between changes
    nothing about it."""
    from tunepipe import InferencePipeLine
    alone = InferencePipeLine(checkpoint=save_full_tagger(runs["base"], runs["pipes"]["a"].task.labels,
                                                          tmp_path / "full", seed=5)).predict(TEXTS)

    with pytest.warns(UserWarning, match="trained on"):
        ip = InferencePipeLine(checkpoint=tmp_path / "full", adapter_config={"a": runs["dirs"]["a"]})
    assert ip.default_adapter is None and ip.task_name == "token_classification"
    assert ip.predict(TEXTS) == alone
    assert ip.predict(TEXTS, adapter="a") == runs["expected"]["a"]
    assert ip.predict(TEXTS) == alone


def test_a_batch_naming_several_adapters_is_grouped(runs, monkeypatch):
    from tunepipe import InferencePipeLine
    ip = InferencePipeLine(checkpoint=runs["base"], adapter_config=runs["dirs"])
    calls = []
    original = ip.adapters.predict
    monkeypatch.setattr(ip.adapters, "predict", lambda items, adapter=None, **kw: calls.append(
        (adapter, len(items))) or original(items, adapter=adapter, **kw))
    order = ["a", "c", "b", "a", "c", "b", "a"]
    items = [TEXTS[0], REVIEWS[0], TEXTS[1], TEXTS[2], REVIEWS[1], TEXTS[0], TEXTS[1]]
    got = ip.predict_grouped(items, order)
    assert sorted(calls) == [("a", 3), ("b", 2), ("c", 2)]  # one batched call per adapter
    for name, item, result in zip(order, items, got):  # grouped in batches, compared alone: padding's last bits
        assert result == close_to(ip.predict(item, adapter=name))
    with pytest.raises(Exception, match="adapter names"):
        ip.predict_grouped(items, order[:2])


def test_merge_one_adapter_into_a_standalone_model(runs, tmp_path):
    from tunepipe import InferencePipeLine
    manager = MultiAdapterManager(str(runs["base"]))
    manager.register_adapter("a", runs["dirs"]["a"])
    target = manager.merge_adapter("a", tmp_path / "merged")
    assert (target / "config.json").is_file() and not (target / "adapter_config.json").exists()
    merged = InferencePipeLine(checkpoint=target).predict(TEXTS)
    expected = runs["expected"]["a"]
    assert [m["tags"] for m in merged] == [e["tags"] for e in expected]
    assert [x["score"] for m in merged for x in m["entities"]] == pytest.approx(
        [x["score"] for e in expected for x in e["entities"]], abs=1e-4)


def test_a_switch_that_silently_does_nothing_is_caught(runs, monkeypatch):
    """peft's set_adapter doing nothing (the known trap) must raise, not predict with the previous adapter."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    manager = MultiAdapterManager(str(runs["base"]))
    manager.register_adapter("a", runs["dirs"]["a"])
    manager.register_adapter("b", runs["dirs"]["b"])
    manager.predict(TEXTS, adapter="a")
    manager.predict(TEXTS, adapter="b")
    monkeypatch.setattr(PeftModel, "set_adapter", lambda self, *a, **k: None)
    monkeypatch.setattr(BaseTunerLayer, "set_adapter", lambda self, *a, **k: None)
    with pytest.raises(AdapterSwitchError, match="did not take effect"):
        manager.predict(TEXTS, adapter="a")


def test_registration_errors(runs, tmp_path):
    manager = MultiAdapterManager(str(runs["base"]))
    with pytest.raises(ConfigError, match="Invalid adapter name"):
        manager.register_adapter("no spaces please", runs["dirs"]["a"])
    manager.register_adapter("a", runs["dirs"]["a"])
    with pytest.raises(ConfigError, match="already registered"):
        manager.register_adapter("a", runs["dirs"]["b"])
    with pytest.raises(ModelNotFoundError):
        manager.register_adapter("x", tmp_path / "missing")
    with pytest.raises(ModelNotFoundError, match="No PEFT adapter"):
        manager.register_adapter("y", runs["base"])
    with pytest.raises(ConfigError, match="int8"):
        MultiAdapterManager(str(runs["base"]), dtype="int8")
    with pytest.raises(Exception, match="no task of its own"):
        manager.predict(TEXTS, adapter=None)


def test_cli_predict_with_named_adapters(runs, tmp_path, capsys):
    from tunepipe.cli import main
    records = [{"text": TEXTS[0], "adapter": "b"}, {"text": REVIEWS[0], "adapter": "c"}, {"text": TEXTS[1]}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    argv = ["predict", "--model", str(runs["base"]), "--input", str(tmp_path / "in.jsonl")]
    for name in "abc":
        argv += ["--adapter", f"{name}={runs['dirs'][name]}"]
    assert main(argv + ["--use", "a"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # each input ran alone (one per adapter), the expected ones in a batch: equal up to padding's last bits
    expected = [runs["expected"]["b"][0], runs["expected"]["c"][0], runs["expected"]["a"][1]]
    assert got == close_to([{"line": n + 1, **e} for n, e in enumerate(expected)])  # each led by its input line
    assert main(argv + ["--use", "zzz"]) == 2
    assert "adapters given: a, b, c" in capsys.readouterr().err
