"""tokenizer.special_tokens / tokenizer.additional_special_tokens: the tokens are added to the tokenizer, the
model's embeddings resized, both saved (model/ with plain transformers; a LoRA adapter with the resized embeddings in
modules_to_save, reloaded on the original base with the same predictions)."""
import json

import pytest

from tunepipe.errors import ConfigError
from tunepipe.specs import load_specs

NEW = ["<ent>", "</ent>"]
TEXTS = ["<ent> Greta Varga </ent> flew from Lisbon", "Ada lives in <ent> Paris </ent> ."]
ONE_STEP = {"max_steps": 1, "eval_strategy": "no", "warmup_steps": 0}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer_dir):
    """A tiny 'pretrained' BERT saved with its tokenizer: a base whose vocabulary the run must grow."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from tests.conftest import TINY_BERT
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = BertConfig(**{k: v for k, v in TINY_BERT.items() if k != "model_type"}, vocab_size=len(tokenizer),
                        pad_token_id=tokenizer.pad_token_id)
    out = tmp_path_factory.mktemp("base")
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def run_specs(tiny_specs, ner_data, base_dir, **sections):
    specs = tiny_specs("token_classification", ner_data, training=ONE_STEP, **sections)
    specs["model"] = {"name_or_path": base_dir}
    specs["tokenizer"] = {"additional_special_tokens": NEW, **sections.get("tokenizer", {})}
    return specs


def test_settings_are_checked_and_reload_from_specs_yaml(tmp_path):
    base = {"task": "token_classification", "model": "minilm", "output_dir": str(tmp_path)}
    specs = load_specs({**base, "tokenizer": {"special_tokens": {"pad_token": "<pad>"},
                                              "additional_special_tokens": NEW}})
    assert specs.tokenizer.special_tokens == {"pad_token": "<pad>"} and specs.tokenizer.additional_special_tokens == NEW
    assert load_specs(specs.to_dict()).tokenizer == specs.tokenizer
    with pytest.raises(ConfigError) as e:
        load_specs({**base, "tokenizer": {"special_tokens": {"pad_tokn": "<pad>"}}})
    assert e.value.field == "tokenizer.special_tokens.pad_tokn" and "did you mean 'pad_token'?" in e.value.suggestions
    with pytest.raises(ConfigError) as e:
        load_specs({**base, "tokenizer": {"additional_special_tokens": ["<a>", ""]}})
    assert e.value.field == "tokenizer.additional_special_tokens"


def test_named_special_tokens_are_set_and_added(tiny_specs, ner_data, tokenizer_dir):
    from tunepipe.modeling.models import TokenizerModules
    plain = TokenizerModules(load_specs(tiny_specs("token_classification", ner_data))).load()
    specs = load_specs(tiny_specs("token_classification", ner_data,
                                  tokenizer={"special_tokens": {"pad_token": "<pad>", "bos_token": "<s>"},
                                             "additional_special_tokens": NEW}))
    tokenizer = TokenizerModules(specs).load()
    assert len(tokenizer) == len(plain) + 4
    assert (tokenizer.pad_token, tokenizer.bos_token) == ("<pad>", "<s>") and tokenizer.pad_token_id >= len(plain)
    assert all(len(tokenizer.tokenize(f"a {t} b")) == 3 for t in NEW)


def test_full_model_run_resizes_and_saves_tokens_that_plain_transformers_reads(tiny_specs, ner_data, base_dir):
    import transformers

    from tunepipe import FineTunePipeLine
    base_len = len(transformers.AutoTokenizer.from_pretrained(base_dir))
    pipe = FineTunePipeLine(run_specs(tiny_specs, ner_data, base_dir))
    pipe.setup()
    assert len(pipe.tokenizer) == base_len + 2
    assert pipe.model.get_input_embeddings().num_embeddings == base_len + 2 == pipe.model.config.vocab_size
    pipe.train()
    expected = pipe.predict(TEXTS)
    saved = pipe.output_dir / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(saved)
    model = transformers.AutoModelForTokenClassification.from_pretrained(saved)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == base_len + 2
    for token in NEW:
        ids = tokenizer(f"x {token} y", add_special_tokens=False)["input_ids"]
        assert tokenizer.convert_tokens_to_ids(token) in ids and len(ids) == 3
        assert tokenizer.convert_tokens_to_ids(token) >= base_len
    again = FineTunePipeLine(pipe.specs)
    again.load_trained()
    assert again.predict(TEXTS) == expected


def test_lora_adapter_with_new_tokens_reloads_with_the_same_predictions(tiny_specs, ner_data, base_dir):
    import torch
    import transformers
    from peft import PeftModel

    from tests.conftest import close_to
    from tunepipe import FineTunePipeLine, InferencePipeLine
    base_len = len(transformers.AutoTokenizer.from_pretrained(base_dir))
    pipe = FineTunePipeLine(run_specs(tiny_specs, ner_data, base_dir, peft={"method": "lora", "r": 4}))
    pipe.setup()
    emb = pipe.model.get_input_embeddings()
    pipe.run()
    adapter = pipe.output_dir / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert any("word_embeddings" in m for m in config["modules_to_save"]), config["modules_to_save"]
    assert json.loads((adapter / "tunepipe_adapter.json").read_text())["vocab_size"] == base_len + 2
    expected = pipe.predict(TEXTS)
    reloaded = InferencePipeLine(checkpoint=str(pipe.output_dir))
    assert close_to(reloaded.predict(TEXTS)) == expected
    # the new rows are the trained ones, not the fresh rows of a resized base
    rows = reloaded.model.get_input_embeddings().weight[base_len:].detach().cpu()
    assert torch.equal(rows, emb.weight[base_len:].detach().cpu())

    # plain peft, as the model card says: resize the base to the adapter's vocabulary, then load the adapter
    card = (pipe.output_dir / "README.md").read_text()
    assert f"base.resize_token_embeddings({base_len + 2})" in card and "added tokens" in card
    info = json.loads((adapter / "tunepipe_adapter.json").read_text())
    kwargs = dict(info["model_kwargs"])
    kwargs["id2label"] = {int(k): v for k, v in kwargs["id2label"].items()}
    base = transformers.AutoModelForTokenClassification.from_pretrained(base_dir, **kwargs)
    base.resize_token_embeddings(info["vocab_size"])
    plain = PeftModel.from_pretrained(base, str(adapter)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(adapter)
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    pipe.model.eval()
    with torch.no_grad():
        want = pipe.model(**{k: v.to(pipe.model.device) for k, v in enc.items()}).logits.float().cpu()
        assert (plain(**enc).logits - want).abs().max().item() < 1e-5
