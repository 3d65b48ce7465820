"""Token classification of sentences longer than data.max_length: windows sharing data.stride tokens in training,
evaluation and prediction, merged back to one tag per word (tunepipe/tasks/word_chunks.py)."""
import json
from pathlib import Path

import pytest
from conftest import TINY_BERT, close_to, write_jsonl

from tunepipe.errors import ConfigError
from tunepipe.specs import load_specs
from tunepipe.tasks.token_classification import (
    TokenClassificationTask,
    _aggregate,
    spans_from_tags,
)

LABELS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
# max_length 12 with [CLS] and [SEP]: windows of 10 content tokens starting every 6 ([0, 10), [6, 16), [12, 22) ...)
MAX_LENGTH, STRIDE, ROOM, STEP = 12, 4, 10, 6


def make_task(**data):
    specs = load_specs({"task": "ner", "model": "m",
                        "data": {"train": "x", "max_length": MAX_LENGTH, "stride": STRIDE, **data}})
    task = TokenClassificationTask(specs)
    task.labels = list(LABELS)
    return task


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def pieces(tok, word):
    return len(tok.tokenize(word))


@pytest.fixture(scope="module")
def fillers(tok):
    """Words of one piece each (so a word's index is its content position)."""
    words = ["in", "the", "to", "of", "and", "on", "for"]
    assert all(pieces(tok, w) == 1 for w in words + ["Cork", "Varga"])
    return words


@pytest.fixture(scope="module")
def long_word(tok):
    word = "Lisbon"  # several pieces in the fixtures' small vocabulary
    assert 3 <= pieces(tok, word) <= STEP
    return word


def sentence_with(fillers, n, placed):
    """``n`` one-piece filler words with ``placed`` {index: (word, tag)}; returns (words, tags)."""
    words = [fillers[i % len(fillers)] for i in range(n)]
    tags = ["O"] * n
    for i, (word, tag) in placed.items():
        words[i], tags[i] = word, tag
    return words, tags


def features(task, tok, rows, eval_=True):
    import datasets
    ds = datasets.Dataset.from_list([{"tokens": w, "ner_tags": t} for w, t in rows])
    fn = task.preprocess_eval if eval_ else task.preprocess
    return ds.map(fn, batched=True, fn_kwargs={"tokenizer": tok}, remove_columns=ds.column_names)


def perfect(ds):
    import numpy as np
    width = max(len(r) for r in ds["labels"])
    labels = np.array([list(r) + [-100] * (width - len(r)) for r in ds["labels"]])
    return np.where(labels < 0, 0, labels), labels


def metrics_of(task, predictions, labels):
    from transformers import EvalPrediction
    return task.compute_metrics(EvalPrediction(predictions=predictions, label_ids=labels))


def n_entities(rows):
    return sum(len(spans_from_tags(tags)) for _, tags in rows)


# ---- training -------------------------------------------------------------------------------------------------
def test_entity_straddling_a_cut_is_labelled_in_every_window_that_holds_its_first_piece(tok, fillers, long_word):
    task = make_task()
    n = pieces(tok, long_word)
    # long_word's pieces at content positions 8 .. 8+n-1: window 0 ([0, 10)) ends inside it, window 1 holds it all
    words, tags = sentence_with(fillers, 30, {8: (long_word, "B-PER")})
    enc = task.preprocess({"tokens": [words], "ner_tags": [tags]}, tok)
    assert len(enc["input_ids"]) >= 4  # 30 + n - 1 content tokens in windows of 10 every 6
    b_per = LABELS.index("B-PER")
    w0, w1 = enc["labels"][0], enc["labels"][1]
    assert len(w0) == MAX_LENGTH and w0[1 + 8] == b_per and w0[1 + 9] == -100  # first piece; a continuation
    assert w1[1 + 2] == b_per and w1[1 + 3:1 + 2 + n] == [-100] * (n - 1)  # position 8 is token 2 of window 1
    # every word's first piece is labelled in some window, continuation pieces never
    labelled = {w for f in range(len(enc["input_ids"])) for w, lab in zip(enc.word_ids(f), enc["labels"][f])
                if w is not None and lab != -100}
    assert labelled == set(range(len(words)))


def test_a_window_starting_inside_a_word_does_not_label_its_continuation(tok, fillers, long_word):
    n = pieces(tok, long_word)
    # long_word's first piece at position 4: window 1 starts at 6, inside it, with continuation pieces only
    assert n > STEP - 4
    words, tags = sentence_with(fillers, 24, {4: (long_word, "B-PER")})
    for label_all in (False, True):
        enc = make_task(label_all_tokens=label_all).preprocess({"tokens": [words], "ner_tags": [tags]}, tok)
        w1 = enc["labels"][1]
        assert enc.word_ids(1)[1] == 4  # the window opens on a continuation piece of word 4
        assert w1[1] == (LABELS.index("I-PER") if label_all else -100)


def test_sentences_that_fit_give_todays_features(tok, fillers, long_word):
    task = make_task()
    rows = [sentence_with(fillers, 6, {1: (long_word, "B-PER"), 3: ("Cork", "B-LOC")}), (["Ada"], ["B-PER"])]
    enc = task.preprocess({"tokens": [w for w, _ in rows], "ner_tags": [t for _, t in rows]}, tok)
    plain = tok([w for w, _ in rows], is_split_into_words=True, truncation=True, max_length=MAX_LENGTH)
    assert set(enc.keys()) == set(plain.keys()) | {"labels", "length"}
    for key in plain:
        assert enc[key] == plain[key]
    assert enc["length"] == [len(x) for x in plain["input_ids"]]
    for i, (_, tags) in enumerate(rows):
        previous, expected = None, []
        for w in plain.word_ids(i):
            expected.append(-100 if w is None or w == previous else LABELS.index(tags[w]))
            previous = w
        assert enc["labels"][i] == expected


def test_a_stride_that_leaves_no_room_is_refused_and_the_default_adapts(tok):
    with pytest.raises(ConfigError) as err:
        make_task(stride=ROOM).preprocess({"tokens": [["a"] * 30], "ner_tags": [["O"] * 30]}, tok)
    assert err.value.field == "data.stride"
    specs = load_specs({"task": "ner", "model": "m", "data": {"train": "x", "max_length": 8}})
    assert specs.data.stride == TokenClassificationTask.defaults["data"]["stride"]
    task = TokenClassificationTask(specs)
    task.labels = list(LABELS)
    enc = task.preprocess({"tokens": [["a"] * 30], "ner_tags": [["O"] * 30]}, tok)  # default 32 lowered: 6 // 4
    assert len(enc["input_ids"]) == 6


# ---- evaluation -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eval_rows(fillers, long_word):
    rows = [sentence_with(fillers, 40, {0: ("Greta", "B-PER"), 8: (long_word, "B-PER"), 9: ("Varga", "I-PER"),
                                        19: ("Lisbon", "B-LOC"), 33: ("Osaka", "B-LOC"), 39: ("Cork", "B-LOC")}),
            (["Greta", "moved", "to", "Lisbon", "."], ["B-PER", "O", "O", "B-LOC", "O"]),
            sentence_with(fillers, 25, {23: ("Hanoi", "B-LOC"), 24: ("Dundee", "I-LOC")})]
    return rows


def test_evaluation_scores_every_word_of_every_sentence(tok, eval_rows):
    task = make_task()
    ds = features(task, tok, eval_rows)
    assert len(ds) > len(eval_rows)  # the long sentences are cut into windows
    task.bind_eval_data("validation", None, ds)
    m = metrics_of(task, *perfect(ds))
    assert m["f1"] == 1.0 and m["accuracy"] == 1.0
    assert m["PER_support"] + m["LOC_support"] == n_entities(eval_rows) == 8
    assert m["LOC_support"] == 5  # Osaka, Cork and Hanoi Dundee lie past the first window
    # one scored token per word, over all windows
    assert sum(w >= 0 for row in ds["word_index"] for w in row) == sum(len(w) for w, _ in eval_rows)
    # a wrong tag on a word is counted once: Osaka predicted O
    predictions, labels = perfect(ds)
    for f, row in enumerate(ds["word_index"]):
        example = sum(c == 0 for c in ds["chunk"][:f + 1]) - 1
        for t, w in enumerate(row):
            if example == 0 and w == 33:
                predictions[f, t] = 0
    m = metrics_of(task, predictions, labels)
    assert m["LOC_support"] == 5 and m["recall"] == pytest.approx(7 / 8) and m["precision"] == 1.0


def test_a_word_seen_by_two_windows_is_scored_from_the_one_where_it_is_farther_from_a_cut(tok, fillers):
    task = make_task()
    # window 2 is [12, 22), window 3 [18, 28): position 19 has 2 tokens of context in window 2 and 1 in window 3,
    # position 20 has 1 in window 2 and 2 in window 3
    rows = [sentence_with(fillers, 30, {19: ("Cork", "B-LOC"), 20: ("Varga", "B-PER")})]
    ds = features(task, tok, rows)
    predictions, labels = perfect(ds)
    assert [ds["word_index"][2][1 + 19 - 12], ds["word_index"][3][1 + 20 - 18]] == [19, 20]
    assert ds["word_index"][3][1 + 19 - 18] == -1 and ds["word_index"][2][1 + 20 - 12] == -1
    task.bind_eval_data("validation", None, ds)
    wrong = predictions.copy()
    wrong[3, 1 + 19 - 18] = wrong[2, 1 + 20 - 12] = 0  # the windows where they are nearer a cut
    assert metrics_of(task, wrong, labels)["f1"] == 1.0
    wrong = predictions.copy()
    wrong[2, 1 + 19 - 12] = 0
    assert metrics_of(task, wrong, labels)["recall"] == pytest.approx(0.5)


def test_metrics_of_short_sentences_are_todays(tok, ner_data):
    """One window per sentence: the merged metrics equal the per-feature ones (today's rule)."""
    import numpy as np
    rows = [json.loads(line) for line in Path(ner_data["validation"]).read_text().splitlines()]
    task = make_task(max_length=64)
    task.labels = task.infer_labels(rows)
    ds = features(task, tok, [(r["tokens"], r["ner_tags"]) for r in rows])
    assert len(ds) == len(rows)
    predictions, labels = perfect(ds)
    rng = np.random.default_rng(0)
    noisy = np.where(rng.random(predictions.shape) < 0.3, rng.integers(0, len(task.labels), predictions.shape),
                     predictions)
    old = metrics_of(task, noisy, labels)  # nothing bound: each row scored as it comes
    task.bind_eval_data("validation", None, ds)
    assert metrics_of(task, noisy, labels) == old and old["f1"] < 1.0


def test_the_pipeline_metric_probe_still_names_the_metrics(tok, eval_rows):
    from tunepipe.pipeline import _reported_metrics
    task = make_task()
    ds = features(task, tok, eval_rows)
    task.bind_eval_data("validation", None, ds)
    for n in (2, len(ds)):
        produced = _reported_metrics(task, ds[:n]["labels"])
        assert {"f1", "precision", "recall", "accuracy", "PER_f1"} <= produced
    assert "LOC_f1" in _reported_metrics(task, ds[:len(ds)]["labels"])


@pytest.mark.parametrize("backend", ["hf", "accelerate"])
def test_a_run_scores_entities_past_max_length(tiny_specs, ner_data, tmp_path, backend):
    """Train and evaluate through the pipeline: the trainer strips the extra columns and keeps the order;
    metrics.json counts every gold entity of the long validation sentences."""
    from tunepipe import FineTunePipeLine
    rows = [json.loads(line) for line in Path(ner_data["validation"]).read_text().splitlines()][:12]
    long_rows = []
    for k in range(0, len(rows), 4):  # four sentences joined: far over 16 tokens
        group = rows[k:k + 4]
        long_rows.append({"tokens": [w for r in group for w in r["tokens"]],
                          "ner_tags": [t for r in group for t in r["ner_tags"]]})
    path = write_jsonl(tmp_path / "long.jsonl", long_rows)
    pipe = FineTunePipeLine(tiny_specs("token_classification", {"train": ner_data["train"],
                                                                "validation": str(path), "max_length": 16,
                                                                "stride": 4}, backend=backend))
    pipe.run()
    assert len(pipe.datasets["validation"]) > 3 * len(long_rows)
    metrics = json.loads((pipe.output_dir / "metrics.json").read_text())["validation"]
    gold = sum(len(spans_from_tags(r["ner_tags"])) for r in long_rows)
    assert sum(v for k, v in metrics.items() if k.endswith("_support")) == gold


# ---- prediction -----------------------------------------------------------------------------------------------
class StubModel:
    """Tags a token B-LOC when it is ``target`` with at least 2 content tokens of context on both sides in its
    window (else O): only the window that sees it best finds it."""

    def __new__(cls, target: int):
        import torch

        class Stub(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.weight = torch.nn.Parameter(torch.zeros(1))
                from transformers import PretrainedConfig
                self.config = PretrainedConfig(id2label=dict(enumerate(LABELS)))

            def forward(self, input_ids, attention_mask, **kwargs):
                from types import SimpleNamespace
                logits = torch.zeros(*input_ids.shape, len(LABELS))
                logits[..., 0] = 1.0
                for row in range(input_ids.shape[0]):
                    content = attention_mask[row].nonzero().flatten().tolist()[1:-1]  # either padding side
                    for j, t in enumerate(content):
                        if int(input_ids[row, t]) == target and min(j, len(content) - 1 - j) >= 2:
                            logits[row, t, 1] = 5.0
                return SimpleNamespace(logits=logits)

        return Stub()


def test_predict_tags_every_word_and_finds_entities_past_the_first_window(tok, fillers):
    model = StubModel(tok.convert_tokens_to_ids(tok.tokenize("Cork"))[0])
    task = make_task()
    # Cork at 19 (best in window 2) and 26 (best in window 3, 2 tokens from its cut at 28)
    words, _ = sentence_with(fillers, 35, {19: ("Cork", "B-LOC"), 26: ("Cork", "B-LOC")})
    text = " ".join(words)
    for item in (words, text):
        out = task.predict(model, tok, [item, ["Cork"]], batch_size=3)
        assert len(out[0]["tags"]) == len(out[0]["tokens"]) == len(words)
        assert [i for i, t in enumerate(out[0]["tags"]) if t != "O"] == [19, 26]
        assert [(e["label"], e["text"]) for e in out[0]["entities"]] == [("LOC", "Cork")] * 2
        start = len(" ".join(words[:19])) + 1
        assert (out[0]["entities"][0]["start"], out[0]["entities"][0]["end"]) == (start, start + 4)
        assert out[1]["tags"] == ["O"]  # no context: the stub says O


def test_predict_on_short_inputs_is_unchanged(tok, tokenizer_dir):
    """Inputs that fit one window: the same words, tags, entities and scores as one plain forward pass."""
    import torch
    from transformers import AutoConfig, AutoModelForTokenClassification

    torch.manual_seed(0)
    config = AutoConfig.for_model(**TINY_BERT, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
                                  label2id={x: i for i, x in enumerate(LABELS)})
    model = AutoModelForTokenClassification.from_config(config).eval()
    task = make_task(max_length=64)
    inputs = ["Greta Varga moved to Lisbon .", ["Shares", "of", "Quill", "Press", "rose", "."],
              "Zyxwvutsrqpo met Osaka", ["Zyxwvutsrqpo"]]
    for strategy in ("first", "average", "max", "simple"):
        ours = task.predict(model, tok, inputs, batch_size=2, aggregation_strategy=strategy)
        for item, got in zip(inputs, ours):
            split = not isinstance(item, str)
            enc = tok([item], is_split_into_words=split, truncation=True, max_length=64, return_tensors="pt")
            with torch.no_grad():
                probs = model(**enc).logits[0].softmax(-1).numpy()
            assert got == close_to(_aggregate(item, enc.encodings[0], probs, model.config.id2label, strategy))


def test_a_left_truncating_left_padding_tokenizer_windows_the_same_words(tok, fillers, eval_rows):
    """truncation_side left: the tokenizer's first window is the sentence's last one (the layout follows)."""
    import copy
    left = copy.deepcopy(tok)
    left.truncation_side = left.padding_side = "left"
    task = make_task()
    ds = features(task, left, eval_rows)
    assert ds["input_ids"][0] != features(task, tok, eval_rows)["input_ids"][0]  # another first window
    task.bind_eval_data("validation", None, ds)
    m = metrics_of(task, *perfect(ds))
    assert m["f1"] == 1.0 and m["PER_support"] + m["LOC_support"] == n_entities(eval_rows)
    words, _ = sentence_with(fillers, 35, {19: ("Cork", "B-LOC"), 26: ("Cork", "B-LOC")})
    model = StubModel(tok.convert_tokens_to_ids(tok.tokenize("Cork"))[0])
    short = ["in", "the", "to", "of", "Cork", "and", "on", "for"]  # padded on the left in a batch of 12 tokens
    out = task.predict(model, left, [words, ["Cork"], words[:5], short], batch_size=5)
    assert [i for i, t in enumerate(out[0]["tags"]) if t != "O"] == [19, 26]
    assert out[1]["tags"] == ["O"] and out[2]["tags"] == ["O"] * 5
    assert [i for i, t in enumerate(out[3]["tags"]) if t != "O"] == [4]


def test_windows_that_do_not_line_up_are_refused(tok, fillers):
    """The layout checks the tokenizer's windows against data.stride instead of misplacing tokens."""
    from tunepipe.errors import TrainingError
    from tunepipe.tasks.word_chunks import ChunkLayout
    words = [fillers[i % len(fillers)] for i in range(30)]
    enc = tok([words], is_split_into_words=True, truncation=True, max_length=MAX_LENGTH, stride=STRIDE,
              return_overflowing_tokens=True)
    layout = ChunkLayout(enc.encodings, STRIDE)
    assert layout.total == 30 and layout.spans[:2] == [(0, ROOM), (STEP, STEP + ROOM)]
    with pytest.raises(TrainingError, match="do not overlap"):
        ChunkLayout(enc.encodings, STRIDE + 1)
