"""TypeUtils: parameter reports per dtype/device, device-checked dtype conversion, and the memory estimate the
pipeline uses to warn before an out-of-memory crash."""
import warnings

import pytest

from tunepipe.errors import ConfigError
from tunepipe.modeling.type_utils import GB, TypeUtils


def tiny_model(**overrides):
    import torch
    from transformers import AutoModelForTokenClassification, BertConfig
    torch.manual_seed(0)
    cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=200,
               max_position_embeddings=64, num_labels=3)
    return AutoModelForTokenClassification.from_config(BertConfig(**{**cfg, **overrides}))


def test_parameter_report_counts_by_dtype_device_and_trainable():
    import torch
    model = tiny_model()
    n = sum(p.numel() for p in model.parameters())
    model.classifier.to(torch.bfloat16)
    for p in model.bert.parameters():
        p.requires_grad = False
    report = TypeUtils.parameter_report(model)
    head = sum(p.numel() for p in model.classifier.parameters())
    assert report["total"] == n and report["trainable"] == head
    assert report["by_dtype"]["bfloat16"]["cpu"] == {"parameters": head, "trainable": head, "bytes": 2 * head}
    assert report["by_dtype"]["float32"]["cpu"]["parameters"] == n - head
    assert report["bytes"] == 4 * (n - head) + 2 * head
    text = TypeUtils.format_report(report)
    assert f"{n:,} parameters" in text and "bfloat16" in text


def test_4bit_weights_count_as_the_parameters_they_hold(tmp_path):
    from transformers import AutoModelForTokenClassification

    from tunepipe.modeling.quantization import QuantizationManager
    model = tiny_model()
    model.save_pretrained(tmp_path)
    q = QuantizationManager(bits=4, peft_method="lora").load(AutoModelForTokenClassification, str(tmp_path))
    full, packed = TypeUtils.parameter_report(model), TypeUtils.parameter_report(q)
    assert "uint8" in packed["by_dtype"]
    assert packed["total"] == full["total"]
    assert packed["bytes"] < 0.5 * full["bytes"]


def test_convert_checks_the_device():
    import torch

    from tunepipe.modeling.quantization import QuantizationManager
    assert TypeUtils.device_supports("fp32", "cpu") == (True, None)
    assert TypeUtils.device_supports("bf16", "cpu")[0] is True
    assert TypeUtils.device_supports("fp16", "cpu")[0] is False
    model = TypeUtils.convert(tiny_model(), "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ConfigError) as e:
        TypeUtils.convert(tiny_model(), "float16")
    assert "bfloat16" in e.value.suggestions[0]
    with pytest.raises(ConfigError):
        TypeUtils.dtype("float8")
    int8 = QuantizationManager.quantize_for_inference(tiny_model(), "dynamic_int8")
    with pytest.raises(ConfigError):
        TypeUtils.convert(int8, "bf16")


def test_memory_estimate_follows_the_formula_and_the_method():
    model = tiny_model()
    n = sum(p.numel() for p in model.parameters())
    b, s, h, a, layers = 8, 32, 64, 4, 2
    est = TypeUtils.estimate_memory(model, b, s, activation_bytes=4, device="cpu")
    assert est.weights == 4 * n + sum(x.numel() * x.element_size() for x in model.buffers())
    assert est.gradients == 4 * n and est.optimizer == 8 * n
    assert est.activations == pytest.approx(layers * s * b * h * (34 + 5 * a * s / h) * 2)
    assert est.total == est.weights + est.gradients + est.optimizer + est.activations + est.overhead
    ckpt = TypeUtils.estimate_memory(model, b, s, gradient_checkpointing=True, device="cpu")
    # checkpointing keeps each layer's input plus one layer's activations for the recomputation
    assert ckpt.activations == pytest.approx(layers * s * b * h * 4 + est.activations / layers)
    deep = tiny_model(num_hidden_layers=12)
    assert (TypeUtils.estimate_memory(deep, b, s, gradient_checkpointing=True, device="cpu").activations
            < TypeUtils.estimate_memory(deep, b, s, device="cpu").activations / 5)
    double = TypeUtils.estimate_memory(model, 2 * b, s, device="cpu")
    assert double.activations == pytest.approx(2 * est.activations)
    from peft import LoraConfig, get_peft_model
    with_dropout = get_peft_model(tiny_model(), LoraConfig(r=2, lora_dropout=0.1, target_modules=["query"]))
    assert TypeUtils.estimate_memory(with_dropout, b, s, device="cpu").activations == pytest.approx(
        1.33 * est.activations)  # the dropped-out input copies LoRA keeps for backward
    for p in model.bert.parameters():
        p.requires_grad = False  # a frozen base (LoRA-like): no gradients or optimizer states for it
    frozen = TypeUtils.estimate_memory(model, b, s, device="cpu")
    assert frozen.gradients + frozen.optimizer < (est.gradients + est.optimizer) / 50


def test_pipeline_warns_before_an_oom_with_what_would_fit(tiny_specs, ner_data, monkeypatch):
    from tunepipe import FineTunePipeLine
    pipe = FineTunePipeLine(tiny_specs("token_classification", ner_data,
                                       training={"per_device_train_batch_size": 64}))
    monkeypatch.setattr(TypeUtils, "available_memory", staticmethod(lambda device="cpu": int(0.7 * GB)))
    with pytest.warns(ResourceWarning) as caught:
        pipe.setup()
    message = str(caught[0].message)
    assert "may run out of memory" in message
    assert "gradient_checkpointing: true" in message and "method: lora" in message
    assert not pipe.memory_estimate.fits() and pipe.memory_estimate.suggestions

    plenty = FineTunePipeLine(tiny_specs("token_classification", ner_data))
    monkeypatch.setattr(TypeUtils, "available_memory", staticmethod(lambda device="cpu": 64 * GB))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        plenty.setup()
    assert plenty.memory_estimate.fits()


def test_batch_size_suggestion_is_one_that_fits():
    from tunepipe.specs import load_specs
    from tunepipe.modeling.type_utils import _alternatives
    model = tiny_model(max_position_embeddings=512)
    specs = load_specs({"task": "ner", "model": "m", "data": {"train": "x", "max_length": 512},
                        "training": {"per_device_train_batch_size": 64}})
    big = TypeUtils.estimate_memory(model, 64, 512, device="cpu")
    small = TypeUtils.estimate_memory(model, 16, 512, device="cpu")
    big.available = int((small.total + TypeUtils.estimate_memory(model, 32, 512, device="cpu").total) / 2 / 0.9)
    monkey = TypeUtils.available_memory
    try:
        TypeUtils.available_memory = staticmethod(lambda device="cpu": big.available)
        options = _alternatives(model, specs, 512, big, {"gradient_checkpointing": False, "activation_bytes": 4})
    finally:
        TypeUtils.available_memory = monkey
    batch = [o for o in options if o.startswith("training.per_device_train_batch_size")]
    assert batch and batch[0].startswith("training.per_device_train_batch_size: 16 with gradient_accumulation_steps: 4")
