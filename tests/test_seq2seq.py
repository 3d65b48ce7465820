"""Sequence to sequence: metrics on hand-checked cases, preprocessing, generation length, and train -> save ->
reload with plain transformers -> identical generations (Python API and CLI), on tiny models built here."""
import contextlib
import json
import logging
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tunepipe.specs import load_specs
from tunepipe.tasks.seq2seq import SummarizationTask, TextGenerationTask, TranslationTask
from tunepipe.tasks.seq2seq_metrics import bleu_chrf, exact_match, generated_lengths, rouge, split_sentences

EN = "man woman dog cat red blue big small runs sits eats sleeps the a on under park house".split()
DE = {w: w[::-1] + "en" for w in EN}  # a made-up, word-for-word "German"
TINY_T5 = {"model_type": "t5", "d_model": 32, "d_ff": 64, "num_layers": 2, "num_heads": 2, "d_kv": 16}
TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 128}


def _pairs(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(EN) for _ in range(rng.randint(3, 8))]
        rows.append({"translation": {"en": " ".join(words), "de": " ".join(DE[w] for w in words)}})
    return rows


def _write(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def mt_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("mt")
    return {"train": _write(d / "train.jsonl", _pairs(64, 0)), "validation": _write(d / "validation.jsonl", _pairs(12, 1))}


@pytest.fixture(scope="module")
def unigram_dir(tmp_path_factory, mt_data):
    from tunepipe.tiny import train_unigram_tokenizer
    rows = [json.loads(line) for line in open(mt_data["train"])]
    texts = [r["translation"][k] for r in rows for k in ("en", "de")]
    out = tmp_path_factory.mktemp("unigram")
    train_unigram_tokenizer(texts * 3, out, vocab_size=150)
    return str(out)


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory, mt_data):
    """A small BERT saved like a pretrained checkpoint (config, weights, WordPiece tokenizer)."""
    from transformers import BertConfig, BertModel

    from tunepipe.tiny import train_wordpiece_tokenizer
    rows = [json.loads(line) for line in open(mt_data["train"])]
    out = tmp_path_factory.mktemp("tiny-bert")
    tok = train_wordpiece_tokenizer([r["translation"][k] for r in rows for k in ("en", "de")] * 3, out,
                                    vocab_size=200)
    cfg = dict(TINY_BERT)
    cfg.pop("model_type")
    BertModel(BertConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **cfg)).save_pretrained(out)
    return str(out)


def t5_specs(tmp_path, data, tokenizer, **sections):
    specs = {"task": "translation", "output_dir": str(tmp_path / "run"), "model": {"from_config": dict(TINY_T5)},
             "tokenizer": {"name_or_path": tokenizer},
             "data": {**data, "source_lang": "en", "target_lang": "de"},
             "training": {"num_train_epochs": 1, "per_device_train_batch_size": 16, "learning_rate": 3e-3,
                          "logging_steps": 2, "save_strategy": "no", "disable_tqdm": True,
                          "dataloader_pin_memory": False},
             "generation": {"max_new_tokens": 24, "num_beams": 2}}
    for key, value in sections.items():
        specs[key] = {**specs.get(key, {}), **value}
    return specs


def make_task(cls=TranslationTask, **data):
    return cls(load_specs({"task": cls.name, "model": "m", "data": {"train": "x", **data}}))


# ---- metrics ---------------------------------------------------------------------------------------------------
def test_bleu_and_chrf_hand_checked():
    # 1-4 gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths so no brevity penalty
    m = bleu_chrf(["the cat sat on the mat"], [["the cat sat on a mat"]])
    assert m["bleu"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-6)
    assert bleu_chrf(["a b c d"], [["a b c d"]]) == {"bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0)}
    assert bleu_chrf(["xyz"], [["qqq"]])["chrf"] == 0.0
    # every reference counts, and records may have different numbers of references
    multi = bleu_chrf(["the cat sat on the mat", "a dog runs in the park"],
                      [["nothing alike here at all", "the cat sat on the mat"], ["a dog runs in the park"]])
    assert multi["bleu"] == pytest.approx(100.0)


def test_rouge_hand_checked():
    m = rouge(["the cat sat"], [["the cat sat on the mat"]])
    assert m["rouge1"] == pytest.approx(100 * 2 * 1 * 0.5 / 1.5)  # P = 3/3, R = 3/6
    assert m["rouge2"] == pytest.approx(100 * 2 * 1 * 0.4 / 1.4)  # P = 2/2, R = 2/5
    assert rouge(["running cats"], [["run cat"]])["rouge1"] == pytest.approx(100.0)  # Porter stemming
    assert rouge(["running cats"], [["run cat"]], use_stemmer=False)["rouge1"] == 0.0
    # summary-level LCS over sentences: same sentences, swapped order
    swapped = rouge(["cats sleep. dogs bark."], [["dogs bark. cats sleep."]])
    assert swapped["rougeL"] == pytest.approx(50.0) and swapped["rougeLsum"] == pytest.approx(100.0)
    assert split_sentences("One. Two!  Three? four") == "One.\nTwo!\nThree?\nfour"
    best = rouge(["a red house"], [["green trees grow", "a red house"]])
    assert best["rouge1"] == pytest.approx(100.0)  # the best of several references
    assert exact_match(["in  Paris", "Rome"], [["in Paris"], ["Milan"]]) == {"exact_match": 50.0}


def test_generated_lengths_skip_padding_and_specials():
    m = generated_lengths([[0, 5, 6, 7, 1, 0], [0, 5, 1, -100, -100, -100]], not_counted=[0, 1, 2])
    assert m == {"gen_len": 2.0, "gen_len_max": 3.0}


def test_compute_metrics_accepts_minus_100_and_scores_raw_references(unigram_dir):
    """Predictions and labels padded with -100 (joined batches); references come from the records, so the
    case and all references count even though label ids are given."""
    import datasets
    from transformers import AutoTokenizer
    from transformers.trainer_utils import EvalPrediction
    tok = AutoTokenizer.from_pretrained(unigram_dir)
    task = make_task(SummarizationTask)
    task.tokenizer = tok
    records = [{"document": "d one", "summary": "cats sleep", "references": ["cats sleep", "the red house"]},
               {"document": "d two", "summary": "a dog runs"}]
    labels = task.encode_targets([r["summary"] for r in records], tok)
    task.bind_eval_data("validation", records, datasets.Dataset.from_dict({"labels": labels}))
    generated = [tok("the red house").input_ids, tok("a dog runs").input_ids]

    def pad(rows, width, value):
        return np.array([list(r) + [value] * (width - len(r)) for r in rows])

    # evaluation batches may arrive in another order: labels find their records by content
    preds = pad([[tok.pad_token_id] + generated[1], [tok.pad_token_id] + generated[0]], 32, -100)
    label_ids = pad([labels[1] + [tok.pad_token_id], labels[0]], 32, -100)
    m = task.compute_metrics(EvalPrediction(predictions=preds, label_ids=label_ids))
    assert m["rouge1"] == pytest.approx(100.0) and m["rougeLsum"] == pytest.approx(100.0)
    assert m["gen_len"] == pytest.approx(np.mean([len(g) - 1 for g in generated]))  # </s> not counted

    translation = make_task(source_lang="en", target_lang="de")
    translation.tokenizer = tok
    rec = [{"translation": {"en": "x", "de": "Zwei Männer."}}]
    ids = translation.encode_targets(["Zwei Männer."], tok)
    translation.bind_eval_data("validation", rec, datasets.Dataset.from_dict({"labels": ids}))
    lower = tok("zwei männer.").input_ids
    m = translation.compute_metrics(EvalPrediction(predictions=pad([lower], 32, -100), label_ids=pad(ids, 32, -100)))
    assert m["bleu"] < 100.0  # scored against the cased reference as written


# ---- preprocessing ---------------------------------------------------------------------------------------------
def test_preprocess_prefix_truncation_and_label_padding(unigram_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(unigram_dir)
    task = make_task(source_lang="en", target_lang="de", source_prefix="translate ", max_target_length=4)
    batch = {"translation": [{"en": "the red dog runs", "de": "eht der god snur"},
                             {"en": "a cat", "de": "a tac"}]}
    enc = task.preprocess(batch, tok)
    assert tok.decode(enc["input_ids"][0], skip_special_tokens=True).startswith("translate the red dog")
    assert enc["length"] == [len(x) for x in enc["input_ids"]]
    assert all(row[-1] == tok.eos_token_id for row in enc["labels"])
    assert len(enc["labels"][0]) == 4  # truncated, still ending with </s>
    features = [{k: enc[k][i] for k in ("input_ids", "attention_mask", "labels")} for i in range(2)]
    collated = task.collator(tok)(features)
    assert collated["labels"].shape[1] % 8 == 0
    assert (collated["labels"][1, len(enc["labels"][1]):] == -100).all()


def test_bert_targets_drop_the_decoder_start_token(tiny_bert_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    row = make_task().encode_targets(["a big dog"], tok)[0]
    assert row[0] != tok.cls_token_id and row[-1] == tok.sep_token_id
    assert tok.decode(row, skip_special_tokens=True) == "a big dog"


def test_records_are_validated_with_file_and_line(tmp_path):
    from tunepipe.data import DatasetModules
    from tunepipe.errors import ValidationError
    train = _write(tmp_path / "t.jsonl", [{"translation": {"en": "a", "de": "b"}}, {"translation": {"en": "c"}}])
    specs = load_specs({"task": "translation", "model": "m",
                        "data": {"train": train, "source_lang": "en", "target_lang": "de"}})
    with pytest.raises(ValidationError) as err:
        DatasetModules(specs, TranslationTask(specs)).load()
    assert err.value.line == 2 and "translation.de" in str(err.value)
    no_langs = TranslationTask(load_specs({"task": "translation", "model": "m", "data": {"train": train}}))
    assert "source_lang" in no_langs.validate_record({"translation": {"en": "a", "de": "b"}}, "train")
    summ = make_task(SummarizationTask)
    assert summ.validate_record({"document": "d", "summary": "s", "references": "s"}, "train")
    assert summ.validate_record({"document": "d"}, "test") is None


def test_generation_kwargs_hold_only_what_applies():
    greedy = make_task(TextGenerationTask)
    assert greedy.generation_kwargs() == {"max_new_tokens": 64, "num_beams": 1, "do_sample": False,
                                          "no_repeat_ngram_size": 0}
    beams = make_task(SummarizationTask)
    assert beams.generation_kwargs() == {"max_new_tokens": 128, "num_beams": 4, "do_sample": False,
                                         "length_penalty": 1.0, "no_repeat_ngram_size": 3}
    sampled = TextGenerationTask(load_specs({"task": "text_generation", "model": "m", "data": {"train": "x"},
                                             "generation": {"do_sample": True, "top_p": 0.9}}))
    assert sampled.generation_kwargs()["top_p"] == 0.9 and "temperature" not in sampled.generation_kwargs()


def test_pretrained_generation_options_the_specs_turn_off_are_unset():
    """A checkpoint saved for beam search and sampling, fine-tuned with greedy specs: the options that no longer
    apply are dropped, else save_pretrained refuses the generation config; max_length gives way to
    max_new_tokens."""
    from types import SimpleNamespace

    from transformers import GenerationConfig
    gen = GenerationConfig(num_beams=4, length_penalty=2.0, early_stopping=True, no_repeat_ngram_size=3,
                           do_sample=True, temperature=0.7, top_p=0.9, max_length=20)
    model = SimpleNamespace(config=SimpleNamespace(decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
                            generation_config=gen)
    make_task(TextGenerationTask).configure_model(model, None)
    kept = {k: v for k, v in gen.to_diff_dict().items() if k != "transformers_version"}
    assert kept == {"max_new_tokens": 64, "num_beams": 1, "do_sample": False,
                    "no_repeat_ngram_size": 0, "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}


def test_example_specs_load():
    root = Path(__file__).resolve().parents[1] / "examples"
    for name, task in (("translation", "translation"), ("summarization", "summarization"),
                       ("summarization_decoder", "summarization"), ("text_generation", "text_generation")):
        specs = load_specs(root / f"{name}.yaml")
        assert specs.task == task and specs.generation.max_new_tokens > 20


# ---- end to end ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def generation_warnings():
    """Messages transformers' generate() logs (its loggers do not propagate to pytest's caplog)."""
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())
    logger, handler = logging.getLogger("transformers.generation.utils"), Keep(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def test_train_save_reload_with_plain_transformers(tmp_path, mt_data):
    """A T5 built from config with a Unigram tokenizer trained on the data (source and target text)."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from tunepipe import FineTunePipeLine
    specs = t5_specs(tmp_path, mt_data, None, training={"per_device_eval_batch_size": 4})
    specs["tokenizer"] = {"train": {"type": "unigram", "vocab_size": 150}}
    pipe = FineTunePipeLine(specs)
    with generation_warnings() as warned:
        pipe.run()
    # Seq2SeqTrainer fills max_length=20 into the model's generation config after the first of the 3 batches
    assert not [m for m in warned if "max_new_tokens" in m and "max_length" in m]
    texts = pipe.task.tokenizer_training_texts([json.loads(line) for line in open(mt_data["train"])])
    assert len(texts) == 2 * 64 and DE["dog"] in " ".join(texts)  # trained on source and target text
    out = Path(pipe.specs.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())["validation"]
    assert {"bleu", "chrf", "gen_len", "gen_len_max", "loss"} <= set(metrics)
    saved_generation = json.loads((out / "model" / "generation_config.json").read_text())
    assert saved_generation["max_new_tokens"] == 24 and saved_generation["num_beams"] == 2
    assert "max_length" not in saved_generation  # evaluation does not leave the library's 20 behind

    sources = ["the big dog runs on the park", "a cat sleeps"]
    ours = [p["translation_text"] for p in pipe.predict(sources)]
    tok = AutoTokenizer.from_pretrained(out / "model")
    plain = AutoModelForSeq2SeqLM.from_pretrained(out / "model").eval()
    with torch.no_grad():  # one padded batch, as predict() ran it; settings come from generation_config.json
        ids = plain.generate(**tok(sources, padding=True, return_tensors="pt"))
    assert [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)] == ours

    fresh = FineTunePipeLine(str(out / "specs.yaml"))
    fresh.load_trained()
    assert [p["translation_text"] for p in fresh.predict(sources)] == ours
    assert fresh.predict({"translation": {"en": sources[1]}})["translation_text"] == ours[1]


def test_generation_is_not_capped_at_the_20_token_default(tmp_path, mt_data, unigram_dir):
    """The model's own generation config says max_length=20 and the model never emits </s>: evaluation during
    and after training, and predict, must still generate max_new_tokens (40) tokens."""
    from tunepipe import FineTunePipeLine
    specs = t5_specs(tmp_path, mt_data, unigram_dir, generation={"max_new_tokens": 40, "num_beams": 1},
                     training={"eval_strategy": "epoch"})
    pipe = FineTunePipeLine(specs).setup()
    gen = pipe.model.generation_config
    gen.max_new_tokens, gen.max_length = None, 20
    gen.suppress_tokens = list(pipe.tokenizer.all_special_ids)  # no </s>, <pad> or <unk>: never stops early
    pipe.train()
    log = [json.loads(line) for line in (Path(specs["output_dir"]) / "train_log.jsonl").read_text().splitlines()]
    assert [r["eval_gen_len_max"] for r in log if "eval_gen_len_max" in r] == [40.0]
    assert pipe.evaluate()["validation"]["gen_len"] == 40.0

    lengths = []
    generate = pipe.model.generate

    def recording(*args, **kwargs):
        ids = generate(*args, **kwargs)
        lengths.append(ids.shape[1])
        return ids
    pipe.model.generate = recording
    pipe.predict(["a dog"])
    assert lengths == [41]  # decoder start + 40 new tokens


def test_encoder_decoder_warm_start_via_cli(tmp_path, mt_data, tiny_bert_dir):
    """model.encoder_decoder builds a bert2bert from a saved encoder; `tunepipe train` and `tunepipe predict`
    run it, and EncoderDecoderModel.from_pretrained reproduces the CLI's predictions."""
    import torch
    from transformers import AutoTokenizer, EncoderDecoderModel
    config = tmp_path / "mt.yaml"
    out = tmp_path / "cli-run"
    config.write_text(yaml.safe_dump({
        "task": "translation", "output_dir": str(out), "model": {"encoder_decoder": tiny_bert_dir},
        "data": {**mt_data, "source_lang": "en", "target_lang": "de"},
        "training": {"num_train_epochs": 1, "per_device_train_batch_size": 16, "learning_rate": 1e-3,
                     "save_strategy": "no", "disable_tqdm": True},
        "generation": {"max_new_tokens": 30, "num_beams": 2}}))
    run = [sys.executable, "-m", "tunepipe"]
    result = subprocess.run(run + ["train", str(config)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bleu" in result.stdout and "gen_len" in result.stdout
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["model_type"] == "encoder-decoder" and saved["tunepipe_task"] == "translation"

    sources = ["a red cat sits", "the woman eats"]
    inputs = _write(tmp_path / "in.jsonl", [{"translation": {"en": s}} for s in sources])
    result = subprocess.run(run + ["predict", "--model", str(out), "--input", inputs], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    cli = [json.loads(line)["translation_text"] for line in result.stdout.strip().splitlines()]
    tok = AutoTokenizer.from_pretrained(out / "model")
    plain = EncoderDecoderModel.from_pretrained(out / "model").eval()
    with torch.no_grad():
        plain_texts = [tok.decode(plain.generate(**tok(s, return_tensors="pt", return_token_type_ids=False))[0],
                                  skip_special_tokens=True).strip() for s in sources]
    assert cli == plain_texts and len(cli) == 2


@pytest.mark.slow
def test_minilm_bert2bert_learns_to_copy(tmp_path):
    """The bundled MiniLM on both sides: a few steps of copying short sentences lower the loss."""
    from tunepipe import FineTunePipeLine
    rows = [{"source": s, "target": s} for s in ["a man rides a bike", "two dogs play in the snow",
                                                  "a woman reads a book", "children run on the beach"] * 8]
    specs = {"task": "text_generation", "output_dir": str(tmp_path / "run"), "model": {"encoder_decoder": "minilm"},
             "data": {"train": rows, "validation": rows[:4]},
             "training": {"num_train_epochs": 3, "per_device_train_batch_size": 8, "learning_rate": 1e-4,
                          "eval_strategy": "no", "save_strategy": "no", "logging_steps": 1, "disable_tqdm": True}}
    pipe = FineTunePipeLine(specs)
    pipe.run()
    losses = [r["loss"] for r in pipe.train_result.log_history if "loss" in r]
    assert losses[-1] < losses[0] and not math.isnan(losses[-1])
    assert pipe.metrics["validation"]["gen_len"] > 0


def test_tasks_listing_init_and_an_encoder_only_model(tmp_path, capsys, mt_data, tiny_bert_dir):
    from tunepipe import FineTunePipeLine
    from tunepipe.cli import main
    from tunepipe.errors import TaskTypeError
    assert main(["tasks"]) == 0
    listing = capsys.readouterr().out
    assert all(t in listing for t in ("translation", "summarization", "text_generation", "max_new_tokens"))
    target = tmp_path / "summarization.yaml"
    assert main(["init", "summarization", "-o", str(target)]) == 0
    specs = load_specs(target)
    assert specs.task == "summarization" and specs.generation.num_beams == 4
    assert specs.training.metric_for_best_model == "rougeL"
    with pytest.raises(TaskTypeError) as err:  # an encoder alone cannot generate: say how to warm-start one
        FineTunePipeLine({"task": "translation", "model": tiny_bert_dir, "output_dir": str(tmp_path / "r"),
                          "data": {**mt_data, "source_lang": "en", "target_lang": "de"}}).setup()
    assert any("encoder_decoder" in s for s in err.value.suggestions)
