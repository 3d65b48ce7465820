"""DatasetModules: every input form reads into the same records; bad input names the file and line."""
import json

import pytest

from tunepipe.data import DatasetModules
from tunepipe.errors import DatasetLoadError, ValidationError
from tunepipe.specs import load_specs
from tunepipe.tasks import get_task

ROWS = [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"},
        {"text": "fine film", "label": "pos"}, {"text": "dull film", "label": "neg"}]


def modules(train, **data):
    specs = load_specs({"task": "text_classification", "model": "m", "data": {"train": train, **data}})
    return DatasetModules(specs, get_task(specs.task)(specs))


def write(path, text, mode="w"):
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture
def files(tmp_path):
    import pandas as pd
    return {
        "jsonl": write(tmp_path / "a.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS)),
        "json": write(tmp_path / "a.json", json.dumps(ROWS)),
        "json_columns": write(tmp_path / "c.json", json.dumps({"text": [r["text"] for r in ROWS],
                                                               "label": [r["label"] for r in ROWS]})),
        "csv": write(tmp_path / "a.csv", "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in ROWS)),
        "tsv": write(tmp_path / "a.tsv", "text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in ROWS)),
        "parquet": (pd.DataFrame(ROWS).to_parquet(tmp_path / "a.parquet"), str(tmp_path / "a.parquet"))[1],
        "dataframe": pd.DataFrame(ROWS),
        "records": ROWS,
    }


@pytest.mark.parametrize("kind", ["jsonl", "json", "json_columns", "csv", "tsv", "parquet", "dataframe", "records"])
def test_every_source_gives_the_same_records(files, kind):
    records = modules(files[kind]).load()["train"]
    assert records.rows == ROWS
    assert len(records.origins) == 4


def test_plain_text_and_list_of_files(tmp_path, files):
    from tunepipe.data import iter_file
    assert len(modules([files["jsonl"], files["csv"]]).load()["train"].rows) == 8
    (tmp_path / "t.txt").write_text("one\n\ntwo\n")
    read = list(iter_file(tmp_path / "t.txt", "text", "text", None, "train"))
    assert [row for row, _ in read] == [{"text": "one"}, {"text": "two"}]
    assert read[1][1] == (str(tmp_path / "t.txt"), 3)


def test_labels_inferred_and_validation_split(files):
    m = modules(files["jsonl"], validation_split=0.25)
    records = m.load()
    assert m.task.labels == ["neg", "pos"]
    assert len(records["train"].rows) == 3 and len(records["validation"].rows) == 1


def test_unknown_label_in_validation_names_the_line(tmp_path, files):
    val = write(tmp_path / "v.jsonl", json.dumps(ROWS[0]) + "\n" + json.dumps({"text": "meh", "label": "mixed"}) + "\n")
    with pytest.raises(ValidationError) as e:
        modules(files["jsonl"], validation=val).load()
    assert (e.value.file, e.value.line) == (val, 2) and "unknown label 'mixed'" in e.value.message


def test_empty_file(tmp_path):
    with pytest.raises(DatasetLoadError) as e:
        modules(write(tmp_path / "e.jsonl", "\n")).load()
    assert "no records" in e.value.message and e.value.field == "data.train"


def test_non_utf8_names_the_line(tmp_path):
    path = write(tmp_path / "l.jsonl", json.dumps(ROWS[0]).encode() + b"\n" + '{"text": "caf\xe9"}'.encode("latin-1"),
                 mode="wb")
    with pytest.raises(DatasetLoadError) as e:
        modules(path).load()
    assert e.value.line == 2 and "UTF-8" in e.value.message and e.value.suggestions


def test_csv_row_with_extra_fields(tmp_path):
    path = write(tmp_path / "x.csv", "text,label\ngood,pos\nbad, really,neg\n")
    with pytest.raises(DatasetLoadError) as e:
        modules(path).load()
    assert e.value.line == 3


def test_missing_column_suggests_the_close_one(tmp_path):
    path = write(tmp_path / "x.jsonl", json.dumps({"txt": "a", "label": "b"}) + "\n")
    with pytest.raises(DatasetLoadError) as e:
        modules(path).load()
    assert e.value.field == "data.text_column" and any("'txt'" in s for s in e.value.suggestions)


def test_empty_text_is_a_bad_record(tmp_path):
    path = write(tmp_path / "x.jsonl", json.dumps({"text": "a", "label": "b"}) + "\n"
                 + json.dumps({"text": " ", "label": "b"}) + "\n")
    with pytest.raises(ValidationError) as e:
        modules(path).load()
    assert e.value.line == 2


def test_unreachable_hub_dataset_is_a_clear_error():
    with pytest.raises(DatasetLoadError) as e:
        modules("someone/not-a-local-dataset").load()
    assert "someone/not-a-local-dataset" in e.value.message and e.value.suggestions


def test_max_train_samples(files):
    assert len(modules(files["jsonl"], max_train_samples=2).load()["train"].rows) == 2


def test_prepare_keeps_a_field_that_first_appears_in_a_later_record():
    from tunepipe.data import with_all_keys
    import datasets
    rows = with_all_keys([{"text": "a"}, {"text": "b", "references": ["x", "y"]}])
    ds = datasets.Dataset.from_list(rows)
    assert ds.column_names == ["text", "references"]
    assert ds[1]["references"] == ["x", "y"] and ds[0]["references"] is None
