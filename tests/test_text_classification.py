"""Text classification: metrics, multi-label encoding, CSV input, and a full train -> reload run."""
import numpy as np
import pytest

from tunepipe.specs import load_specs
from tunepipe.tasks.text_classification import TextClassificationTask, classification_metrics


def test_single_label_metrics_hand_checked():
    labels = np.array([0, 0, 1, 1, 2])
    preds = np.array([0, 1, 1, 1, 0])
    m = classification_metrics(labels, preds, multi_label=False, num_labels=3)
    assert m["accuracy"] == pytest.approx(3 / 5)
    # per-class F1: c0 p=1/2 r=1/2 -> .5; c1 p=2/3 r=1 -> .8; c2 -> 0
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_multi_label_metrics_hand_checked():
    labels = np.array([[1, 0], [1, 1]])
    preds = np.array([[1, 0], [1, 0]])
    m = classification_metrics(labels, preds, multi_label=True, num_labels=2)
    assert m["accuracy"] == 0.5
    assert m["micro_f1"] == pytest.approx(0.8)  # tp=2 fp=0 fn=1


def test_multi_label_targets_are_multi_hot(tokenizer_dir):
    from transformers import AutoTokenizer
    specs = load_specs({"task": "text_classification", "model": "m", "data": {"train": "x", "multi_label": True}})
    task = TextClassificationTask(specs)
    task.labels = task.infer_labels([{"label": ["a", "b"]}, {"label": ["c"]}])
    enc = task.preprocess({"text": ["x y", "z"], "label": [["a", "c"], ["b"]]}, AutoTokenizer.from_pretrained(tokenizer_dir))
    assert enc["labels"] == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    assert task.model_kwargs()["problem_type"] == "multi_label_classification"


def test_integer_labels_sort_numerically():
    specs = load_specs({"task": "text_classification", "model": "m", "data": {"train": "x"}})
    assert TextClassificationTask(specs).infer_labels([{"label": 10}, {"label": 2}, {"label": 1}]) == ["1", "2", "10"]


def test_csv_train_and_plain_transformers_reload(tmp_path, tiny_specs, cls_data):
    import csv
    import json

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunepipe import FineTunePipeLine
    rows = [json.loads(line) for line in open(cls_data["train"])]
    path = tmp_path / "train.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["sentence", "label"])
        writer.writeheader()
        writer.writerows({"sentence": r["text"], "label": r["label"]} for r in rows)
    specs = tiny_specs("text_classification", {"train": str(path), "validation": cls_data["validation"],
                                               "columns": {"sentence": "text"}},
                       training={"num_train_epochs": 10})
    pipe = FineTunePipeLine(specs)
    pipe.run()
    assert set(pipe.metrics["validation"]) >= {"accuracy", "macro_f1", "loss"}
    texts = ["a warm and funny film", "a dull and lifeless film", "i loved every minute"]
    ours = pipe.predict(texts)
    model_dir = f"{pipe.specs.output_dir}/model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    plain = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = plain(**tok(texts, padding=True, return_tensors="pt")).logits
    assert [plain.config.id2label[i] for i in logits.argmax(-1).tolist()] == [r["label"] for r in ours]
    probs = logits.softmax(-1).max(-1).values.tolist()
    assert [r["score"] for r in ours] == pytest.approx(probs, abs=1e-4)
    assert plain.config.id2label == {0: "neg", 1: "pos"}


def test_multi_label_end_to_end(tiny_specs):
    from tunepipe import FineTunePipeLine
    train = [{"text": t, "label": ["pos", "film"] if i % 2 else ["film"]}
             for i, t in enumerate(["a warm film", "a dull film", "great acting", "bad acting"] * 6)]
    pipe = FineTunePipeLine(tiny_specs("text_classification", {"train": train, "validation": train[:8],
                                                               "multi_label": True}))
    pipe.run()
    assert {"accuracy", "micro_f1", "macro_f1"} <= set(pipe.metrics["validation"])
    result = pipe.predict("a warm film")
    assert set(result["scores"]) == {"film", "pos"} and isinstance(result["labels"], list)


def test_a_test_split_without_labels_is_said_not_scored(tmp_path, tiny_specs, cls_data, caplog, one_torch_thread):
    import json

    from tunepipe import FineTunePipeLine
    unlabelled = tmp_path / "test.jsonl"
    unlabelled.write_text("".join(json.dumps({"text": json.loads(line)["text"]}) + "\n"
                                  for line in open(cls_data["validation"])))
    specs = tiny_specs("text_classification", {**cls_data, "test": str(unlabelled)}, training={"max_steps": 2})
    pipe = FineTunePipeLine(specs)
    pipe.run()
    assert "validation" in pipe.metrics and "test" not in pipe.metrics
    assert "the test split has no labels: it is not scored" in caplog.text
