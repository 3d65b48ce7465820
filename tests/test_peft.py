"""PEFT through the pipeline on tiny from-config models: every method trains a step, saves an adapter-only directory
and reloads (through tunepipe and through plain peft) with identical predictions; checkpointing really
recomputes; merged exports match; what peft cannot do fails early with a clear error."""
import json

import pytest

from tunepipe.errors import ConfigError, ModelNotFoundError

TEXTS = ["Greta Varga flew from Lisbon", "Ada lives in Paris .", "Bluefin Robotics hired Omar"]
REVIEWS = ["a warm and funny film", "a dull and lifeless film", "the best film this year"]
ONE_STEP = {"max_steps": 1, "eval_strategy": "no", "warmup_steps": 0}


def train_run(tiny_specs, task, data, **sections):
    from tunepipe import FineTunePipeLine
    sections.setdefault("training", {})
    sections["training"] = {**ONE_STEP, **sections["training"]}
    pipe = FineTunePipeLine(tiny_specs(task, data, **sections))
    pipe.setup()
    before = {n: p.detach().clone() for n, p in pipe.model.named_parameters() if p.requires_grad}
    pipe.train()
    changed = [n for n, p in pipe.model.named_parameters() if p.requires_grad and not p.detach().equal(before[n])]
    return pipe, changed


def plain_peft_logits(pipe, auto_cls_name, texts, pair_words: bool):
    """Logits of the adapter loaded with plain transformers + peft, as the model card tells users to."""
    import torch
    import transformers
    from peft import PeftModel
    adapter = pipe.output_dir / "adapter"
    info = json.loads((adapter / "tunepipe_adapter.json").read_text())
    base_dir = (adapter / info["base_model_relative"]).resolve()
    base = getattr(transformers, auto_cls_name).from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(adapter)
    enc = tok([t.split() for t in texts] if pair_words else texts, is_split_into_words=pair_words, padding=True,
              return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits, enc


def in_memory_logits(pipe, enc):
    import torch

    from tunepipe.modeling.type_utils import TypeUtils
    pipe.model.eval()
    with torch.no_grad(), TypeUtils.plain_forward(pipe.model):
        return pipe.model(**{k: v.to(pipe.model.device) for k, v in enc.items()}).logits.float().cpu()


@pytest.mark.parametrize("peft", [{"method": "lora", "r": 4}, {"method": "dora", "r": 4}, {"method": "ia3"},
                                  {"config": {"peft_type": "LORA", "r": 4, "target_modules": ["query", "value"]}}],
                         ids=["lora", "dora", "ia3", "raw-config"])
def test_token_classification_methods_train_save_reload(tiny_specs, ner_data, peft):
    pipe, changed = train_run(tiny_specs, "token_classification", ner_data, peft=peft)
    assert changed, "no trainable weight moved after one optimizer step"
    assert any("classifier" in n for n in changed), "the task head must be trained (modules_to_save)"
    adapter = pipe.output_dir / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "tokenizer_config.json").is_file()
    assert not (pipe.output_dir / "model").exists(), "a PEFT run writes an adapter, not a full model"
    expected = pipe.predict(TEXTS)

    from tunepipe import FineTunePipeLine
    again = FineTunePipeLine(pipe.specs)
    again.load_trained()
    assert again.predict(TEXTS) == expected

    plain, enc = plain_peft_logits(pipe, "AutoModelForTokenClassification", TEXTS, pair_words=True)
    assert (plain - in_memory_logits(pipe, enc)).abs().max().item() < 1e-5


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt_tuning", "p_tuning"])
def test_text_classification_methods_train_save_reload(tiny_specs, cls_data, method):
    setting = {"lora": {"r": 4}, "ia3": {}}.get(method, {"num_virtual_tokens": 4})  # only what the method reads
    pipe, changed = train_run(tiny_specs, "text_classification", cls_data, peft={"method": method, **setting})
    assert changed and any("classifier" in n for n in changed)
    expected = pipe.predict(REVIEWS)
    from tunepipe import FineTunePipeLine
    again = FineTunePipeLine(pipe.specs)
    again.load_trained()
    assert again.predict(REVIEWS) == expected
    plain, enc = plain_peft_logits(pipe, "AutoModelForSequenceClassification", REVIEWS, pair_words=False)
    assert (plain - in_memory_logits(pipe, enc)).abs().max().item() < 1e-5


def test_adapter_holds_only_adapter_and_head_weights(tiny_specs, ner_data):
    from safetensors import safe_open

    from tunepipe.modeling.peft_support import trainable_parameters
    pipe, _ = train_run(tiny_specs, "token_classification", ner_data, peft={"method": "lora", "r": 2})
    path = pipe.output_dir / "adapter" / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        saved = sum(f.get_tensor(k).numel() for k in keys)
    assert keys and all("lora_" in k or "classifier" in k for k in keys), keys
    trainable, total = trainable_parameters(pipe.model)
    assert saved == trainable < total / 5
    assert path.stat().st_size < 4 * trainable + 16_384  # fp32 values + a safetensors header: no base weights


def test_gradient_checkpointing_recomputes_and_lora_still_learns(tiny_specs, ner_data):
    """With checkpointing on, each encoder layer runs twice per step (forward + recompute in the backward pass) and
    LoRA weights still move."""
    from tunepipe import FineTunePipeLine

    def layer_calls(checkpointing: bool):
        pipe = FineTunePipeLine(tiny_specs("token_classification", ner_data, peft={"method": "lora", "r": 4},
                                           training={**ONE_STEP, "gradient_checkpointing": checkpointing}))
        pipe.setup()
        inner = pipe.model.get_base_model().bert.encoder.layer[0].intermediate  # inside the checkpointed forward
        calls = []
        inner.register_forward_hook(lambda *a: calls.append(1))
        lora = {n: p.detach().clone() for n, p in pipe.model.named_parameters() if "lora_B" in n}
        pipe.trainer.run_training()
        moved = [n for n, p in pipe.model.named_parameters() if "lora_B" in n and not p.detach().equal(lora[n])]
        return len(calls), moved, pipe.model

    calls_on, moved_on, model = layer_calls(True)
    calls_off, moved_off, _ = layer_calls(False)
    assert model.get_base_model().is_activation_checkpointing
    assert (calls_on, calls_off) == (2, 1)
    assert moved_on and len(moved_on) == len(moved_off)


def test_merged_export_matches_adapter_and_loads_with_plain_transformers(tiny_specs, ner_data):
    import torch
    from transformers import AutoModelForTokenClassification

    from tunepipe.cli import main
    from tunepipe.modeling.peft_support import load_adapter
    pipe, _ = train_run(tiny_specs, "token_classification", ner_data, peft={"method": "lora", "r": 4},
                        training={"learning_rate": 5e-2})
    assert main(["merge", str(pipe.output_dir)]) == 0
    merged = AutoModelForTokenClassification.from_pretrained(pipe.output_dir / "merged").eval()
    assert merged.config.tunepipe_task == "token_classification"
    adapter_model, tok = load_adapter(pipe.output_dir / "adapter")
    enc = tok([t.split() for t in TEXTS], is_split_into_words=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        a, m = adapter_model(**enc).logits, merged(**enc).logits
        base = AutoModelForTokenClassification.from_pretrained(pipe.output_dir / "base_model").eval()(**enc).logits
    assert (a - m).abs().max().item() < 1e-4
    assert (a - base).abs().max().item() > 1e-3  # the merge carried the training, not just the base
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_prompt_adapter_cannot_be_merged(tiny_specs, cls_data, tmp_path):
    from tunepipe.serving.merge import merge_and_unload
    pipe, _ = train_run(tiny_specs, "text_classification", cls_data, peft={"method": "prompt_tuning",
                                                                           "num_virtual_tokens": 4})
    with pytest.raises(ConfigError) as e:
        merge_and_unload(pipe.output_dir, tmp_path / "merged")
    assert "virtual tokens" in e.value.message and any("PeftModel.from_pretrained" in s for s in e.value.suggestions)
    assert not (tmp_path / "merged").exists()
    with pytest.raises(ModelNotFoundError):
        merge_and_unload(tmp_path)


def test_cli_predicts_from_an_adapter_run(tiny_specs, ner_data, capsys):
    from tunepipe.cli import main
    pipe, _ = train_run(tiny_specs, "token_classification", ner_data, peft={"method": "lora", "r": 4})
    expected = pipe.predict("Ada lives in Paris .")
    assert main(["predict", "--model", str(pipe.output_dir), "--input", "Ada lives in Paris ."]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == expected
    card = (pipe.output_dir / "README.md")
    pipe.evaluate()
    assert "PeftModel.from_pretrained" in card.read_text()
    assert main(["evaluate", str(pipe.output_dir / "specs.yaml")]) == 0  # evaluates adapter/, not model/
    assert "validation metrics" in capsys.readouterr().out


@pytest.mark.parametrize("task,method,needle", [
    ("token_classification", "prompt_tuning", "shift"),  # virtual tokens shift per-token outputs
    ("token_classification", "p_tuning", "shift"),
    ("text_classification", "prefix_tuning", "past_key_values"),
])
def test_methods_peft_cannot_run_fail_before_loading_data(tiny_specs, ner_data, cls_data, task, method, needle):
    from tunepipe import FineTunePipeLine
    data = {"train": "/does/not/exist.jsonl"}  # proves the check runs before the data is read
    pipe = FineTunePipeLine(tiny_specs(task, data, peft={"method": method}))
    with pytest.raises(ConfigError) as e:
        pipe.setup()
    assert needle in e.value.message and e.value.field == "peft.method" and e.value.suggestions


def test_bad_targets_and_raw_configs_are_config_errors(tiny_specs, ner_data):
    from tunepipe import FineTunePipeLine
    pipe = FineTunePipeLine(tiny_specs("token_classification", {"train": "/nope.jsonl"},
                                       peft={"method": "lora", "target_modules": ["q_proj"]}))
    with pytest.raises(ConfigError) as e:
        pipe.setup()
    assert e.value.field == "peft.target_modules" and "query" in e.value.suggestions[0]
    pipe = FineTunePipeLine(tiny_specs("token_classification", {"train": "/nope.jsonl"},
                                       peft={"config": {"r": 4}}))
    with pytest.raises(ConfigError) as e:
        pipe.setup()
    assert e.value.field == "peft.config.peft_type"


def test_prefix_tuning_on_a_causal_lm_saves_and_reloads(tmp_path):
    """prefix tuning is for decoders: a tiny GPT-2 trains a step, and the reloaded adapter gives the same logits."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from tunepipe.modeling.peft_support import finish_model, load_adapter, save_adapter
    from tunepipe.specs import load_specs

    class CausalTask:  # the pieces of a Task that PEFT uses
        name, auto_model_class, peft_task_type, uses_labels = "causal_lm", "AutoModelForCausalLM", "CAUSAL_LM", False

        def model_kwargs(self):
            return {}

    specs = load_specs({"task": "token_classification", "output_dir": str(tmp_path / "run"),
                        "model": {"from_config": {"model_type": "gpt2"}},
                        "peft": {"method": "prefix_tuning", "num_virtual_tokens": 3}})
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=300,
                                                       n_positions=64, bos_token_id=0, eos_token_id=0))
    model = finish_model(base, specs, CausalTask())
    ids = torch.randint(1, 300, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_adapter(model, None, tmp_path / "run" / "adapter", specs, CausalTask())
    reloaded, tokenizer = load_adapter(tmp_path / "run" / "adapter")
    assert tokenizer is None  # none was saved, and the from_config base has none
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)


def test_an_adapter_folder_cannot_switch_on_remote_code(tiny_specs, ner_data, monkeypatch):
    """trust_remote_code comes from the caller, never from the adapter's own info file."""
    import transformers

    from tunepipe.modeling.peft_support import load_adapter
    pipe, _ = train_run(tiny_specs, "token_classification", ner_data, peft={"method": "lora", "r": 2})
    adapter = pipe.output_dir / "adapter"
    info_file = adapter / "tunepipe_adapter.json"
    info_file.write_text(json.dumps({**json.loads(info_file.read_text()), "trust_remote_code": True}))
    seen = []
    original = transformers.AutoModelForTokenClassification.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForTokenClassification, "from_pretrained", spy)
    load_adapter(adapter, "AutoModelForTokenClassification")
    load_adapter(adapter, "AutoModelForTokenClassification", trust_remote_code=True)
    assert seen == [False, True]


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning", "p_tuning"])
def test_prompt_methods_on_a_warm_started_encoder_decoder_are_refused_before_loading(tmp_path, method):
    """peft cannot read an EncoderDecoderModel's layer count: said before the data or the weights load, with a
    method that works."""
    from tunepipe import FineTunePipeLine
    from tunepipe.errors import ConfigError
    specs = {"task": "summarization", "output_dir": str(tmp_path / "run"), "model": {"encoder_decoder": "minilm"},
             "data": {"train": str(tmp_path / "absent.jsonl")}, "peft": {"method": method}}
    with pytest.raises(ConfigError) as err:
        FineTunePipeLine(specs).setup()
    assert err.value.field == "peft.method" and "encoder_decoder" in err.value.message
    assert any("lora" in s for s in err.value.suggestions)
    assert not (tmp_path / "run").exists()
