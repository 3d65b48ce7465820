"""QuantizationManager on this CPU: QLoRA (4-bit) and 8-bit LoRA train, reload bit-identically and merge in full
precision; what bitsandbytes cannot do here is refused early; post-training quantization for inference."""
import sys

import pytest

from tunepipe.errors import ConfigError, CudaError, DependencyError
from tunepipe.modeling.quantization import QuantizationManager

TEXTS = ["Greta Varga flew from Lisbon", "Ada lives in Paris ."]
STEPS = {"max_steps": 2, "eval_strategy": "steps", "eval_steps": 1, "warmup_steps": 0}  # train -> eval -> train on the 4-bit layers


def quantized_run(tiny_specs, data, task="token_classification", peft=None, quantization=None, **training):
    from tunepipe import FineTunePipeLine
    pipe = FineTunePipeLine(tiny_specs(task, data, peft=peft or {"method": "qlora", "r": 4},
                                       quantization=quantization or {}, training={**STEPS, **training}))
    pipe.setup()
    lora = {n: p.detach().clone() for n, p in pipe.model.named_parameters() if p.requires_grad}
    pipe.train()
    moved = [n for n, p in pipe.model.named_parameters() if p.requires_grad and not p.detach().equal(lora[n])]
    return pipe, moved


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def test_qlora_trains_on_cpu_and_reloads_identically(tiny_specs, ner_data):
    import torch
    import transformers
    from peft import PeftModel
    pipe, moved = quantized_run(tiny_specs, ner_data)
    assert QuantizationManager.quantization_type(pipe.model) == "bnb_4bit_nf4"
    base = pipe.model.get_base_model()
    assert type(base.bert.encoder.layer[0].attention.self.query.base_layer).__name__ == "Linear4bit"
    assert base.classifier.modules_to_save["default"].weight.dtype == torch.float32  # the head is not quantized
    assert any("lora_" in n for n in moved) and any("classifier" in n for n in moved)
    expected = pipe.predict(TEXTS)

    from tunepipe import FineTunePipeLine
    again = FineTunePipeLine(pipe.specs)
    again.load_trained()
    assert QuantizationManager.is_quantized(again.model)
    assert again.predict(TEXTS) == expected

    # plain transformers + peft, with the recorded bitsandbytes settings and the CPU layout fix
    qm = QuantizationManager(pipe.specs)
    auto = transformers.AutoModelForTokenClassification
    plain_base = auto.from_pretrained(pipe.output_dir / "base_model",
                                      **qm.load_kwargs(auto, str(pipe.output_dir / "base_model")))
    QuantizationManager.fix_cpu_layers(plain_base)
    plain = PeftModel.from_pretrained(plain_base, str(pipe.output_dir / "adapter")).eval()
    enc = again.tokenizer([t.split() for t in TEXTS], is_split_into_words=True, padding=True, return_tensors="pt")
    with torch.no_grad():  # on a GPU both models sit on it (bitsandbytes' device_map)
        assert torch.equal(plain(**enc.to(plain.device)).logits, again.model(**enc.to(again.model.device)).logits)


def test_qlora_merge_reloads_the_base_in_full_precision(tiny_specs, ner_data):
    import torch
    from transformers import AutoModelForTokenClassification

    from tunepipe.serving.merge import merge_and_unload
    from tunepipe.modeling.peft_support import load_adapter
    pipe, _ = quantized_run(tiny_specs, ner_data, learning_rate=5e-2)
    target = merge_and_unload(pipe.output_dir)
    merged = AutoModelForTokenClassification.from_pretrained(target).eval()
    assert not QuantizationManager.is_quantized(merged)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    full, tok = load_adapter(pipe.output_dir / "adapter", full_precision=True)
    quantized, _ = load_adapter(pipe.output_dir / "adapter")
    enc = tok([t.split() for t in TEXTS], is_split_into_words=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        m, f, q = merged(**enc).logits, full(**enc).logits, quantized(**enc).logits
    assert (m - f).abs().max().item() < 1e-4
    assert (m - q).abs().max().item() > 0  # the 4-bit base differs from the fp32 one; the merge used the fp32


def test_8bit_lora_trains_text_classification(tiny_specs, cls_data):
    pipe, moved = quantized_run(tiny_specs, cls_data, task="text_classification", peft={"method": "lora", "r": 4},
                                quantization={"load_in_8bit": True})
    assert QuantizationManager.quantization_type(pipe.model) == "bnb_8bit" and moved
    reviews = ["a warm and funny film", "a dull and lifeless film"]
    expected = pipe.predict(reviews)
    from tunepipe import FineTunePipeLine
    again = FineTunePipeLine(pipe.specs)
    again.load_trained()
    assert again.predict(reviews) == expected


def test_fp4_without_double_quant_is_what_gets_loaded(tiny_specs, ner_data):
    from tunepipe import FineTunePipeLine
    pipe = FineTunePipeLine(tiny_specs("token_classification", ner_data, peft={"method": "lora", "r": 4},
                                       quantization={"load_in_4bit": True, "quant_type": "fp4",
                                                     "double_quant": False, "compute_dtype": "float32"}))
    pipe.setup()
    assert QuantizationManager.quantization_type(pipe.model) == "bnb_4bit_fp4"
    q = pipe.model.get_base_model().config.quantization_config
    assert q.bnb_4bit_use_double_quant is False and str(q.bnb_4bit_compute_dtype).endswith("float32")


def test_legacy_flat_keys_turn_on_qlora(tiny_specs, ner_data):
    from tunepipe.specs import load_specs
    specs = load_specs({**tiny_specs("token_classification", ner_data), "use_peft": True, "peft_method": "lora",
                        "use_quantization": True, "quantization_type": "nf4"})
    qm = QuantizationManager(specs)
    assert (qm.bits, qm.quant_type, qm.peft_method) == (4, "nf4", "lora")
    assert QuantizationManager(load_specs({**tiny_specs("ner", ner_data), "peft": {"method": "qlora"}})).bits == 4


@pytest.mark.parametrize("sections,error,needle", [
    ({"quantization": {"load_in_4bit": True}}, ConfigError, "fully fine-tuned"),
    ({"quantization": {"load_in_4bit": True, "load_in_8bit": True}, "peft": {"method": "lora"}}, ConfigError,
     "both on"),
    pytest.param({"quantization": {"load_in_8bit": True}, "peft": {"method": "dora"}}, ConfigError,
                 "DoRA on an 8-bit", marks=pytest.mark.skipif(_cuda(), reason="a CPU-only limit of bitsandbytes"),
                 id="dora-8bit-cpu"),
])
def test_unsupported_combinations_fail_before_loading_data(tiny_specs, sections, error, needle):
    from tunepipe import FineTunePipeLine
    pipe = FineTunePipeLine(tiny_specs("token_classification", {"train": "/nope.jsonl"}, **sections))
    with pytest.raises(error) as e:
        pipe.setup()
    assert needle in e.value.message and e.value.suggestions


def test_missing_bitsandbytes_and_mps_are_clear_errors(tiny_specs, ner_data, monkeypatch):
    from tunepipe.specs import load_specs
    qm = QuantizationManager(load_specs(tiny_specs("ner", ner_data, peft={"method": "qlora"})))
    with pytest.raises(CudaError) as e:
        qm.check_supported(device="mps")
    assert "MPS" in e.value.message
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(DependencyError) as e:
        qm.check_supported(device="cpu")
    assert "tunepipe[quantization]" in e.value.suggestions[0]


def test_inference_quantization_bf16_and_dynamic_int8(tiny_specs, ner_data, tmp_path):
    import torch
    from transformers import AutoModelForTokenClassification, BertConfig

    from tunepipe.modeling.quantization import measure_inference, serialized_size
    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_config(BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=100,
        max_position_embeddings=16,
        num_labels=5)).eval()
    batch = {"input_ids": torch.randint(5, 100, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    with torch.no_grad():
        ref = model(**batch).logits
    assert set(QuantizationManager.available_inference_methods()) >= {"bf16", "dynamic_int8"}
    for method, tol in (("bf16", 0.05), ("dynamic_int8", 0.1)):
        q = QuantizationManager.quantize_for_inference(model, method)
        with torch.no_grad():
            out = q(**batch).logits.float()
        assert (out - ref).abs().max().item() < tol, method
        assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99
        assert measure_inference(q, [batch])["examples_per_second"] > 0
    assert next(model.parameters()).dtype == torch.float32  # the original is untouched
    int8 = QuantizationManager.quantize_for_inference(model, "dynamic_int8")
    assert QuantizationManager.quantization_type(int8) == "dynamic_int8"
    assert serialized_size(int8) < 0.6 * serialized_size(model)
    with pytest.raises(ConfigError):
        QuantizationManager.quantize_for_inference(int8, "bf16")
    with pytest.raises(ConfigError):
        QuantizationManager.check_peft_compatible(int8, "lora")
    if "torchao_int8_weight_only" not in QuantizationManager.available_inference_methods():
        with pytest.raises(DependencyError):
            QuantizationManager.quantize_for_inference(model, "torchao_int8_weight_only")
