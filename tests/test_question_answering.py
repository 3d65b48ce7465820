"""Extractive QA: the official SQuAD metrics on hand-made cases, windows/offsets on a long context, n-best
post-processing, and train -> save -> reload -> identical predictions through the Python API and the CLI."""
import collections
import json
import os
import random
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunepipe.specs import load_specs
from tunepipe.tasks.question_answering import (QuestionAnsweringTask, answer_token_span, best_answers,
                                               tokenize_windows)
from tunepipe.tasks.squad_metrics import exact_match, normalize_answer, squad_v1, squad_v2, token_f1



def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- the official evaluation logic, restated from the SQuAD v1.1 and v2.0 scripts, to cross-check ----------
def official_normalize(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def official_v1_f1(prediction, ground_truth):
    prediction_tokens = official_normalize(prediction).split()
    ground_truth_tokens = official_normalize(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def official_v1(dataset, predictions):
    f1 = exact = total = 0
    for qid, golds in dataset.items():
        total += 1
        if qid not in predictions:
            continue
        exact += max(official_normalize(predictions[qid]) == official_normalize(g) for g in golds)
        f1 += max(official_v1_f1(predictions[qid], g) for g in golds)
    return {"exact_match": 100.0 * exact / total, "f1": 100.0 * f1 / total}


def official_v2(dataset, predictions):
    def get_tokens(s):
        return official_normalize(s).split() if s else []

    def compute_f1(a_gold, a_pred):
        gold_toks, pred_toks = get_tokens(a_gold), get_tokens(a_pred)
        common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
        num_same = sum(common.values())
        if len(gold_toks) == 0 or len(pred_toks) == 0:
            return int(gold_toks == pred_toks)
        if num_same == 0:
            return 0
        precision, recall = 1.0 * num_same / len(pred_toks), 1.0 * num_same / len(gold_toks)
        return (2 * precision * recall) / (precision + recall)

    exact, f1, has_ans = {}, {}, {}
    for qid, answers in dataset.items():
        has_ans[qid] = bool(answers)
        golds = [a for a in answers if official_normalize(a)] or [""]
        exact[qid] = max(int(official_normalize(a) == official_normalize(predictions[qid])) for a in golds)
        f1[qid] = max(compute_f1(a, predictions[qid]) for a in golds)

    def make(qids):
        return 100.0 * sum(exact[k] for k in qids) / len(qids), 100.0 * sum(f1[k] for k in qids) / len(qids)

    out = dict(zip(("exact_match", "f1"), make(list(exact))))
    for name, flag in (("HasAns", True), ("NoAns", False)):
        qids = [k for k in exact if has_ans[k] == flag]
        if qids:
            out[f"{name}_exact_match"], out[f"{name}_f1"] = make(qids)
    return out


# ---- metrics on hand-made cases ------------------------------------------------------------------------------
NORMALISATION_CASES = [  # (text, normalised by hand)
    ("Paris", "paris"),                          # lower case
    ("Tesla's coil!", "teslas coil"),            # punctuation removed (apostrophe too), not replaced by a space
    ("The Rhine", "rhine"),                      # article, after lower-casing
    ("an apple a day", "apple day"),             # a / an
    ("Banana theatre", "banana theatre"),        # articles only as whole words
    ("  New \t York\n", "new york"),             # white space collapsed
    ("the-cat", "thecat"),                       # punctuation goes first, so 'the' is no longer a word
    ("A.C.", "ac"),
    ("(the) end", "end"),
    ("", ""),
]


@pytest.mark.parametrize("text, expected", NORMALISATION_CASES)
def test_normalisation_rules(text, expected):
    assert normalize_answer(text) == expected
    assert official_normalize(text) == expected


METRIC_CASES = [  # (prediction, gold answers, EM, F1) worked out by hand
    ("paris", ["Paris"], 1.0, 1.0),
    ("Tesla's coil", ["Teslas coil!"], 1.0, 1.0),
    ("the Rhine", ["Rhine"], 1.0, 1.0),
    ("  New York ", ["new   york"], 1.0, 1.0),
    ("the-cat", ["cat"], 0.0, 0.0),                        # 'thecat' vs 'cat': no common token
    ("the Rhine river", ["Rhine"], 0.0, 2 / 3),            # P = 1/2, R = 1
    ("July 1856", ["1856", "10 July 1856"], 0.0, 0.8),     # max(2/3, P=1 R=2/3 -> 0.8)
    ("1856", ["1856", "July 1856", "10 July 1856"], 1.0, 1.0),
    ("x x y", ["x y"], 0.0, 0.8),                          # common = {x: 1, y: 1}: P = 2/3, R = 1
    ("", ["Rhine"], 0.0, 0.0),
]


@pytest.mark.parametrize("pred, golds, em, f1", METRIC_CASES)
def test_exact_match_and_f1_by_hand(pred, golds, em, f1):
    assert max(exact_match(pred, g) for g in golds) == em
    assert max(token_f1(pred, g) for g in golds) == pytest.approx(f1)
    assert max(official_v1_f1(pred, g) for g in golds) == pytest.approx(f1)


def test_squad_v1_scores_in_percent_and_counts_missing_predictions_as_zero():
    refs = {"a": ["Paris"], "b": ["1856", "10 July 1856"], "c": ["Rhine"], "d": ["x"]}
    preds = {"a": "paris", "b": "July 1856", "c": "Danube"}  # d missing
    m = squad_v1(preds, refs)
    assert m["exact_match"] == pytest.approx(100 * 1 / 4)
    assert m["f1"] == pytest.approx(100 * (1 + 0.8 + 0 + 0) / 4)
    assert m["total"] == 4
    assert m["exact_match"] == pytest.approx(official_v1(refs, preds)["exact_match"])
    assert m["f1"] == pytest.approx(official_v1(refs, preds)["f1"])


def test_squad_v2_has_ans_and_no_ans():
    refs = {"a": ["Paris"], "b": ["the Rhine river"], "c": [], "d": []}
    preds = {"a": "Paris", "b": "Rhine", "c": "", "d": "Rhine"}
    m = squad_v2(preds, refs)
    # a: EM 1 F1 1; b: EM 0, F1 = 2PR/(P+R) with P = 1, R = 1/2 -> 2/3; c: EM 1 F1 1; d: 0 0
    assert m["HasAns_exact_match"] == pytest.approx(50.0) and m["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert m["NoAns_exact_match"] == pytest.approx(50.0) and m["NoAns_f1"] == pytest.approx(50.0)
    assert m["exact_match"] == pytest.approx(50.0) and m["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1) / 4)
    assert (m["HasAns_total"], m["NoAns_total"], m["total"]) == (2, 2, 4)
    official = official_v2(refs, preds)
    assert {k: pytest.approx(v) for k, v in official.items()} == {k: m[k] for k in official}


def test_metrics_agree_with_official_logic_on_random_strings():
    rng = random.Random(3)
    words = ["the", "a", "an", "Rhine", "rhine,", "1856", "July", "x", "(x)", "Tesla's", "  ", "-", "an."]

    def phrase():
        return " ".join(rng.choice(words) for _ in range(rng.randint(0, 4)))

    refs = {str(i): [phrase() for _ in range(rng.randint(1, 3))] for i in range(300)}
    preds = {k: phrase() for k in refs}
    ours, official = squad_v1(preds, refs), official_v1(refs, preds)
    assert ours["exact_match"] == pytest.approx(official["exact_match"])
    assert ours["f1"] == pytest.approx(official["f1"])
    refs2 = {k: (v if int(k) % 3 else []) for k, v in refs.items()}
    ours, official = squad_v2(preds, refs2), official_v2(refs2, preds)
    assert {k: pytest.approx(v) for k, v in official.items()} == {k: ours[k] for k in official}


# ---- windows, offsets, labels --------------------------------------------------------------------------------
def make_task(**data):
    specs = load_specs({"task": "qa", "model": "m", "data": {"train": "x", **data}})
    return QuestionAnsweringTask(specs)


def long_context(rng, n_sentences=40):
    from tunepipe.demo import FIRST, PLACES
    parts = []
    for _ in range(n_sentences):
        parts.append(f"{rng.choice(FIRST)} moved to {rng.choice(PLACES)} .")
    return " ".join(parts)


def test_windows_cover_a_long_context_with_overlap_and_exact_offsets(tokenizer_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    context = long_context(random.Random(1))
    answer = "Porto Alegre"
    start = context.index(" .", len(context) // 2) + 3  # a sentence in the middle
    context = context[:start] + f"Zofia founded {answer} ." + context[start:]
    answer_start = context.index(answer)
    max_length, stride = 48, 12
    task = make_task(max_length=max_length, stride=stride)
    batch = {"id": ["q1"], "question": ["  Where did Zofia go ?"], "context": [context],
             "answers": [{"text": [answer], "answer_start": [answer_start]}]}
    enc = task.preprocess_eval(batch, tok)
    n = len(enc["input_ids"])
    assert n >= 5
    assert all(len(ids) <= max_length for ids in enc["input_ids"])
    assert enc["window"] == list(range(n)) and enc["example_id"] == ["q1"] * n
    assert set(enc["null_index"]) == {0}
    spans = [[o for o in offsets if o is not None] for offsets in enc["offset_mapping"]]
    # consecutive windows share exactly `stride` context tokens; together they cover the whole context
    for a, b in zip(spans, spans[1:]):
        assert a[-stride:] == b[:stride]
    assert spans[0][0][0] == 0 and spans[-1][-1][1] == len(context)
    for offsets in spans:
        assert all(context[s:e].strip() == context[s:e] and e > s for s, e in offsets)
    # label positions: the windows holding the whole answer point at it exactly, all others at [CLS]
    hits = 0
    for i in range(n):
        s, e = enc["start_positions"][i], enc["end_positions"][i]
        offsets = enc["offset_mapping"][i]
        if (s, e) == (0, 0):
            inside = [o for o in offsets if o is not None]
            assert not (inside[0][0] <= answer_start and inside[-1][1] >= answer_start + len(answer))
        else:
            hits += 1
            assert context[offsets[s][0]:offsets[e][1]] == answer
    assert hits >= 1
    # the training features carry the same labels, no offsets
    train = task.preprocess(batch, tok)
    assert train["start_positions"] == enc["start_positions"] and "offset_mapping" not in train
    assert train["length"] == [len(ids) for ids in train["input_ids"]]


def test_answer_token_span_at_the_window_edges(tokenizer_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    context = "Lena moved to Cork"
    enc, cid = tokenize_windows(tok, ["Where ?"], [context], 64, 8)
    offsets, seq = enc["offset_mapping"][0], enc.sequence_ids(0)
    for answer in ("Lena", "Cork", "Lena moved to Cork"):  # first token, last token, everything
        s, e = answer_token_span(offsets, seq, cid, context.index(answer), context.index(answer) + len(answer))
        assert context[offsets[s][0]:offsets[e][1]] == answer
    assert answer_token_span(offsets, seq, cid, 100, 104) is None


def test_unanswerable_questions_point_at_cls(tokenizer_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    task = make_task(version_2_with_negative=True, max_length=64, stride=8)
    enc = task.preprocess({"question": ["Who ?"], "context": ["Lena moved to Cork ."],
                           "answers": [{"text": [], "answer_start": []}]}, tok)
    assert enc["start_positions"] == [0] and enc["end_positions"] == [0]
    assert task.validate_record({"question": "Who ?", "context": "x", "answers": {"text": [], "answer_start": []}},
                                "train") is None
    assert "version_2_with_negative" in make_task().validate_record(
        {"question": "Who ?", "context": "x", "answers": {"text": [], "answer_start": []}}, "train")


def test_best_answers_n_best_max_length_and_null_threshold():
    #            0:CLS 1:q  2:SEP 3:Lena 4:moved 5:to 6:Cork 7:SEP
    context = "Lena moved to Cork"
    offsets = [None, None, None, (0, 4), (5, 10), (11, 13), (14, 18), None]
    start = [0.0, 9.0, 0.0, 5.0, 0.0, 0.0, 2.0, 0.0]   # the question token scores highest: never an answer
    end = [0.0, 9.0, 0.0, 0.0, 0.0, 0.0, 4.0, 0.0]
    args = ([context], [0], [offsets], [start], [end], [0])
    best = best_answers(*args)[0]
    assert (best["answer"], best["start"], best["end"]) == ("Lena moved to Cork", 0, 18)
    assert not best["no_answer"] and 0 < best["score"] <= 1
    # 'Lena moved to Cork' is 4 tokens; of the spans up to 2 tokens 'Cork' (2 + 4) beats 'Lena' (5 + 0)
    short = best_answers(*args, max_answer_length=2)[0]
    assert short["answer"] == "Cork" and context[short["start"]:short["end"]] == "Cork"
    # v2: null score 0 + 0 = 0 against the best span 5 + 4 = 9: diff -9
    v2 = best_answers(*args, version_2_with_negative=True)[0]
    assert v2["answer"] == "Lena moved to Cork" and v2["null_score_diff"] == pytest.approx(-9.0)
    none = best_answers(*args, version_2_with_negative=True, null_score_diff_threshold=-10.0)[0]
    assert (none["answer"], none["start"], none["end"], none["no_answer"]) == ("", 0, 0, True)
    assert none["null_score_diff"] == pytest.approx(-9.0) and 0 < none["score"] < 1


def test_best_answers_pick_the_best_window_and_lowest_null():
    context = "ab cd"
    w1 = [None, (0, 2), None]
    w2 = [None, (3, 5), None]
    out = best_answers([context], [0, 0], [w1, w2], [[1.0, 2.0, 0.0], [3.0, 2.5, 0.0]],
                       [[1.0, 2.0, 0.0], [0.5, 3.0, 0.0]], [0, 0], version_2_with_negative=True)[0]
    # spans: 'ab' 4.0, 'cd' 5.5; null = min(2.0, 3.5) = 2.0 -> diff -3.5
    assert out["answer"] == "cd" and (out["start"], out["end"]) == (3, 5)
    assert out["null_score_diff"] == pytest.approx(-3.5)


def test_nested_official_squad_json_is_flattened(tmp_path):
    from tunepipe.data import DatasetModules
    nested = {"version": "1.1", "data": [{"title": "T", "paragraphs": [
        {"context": "Lena moved to Cork .", "qas": [
            {"id": "q1", "question": "Where did Lena move ?", "answers": [{"text": "Cork", "answer_start": 14}]},
            {"id": "q2", "question": "Who moved ?", "answers": [{"text": "Lena", "answer_start": 0},
                                                               {"text": "Lena", "answer_start": 0}]}]},
        {"context": "Rosa left .", "qas": [
            {"id": "q3", "question": "Who left ?", "answers": [], "is_impossible": True}]}]}]}
    path = tmp_path / "train.json"
    path.write_text(json.dumps(nested))
    specs = load_specs({"task": "qa", "model": "m", "data": {"train": str(path), "version_2_with_negative": True}})
    records = DatasetModules(specs, QuestionAnsweringTask(specs)).load()["train"].rows
    assert [r["id"] for r in records] == ["q1", "q2", "q3"]
    present = {k: v for k, v in records[1].items() if v is not None}  # Arrow gives every record every column
    assert present == {"id": "q2", "title": "T", "context": "Lena moved to Cork .", "question": "Who moved ?",
                       "answers": {"text": ["Lena", "Lena"], "answer_start": [0, 0]}}
    assert records[2]["answers"] == {"text": [], "answer_start": []} and records[2]["is_impossible"] is True


def test_misplaced_answer_is_reported_with_file_and_line(tmp_path):
    from tunepipe.data import DatasetModules
    from tunepipe.errors import ValidationError
    context = "Lena moved to Cork ."
    rows = [{"question": "Who ?", "context": context, "answers": {"text": ["Lena"], "answer_start": [0]}},
            {"question": "Where ?", "context": context, "answers": {"text": ["Cork"], "answer_start": [3]}}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    specs = load_specs({"task": "qa", "model": "m", "data": {"train": str(path)}})
    with pytest.raises(ValidationError) as err:
        DatasetModules(specs, QuestionAnsweringTask(specs)).load()
    assert err.value.line == 2 and "not at character 3" in err.value.message and err.value.suggestions


def test_stride_must_be_below_max_length(tokenizer_dir):
    from transformers import AutoTokenizer
    from tunepipe.errors import ConfigError
    with pytest.raises(ConfigError) as err:
        make_task(max_length=32, stride=32).preprocess(
            {"question": ["Who ?"], "context": ["Lena ."], "answers": [None]},
            AutoTokenizer.from_pretrained(tokenizer_dir))
    assert err.value.field == "data.stride"


def test_prediction_inputs_accept_dicts_pairs_and_json_text():
    from tunepipe.errors import ValidationError
    task = make_task()
    expected = ("Who left ?", "Rosa left .")
    assert task._as_input({"question": "Who left ?", "context": "Rosa left ."}, 0) == expected
    assert task._as_input(("Who left ?", "Rosa left ."), 0) == expected
    assert task._as_input('{"question": "Who left ?", "context": "Rosa left ."}', 0) == expected
    assert task.input_from_record({"id": "x", "question": "Who left ?", "context": "Rosa left .",
                                   "answers": None}) == {"question": "Who left ?", "context": "Rosa left ."}
    for bad in ("Who left?", {"question": "Who left ?"}, {"question": " ", "context": "x"}):
        with pytest.raises(ValidationError) as err:
            task._as_input(bad, 2)
        assert "Input 3" in err.value.message and err.value.suggestions


# ---- end to end ----------------------------------------------------------------------------------------------
def make_qa_records(n, seed, unanswerable=0.0):
    """Contexts of several facts about people (the conftest tokenizer knows these words); one question each."""
    from tunepipe.demo import FIRST, ORGS, PLACES
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        people = rng.sample(FIRST, 7)
        context, facts = "", []
        for person in people[:6]:
            if rng.random() < 0.5:
                answer, sentence = rng.choice(PLACES), "{p} moved to {a} ."
                question = f"Where did {person} move ?"
            else:
                answer, sentence = rng.choice(ORGS), "{a} hired {p} ."
                question = f"Who hired {person} ?"
            text = sentence.format(p=person, a=answer)
            facts.append((question, answer, len(context) + text.index(answer)))
            context += text + " Heavy rain closed roads near " + rng.choice(PLACES) + " . "
        context = context.strip()
        if rng.random() < unanswerable:
            rows.append({"id": f"q{seed}-{i}", "question": f"Where did {people[6]} move ?", "context": context,
                         "answers": {"text": [], "answer_start": []}})
        else:
            question, answer, start = rng.choice(facts)
            assert context[start:start + len(answer)] == answer
            rows.append({"id": f"q{seed}-{i}", "question": question, "context": context,
                         "answers": {"text": [answer], "answer_start": [start]}})
    return rows


def _check_answers(preds, inputs):
    assert len(preds) == len(inputs)
    for p, x in zip(preds, inputs):
        assert p["answer"] == x["context"][p["start"]:p["end"]]
        assert 0.0 <= p["score"] <= 1.0 and isinstance(p["no_answer"], bool)


def _same_predictions(a, b):
    assert [(p["answer"], p["start"], p["end"], p["no_answer"]) for p in a] == [
        (p["answer"], p["start"], p["end"], p["no_answer"]) for p in b]
    assert [p["score"] for p in a] == pytest.approx([p["score"] for p in b], abs=1e-6)


def test_python_api_train_save_reload_identical(tmp_path, tiny_specs):
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer
    from tunepipe import FineTunePipeLine
    train = write_jsonl(tmp_path / "data" / "train.jsonl", make_qa_records(48, 1))
    val_rows = make_qa_records(12, 2)
    val = write_jsonl(tmp_path / "data" / "validation.jsonl", val_rows)
    specs = tiny_specs("question_answering", {"train": str(train), "validation": str(val), "max_length": 64,
                                              "stride": 16}, training={"bf16": False, "num_train_epochs": 2})
    pipe = FineTunePipeLine(specs)
    pipe.run()
    out = pipe.output_dir
    for name in ("model/config.json", "model/model.safetensors", "model/tokenizer.json", "specs.yaml", "metrics.json",
                 "train_log.jsonl", "README.md"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())["validation"]
    assert {"exact_match", "f1", "total", "loss"} <= set(metrics) and "HasAns_f1" not in metrics
    assert metrics["total"] == len(val_rows)
    assert pipe.datasets["validation"].num_rows > len(val_rows)  # long contexts: several windows per question

    inputs = [{"question": r["question"], "context": r["context"]} for r in val_rows]
    preds = pipe.predict(inputs)
    _check_answers(preds, inputs)
    assert not any(p["no_answer"] for p in preds) and len({p["start"] for p in preds}) > 1
    # evaluation (trainer batches, windows mapped back by position) and predict() agree question by question
    evaluated = pipe.task.last_predictions["validation"]
    assert [(p["start"], p["end"]) for p in preds] == [(p["start"], p["end"]) for p in evaluated]
    golds = {str(i): r["answers"]["text"] for i, r in enumerate(val_rows)}
    recomputed = squad_v1({str(i): p["answer"] for i, p in enumerate(preds)}, golds)
    assert recomputed["f1"] == pytest.approx(metrics["f1"]) and recomputed["exact_match"] == pytest.approx(
        metrics["exact_match"])
    _same_predictions([pipe.predict(inputs[0])], preds[:1])  # one dict in, one answer out

    model = AutoModelForQuestionAnswering.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    _same_predictions(pipe.task.predict(model, tokenizer, inputs), preds)


def test_cli_v2_train_predict_with_nested_official_json(tmp_path, tiny_specs):
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer
    train_rows = make_qa_records(40, 3, unanswerable=0.3)
    nested = {"version": "v2.0", "data": [{"title": "facts", "paragraphs": [
        {"context": r["context"], "qas": [{
            "id": r["id"], "question": r["question"], "is_impossible": not r["answers"]["text"],
            "answers": [{"text": t, "answer_start": s}
                        for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])]}]}
        for r in train_rows]}]}
    (tmp_path / "train.json").write_text(json.dumps(nested))
    val_rows = make_qa_records(10, 4, unanswerable=0.3)
    val = write_jsonl(tmp_path / "validation.jsonl", val_rows)
    specs = tiny_specs("qa", {"train": str(tmp_path / "train.json"), "validation": str(val), "max_length": 64,
                              "stride": 16, "version_2_with_negative": True})
    config = tmp_path / "qa.yaml"
    config.write_text(yaml.safe_dump(specs))
    out = tmp_path / "cli-run"

    def cli(*args):
        result = subprocess.run([sys.executable, "-m", "tunepipe", *args], capture_output=True, text=True,
                                timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    result = cli("train", str(config), "--output-dir", str(out))
    assert "HasAns_f1" in result.stdout and "NoAns_f1" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())["validation"]
    n_no_answer = sum(not r["answers"]["text"] for r in val_rows)
    assert 0 < n_no_answer < len(val_rows)
    assert (metrics["NoAns_total"], metrics["HasAns_total"]) == (n_no_answer, len(val_rows) - n_no_answer)
    assert (out / "model" / "model.safetensors").is_file() and (out / "specs.yaml").is_file()

    inputs = [{"question": r["question"], "context": r["context"]} for r in val_rows]
    write_jsonl(tmp_path / "in.jsonl", [{"id": r["id"], **x} for r, x in zip(val_rows, inputs)])
    cli("predict", "--model", str(out), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "p.jsonl"))
    cli_preds = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    _check_answers(cli_preds, inputs)
    assert all("null_score_diff" in p for p in cli_preds)  # a v2 model: the saved specs say so

    model = AutoModelForQuestionAnswering.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    task = QuestionAnsweringTask(load_specs(out / "specs.yaml"))
    _same_predictions(task.predict(model, tokenizer, inputs), cli_preds)


def test_example_yaml_tasks_listing_and_init(tmp_path, capsys):
    from pathlib import Path
    from tunepipe.cli import main
    example = load_specs(Path(__file__).resolve().parents[1] / "examples" / "question_answering.yaml")
    assert example.task == "question_answering" and example.data.max_length == 384 and example.data.stride == 128
    assert main(["tasks"]) == 0
    listing = capsys.readouterr().out
    assert "question_answering" in listing and "max_answer_length: 30" in listing
    target = tmp_path / "qa.yaml"
    assert main(["init", "qa", "-o", str(target)]) == 0
    specs = load_specs(target)
    assert specs.task == "question_answering" and specs.data.text_pair_column == "context"
    assert specs.data.n_best_size == 20 and specs.training.metric_for_best_model == "f1"


def test_a_merged_qa_lora_adapter_answers_as_the_adapter_did(tmp_path, tiny_specs):
    """peft's QA model does not pass segment ids on to its base: the merged model must answer as the adapter
    (which trained and predicts without them) does, scores included, when plain transformers loads it."""
    import torch
    from transformers import AutoModelForQuestionAnswering

    from tunepipe import FineTunePipeLine
    from tunepipe.cli import main
    from tunepipe.modeling.peft_support import load_adapter
    train = write_jsonl(tmp_path / "data" / "train.jsonl", make_qa_records(32, 1))
    val_rows = make_qa_records(6, 2)
    specs = tiny_specs("question_answering", {"train": str(train), "max_length": 64, "stride": 16},
                       training={"bf16": False, "max_steps": 6, "learning_rate": 5e-2},
                       peft={"method": "lora", "r": 4})
    FineTunePipeLine(specs).run()
    out = Path(specs["output_dir"])
    assert main(["merge", str(out)]) == 0
    adapter_model, tokenizer = load_adapter(out / "adapter")
    merged = AutoModelForQuestionAnswering.from_pretrained(out / "merged").eval()
    enc = tokenizer([r["question"] for r in val_rows], [r["context"] for r in val_rows], truncation=True,
                    max_length=64, padding=True, return_token_type_ids=True, return_tensors="pt")
    assert enc["token_type_ids"].max() == 1  # the context is segment 1
    with torch.no_grad():
        a, m = adapter_model(**enc), merged(**enc)
    assert (a.start_logits - m.start_logits).abs().max().item() < 1e-4
    assert (a.end_logits - m.end_logits).abs().max().item() < 1e-4
