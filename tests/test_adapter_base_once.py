"""MultiAdapterManager reads the base model from disk once: three LoRA adapters of different tasks (token
classification, text classification, question answering) on one base, six requests in turn, one load; each adapter
predicts exactly what it predicts loaded alone; every task's model computes with the same backbone tensors (shared
storage, not copies); a base saved with a head of its own keeps it; a base saved quantized is refused by name."""
from __future__ import annotations

import contextlib

import pytest
from test_adapters import LABELS, REVIEWS, TEXTS, save_full_tagger, save_headless_base, train_adapter
from test_peft_portability import QUESTION, qa_data

QUESTIONS = [QUESTION, {"question": "Who moved to Cork ?", "context": "Omar Haddad moved to Cork ."}]
INPUTS = {"ner": TEXTS, "cls": REVIEWS, "qa": QUESTIONS}
TASKS = {"ner": "token_classification", "cls": "text_classification", "qa": "question_answering"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_dir, ner_data, cls_data):
    """A headless base (BertModel + tokenizer) and three LoRA runs on it, one per task; what each predicts loaded
    alone (InferencePipeLine on the run: the base and the adapter from disk, nothing shared)."""
    from tunepipe import InferencePipeLine
    root = tmp_path_factory.mktemp("base-once")
    save_headless_base(tokenizer_dir, root / "base")
    data = {"ner": {"train": ner_data["train"], "labels": LABELS}, "cls": {"train": cls_data["train"]},
            "qa": {"train": qa_data(root)["train"]}}
    dirs = {}
    for seed, name in enumerate(TASKS, start=1):
        dirs[name] = str(train_adapter(root / name, root / "base", TASKS[name], data[name], seed).output_dir)
    expected = {name: InferencePipeLine(checkpoint=dirs[name]).predict(INPUTS[name]) for name in TASKS}
    return {"root": root, "base": root / "base", "dirs": dirs, "expected": expected}


@contextlib.contextmanager
def counting_loads(base):
    """Reads of ``base`` from disk: from_pretrained calls naming it (``read``: the data_ptr of each returned model's
    backbone weights, the models kept alive in ``models``), safetensors files opened under it."""
    import transformers.modeling_utils as mu
    original, original_open = mu.PreTrainedModel.from_pretrained.__func__, mu.safe_open
    counts = {"from_pretrained": 0, "safetensors": 0, "models": [], "read": []}
    base = str(base)

    def from_pretrained(cls, path, *args, **kwargs):
        model = original(cls, path, *args, **kwargs)
        if str(path) == base:
            counts["from_pretrained"] += 1
            loaded = model[0] if isinstance(model, tuple) else model  # (model, info) with output_loading_info
            counts["models"].append(loaded)
            backbone = getattr(loaded, loaded.base_model_prefix, loaded)
            counts["read"].append({p.data_ptr() for p in backbone.parameters()})
        return model

    def safe_open(filename, *args, **kwargs):
        counts["safetensors"] += str(filename).startswith(base)
        return original_open(filename, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mu.PreTrainedModel, "from_pretrained", classmethod(from_pretrained))
        mp.setattr(mu, "safe_open", safe_open)
        yield counts


def backbone_pointers(model) -> dict[str, int]:
    """data_ptr of every backbone weight the model computes with (LoRA layers' own weights left out)."""
    from peft import PeftModel
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    backbone = getattr(base, base.base_model_prefix)
    return {name.replace(".base_layer", ""): p.data_ptr() for name, p in backbone.named_parameters()
            if "lora_" not in name}


def test_six_requests_over_three_tasks_load_the_base_once(runs):
    from tunepipe import MultiAdapterManager
    with counting_loads(runs["base"]) as counts:
        manager = MultiAdapterManager(str(runs["base"]))
        for name in TASKS:
            manager.register_adapter(name, runs["dirs"][name])
        got = {name: [] for name in TASKS}
        for name in ["ner", "cls", "qa", "ner", "cls", "qa"]:
            got[name].append(manager.predict(INPUTS[name], adapter=name))
    assert counts["from_pretrained"] == 1, counts  # the old manager: one load per head group (3 here)
    assert counts["safetensors"] == 1, counts
    assert manager.base_loads == 1
    assert manager.load_counts == {"ner": 1, "cls": 1, "qa": 1}
    for name in TASKS:  # exactly what each adapter predicts loaded alone, first and second time
        assert got[name] == [runs["expected"][name]] * 2, name


def test_every_task_model_computes_with_the_same_backbone_storage(runs):
    """The three task models compute with one set of backbone tensors, and those are the tensors of the model read
    from disk: no backbone was read, or built, for a task and then thrown away."""
    from tunepipe import MultiAdapterManager
    with counting_loads(runs["base"]) as counts:
        manager = MultiAdapterManager(str(runs["base"]))
        models = {}
        for name in TASKS:
            manager.register_adapter(name, runs["dirs"][name])
            models[name] = manager.set_adapter(name)[0]
    assert len({id(m) for m in models.values()}) == 3  # one model (head) per task
    pointers = {name: backbone_pointers(m) for name, m in models.items()}
    assert pointers["ner"] and pointers["ner"] == pointers["cls"] == pointers["qa"]
    in_use = set(pointers["ner"].values())
    assert counts["read"]
    for read in counts["read"]:  # the old manager: 3 models read, 2 of their backbones dropped
        assert read <= in_use
    # memory: the backbone once, plus the heads and adapters, together smaller than one backbone
    sizes = {p.data_ptr(): p.numel() for m in models.values() for p in m.parameters()}
    backbone = sum(n for ptr, n in sizes.items() if ptr in in_use)
    assert sum(n for ptr, n in sizes.items() if ptr not in in_use) < backbone


def test_a_base_with_a_head_of_its_own_keeps_it_beside_adapters(runs, tmp_path):
    """A fine-tuned token classifier as the base: no adapter = that model exactly (its own head, from the one
    load), and a NER adapter of other labels beside it (two heads on one backbone)."""
    from tunepipe import InferencePipeLine
    save_full_tagger(runs["base"], LABELS, tmp_path / "full", seed=7)
    alone = InferencePipeLine(checkpoint=tmp_path / "full").predict(TEXTS)
    with counting_loads(tmp_path / "full") as counts, pytest.warns(UserWarning, match="trained on"):
        ip = InferencePipeLine(checkpoint=tmp_path / "full", adapter_config={"ner": runs["dirs"]["ner"]})
        assert ip.predict(TEXTS) == alone
        assert ip.predict(TEXTS, adapter="ner") == runs["expected"]["ner"]
        assert ip.predict(TEXTS) == alone
    assert alone != runs["expected"]["ner"]
    assert counts["from_pretrained"] == 1, counts


def test_backbone_weights_the_saved_class_leaves_on_disk_are_still_used(runs, tmp_path):
    """A base saved like bert-base-uncased (architectures: BertForMaskedLM, which has no pooler, with the pooler's
    weights in the file): the classifier gets the pretrained pooler, read for it alone, not a new random one."""
    import json
    import shutil

    from tunepipe import MultiAdapterManager
    shutil.copytree(runs["base"], tmp_path / "mlm-base")
    config = json.loads((tmp_path / "mlm-base" / "config.json").read_text())
    (tmp_path / "mlm-base" / "config.json").write_text(json.dumps({**config, "architectures": ["BertForMaskedLM"]}))
    with counting_loads(tmp_path / "mlm-base") as counts, pytest.warns(UserWarning, match="trained on"):
        manager = MultiAdapterManager(str(tmp_path / "mlm-base"))
        for name in TASKS:
            manager.register_adapter(name, runs["dirs"][name])
        for name in ["ner", "cls", "qa", "cls", "ner"]:
            assert manager.predict(INPUTS[name], adapter=name) == runs["expected"][name], name
    assert counts["from_pretrained"] == 2, counts  # the base, then the classifier for its pooler (the old: 3)
    assert manager.base_loads == 2


def test_a_base_saved_quantized_is_refused_with_a_typed_error(runs, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BertModel, BitsAndBytesConfig

    from tunepipe import MultiAdapterManager
    from tunepipe.errors import ConfigError
    quantized = BertModel.from_pretrained(runs["base"], quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    quantized.save_pretrained(tmp_path / "q8")
    manager = MultiAdapterManager(str(tmp_path / "q8"))
    with pytest.warns(UserWarning, match="trained on"):
        manager.register_adapter("ner", runs["dirs"]["ner"])
    with pytest.raises(ConfigError, match="saved quantized") as e:
        manager.predict(TEXTS, adapter="ner")
    assert "InferencePipeLine(checkpoint=<adapter dir>)" in " ".join(e.value.suggestions)
