"""Token classification: label alignment, entity spans, seqeval metrics, and a full train -> reload run."""
import json
from pathlib import Path

import pytest

from tunepipe.specs import load_specs
from tunepipe.tasks.token_classification import (TokenClassificationTask, entity_metrics, spans_from_tags)


def make_task(**data):
    specs = load_specs({"task": "ner", "model": "m", "data": {"train": "x", **data}})
    task = TokenClassificationTask(specs)
    task.labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    return task


def test_labels_go_on_first_sub_token_only(tokenizer_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    words = ["Zyxwvutsrq", "lives", "in", "Lisbon"]  # an unseen word: split into several pieces
    assert len(tok.tokenize(words[0])) > 1
    enc = make_task().preprocess({"tokens": [words], "ner_tags": [["B-PER", "O", "O", "B-LOC"]]}, tok)
    labels, word_ids = enc["labels"][0], enc.word_ids(0)
    n_pieces = len(tok.tokenize(words[0]))
    assert labels[0] == -100 and labels[-1] == -100  # [CLS], [SEP]
    assert labels[1] == 1  # B-PER on the first piece
    assert labels[2:1 + n_pieces] == [-100] * (n_pieces - 1)
    assert [l for l in labels if l != -100] == [1, 0, 0, 3]
    assert word_ids[1:1 + n_pieces] == [0] * n_pieces


def test_label_all_tokens_uses_inside_tag(tokenizer_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    enc = make_task(label_all_tokens=True).preprocess({"tokens": [["Zyxwvutsrq"]], "ner_tags": [["B-PER"]]}, tok)
    inner = enc["labels"][0][1:-1]
    assert inner[0] == 1 and set(inner[1:]) == {2}  # B-PER then I-PER


def test_spans_from_tags():
    assert spans_from_tags(["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-ORG"]) == [
        ("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5), ("ORG", 5, 6)]


def test_entity_metrics_hand_checked():
    y_true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    y_pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    m = entity_metrics(y_true, y_pred)
    # gold: PER, LOC, ORG; predicted: PER, ORG(wrong), ORG(right) -> 2 of 3 correct each way
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["PER_f1"] == 1.0 and m["LOC_f1"] == 0.0 and m["ORG_f1"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(5 / 6)


def test_inferred_labels_put_o_first_and_add_inside_tags():
    task = make_task()
    task.labels = None
    assert task.infer_labels([{"ner_tags": ["B-PER", "O", "B-LOC", "I-LOC"]}]) == [
        "O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


@pytest.mark.parametrize("record, message", [
    ({"tokens": ["a", "b"], "ner_tags": ["O"]}, "2 tokens but 1 tags"),
    ({"tokens": [], "ner_tags": []}, "non-empty"),
    ({"tokens": ["a"], "ner_tags": ["B-XYZ"]}, "unknown label 'B-XYZ'"),
    ({"tokens": ["a"], "ner_tags": "O"}, "must be a list"),
])
def test_bad_records_are_explained(record, message):
    assert message in make_task().validate_record(record, "train")


def test_conll_file_and_end_to_end_reload(tmp_path, tiny_specs, ner_data):
    """Train from a CoNLL column file, then plain transformers must reproduce tunepipe's predictions."""
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from tunepipe import FineTunePipeLine
    conll = tmp_path / "train.conll"
    rows = [json.loads(line) for line in open(ner_data["train"])]
    conll.write_text("-DOCSTART- -X- -X- O\n\n" + "\n\n".join(
        "\n".join(f"{w} NN O {t}" for w, t in zip(r["tokens"], r["ner_tags"])) for r in rows) + "\n")
    pipe = FineTunePipeLine(tiny_specs("token_classification", {"train": str(conll),
                                                                "validation": ner_data["validation"]}))
    model, tokenizer = pipe.run()
    out = Path(pipe.specs.output_dir)
    for name in ("model/config.json", "model/model.safetensors", "specs.yaml", "metrics.json", "train_log.jsonl",
                 "README.md"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["validation"]["f1"] <= 1.0 and "PER_f1" in metrics["validation"]
    assert len(pipe.datasets["train"]) == len(rows)

    sentences = ["Greta Varga moved to Lisbon .", "Shares of Quill Press rose ."]
    ours = pipe.predict(sentences)
    plain_tok = AutoTokenizer.from_pretrained(out / "model")
    plain = AutoModelForTokenClassification.from_pretrained(out / "model").eval()
    for sentence, pred in zip(sentences, ours):
        words = sentence.split()
        enc = plain_tok(words, is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            ids = plain(**enc).logits[0].argmax(-1).tolist()
        first = {}
        for pos, w in enumerate(enc.word_ids(0)):
            if w is not None and w not in first:
                first[w] = plain.config.id2label[ids[pos]]
        assert pred["tags"] == [first[i] for i in range(len(words))]
        for ent in pred["entities"]:
            assert sentence[ent["start"]:ent["end"]] == ent["text"]
