"""peft's own parameter names in `peft:` beside tunepipe's: mapped where they mean the same, passed through to the
method's peft config class otherwise, typos and contradictions refused, and a run's specs.yaml reloading to the same
config."""
import json

import pytest

from tunepipe.errors import ConfigError
from tunepipe.specs import load_specs

BASE = {"task": "text_classification", "model": "minilm"}
ONE_STEP = {"max_steps": 1, "eval_strategy": "no", "warmup_steps": 0}


def peft_of(peft):
    return load_specs({**BASE, "peft": peft}).peft


def config_error(peft) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        load_specs({**BASE, "peft": peft})
    return e.value


def test_peft_names_map_onto_tunepipes_and_the_rest_passes_through():
    p = peft_of({"method": "lora", "r": 4, "lora_alpha": 32, "lora_dropout": 0.1, "init_lora_weights": "gaussian",
                 "use_rslora": True, "target_modules": ["query", "value"]})
    assert (p.method, p.r, p.alpha, p.dropout, p.target_modules) == ("lora", 4, 32, 0.1, ["query", "value"])
    assert p.config == {"init_lora_weights": "gaussian", "use_rslora": True}
    # a copied peft config: peft_type and use_dora name the method; task_type is kept to be checked against the task
    p = peft_of({"peft_type": "LORA", "use_dora": True, "lora_alpha": 8, "bias": "lora_only", "task_type": "SEQ_CLS"})
    assert (p.method, p.alpha, p.bias, p.config) == ("dora", 8, "lora_only", {"task_type": "SEQ_CLS"})
    # peft names written inside peft.config land in the same place
    assert peft_of({"method": "lora", "config": {"lora_alpha": 32, "init_lora_weights": "gaussian"}}) == \
        peft_of({"method": "lora", "lora_alpha": 32, "init_lora_weights": "gaussian"})
    p = peft_of({"method": "prompt_tuning", "num_virtual_tokens": 5, "prompt_tuning_init": "RANDOM"})
    assert (p.num_virtual_tokens, p.config) == (5, {"prompt_tuning_init": "RANDOM"})
    p = peft_of({"method": "ia3", "target_modules": ["query", "output.dense"], "feedforward_modules": ["output.dense"]})
    assert p.config == {"feedforward_modules": ["output.dense"]}


@pytest.mark.parametrize("peft", [
    {"method": "lora", "lora_alpha": 32, "lora_dropout": 0.0, "init_lora_weights": "gaussian", "use_rslora": True},
    {"peft_type": "LORA", "use_dora": True, "r": 2, "task_type": "SEQ_CLS"},
    {"method": "p_tuning", "num_virtual_tokens": 3, "encoder_hidden_size": 16},
    {"method": "ia3", "target_modules": ["query", "output.dense"], "feedforward_modules": ["output.dense"]},
], ids=["lora", "dora", "p_tuning", "ia3"])
def test_resolved_specs_reload_to_the_same_config(peft, tmp_path):
    specs = load_specs({**BASE, "output_dir": str(tmp_path), "peft": peft})
    (tmp_path / "specs.yaml").write_text(specs.to_yaml())
    again = load_specs(tmp_path / "specs.yaml")
    assert again.peft == specs.peft and again.fingerprint() == specs.fingerprint()


def test_contradictions_name_both_fields():
    e = config_error({"method": "lora", "alpha": 16, "lora_alpha": 32})
    assert "peft.alpha" in e.message and "peft.lora_alpha" in e.message and e.field == "peft.lora_alpha"
    e = config_error({"method": "lora", "dropout": 0.1, "config": {"lora_dropout": 0.2}})
    assert "peft.dropout" in e.message and "peft.config.lora_dropout" in e.message
    e = config_error({"method": "ia3", "peft_type": "LORA"})
    assert "peft.method" in e.message and "peft.peft_type" in e.message
    assert config_error({"method": "dora", "use_dora": False}).field == "peft.use_dora"
    # the same value given both ways is no contradiction
    assert peft_of({"method": "lora", "alpha": 32, "lora_alpha": 32}).alpha == 32


def test_typos_get_did_you_mean_among_the_methods_peft_class():
    e = config_error({"method": "lora", "lora_alfa": 32})
    assert e.field == "peft.lora_alfa" and "LoraConfig" in e.message
    assert "did you mean 'lora_alpha'?" in e.suggestions
    e = config_error({"method": "lora", "init_lora_weight": "gaussian"})
    assert "did you mean 'init_lora_weights'?" in e.suggestions
    e = config_error({"config": {"peft_type": "LORA", "r": 4, "use_rslorra": True}})
    assert e.field == "peft.config.use_rslorra" and "did you mean 'use_rslora'?" in e.suggestions


def test_keys_of_another_method_are_refused():
    e = config_error({"method": "lora", "num_virtual_tokens": 10})
    assert e.field == "peft.num_virtual_tokens" and "prompt_tuning" in e.message
    e = config_error({"method": "lora", "encoder_hidden_size": 16})
    assert e.field == "peft.encoder_hidden_size" and "p_tuning" in e.message
    e = config_error({"method": "ia3", "lora_alpha": 8})
    assert e.field == "peft.lora_alpha" and "ia3" in e.message
    e = config_error({"method": "prompt_tuning", "init_lora_weights": "gaussian"})
    assert "lora" in e.message
    # settings tunepipe fills itself, and peft names without a method, are refused too
    assert config_error({"method": "lora", "base_model_name_or_path": "x"}).field == "peft.base_model_name_or_path"
    assert config_error({"use_rslora": True}).field == "peft.use_rslora"
    # a complete peft.config (peft_type) with tunepipe's settings beside it: they would be ignored
    assert config_error({"config": {"peft_type": "LORA"}, "r": 4}).field == "peft.r"


def _pipe(tiny_specs, cls_data, peft):
    from tunepipe import FineTunePipeLine
    return FineTunePipeLine(tiny_specs("text_classification", cls_data, peft=peft, training=ONE_STEP))


def test_task_type_must_agree_with_the_task(tiny_specs, cls_data):
    pipe = _pipe(tiny_specs, cls_data, {"method": "lora", "task_type": "TOKEN_CLS"})
    with pytest.raises(ConfigError) as e:
        pipe.setup()
    assert e.value.field == "peft.config.task_type" and "SEQ_CLS" in e.value.message
    pipe = _pipe(tiny_specs, cls_data, {"config": {"peft_type": "LORA", "task_type": "CAUSAL_LM"}})
    with pytest.raises(ConfigError) as e:
        pipe.setup()
    assert e.value.field == "peft.config.task_type"


def test_raw_config_of_another_peft_type_is_checked_against_its_class(tiny_specs, cls_data):
    pipe = _pipe(tiny_specs, cls_data, {"config": {"peft_type": "LOHA", "r": 4, "alhpa": 8}})
    with pytest.raises(ConfigError) as e:
        pipe.setup()
    assert e.value.field == "peft.config.alhpa" and "did you mean 'alpha'?" in e.value.suggestions


def test_a_run_with_peft_names_trains_with_them_and_its_specs_reload(tiny_specs, cls_data):
    from tunepipe import FineTunePipeLine
    pipe = _pipe(tiny_specs, cls_data, {"method": "lora", "r": 4, "lora_alpha": 32, "lora_dropout": 0.0,
                                        "use_rslora": True, "init_lora_weights": "gaussian", "task_type": "SEQ_CLS"})
    pipe.run()
    config = pipe.model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora, config.init_lora_weights) == \
        (4, 32, 0.0, True, "gaussian")
    saved = json.loads((pipe.output_dir / "adapter" / "adapter_config.json").read_text())
    assert (saved["lora_alpha"], saved["use_rslora"], saved["init_lora_weights"]) == (32, True, "gaussian")
    again = load_specs(pipe.output_dir / "specs.yaml")
    assert again.peft == pipe.specs.peft and again.fingerprint() == pipe.specs.fingerprint()
    reloaded = FineTunePipeLine(again)
    reloaded.load_trained()
    texts = ["a warm and funny film", "a dull and lifeless film"]
    assert reloaded.predict(texts) == pipe.predict(texts)
