"""InferencePipeLine for every task: a model trained here (tiny, from config) and reloaded from its output_dir,
its model/ directory, or a copy without specs.yaml predicts exactly what the trained model predicted in memory;
settings saved at training time are used and can be overridden per call; bad inputs and settings are refused
with clear errors; dtypes and the CLI."""
import json
import random
import shutil

import pytest
import torch

from conftest import close_to
from tunepipe.errors import ConfigError, ModelNotFoundError, TaskTypeError, ValidationError

QUICK = {"max_steps": 6, "eval_strategy": "no", "bf16": False, "learning_rate": 5e-3}
TEXTS = ["Greta Varga moved to Lisbon .", "Shares of Alder Foods rose after Omar spoke in Cork .", "Hi"]
REVIEWS = ["a warm and funny film", "a dull and lifeless film", "i loved every minute"]
TINY_T5 = {"model_type": "t5", "d_model": 32, "d_ff": 64, "num_layers": 1, "num_heads": 2, "d_kv": 16}
TINY_GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}


def train(specs):
    from tunepipe import FineTunePipeLine
    specs["training"] = {**specs.get("training", {}), **QUICK}
    pipe = FineTunePipeLine(specs)
    pipe.setup()
    pipe.train()
    return pipe


def inference(*args, **kwargs):
    from tunepipe import InferencePipeLine
    return InferencePipeLine(*args, **kwargs)


# ---- every task: reloaded predictions equal the trained model's -----------------------------------------------
def test_token_classification_matches_the_trained_model_and_plain_transformers(tiny_specs, ner_data, tmp_path):
    from transformers import AutoModelForTokenClassification, AutoTokenizer
    pipe = train(tiny_specs("token_classification", {"train": ner_data["train"]}))
    expected = pipe.predict(TEXTS)
    for checkpoint, task in ((pipe.output_dir, None), (pipe.output_dir / "model", "ner")):
        ip = inference(task, checkpoint, batch_size=2)  # batches of 2: sorting and regrouping are exercised
        assert ip.task_name == "token_classification"
        assert ip.predict(TEXTS) == expected
        assert ip.predict(TEXTS[0]) == expected[0] and ip.run(TEXTS[1]) == expected[1]
    assert ip.predict([["Greta", "Varga"]])[0]["tokens"] == ["Greta", "Varga"]
    assert ip.predict([]) == []

    # the tags are the argmax of plain transformers' logits on each word's first piece
    tok = AutoTokenizer.from_pretrained(pipe.output_dir / "model")
    plain = AutoModelForTokenClassification.from_pretrained(pipe.output_dir / "model").eval()
    for text, pred in zip(TEXTS, expected):
        enc = tok(pred["tokens"], is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            ids = plain(**enc).logits[0].argmax(-1).tolist()
        firsts = [i for i, w in enumerate(enc.word_ids()) if w is not None and (i == 0 or enc.word_ids()[i - 1] != w)]
        assert pred["tags"] == [plain.config.id2label[ids[i]] for i in firsts]
        for ent in pred["entities"]:
            assert text[ent["start"]:ent["end"]] == ent["text"] and 0 < ent["score"] <= 1


def test_text_classification_all_scores_and_pairs(tiny_specs, cls_data):
    pipe = train(tiny_specs("text_classification", cls_data))
    ip = inference(None, pipe.output_dir)
    assert ip.predict(REVIEWS) == pipe.predict(REVIEWS)
    full = ip.predict(REVIEWS, all_scores=True)
    for short, long in zip(pipe.predict(REVIEWS), full):
        assert set(long["scores"]) == {"neg", "pos"} and sum(long["scores"].values()) == pytest.approx(1, abs=1e-5)
        assert long["label"] == short["label"] and long["scores"][short["label"]] == pytest.approx(short["score"])
    with pytest.raises(ConfigError, match="all_scores"):
        ip.predict(REVIEWS, all_scores="yes")
    with pytest.raises(ConfigError) as e:
        ip.predict(REVIEWS, top_k=3)
    assert "all_scores" in " ".join(e.value.suggestions)
    with pytest.raises(ValidationError):
        ip.predict([["only one text of a pair", 3]])
    with pytest.raises(ValidationError):
        ip.predict([42])


def _qa_rows(n, seed):
    from tunepipe.demo import FIRST, PLACES
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        people = rng.sample(FIRST, 3)
        places = [rng.choice(PLACES) for _ in people]
        context = " ".join(f"{p} moved to {c} ." for p, c in zip(people, places))
        k = rng.randrange(3)
        rows.append({"id": f"{seed}-{i}", "question": f"Where did {people[k]} move ?", "context": context,
                     "answers": {"text": [places[k]], "answer_start": [context.index(f"{people[k]} moved to") +
                                                                        len(f"{people[k]} moved to ")]}})
    return rows


def test_question_answering_v2_settings_come_from_training(tiny_specs, tmp_path):
    from tunepipe.tasks.question_answering import QuestionAnsweringTask
    train_file = tmp_path / "qa.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in _qa_rows(32, 1)))
    pipe = train(tiny_specs("question_answering", {"train": str(train_file), "max_length": 48, "stride": 16,
                                                   "version_2_with_negative": True}))
    inputs = [{"question": r["question"], "context": r["context"]} for r in _qa_rows(5, 2)]
    ip = inference("qa", pipe.output_dir)
    got = ip.predict(inputs)
    assert got == pipe.predict(inputs)
    assert all("null_score_diff" in p for p in got)  # a v2 model: the saved specs say so
    for p, x in zip(got, inputs):
        assert p["answer"] == x["context"][p["start"]:p["end"]]
    # per-call override of a post-processing setting
    short = ip.predict(inputs, max_answer_length=1, version_2_with_negative=False)
    assert short == pipe.predict(inputs, max_answer_length=1, version_2_with_negative=False)
    assert all(len(p["answer"].split()) <= 1 for p in short)
    with pytest.raises(ConfigError, match="n_best_size"):
        ip.predict(inputs, n_best_size=0)
    with pytest.raises(ValidationError):
        ip.predict({"question": "Where?"})
    assert isinstance(ip.task, QuestionAnsweringTask)


def test_translation_uses_saved_generation_settings(tmp_path):
    """Generation settings of training (specs.yaml; or generation_config.json when the model directory travels
    alone) are used by default; a call can override them."""
    from tunepipe.tiny import train_unigram_tokenizer
    words = "man woman dog cat red blue big small runs sits eats sleeps the a on under park house".split()
    rng = random.Random(0)
    rows = []
    for _ in range(48):
        sentence = [rng.choice(words) for _ in range(rng.randint(3, 7))]
        rows.append({"translation": {"en": " ".join(sentence), "de": " ".join(w[::-1] for w in sentence)}})
    texts = [r["translation"][k] for r in rows for k in ("en", "de")]
    train_unigram_tokenizer(texts * 3, tmp_path / "tok", vocab_size=120)
    specs = {"task": "translation", "output_dir": str(tmp_path / "run"), "model": {"from_config": TINY_T5},
             "tokenizer": {"name_or_path": str(tmp_path / "tok")},
             "data": {"train": rows, "source_lang": "en", "target_lang": "de"},
             "generation": {"max_new_tokens": 7, "num_beams": 2},
             "training": {"per_device_train_batch_size": 16, "save_strategy": "no", "disable_tqdm": True}}
    pipe = train(specs)
    sources = ["the big dog runs", "a cat sleeps on the house", "red"]
    expected = pipe.predict(sources)
    ip = inference(None, pipe.output_dir)
    assert ip.task.generation_kwargs()["max_new_tokens"] == 7
    assert ip.predict(sources) == expected
    assert ip.predict({"translation": {"en": sources[0]}}) == expected[0]
    greedy = ip.predict(sources, num_beams=1, max_new_tokens=3)
    assert greedy == pipe.predict(sources, num_beams=1, max_new_tokens=3)
    one = ip.predict(sources, max_new_tokens=1)  # one piece: at most one word
    assert all(" " not in g["translation_text"] for g in one) and one != expected

    alone = tmp_path / "copied-model"
    shutil.copytree(pipe.output_dir / "model", alone)  # no specs.yaml next to it
    ip2 = inference(None, alone)
    assert ip2.task.generation_kwargs()["max_new_tokens"] == 7 and ip2.predict(sources) == expected
    with pytest.raises(ConfigError, match="num_beam"):
        ip.predict(sources, num_beam=2)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        ip.predict(sources, max_new_tokens=0)


def test_causal_lm_completions(tmp_path):
    from tunepipe.tiny import train_bpe_tokenizer
    rng = random.Random(0)
    colours = {"rose": "red", "sky": "blue", "grass": "green"}
    rows = [{"prompt": f"Q: colour of the {k}", "completion": f" {colours[k]}"}
            for k in (rng.choice(sorted(colours)) for _ in range(64))]
    train_bpe_tokenizer([r["prompt"] + r["completion"] for r in rows], tmp_path / "tok", vocab_size=200)
    specs = {"task": "causal_lm", "output_dir": str(tmp_path / "run"), "model": {"from_config": TINY_GPT2},
             "tokenizer": {"name_or_path": str(tmp_path / "tok")}, "data": {"train": rows, "max_length": 32},
             "generation": {"max_new_tokens": 3},
             "training": {"per_device_train_batch_size": 16, "save_strategy": "no", "disable_tqdm": True}}
    pipe = train(specs)
    prompts = [f"Q: colour of the {k}" for k in colours] + ["Q:"]
    ip = inference(None, pipe.output_dir)
    got = ip.predict(prompts)
    assert got == pipe.predict(prompts) and all(g["generated_tokens"] <= 3 for g in got)
    assert ip.predict(prompts, max_new_tokens=1) == pipe.predict(prompts, max_new_tokens=1)


def test_masked_lm_top_k(tiny_specs, ner_data, tmp_path):
    texts = [" ".join(json.loads(line)["tokens"]) for line in open(ner_data["train"])]
    train_file = tmp_path / "mlm.jsonl"
    train_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    pipe = train(tiny_specs("masked_language_modeling", {"train": str(train_file), "chunk_size": 32}))
    ip = inference(None, pipe.output_dir)
    inputs = ["Greta [MASK] moved to Lisbon .", "Shares of [MASK] Foods rose in [MASK] ."]
    assert ip.predict(inputs) == pipe.predict(inputs)
    three = ip.predict(inputs, top_k=3)
    assert [len(f) for f in three[1]["fills"]] == [3, 3]
    assert three == pipe.predict(inputs, top_k=3)
    with pytest.raises(ConfigError, match="integer"):
        ip.predict(inputs, top_k="3")
    with pytest.raises(ValidationError, match="mask"):
        ip.predict("no mask here")


# ---- devices, dtypes, errors, CLI -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ner_run(tmp_path_factory, tokenizer_dir, ner_data):
    from conftest import TINY_BERT
    out = tmp_path_factory.mktemp("ner-run")
    return train({"task": "token_classification", "output_dir": str(out / "run"),
                  "model": {"from_config": dict(TINY_BERT)}, "tokenizer": {"name_or_path": tokenizer_dir},
                  "data": {"train": ner_data["train"]},
                  "training": {"per_device_train_batch_size": 8, "save_strategy": "no", "disable_tqdm": True}})


def test_bf16_and_int8(ner_run):
    from tunepipe.modeling.quantization import QuantizationManager
    expected = ner_run.predict(TEXTS)
    bf16 = inference(None, ner_run.output_dir, dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    got = bf16.predict(TEXTS)
    assert [g["tokens"] for g in got] == [e["tokens"] for e in expected]
    agree = sum(a == b for g, e in zip(got, expected) for a, b in zip(g["tags"], e["tags"]))
    assert agree >= 0.8 * sum(len(e["tags"]) for e in expected)
    int8 = inference(None, ner_run.output_dir, dtype="int8", device="cpu")
    assert QuantizationManager.quantization_type(int8.model) == "dynamic_int8"
    assert [g["tokens"] for g in int8.predict(TEXTS)] == [e["tokens"] for e in expected]
    with pytest.raises(ConfigError):
        inference(None, ner_run.output_dir, dtype="float13")


PIECES = ["Zygmunt Brzezinski flew from O'Hare to Krakow-Nowa Huta in 1999 .", "Greta Varga moved to Lisbon .",
          "Quixotic Xylophonists , Ltd. hired Omar ( Cork ) !", "  spaces   around\twords  ", ""]


@pytest.fixture(scope="module")
def random_tagger(tmp_path_factory, tokenizer_dir):
    """An untrained tagger with a large random head: it predicts every label somewhere, pieces of one word often
    disagree, and so every aggregation rule is exercised."""
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    from conftest import TINY_BERT
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(**{k: v for k, v in TINY_BERT.items() if k != "model_type"}, vocab_size=len(tok),
                        id2label=dict(enumerate(labels)), label2id={t: i for i, t in enumerate(labels)})
    torch.manual_seed(0)
    model = BertForTokenClassification(config)
    with torch.no_grad():
        model.classifier.weight.mul_(20)
    out = tmp_path_factory.mktemp("random-tagger")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("strategy", ["first", "average", "max", "simple"])
def test_entities_equal_the_transformers_pipeline(random_tagger, strategy):
    """Raw text: the same entities (label, character span, score) as transformers' token-classification pipeline
    with the same aggregation_strategy, on words that the tokenizer splits into several pieces."""
    import transformers
    hf = transformers.pipeline("token-classification", model=str(random_tagger), aggregation_strategy=strategy,
                               device="cpu")
    ours = inference("token_classification", random_tagger, batch_size=2, device="cpu")
    tok = ours.tokenizer
    assert any(len(tok.tokenize(w)) > 1 for w in PIECES[0].split())  # the case that tells strategies apart
    got = ours.predict(PIECES, aggregation_strategy=strategy)
    n_entities = 0
    for text, mine, theirs in zip(PIECES, got, hf(PIECES)):
        assert [(e["label"], e["start"], e["end"]) for e in mine["entities"]] == \
            [(e["entity_group"], e["start"], e["end"]) for e in theirs]
        assert [e["score"] for e in mine["entities"]] == pytest.approx([float(e["score"]) for e in theirs], abs=1e-4)
        assert all(text[e["start"]:e["end"]] == e["text"] for e in mine["entities"])
        n_entities += len(theirs)
    assert n_entities > 0
    with pytest.raises(ConfigError, match="aggregation_strategy"):
        ours.predict(PIECES, aggregation_strategy="bogus")


def test_user_errors(ner_run, tmp_path):
    with pytest.raises(ModelNotFoundError):
        inference(None, tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError) as e:
        inference(None, tmp_path / "empty")
    assert e.value.suggestions
    with pytest.raises(TaskTypeError, match="token_classification"):
        inference("text_classification", ner_run.output_dir)
    ip = inference(None, ner_run.output_dir)
    with pytest.raises(ConfigError, match="adapter"):
        ip.predict(TEXTS, adapter="nope")
    with pytest.raises(ConfigError, match="Unknown prediction setting"):
        ip.predict(TEXTS, num_beams=2)
    with pytest.raises(ValidationError):
        ip.predict([{"no": "words"}])
    with pytest.raises(ConfigError, match="batch_size"):
        inference(None, ner_run.output_dir, batch_size=0)


def test_cli_predict_file_with_progress(ner_run, tmp_path, capsys):
    from tunepipe.cli import main
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"tokens": t.split()}) + "\n" for t in TEXTS))
    assert main(["predict", "--model", str(ner_run.output_dir), "--input", str(inputs), "--output",
                 str(tmp_path / "out.jsonl"), "--batch-size", "2"]) == 0
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    expected = [{"line": n + 1, **p} for n, p in enumerate(ner_run.predict([t.split() for t in TEXTS]))]
    assert got == close_to(expected)  # each led by its input line; batches of 2 here: padding's last bits
    err = capsys.readouterr().err
    assert "3/3" in err  # the progress bar on files
    assert not list(tmp_path.glob(".out.jsonl.tmp-*"))
    assert main(["predict", "--model", str(ner_run.output_dir), "--input", str(inputs), "--adapter", "x"]) == 2
    assert "NAME=DIR" in capsys.readouterr().err
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    assert main(["predict", "--model", str(ner_run.output_dir), "--input", str(texts), "--output",
                 str(tmp_path / "simple.jsonl"), "--param", "aggregation_strategy=simple"]) == 0
    got = [json.loads(line) for line in (tmp_path / "simple.jsonl").read_text().splitlines()]
    simple = ner_run.predict(TEXTS, aggregation_strategy="simple")
    assert got == [{"line": n + 1, **p} for n, p in enumerate(simple)]
    capsys.readouterr()
    assert main(["predict", "--model", str(ner_run.output_dir), "--input", "Ada", "--param", "strategy"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["predict", "--model", str(ner_run.output_dir), "--input", "Ada", "--param", "nope=1"]) == 2
    assert "aggregation_strategy" in capsys.readouterr().err
