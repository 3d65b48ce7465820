"""Masked LM and causal LM: blocks, completion-only labels, packing, whole-word and fixed evaluation masking, the
perplexity reduction, tokenizer training from scratch, and train -> save -> plain-transformers reload runs through
the Python API and the CLI. Tiny from-config models, data generated here, offline."""
import json
import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from tunepipe.errors import ConfigError, ValidationError
from tunepipe.specs import load_specs
from tunepipe.tasks.causal_lm import CausalLMTask, prompt_completion_example
from tunepipe.tasks.masked_lm import MaskedLMTask, group_texts, perplexity_metrics, token_nll

TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 128}
TINY_GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 128}
TRAINING = {"num_train_epochs": 2, "per_device_train_batch_size": 8, "learning_rate": 2e-3, "logging_steps": 5,
            "save_strategy": "no", "disable_tqdm": True, "dataloader_pin_memory": False}
WORDS = ("the cat dog bird sat ran flew on in under a mat park tree big small red blue happy quickly slowly "
         "house garden remarkable unbelievable wonderful").split()
COLORS = {"rose": "red", "sky": "blue", "grass": "green", "sun": "yellow"}


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20))) for _ in range(n)]


def color_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"Q: name the colour of the {thing}", "completion": f" {COLORS[thing]}"}
            for thing in (rng.choice(sorted(COLORS)) for _ in range(n))]


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tunepipe", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
    """A small WordPiece vocabulary: long words split into several pieces (for whole-word masking)."""
    from tunepipe.tiny import train_wordpiece_tokenizer
    return train_wordpiece_tokenizer(sentences(200), tmp_path_factory.mktemp("wp"), vocab_size=90)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    from tunepipe.tiny import train_bpe_tokenizer
    texts = [r["prompt"] + r["completion"] for r in color_records(100)] + sentences(100)
    return train_bpe_tokenizer(texts, tmp_path_factory.mktemp("bpe"), vocab_size=300)


def mlm_task(**data):
    return MaskedLMTask(load_specs({"task": "mlm", "model": "m", "data": {"train": "x", **data}}))


def clm_task(**data):
    return CausalLMTask(load_specs({"task": "causal_lm", "model": "m", "data": {"train": "x", **data}}))


# ---- blocks, labels, packing --------------------------------------------------------------------------------
def test_group_texts_concatenates_and_cuts_blocks():
    batch = {"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]], "attention_mask": [[1] * 3, [1] * 2, [1] * 4]}
    out = group_texts(batch, 4)
    assert out["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8]]  # 9 is the remainder, dropped as run_mlm does
    assert out["attention_mask"] == [[1] * 4, [1] * 4]
    assert group_texts(batch, 4, drop_remainder=False)["input_ids"][-1] == [9]
    assert group_texts({"input_ids": [[1, 2]]}, 4)["input_ids"] == [[1, 2]]  # too short for one block: kept


def test_mlm_preprocess_packs_blocks_and_line_by_line(wordpiece):
    texts = sentences(40)
    total = sum(len(wordpiece(t)["input_ids"]) for t in texts)
    packed = mlm_task(chunk_size=16).preprocess({"text": texts}, wordpiece)
    assert {len(b) for b in packed["input_ids"]} == {16} and len(packed["input_ids"]) == total // 16
    assert packed["input_ids"][0][0] == wordpiece.cls_token_id
    lines = mlm_task(packing=False, max_length=8).preprocess({"text": texts}, wordpiece)
    assert len(lines["input_ids"]) == 40 and max(map(len, lines["input_ids"])) == 8
    assert lines["length"] == [len(x) for x in lines["input_ids"]]


def test_completion_only_labels(bpe):
    task = clm_task(max_length=64)
    prompt, completion = "Q: name the colour of the rose", " red"
    enc = task.preprocess({"prompt": [prompt], "completion": [completion]}, bpe)
    p_ids, c_ids = bpe(prompt)["input_ids"], bpe(completion)["input_ids"]
    assert enc["input_ids"][0] == p_ids + c_ids + [bpe.eos_token_id]
    assert enc["labels"][0] == [-100] * len(p_ids) + c_ids + [bpe.eos_token_id]

    inst = task.preprocess({"instruction": ["Name a colour"], "input": [""], "output": ["blue"]}, bpe)
    template = "### Instruction:\nName a colour\n\n### Response:\n"
    assert inst["labels"][0].count(-100) == len(bpe(template)["input_ids"])
    plain = task.preprocess({"text": ["the cat sat"]}, bpe)
    assert plain["labels"][0] == plain["input_ids"][0] == bpe("the cat sat")["input_ids"] + [bpe.eos_token_id]


def test_long_prompt_loses_its_start_not_the_completion():
    ids, labels = prompt_completion_example(list(range(100, 120)), [1, 2, 3], max_length=10)
    assert ids == list(range(113, 120)) + [1, 2, 3] and labels == [-100] * 7 + [1, 2, 3]
    ids, labels = prompt_completion_example([100, 101], list(range(20)), max_length=10)
    assert ids == [100, 101] + list(range(8)) and labels[:2] == [-100, -100]


def test_packing_fills_blocks_and_keeps_labels_with_their_tokens(bpe):
    records = color_records(30)
    batch = {"prompt": [r["prompt"] for r in records], "completion": [r["completion"] for r in records]}
    unpacked = clm_task(max_length=64).preprocess(batch, bpe)
    packed = clm_task(max_length=64, packing=True, chunk_size=32).preprocess(batch, bpe)
    assert all(len(b) == 32 for b in packed["input_ids"][:-1]) and 0 < len(packed["input_ids"][-1]) <= 32
    flat = lambda rows: [x for row in rows for x in row]  # noqa: E731
    assert flat(packed["input_ids"]) == flat(unpacked["input_ids"])  # nothing lost or reordered
    assert flat(packed["labels"]) == flat(unpacked["labels"])
    assert len(packed["input_ids"]) < len(unpacked["input_ids"])


# ---- masking ------------------------------------------------------------------------------------------------
def _words_of(tokenizer, text):
    enc = tokenizer(text, return_offsets_mapping=True)
    return enc["input_ids"], enc.word_ids()


@pytest.mark.parametrize("whole_word", [True, False])
def test_whole_word_masking(wordpiece, whole_word):
    task = mlm_task(packing=False, max_length=64, whole_word_mask=whole_word, mlm_probability=0.3)
    texts = ["the remarkable bird flew quickly under the unbelievable wonderful tree"] * 40
    enc = task.preprocess({"text": texts}, wordpiece)
    ids, word_ids = _words_of(wordpiece, texts[0])
    assert len(set(w for w in word_ids if w is not None)) < len(ids) - 2  # some words are several pieces
    features = [{k: enc[k][i] for k in enc} for i in range(len(texts))]
    batch = task.collator(wordpiece)(features)
    masked = (batch["labels"] != -100).numpy()
    assert masked.any()
    partial = 0
    for row in masked:
        for w in set(w for w in word_ids if w is not None):
            pieces = [row[i] for i, wi in enumerate(word_ids) if wi == w]
            partial += len(pieces) > 1 and 0 < sum(pieces) < len(pieces)
    assert (partial == 0) if whole_word else (partial > 0)
    if whole_word:  # transformers 5 whole-word masking always writes the mask token
        assert (batch["input_ids"][torch.from_numpy(masked)] == wordpiece.mask_token_id).all()


def test_evaluation_masks_are_fixed_and_training_masks_vary(wordpiece):
    task = mlm_task(chunk_size=32)
    batch = {"text": sentences(60)}
    first, second = task.preprocess_eval(batch, wordpiece), task.preprocess_eval(batch, wordpiece)
    assert first["input_ids"] == second["input_ids"] and first["labels"] == second["labels"]
    labels = np.array(first["labels"])
    assert 0.08 < (labels != -100).mean() < 0.22  # ~ mlm_probability 0.15
    plain = task.preprocess(batch, wordpiece)
    originals = np.array(plain["input_ids"])
    assert (labels[labels != -100] == originals[labels != -100]).all()  # labels are the original tokens
    collate = task.collator(wordpiece)
    features = [{k: plain[k][i] for k in plain} for i in range(8)]
    others = [{k: plain[k][i] for k in plain} for i in range(8, 16)]
    one, same = collate(features)["labels"], collate(features)["labels"]
    assert torch.equal(one, same)  # the seed, the epoch and the batch decide: a resumed run masks alike
    assert (collate(others)["labels"] != -100).sum() > 0
    assert not torch.equal((collate(others)["labels"] != -100)[:, :8], (one != -100)[:, :8])
    collate.set_epoch(1)
    assert not torch.equal(collate(features)["labels"], one)  # the same batch in another epoch: other masks
    padded = collate([{k: first[k][i] for k in first} for i in range(8)])
    assert torch.equal(padded["labels"][:, :32], torch.tensor(first["labels"][:8]))  # eval: only padded


def test_token_nll_and_perplexity_match_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    labels = torch.tensor([[-100, 2, -100, 4, -100], [1, -100, -100, -100, -100], [-100] * 5])
    stats = token_nll(logits, labels)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), reduction="sum")
    assert stats[:, 1].tolist() == [2, 1, 0]
    assert stats[:, 0].sum().item() == pytest.approx(expected.item(), rel=1e-5)
    shifted = token_nll(logits, labels, shift=True)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    metrics = perplexity_metrics(type("P", (), {"predictions": shifted.numpy()}))
    assert metrics["predicted_tokens"] == 2
    assert metrics["perplexity"] == pytest.approx(math.exp(expected.item()), rel=1e-5)


# ---- errors -------------------------------------------------------------------------------------------------
def test_user_errors_are_explained(tmp_path):
    from tunepipe import FineTunePipeLine
    with pytest.raises(ConfigError) as e:
        FineTunePipeLine({"task": "mlm", "model": "minilm", "tokenizer": {"train": {"type": "wordpiece"}},
                          "data": {"train": [{"text": "a b"}]}, "output_dir": str(tmp_path / "o")}).setup()
    assert e.value.field == "tokenizer.train" and e.value.suggestions
    with pytest.raises(ConfigError) as e:
        FineTunePipeLine({"task": "mlm", "model": {"from_config": TINY_BERT}, "data": {"train": [{"text": "a b"}]},
                          "tokenizer": {"train": {"type": "wordpiece", "vocab_sise": 10}},
                          "output_dir": str(tmp_path / "o")}).setup()
    assert e.value.field == "tokenizer.train.vocab_sise" and "did you mean 'vocab_size'?" in e.value.suggestions
    with pytest.raises(ConfigError) as e:  # default max_length 512 > the model's 128 positions
        FineTunePipeLine({"task": "causal_lm", "model": {"from_config": TINY_GPT2}, "data": {"train": color_records(8)},
                          "tokenizer": {"train": {"type": "bpe", "vocab_size": 270}},
                          "output_dir": str(tmp_path / "o")}).setup()
    assert e.value.field == "data.max_length" and "128 positions" in str(e.value)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"question": "a"}) + "\n")
    with pytest.raises(ValidationError) as e:
        FineTunePipeLine({"task": "causal_lm", "model": "m", "data": {"train": str(bad)},
                          "output_dir": str(tmp_path / "o")}).setup()
    assert e.value.line == 2 and "'prompt' + 'completion'" in str(e.value)
    with pytest.raises(ValidationError):
        mlm_task()._with_mask_token("no mask here", "[MASK]")


# ---- end to end ---------------------------------------------------------------------------------------------
def _mlm_specs(tmp_path, **extra):
    train = tmp_path / "train.txt"
    train.write_text("\n".join(sentences(300)) + "\n")
    val = tmp_path / "validation.jsonl"
    val.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(40, seed=1)))
    return {"task": "masked_language_modeling", "output_dir": str(tmp_path / "mlm"),
            "model": {"from_config": TINY_BERT}, "tokenizer": {"train": {"type": "wordpiece", "vocab_size": 120}},
            "data": {"train": str(train), "validation": str(val), "chunk_size": 32, **extra},
            "training": dict(TRAINING)}


def test_mlm_from_scratch_trains_saves_and_reloads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from tunepipe import FineTunePipeLine
    pipe = FineTunePipeLine(_mlm_specs(tmp_path, whole_word_mask=True))
    pipe.setup()
    before = pipe.trainer.run_evaluation(pipe.datasets["validation"])
    pipe.train()
    pipe.evaluate()
    after = pipe.metrics["validation"]
    assert after["predicted_tokens"] == before["predicted_tokens"] > 0  # the same fixed masks
    assert after["perplexity"] < 0.8 * before["perplexity"]
    assert after["perplexity"] == pytest.approx(math.exp(after["token_loss"]))
    model_dir = pipe.output_dir / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (model_dir / name).is_file(), name
    assert "perplexity" in json.loads((pipe.output_dir / "metrics.json").read_text())["validation"]

    tok = AutoTokenizer.from_pretrained(model_dir)
    plain = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    assert tok.get_vocab() == pipe.tokenizer.get_vocab() and len(tok) == 120
    trained = pipe.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in plain.state_dict().items())
    texts = ["the big cat [MASK] on the mat", "a [MASK] bird flew under the [MASK] tree"]
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        plain_logits = plain(**enc).logits
    reloaded = FineTunePipeLine(_mlm_specs(tmp_path, whole_word_mask=True))
    reloaded.load_trained()
    preds = reloaded.predict(texts)
    for row, pred in enumerate(preds):
        positions = (enc["input_ids"][row] == tok.mask_token_id).nonzero()[:, 0]
        assert len(pred["fills"]) == len(positions) == texts[row].count("[MASK]")
        for pos, fills in zip(positions, pred["fills"]):
            assert fills[0]["token"] == int(plain_logits[row, pos].argmax())
            assert fills[0]["score"] == pytest.approx(float(plain_logits[row, pos].softmax(-1).max()), abs=1e-4)
    assert "[MASK]" not in preds[0]["sequence"]


def test_causal_lm_trains_completions_saves_and_generates_like_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunepipe import FineTunePipeLine
    specs = {"task": "causal_lm", "output_dir": str(tmp_path / "clm"), "model": {"from_config": TINY_GPT2},
             "tokenizer": {"train": {"type": "bpe", "vocab_size": 300}},
             "data": {"train": color_records(400), "validation": color_records(40, seed=1), "max_length": 48},
             "generation": {"max_new_tokens": 4},
             "training": {**TRAINING, "num_train_epochs": 3, "learning_rate": 3e-3}}
    pipe = FineTunePipeLine(specs)
    pipe.setup()
    before = pipe.trainer.run_evaluation(pipe.datasets["validation"])["perplexity"]
    pipe.train()
    pipe.evaluate()
    after = pipe.metrics["validation"]
    completions = [r["completion"] for r in specs["data"]["validation"]]
    # only the colour and the eos of each record are scored, never the prompt
    assert after["predicted_tokens"] == sum(len(pipe.tokenizer(c)["input_ids"]) + 1 for c in completions)
    assert after["perplexity"] < 0.5 * before
    prompts = [f"Q: name the colour of the {thing}" for thing in COLORS]
    reloaded = FineTunePipeLine(specs)
    reloaded.load_trained()
    ours = reloaded.predict(prompts + [{"prompt": prompts[0], "completion": "ignored"}])
    assert ours[-1] == ours[0]

    model_dir = pipe.output_dir / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert plain.config.eos_token_id == tok.eos_token_id and plain.config.pad_token_id == tok.pad_token_id
    for prompt, pred in zip(prompts, ours):
        enc = tok(prompt, return_tensors="pt")
        out = plain.generate(**enc, max_new_tokens=4, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
        if tok.eos_token_id in out:
            out = out[:out.index(tok.eos_token_id)]
        assert pred["completion"] == tok.decode(out, skip_special_tokens=True)
        assert pred["generated_tokens"] == len(out)
    assert [p["completion"] for p in ours[:4]] == [f" {c}" for c in COLORS.values()]  # it learned the task


def test_cli_trains_and_predicts_both_tasks(tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer
    mlm_cfg = tmp_path / "mlm.yaml"
    mlm_cfg.write_text(yaml.safe_dump(_mlm_specs(tmp_path, packing=False, max_length=24)))
    clm_train = tmp_path / "instructions.jsonl"
    clm_train.write_text("".join(json.dumps({"instruction": f"Name the colour {c}", "output": c}) + "\n"
                                 for c in list(COLORS.values()) * 20))
    clm_cfg = tmp_path / "clm.yaml"
    clm_cfg.write_text(yaml.safe_dump({
        "task": "causal_lm", "output_dir": str(tmp_path / "clm"), "model": {"from_config": TINY_GPT2},
        "tokenizer": {"train": {"type": "bpe", "vocab_size": 260}},
        "data": {"train": str(clm_train), "validation_split": 0.1, "max_length": 48, "packing": True,
                 "chunk_size": 64}, "generation": {"max_new_tokens": 3}, "training": TRAINING}))
    for cfg in (mlm_cfg, clm_cfg):
        result = run_cli("train", str(cfg))
        assert result.returncode == 0, result.stderr[-2000:]
        assert "perplexity" in result.stdout
    trained = json.loads((tmp_path / "mlm" / "metrics.json").read_text())["validation"]["perplexity"]
    result = run_cli("evaluate", str(mlm_cfg))
    assert result.returncode == 0, result.stderr[-2000:]
    # the saved model on the same fixed evaluation masks
    assert json.loads((tmp_path / "mlm" / "metrics.json").read_text())["validation"]["perplexity"] == pytest.approx(
        trained, rel=1e-3)

    inputs = tmp_path / "mlm_in.jsonl"
    inputs.write_text(json.dumps({"text": "the [MASK] sat on the mat"}) + "\n")
    result = run_cli("predict", "--model", str(tmp_path / "mlm"), "--input", str(inputs))
    assert result.returncode == 0, result.stderr[-2000:]
    pred = json.loads(result.stdout.strip().splitlines()[-1])
    tok = AutoTokenizer.from_pretrained(tmp_path / "mlm" / "model")
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "mlm" / "model").eval()
    enc = tok("the [MASK] sat on the mat", return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[0, (enc["input_ids"][0] == tok.mask_token_id).nonzero()[0, 0]]
    assert [f["token"] for f in pred["fills"][0]] == logits.topk(5).indices.tolist()

    inputs = tmp_path / "clm_in.jsonl"
    inputs.write_text(json.dumps({"instruction": "Name the colour red"}) + "\n")
    result = run_cli("predict", "--model", str(tmp_path / "clm"), "--input", str(inputs))
    assert result.returncode == 0, result.stderr[-2000:]
    pred = json.loads(result.stdout.strip().splitlines()[-1])
    assert pred["prompt"] == "### Instruction:\nName the colour red\n\n### Response:\n"
    tok = AutoTokenizer.from_pretrained(tmp_path / "clm" / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "clm" / "model").eval()
    enc = tok(pred["prompt"], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=3, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
    out = out[:out.index(tok.eos_token_id)] if tok.eos_token_id in out else out
    assert pred["completion"] == tok.decode(out, skip_special_tokens=True)


def test_tasks_listing_and_init(tmp_path, capsys):
    from tunepipe.cli import main
    assert main(["tasks"]) == 0
    listing = capsys.readouterr().out
    assert "masked_language_modeling" in listing and "causal_lm" in listing and "perplexity" in listing
    for task in ("masked_language_modeling", "causal_lm"):
        target = tmp_path / f"{task}.yaml"
        assert main(["init", task, "-o", str(target)]) == 0
        specs = load_specs(target)
        assert specs.task == task and specs.training.metric_for_best_model == "perplexity"
        assert specs.training.greater_is_better is False
