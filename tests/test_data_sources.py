"""data.<split> as a folder of shards, a glob, a list of files, or a datasets save_to_disk folder; bad records
in a shard name the shard and its line."""
import json
from pathlib import Path

import pytest

from tunepipe.data import DatasetModules
from tunepipe.errors import DatasetLoadError, ValidationError
from tunepipe.specs import load_specs
from tunepipe.tasks import get_task

ROWS = [{"text": f"film number {i} was {'good' if i % 2 else 'bad'}", "label": "pos" if i % 2 else "neg"}
        for i in range(12)]


def modules(train, **data):
    specs = load_specs({"task": "text_classification", "model": "m", "data": {"train": train, **data}})
    return DatasetModules(specs, get_task(specs.task)(specs))


def shards(folder: Path, rows=ROWS, parts=3, bad_at=None):
    folder.mkdir(parents=True, exist_ok=True)
    size = len(rows) // parts
    for p in range(parts):
        lines = [json.dumps(r) for r in rows[p * size:(p + 1) * size]]
        if bad_at == p:
            lines.insert(1, json.dumps({"text": "", "label": "pos"}))
        (folder / f"part-{p:03d}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def texts(m) -> list[str]:
    return [r["text"] for r in m.load()["train"].rows]


def test_a_folder_of_shards_reads_them_in_name_order(tmp_path):
    folder = shards(tmp_path / "train")
    (folder / ".hidden.jsonl").write_text("{broken\n")  # hidden files are not data
    assert texts(modules(str(folder))) == [r["text"] for r in ROWS]


def test_a_glob_and_a_list_of_files(tmp_path):
    folder = shards(tmp_path / "train")
    assert texts(modules(str(folder / "part-*.jsonl"))) == [r["text"] for r in ROWS]
    files = sorted(str(p) for p in folder.glob("*.jsonl"))
    assert texts(modules([files[2], files[0]])) == [r["text"] for r in ROWS[8:12] + ROWS[0:4]]
    with pytest.raises(DatasetLoadError) as e:
        modules(str(tmp_path / "nothing-*.jsonl")).load()
    assert e.value.field == "data.train" and "No file matches" in e.value.message


def test_a_bad_record_names_its_shard_and_line(tmp_path):
    folder = shards(tmp_path / "train", bad_at=1)
    with pytest.raises(ValidationError) as e:
        modules(str(folder)).load()
    assert (Path(e.value.file).name, e.value.line) == ("part-001.jsonl", 2)


def test_a_save_to_disk_folder(tmp_path):
    import datasets
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    ds = datasets.Dataset.from_list([{"text": r["text"], "label": r["label"]} for r in ROWS], features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    m = modules(str(tmp_path / "saved"))
    records = m.load()["train"]
    assert [r["label"] for r in records.rows] == [r["label"] for r in ROWS]  # ClassLabel ids -> names
    assert m.task.labels == ["neg", "pos"]
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dict"))
    assert len(modules(str(tmp_path / "dict")).load()["train"]) == len(ROWS)
    with pytest.raises(DatasetLoadError) as e:
        modules(str(tmp_path / "dict"), validation=str(tmp_path / "dict")).load()
    assert "not 'validation'" in e.value.message


def test_a_folder_without_data_files(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("notes")
    with pytest.raises(DatasetLoadError) as e:
        modules(str(tmp_path / "empty")).load()
    assert "without data files" in e.value.message and e.value.field == "data.train"


def test_the_same_shard_twice_is_refused(tmp_path):
    folder = shards(tmp_path / "train")
    with pytest.raises(DatasetLoadError) as e:
        modules([str(folder), str(folder / "part-000.jsonl")]).load()
    assert "twice" in e.value.message


def test_values_of_widening_types_across_write_batches(tmp_path):
    """A column empty (null) for the first write batch, ints then floats, a key first seen late: one table."""
    from tunepipe.data import records as rec
    rows = [{"text": f"t{i}", "label": "a", "score": i} for i in range(rec.WRITE_BATCH)]
    rows += [{"text": "late", "label": "b", "score": 0.5, "note": "first seen here"}]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = modules(str(path)).load()["train"]
    assert len(loaded) == len(rows)
    assert loaded.rows[-1] == {"text": "late", "label": "b", "score": 0.5, "note": "first seen here"}
    assert loaded.rows[0]["note"] is None and loaded.rows[3]["score"] == 3
    assert loaded.origins[-1] == (str(path), len(rows))
