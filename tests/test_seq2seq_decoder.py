"""Seq2seq tasks on decoder-only models: the source is a prompt, the target its completion (tiny GPT-2s, offline)."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tunepipe.specs import load_specs
from tunepipe.tasks import seq2seq_decoder
from tunepipe.tasks.seq2seq import SummarizationTask, TextGenerationTask

TINY_GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 128}
COLORS = {"rose": "red", "sky": "blue", "grass": "green", "sun": "yellow"}
TRAINING = {"num_train_epochs": 3, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 5,
            "learning_rate": 3e-3, "logging_steps": 5, "save_strategy": "no", "disable_tqdm": True,
            "dataloader_pin_memory": False, "bf16": False}


def colour_records(n: int, seed: int = 0) -> list[dict]:
    """The target depends on the source: a model that ignores its prompt cannot score."""
    rng = random.Random(seed)
    return [{"source": f"name the colour of the {thing}", "target": COLORS[thing]}
            for thing in (rng.choice(sorted(COLORS)) for _ in range(n))]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    from tunepipe.tiny import train_bpe_tokenizer
    texts = [r["source"] + "\nOutput: " + r["target"] for r in colour_records(200)]
    return train_bpe_tokenizer(texts, tmp_path_factory.mktemp("bpe"), vocab_size=280)


def decoder_task(cls=SummarizationTask, tokenizer=None, **data):
    from transformers import GPT2Config
    task = cls(load_specs({"task": cls.name, "model": "m", "data": {"train": "x", **data}}))
    task.adopt_config(GPT2Config(n_layer=1))
    task.tokenizer = tokenizer
    return task


def specs_for(tmp_path, backend: str = "hf", **training) -> dict:
    return {"task": "text_generation", "output_dir": str(tmp_path / f"run-{backend}"),
            "model": {"from_config": TINY_GPT2}, "tokenizer": {"train": {"type": "bpe", "vocab_size": 280}},
            "data": {"train": colour_records(400), "validation": colour_records(12, seed=1), "max_length": 48},
            "generation": {"max_new_tokens": 6, "num_beams": 1},
            "training": {**TRAINING, **training},
            "use_accelerate": backend in ("accelerate", "both"), "use_lightning": backend in ("lightning", "both")}


def test_decoder_only_models_are_told_apart():
    from transformers import BertConfig, GPT2Config, LlamaConfig, T5Config
    assert seq2seq_decoder.is_decoder_only(GPT2Config()) and seq2seq_decoder.is_decoder_only(LlamaConfig())
    # BERT has a causal-LM head class but is warm-started as an encoder-decoder; T5 is one already
    assert not seq2seq_decoder.is_decoder_only(BertConfig()) and not seq2seq_decoder.is_decoder_only(T5Config())
    task = decoder_task()
    assert (task.auto_model_class, task.peft_task_type) == ("AutoModelForCausalLM", "CAUSAL_LM")
    task.adopt_config(T5Config())
    assert (task.auto_model_class, task.peft_task_type) == ("AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM")


def test_prompt_completion_labels_and_truncation_keep_the_cue(bpe):
    task = decoder_task(tokenizer=bpe, max_length=40, max_target_length=8)
    doc, summary = "name the colour of the sky", "blue"
    enc = task.preprocess({"document": [doc], "summary": [summary]}, bpe)
    prompt = bpe(doc + "\nTL;DR:")["input_ids"]
    completion = bpe(" " + summary, add_special_tokens=False)["input_ids"] + [bpe.eos_token_id]
    assert enc["input_ids"][0] == prompt + completion
    assert enc["labels"][0] == [-100] * len(prompt) + completion
    assert enc["length"][0] == len(prompt + completion)

    long_doc = " ".join(["name the colour of the sky"] * 20)
    enc = task.preprocess({"document": [long_doc], "summary": [summary]}, bpe)
    suffix = bpe("\nTL;DR:", add_special_tokens=False)["input_ids"]
    prompt_len = enc["labels"][0].index(completion[0])
    assert enc["input_ids"][0][prompt_len - len(suffix):prompt_len] == suffix  # the cue survives truncation
    assert len(enc["input_ids"][0]) <= 40 and enc["input_ids"][0][prompt_len:] == completion
    unlabelled = task.preprocess({"document": [doc], "summary": [None]}, bpe)  # a test record: prompt only
    assert "labels" not in unlabelled and unlabelled["input_ids"][0] == prompt


def test_generation_starts_from_the_prompt_left_padded(bpe):
    task = decoder_task(TextGenerationTask, tokenizer=bpe, max_length=48)
    rows = task.preprocess({"source": ["name the colour of the sky", "the rose"], "target": ["blue", "red"]}, bpe)
    batch = task.collator(bpe)([{k: rows[k][i] for k in ("input_ids", "attention_mask", "labels")}
                                for i in range(2)])
    inputs = task.generation_inputs(batch)
    prompts = [bpe(s + "\nOutput:")["input_ids"] for s in ("name the colour of the sky", "the rose")]
    width = max(map(len, prompts))
    assert inputs["input_ids"].tolist() == [[bpe.pad_token_id] * (width - len(p)) + p for p in prompts]
    assert inputs["attention_mask"].tolist() == [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    generated = torch.cat([inputs["input_ids"], torch.tensor([[7, 8], [9, 10]])], dim=1)
    assert task.generated_part(generated, inputs).tolist() == [[7, 8], [9, 10]]


def test_decoder_only_trains_evaluates_and_reloads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunepipe import FineTunePipeLine
    pipe = FineTunePipeLine(specs_for(tmp_path, num_train_epochs=6))
    seen = {}
    pipe.setup()
    score = pipe.task.score

    def capture(predictions, references):  # in evaluation order (length-grouped), with their references
        seen["pairs"] = sorted(zip(predictions, (r[0] for r in references)))
        return score(predictions, references)
    pipe.task.score = capture
    pipe.train()
    metrics = pipe.evaluate()["validation"]
    assert pipe.task.auto_model_class == "AutoModelForCausalLM"
    assert metrics["exact_match"] == 100.0  # it reads the prompt: each thing gets its own colour
    validation = colour_records(12, seed=1)
    colour_tokens = [len(pipe.tokenizer(" " + r["target"], add_special_tokens=False)["input_ids"]) for r in validation]
    # the colour, then eos: the prompt is not counted as generated
    assert metrics["gen_len"] == pytest.approx(sum(colour_tokens) / len(colour_tokens))
    sources = [r["source"] for r in validation]
    ours = [p["generated_text"] for p in pipe.predict(sources)]
    assert sorted(zip(ours, (r["target"] for r in validation))) == seen["pairs"]

    model_dir = pipe.output_dir / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for source, text in zip(sources[:4], ours):
        enc = tok(source + "\nOutput:", return_tensors="pt")
        with torch.no_grad():  # max_new_tokens, greedy, eos and pad come from the saved generation_config.json
            out = plain.generate(**enc)[0, enc["input_ids"].shape[1]:]
        assert tok.decode(out, skip_special_tokens=True).strip() == text

    fresh = FineTunePipeLine(str(pipe.output_dir / "specs.yaml"))
    fresh.load_trained()
    assert isinstance(fresh.model, type(plain))
    assert [p["generated_text"] for p in fresh.predict(sources)] == ours


@pytest.mark.parametrize("backend", ["accelerate", "lightning"])
def test_other_backends_evaluate_from_the_prompt(tmp_path, backend):
    """Same evaluation on the Accelerate and Lightning loops: generated from the prompt, scored on new tokens."""
    from tunepipe import FineTunePipeLine
    pipe = FineTunePipeLine(specs_for(tmp_path, backend, num_train_epochs=1))
    seen = {}
    pipe.setup()
    score = pipe.task.score

    def capture(predictions, references):
        seen["pairs"] = sorted(zip(predictions, (r[0] for r in references)))
        return score(predictions, references)
    pipe.task.score = capture
    pipe.train()
    metrics = pipe.evaluate()["validation"]
    assert {"rouge1", "exact_match", "gen_len", "loss"} <= set(metrics)
    assert metrics["gen_len_max"] <= 6
    validation = colour_records(12, seed=1)
    ours = [p["generated_text"] for p in pipe.predict([r["source"] for r in validation])]
    assert sorted(zip(ours, (r["target"] for r in validation))) == seen["pairs"]


def test_cli_trains_and_predicts_a_decoder_only_summarizer(tmp_path):
    rows = [{"document": r["source"], "summary": r["target"]} for r in colour_records(120)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "summ.yaml"
    cfg.write_text(yaml.safe_dump({
        "task": "summarization", "output_dir": str(tmp_path / "summ"), "model": {"from_config": TINY_GPT2},
        "tokenizer": {"train": {"type": "bpe", "vocab_size": 280}},
        "data": {"train": str(train), "validation_split": 0.1, "max_length": 48, "max_target_length": 8},
        "generation": {"max_new_tokens": 4, "num_beams": 2}, "training": {**TRAINING, "num_train_epochs": 1}}))
    run = subprocess.run([sys.executable, "-m", "tunepipe", "train", str(cfg)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "rougeL" in run.stdout
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"document": "name the colour of the sun"}) + "\n")
    run = subprocess.run([sys.executable, "-m", "tunepipe", "predict", "--model", str(tmp_path / "summ"),
                          "--input", str(inputs)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    pred = json.loads(run.stdout.strip().splitlines()[-1])
    assert isinstance(pred["summary_text"], str) and "colour" not in pred["summary_text"]  # no prompt echoed
    assert json.loads((Path(tmp_path / "summ" / "model" / "config.json")).read_text())["model_type"] == "gpt2"


def test_lora_on_a_decoder_only_model_saves_a_causal_lm_adapter(tmp_path):
    from tunepipe import FineTunePipeLine
    specs = specs_for(tmp_path, num_train_epochs=1)
    specs["peft"] = {"method": "lora", "r": 4}
    pipe = FineTunePipeLine(specs)
    pipe.run()
    adapter = pipe.output_dir / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    assert json.loads((adapter / "tunepipe_adapter.json").read_text())["auto_model_class"] == "AutoModelForCausalLM"
    sources = [r["source"] for r in colour_records(6, seed=1)]
    ours = pipe.predict(sources)
    fresh = FineTunePipeLine(str(pipe.output_dir / "specs.yaml"))
    fresh.load_trained()
    assert fresh.task.auto_model_class == "AutoModelForCausalLM"
    assert fresh.predict(sources) == ours
    from tunepipe import InferencePipeLine, MultiAdapterManager
    # prompts, not encoder inputs, after reloading
    assert InferencePipeLine(checkpoint=str(adapter)).predict(sources) == ours
    manager = MultiAdapterManager()
    manager.register_adapter("colours", adapter)
    assert manager.predict(sources, adapter="colours") == ours
    base, _, base_task = manager.set_adapter(None, "text_generation")  # the base alone is a causal LM too
    assert base_task.decoder_only and base.__class__.__name__ == "GPT2LMHeadModel"
    bare = manager.predict(sources, adapter=None, task="text_generation")  # the base keeps the trained tokenizer
    assert len(bare) == len(sources) and all(isinstance(p["generated_text"], str) for p in bare)


def test_decoder_only_models_decode_greedily_unless_the_specs_say_otherwise(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    decoder_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(decoder_dir)
    base = {"task": "summarization", "data": {"train": "x"}}
    for model in ({"from_config": TINY_GPT2}, str(decoder_dir), {"name_or_path": str(decoder_dir)}):
        gen = load_specs({**base, "model": model}).generation
        assert (gen.num_beams, gen.no_repeat_ngram_size, gen.max_new_tokens) == (1, 0, 128)
    gen = load_specs({**base, "model": str(decoder_dir), "generation": {"num_beams": 3}}).generation
    assert (gen.num_beams, gen.no_repeat_ngram_size) == (3, 0)
    for model in ({"from_config": {"model_type": "t5"}}, {"encoder_decoder": "minilm"}, "not/a-local-model"):
        gen = load_specs({**base, "model": model}).generation  # encoder-decoders (or unknown): beam search
        assert (gen.num_beams, gen.no_repeat_ngram_size) == (4, 3)
