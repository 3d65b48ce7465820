"""The tokenization cache: a second run on the same data reads nothing and tokenizes nothing; a changed file,
tokenizer or max_length misses; a failed build leaves no entry; max_train_samples reads only what it keeps."""
import json
import os
from pathlib import Path

import pytest

from tunepipe.data import DatasetModules
from tunepipe.data import cache as data_cache
from tunepipe.errors import DatasetLoadError
from tunepipe.specs import load_specs
from tunepipe.tasks import get_task


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("TUNEPIPE_CACHE_DIR", str(folder))
    return folder


def modules(ner_data, **data):
    specs = load_specs({"task": "token_classification", "model": "m", "data": {**ner_data, **data}})
    return DatasetModules(specs, get_task(specs.task)(specs))


def tokenizer(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def prepared(ner_data, tok, **data):
    m = modules(ner_data, **data)
    out = m.prepare(tok)
    return m, {split: ds.to_dict() for split, ds in out.items()}


def test_second_run_reads_and_tokenizes_nothing(ner_data, tokenizer_dir, cache_dir, monkeypatch):
    tok = tokenizer(tokenizer_dir)
    first, first_out = prepared(ner_data, tok)
    assert first.cache_hits == {"records": False, "tokens:train": False, "tokens:validation": False}
    import tunepipe.data.modules as mod

    def no_reading(*a, **k):
        raise AssertionError("the data was read again")
    monkeypatch.setattr(mod, "iter_source", no_reading)
    again, again_out = prepared(ner_data, tok)
    assert again.cache_hits == {"records": True, "tokens:train": True, "tokens:validation": True}
    assert again_out == first_out
    assert again.task.labels == first.task.labels
    assert (cache_dir / "datasets" / "CACHEDIR.TAG").is_file()


def test_a_changed_file_misses(ner_data, tokenizer_dir, cache_dir, tmp_path):
    tok = tokenizer(tokenizer_dir)
    train = tmp_path / "train.jsonl"
    lines = Path(ner_data["train"]).read_text().splitlines()
    train.write_text("\n".join(lines) + "\n")
    data = {**ner_data, "train": str(train)}
    _, before = prepared(data, tok)
    train.write_text("\n".join(lines[:-10]) + "\n")  # fewer records, same path
    m, after = prepared(data, tok)
    assert m.cache_hits["records"] is False and m.cache_hits["tokens:train"] is False
    assert len(after["train"]["input_ids"]) == len(before["train"]["input_ids"]) - 10


def test_a_changed_tokenizer_or_max_length_misses_the_tokens_only(ner_data, tokenizer_dir, cache_dir, tmp_path):
    tok = tokenizer(tokenizer_dir)
    prepared(ner_data, tok)
    m, shorter = prepared(ner_data, tok, max_length=8)
    assert m.cache_hits == {"records": True, "tokens:train": False, "tokens:validation": False}
    assert max(len(x) for x in shorter["train"]["input_ids"]) <= 8
    from tunepipe.tiny import train_wordpiece_tokenizer
    texts = [" ".join(json.loads(line)["tokens"]) for line in open(ner_data["train"])]
    train_wordpiece_tokenizer(texts, tmp_path / "other-tok", vocab_size=120)
    m, _ = prepared(ner_data, tokenizer(tmp_path / "other-tok"))
    assert m.cache_hits == {"records": True, "tokens:train": False, "tokens:validation": False}
    m, _ = prepared(ner_data, tok)
    assert m.cache_hits == {"records": True, "tokens:train": True, "tokens:validation": True}


def test_a_failed_build_leaves_no_entry(ner_data, tokenizer_dir, cache_dir, monkeypatch):
    m = modules(ner_data)
    m.load()

    def broken(batch, tokenizer):
        raise RuntimeError("tokenizer crashed")
    monkeypatch.setattr(m.task, "preprocess", broken)
    with pytest.raises(Exception):
        m.prepare(tokenizer(tokenizer_dir))
    tokens = cache_dir / "datasets" / "tokens"
    assert not tokens.exists() or not any(tokens.iterdir())  # no entry, no temporary folder left


def test_cache_off_writes_nothing(ner_data, tokenizer_dir, cache_dir):
    m, _ = prepared(ner_data, tokenizer(tokenizer_dir), cache=False)
    assert not cache_dir.exists()
    assert m.cache_hits["records"] is False


def test_max_train_samples_reads_only_what_it_keeps(ner_data, tmp_path, cache_dir):
    lines = Path(ner_data["train"]).read_text().splitlines()
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(lines[:20] + ["{broken"]) + "\n")
    m = modules({**ner_data, "train": str(train)}, max_train_samples=20)
    assert len(m.load()["train"]) == 20
    with pytest.raises(DatasetLoadError) as e:
        modules({**ner_data, "train": str(train)}, max_train_samples=21).load()
    assert e.value.line == 21


def test_clear_removes_only_a_tagged_cache(ner_data, tokenizer_dir, cache_dir, monkeypatch, tmp_path):
    prepared(ner_data, tokenizer(tokenizer_dir))
    assert data_cache.clear() > 0 and not (cache_dir / "datasets").exists()
    mine = tmp_path / "mine"
    (mine / "datasets").mkdir(parents=True)
    (mine / "datasets" / "notes.txt").write_text("keep")
    monkeypatch.setenv("TUNEPIPE_CACHE_DIR", str(mine))
    assert data_cache.clear() == 0 and (mine / "datasets" / "notes.txt").read_text() == "keep"


def test_memory_mapped_not_loaded(ner_data, tokenizer_dir, cache_dir):
    """The splits are Arrow files on disk, mapped, not tables copied into memory."""
    m = modules(ner_data)
    out = m.prepare(tokenizer(tokenizer_dir))
    for ds in (out["train"], m.records["train"].dataset):
        assert ds.cache_files and all(Path(f["filename"]).is_file() for f in ds.cache_files)
        assert os.path.commonpath([ds.cache_files[0]["filename"], str(cache_dir)]) == str(cache_dir)


def test_cache_command(ner_data, tokenizer_dir, cache_dir, capsys):
    import tunepipe.cli as cli
    prepared(ner_data, tokenizer(tokenizer_dir))
    assert cli.main(["cache"]) == 0
    assert "3 entries" in capsys.readouterr().out  # records + tokens of train and validation
    assert cli.main(["cache", "clear"]) == 0
    assert "removed" in capsys.readouterr().out and not (cache_dir / "datasets").exists()
