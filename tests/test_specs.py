"""Specs: typed sections, legacy flat keys, overrides, and errors that name the key and suggest a fix."""
import json

import pytest
import yaml

from tunepipe.errors import ConfigError, TaskTypeError
from tunepipe.specs import Specs, load_specs

BASE = {"task": "token_classification", "model": "minilm", "data": {"train": "t.jsonl"}}


def test_dict_gets_task_defaults_and_safe_defaults():
    s = load_specs(BASE)
    assert isinstance(s, Specs)
    assert s.model.name_or_path == "minilm"
    assert s.data.text_column == "tokens" and s.data.label_column == "ner_tags"
    assert s.training.metric_for_best_model == "f1"
    assert s.training.fp16 is False and s.training.bf16 == "auto"
    assert s.backend == "hf"
    assert s.output_dir == "runs/token_classification"


def test_yaml_and_json_files(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({**BASE, "training": {"learning_rate": 3e-5}}))
    (tmp_path / "b.json").write_text(json.dumps({**BASE, "training": {"learning_rate": 4e-5}}))
    assert load_specs(tmp_path / "a.yaml").training.learning_rate == 3e-5
    assert load_specs(str(tmp_path / "b.json")).training.learning_rate == 4e-5


def test_legacy_flat_keys_map_into_sections():
    s = load_specs({"task_type": "ner", "output_dir": "out", "model": "m", "num_train_epochs": 2, "learning_rate": 1e-4,
                    "weight_decay": 0.01, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
                    "gradient_accumulation_steps": 2, "max_grad_norm": 0.5, "max_length": 64, "chunk_size": 32,
                    "stride": 16, "mlm_probability": 0.2, "scheduler_strategy": "cosine", "use_peft": True,
                    "peft_method": "dora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "lora_bias": "all",
                    "use_quantization": True, "quantization_type": "8bit", "use_gradient_checkpointing": True,
                    "fp16": False, "evaluation_strategy": "no"})
    t = s.training
    assert (s.task, s.output_dir) == ("token_classification", "out")
    assert (t.num_train_epochs, t.learning_rate, t.weight_decay) == (2, 1e-4, 0.01)
    assert (t.per_device_train_batch_size, t.per_device_eval_batch_size, t.gradient_accumulation_steps) == (4, 8, 2)
    assert (t.max_grad_norm, t.lr_scheduler_type, t.gradient_checkpointing, t.eval_strategy) == (0.5, "cosine", True, "no")
    assert (s.data.max_length, s.data.chunk_size, s.data.stride, s.data.mlm_probability) == (64, 32, 16, 0.2)
    assert (s.peft.method, s.peft.r, s.peft.alpha, s.peft.dropout, s.peft.bias) == ("dora", 4, 8, 0.1, "all")
    assert s.quantization.load_in_8bit and not s.quantization.load_in_4bit


def test_use_peft_defaults_to_lora_and_4bit_type():
    s = load_specs({**BASE, "use_peft": True, "use_quantization": True, "quantization_type": "nf4"})
    assert s.peft.method == "lora"
    assert s.quantization.load_in_4bit and s.quantization.quant_type == "nf4"


def test_renamed_transformers_keys_inside_training():
    s = load_specs({**BASE, "training": {"evaluation_strategy": "steps", "group_by_length": False,
                                         "warmup_steps": 10, "optim": "adamw_torch"}})
    assert s.training.eval_strategy == "steps"
    assert s.training.train_sampling_strategy == "random"
    assert s.training.model_extra == {"optim": "adamw_torch"}  # passed through to TrainingArguments


@pytest.mark.parametrize("raw, field, hint", [
    ({**BASE, "learning_rte": 1e-4}, "learning_rte", "learning_rate"),
    ({**BASE, "training": {"learning_rte": 1e-4}}, "training.learning_rte", "learning_rate"),
    ({**BASE, "data": {"train": "t.jsonl", "lable_column": "x"}}, "data.lable_column", "label_column"),
    ({**BASE, "modle": "minilm"}, "modle", "model"),
])
def test_unknown_key_says_did_you_mean(raw, field, hint):
    with pytest.raises(ConfigError) as e:
        load_specs(raw)
    assert e.value.code == "CONFIG_ERROR"
    assert e.value.field == field
    assert any(hint in s for s in e.value.suggestions), e.value.suggestions


def test_wrong_type_names_the_field():
    with pytest.raises(ConfigError) as e:
        load_specs({**BASE, "training": {"learning_rate": "fast"}})
    assert e.value.field == "training.learning_rate"
    assert e.value.suggestions


def test_overrides_parse_values_and_create_paths():
    s = load_specs(BASE, overrides=["training.learning_rate=3e-5", "data.max_length=64", "model=other",
                                    "training.bf16=false", "peft.target_modules=[query, value]"])
    assert s.training.learning_rate == 3e-5 and isinstance(s.training.learning_rate, float)
    assert s.data.max_length == 64
    assert s.model.name_or_path == "other"
    assert s.training.bf16 is False
    assert s.peft.target_modules == ["query", "value"]
    with pytest.raises(ConfigError):
        load_specs(BASE, overrides=["training.learning_rate"])


def test_backend_flags():
    assert load_specs({**BASE, "use_accelerate": True}).backend == "accelerate"
    assert load_specs({**BASE, "use_accelerate": True, "use_lightning": True}).backend == "lightning+accelerate"
    with pytest.raises(ConfigError) as e:
        load_specs({**BASE, "backend": "hf", "use_lightning": True})
    assert e.value.field == "backend"


def test_unknown_task_and_missing_task():
    with pytest.raises(TaskTypeError) as e:
        load_specs({**BASE, "task": "token_clasification"})
    assert any("token_classification" in s for s in e.value.suggestions)
    with pytest.raises(ConfigError) as e:
        load_specs({"model": "minilm"})
    assert e.value.field == "task"


def test_invalid_yaml_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("task: ner\ndata:\n  train: a.jsonl\n   validation: b.jsonl\n")
    with pytest.raises(ConfigError) as e:
        load_specs(p)
    assert e.value.file == str(p) and e.value.line == 4


def test_fingerprint_ignores_output_dir_but_not_hyperparameters():
    a = load_specs({**BASE, "output_dir": "x"})
    b = load_specs({**BASE, "output_dir": "y"})
    c = load_specs({**BASE, "training": {"learning_rate": 1e-3}})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_resolved_yaml_round_trips():
    s = load_specs({**BASE, "training": {"optim": "adamw_torch"}})
    again = load_specs(yaml.safe_load(s.to_yaml()))
    assert again.fingerprint() == s.fingerprint()


def test_original_signature_and_args_dir(tmp_path):
    from tunepipe import FineTunePipeLine
    (tmp_path / "args.json").write_text(json.dumps({"output_dir": str(tmp_path / "o"), "model": "minilm",
                                                    "data": {"train": "t.jsonl"}, "learning_rate": 2e-5}))
    pipe = FineTunePipeLine(str(tmp_path), "text_classification", chosen_metric="macro_f1", use_accelerate=False)
    assert pipe.specs.task == "text_classification"
    assert pipe.specs.training.metric_for_best_model == "macro_f1"
    assert pipe.specs.training.learning_rate == 2e-5
    pipe2 = FineTunePipeLine(BASE, overrides=["training.seed=7"])
    assert pipe2.specs.training.seed == 7


def test_training_arguments_are_safe_on_cpu(tmp_path):
    from tunepipe.trainers.settings import training_arguments
    args = training_arguments(load_specs(BASE), tmp_path, has_eval=False)
    assert args.push_to_hub is False
    assert args.fp16 is False
    assert args.eval_strategy == "no"
    assert args.report_to in ([], "none", ["none"])


def test_fp16_without_cuda_is_a_clear_error(tmp_path):
    import torch

    from tunepipe.errors import CudaError
    from tunepipe.trainers.settings import training_arguments
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: fp16 is allowed")
    with pytest.raises(CudaError) as e:
        training_arguments(load_specs({**BASE, "fp16": True}), tmp_path, has_eval=False)
    assert e.value.field == "training.fp16" and e.value.suggestions


def test_an_unquoted_no_strategy_means_no(tmp_path):
    """YAML reads `no` as false; `save_strategy: no` (as the error hints write it) must still mean "no"."""
    path = tmp_path / "s.yaml"
    path.write_text("task: ner\ndata: {train: x.jsonl}\ntraining:\n  save_strategy: no\n  eval_strategy: no\n")
    specs = load_specs(path)
    assert (specs.training.save_strategy, specs.training.eval_strategy) == ("no", "no")
    assert load_specs({"task": "ner", "data": {"train": "x"}},
                      overrides=["training.save_strategy=no"]).training.save_strategy == "no"
