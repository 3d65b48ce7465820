"""data.streaming: the train split read while training, on every backend and across processes; exact resume
after SIGKILL mid-stream; bad records reported with file and line when reached; nothing read ahead of need."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunepipe.errors import ConfigError, ValidationError
from tunepipe.pipeline import FineTunePipeLine

from test_distributed import PROBE
from test_resume import BACKENDS, _check_exact_resume, _run_child, forkserver, ner_specs  # noqa: F401

STREAM_PLAN = {"batches": 12, "epochs": 2, "save_steps": 5}  # 96 records / 8 = 12 batches per pass, 2 passes


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Small models run fastest on one thread."""


def ner_labels(path) -> list[str]:
    from tunepipe.tasks.token_classification import b_to_i, tag_sort_key
    tags = {t for line in open(path) for t in json.loads(line)["ner_tags"]} | {"O"}
    return sorted(tags | {b_to_i(t) for t in tags}, key=tag_sort_key)


def stream_specs(tiny_specs, ner_data, backend="hf", **data):
    specs = tiny_specs("token_classification", {**ner_data, "streaming": True,
                                                "labels": ner_labels(ner_data["validation"].replace("validation",
                                                                                                    "train")),
                                                "shuffle_buffer": 40, **data},
                       backend=backend, training={"max_steps": 6, "logging_steps": 1,
                                                  "train_sampling_strategy": "group_by_length"})
    specs["data"] = {k: v for k, v in specs["data"].items() if v is not None}
    return specs


def losses(pipe) -> list[float]:
    return [e["loss"] for e in pipe.train_result.log_history if "loss" in e]


def test_stream_trains_the_same_on_every_backend(tiny_specs, ner_data, tmp_path):
    """The stream's batches (sharding, shuffle buffer, length groups) are the backends' shared input: the same
    per-step losses on all four, and they differ from a run with another seed (the test can fail)."""
    runs = {}
    for backend in BACKENDS:
        specs = stream_specs(tiny_specs, ner_data, backend)
        specs["output_dir"] = str(tmp_path / backend.replace("+", "_"))
        pipe = FineTunePipeLine(specs)
        pipe.setup()
        pipe.train()
        runs[backend] = losses(pipe)
    assert len(runs["hf"]) == 6
    for backend in BACKENDS[1:]:
        assert runs[backend] == pytest.approx(runs["hf"], rel=1e-4), backend
    other = stream_specs(tiny_specs, ner_data, "accelerate")
    other["training"]["seed"], other["output_dir"] = 7, str(tmp_path / "seed7")
    pipe = FineTunePipeLine(other)
    pipe.setup()
    pipe.train()
    assert losses(pipe) != pytest.approx(runs["hf"], rel=1e-4)


@pytest.mark.parametrize("backend", ["hf", "accelerate", "lightning"])
def test_exact_resume_mid_stream(forkserver, tiny_specs, ner_data, tmp_path, backend):  # noqa: F811
    """Killed with SIGKILL mid-stream and resumed with resume: auto: the weights, losses and metrics of the
    uninterrupted run (the run crosses a pass boundary, where the stream starts over reshuffled)."""
    def make(b, out):
        specs = ner_specs(tiny_specs, ner_data, b, out)
        specs["data"].update(streaming=True, labels=ner_labels(ner_data["train"]), shuffle_buffer=40)
        specs["training"]["max_steps"] = STREAM_PLAN["batches"] * STREAM_PLAN["epochs"]
        return specs

    _check_exact_resume(forkserver, make, STREAM_PLAN, backend, tmp_path, "stream")


def test_bad_record_in_the_stream_names_file_and_line(tiny_specs, ner_data, tmp_path):
    lines = Path(ner_data["train"]).read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:30] + [json.dumps({"tokens": ["a", "b"], "ner_tags": ["O"]})] + lines[30:]) + "\n")
    specs = stream_specs(tiny_specs, {**ner_data, "train": str(bad)})
    with pytest.raises(ValidationError) as e:  # when the record is reached (here: sampling the first features)
        FineTunePipeLine(specs).run()
    assert (e.value.file, e.value.line) == (str(bad), 31) and "2 tokens but 1 tags" in e.value.message

    skipping = stream_specs(tiny_specs, {**ner_data, "train": str(bad)}, on_bad_record="skip")
    skipping["output_dir"] = str(tmp_path / "skip")
    pipe = FineTunePipeLine(skipping)
    pipe.setup()
    pipe.train()
    assert pipe.train_result.global_step == 6


def test_stream_reads_only_what_training_needs(tiny_specs, ner_data, tmp_path):
    """A malformed line far beyond what 6 steps consume is never reached (map-style reading would fail on it)."""
    lines = Path(ner_data["train"]).read_text().splitlines()
    big = tmp_path / "big.jsonl"
    big.write_text("\n".join(lines * 30 + ["{not json"]) + "\n")  # 2,880 good records, then a broken line
    specs = stream_specs(tiny_specs, {**ner_data, "train": str(big)})
    pipe = FineTunePipeLine(specs)
    pipe.setup()
    pipe.train()
    assert pipe.train_result.global_step == 6
    from tunepipe.errors import DatasetLoadError
    plain = stream_specs(tiny_specs, {**ner_data, "train": str(big)}, streaming=False)
    plain["output_dir"] = str(tmp_path / "plain")
    with pytest.raises(DatasetLoadError) as e:
        FineTunePipeLine(plain).setup()
    assert e.value.line == len(lines) * 30 + 1


@pytest.mark.parametrize("data, field", [({"labels": None}, "data.labels"),
                                         ({"validation_split": 0.1, "validation": None}, "data.validation_split")])
def test_what_a_stream_cannot_do_is_said_before_reading(tiny_specs, ner_data, data, field):
    specs = stream_specs(tiny_specs, ner_data, **data)
    with pytest.raises(ConfigError) as e:
        FineTunePipeLine(specs).setup()
    assert e.value.field == field and e.value.suggestions


@pytest.mark.parametrize("backend, launcher", [("hf", "torchrun"), ("accelerate", "torchrun"),
                                               ("lightning", "python"), ("lightning+accelerate", "python")])
def test_two_processes_see_disjoint_parts_of_the_stream(tiny_specs, ner_data, tmp_path, backend, launcher):
    """2-process DDP on CPU: with one file the ranks take every other record (split_dataset_by_node), so in one
    pass over 80 distinct records each rank trains on 40 and no record is seen twice."""
    import yaml
    from transformers import AutoTokenizer
    unique = list(dict.fromkeys(Path(ner_data["train"]).read_text().splitlines()))[:80]
    (tmp_path / "train.jsonl").write_text("\n".join(unique) + "\n")
    specs = stream_specs(tiny_specs, {**ner_data, "train": str(tmp_path / "train.jsonl")}, backend)
    specs["training"].update(max_steps=5, bf16=False, save_strategy="no")
    specs["output_dir"] = str(tmp_path / "run")
    if backend.startswith("lightning"):
        specs["distributed"] = {"devices": 2, "strategy": "ddp"}
    (tmp_path / "specs.yaml").write_text(yaml.safe_dump(specs))
    (tmp_path / "probe.py").write_text(PROBE)
    out = tmp_path / "out"
    out.mkdir()
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    command = ([str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", port]
               if launcher == "torchrun" else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(command + [str(tmp_path / "probe.py"), str(tmp_path / "specs.yaml"), str(out)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = [[row for batch in json.loads((out / f"seen-{r}.json").read_text()) for row in batch] for r in (0, 1)]
    tok = AutoTokenizer.from_pretrained(specs["tokenizer"]["name_or_path"])
    train = [json.loads(line) for line in unique]
    index = {tuple(tok(r["tokens"], is_split_into_words=True)["input_ids"]): i for i, r in enumerate(train)}
    assert len(index) == len(train) == 80
    ranks = [[index[tuple(row)] for row in rank] for rank in seen]
    assert len(ranks[0]) == len(ranks[1]) == 40
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == list(range(len(train)))


def _aligned_groups_sorted(batches, k) -> bool:
    """Inside each run of k batches (as the stream cut them), no two batches' length ranges overlap."""
    ranges = [(min(len(f["input_ids"]) for f in b), max(len(f["input_ids"]) for f in b)) for b in batches]
    return all(a[1] <= b[0] or b[1] <= a[0] for i in range(0, len(ranges), k)
               for j, a in enumerate(ranges[i:i + k]) for b in ranges[i + j + 1:i + k])


def test_stream_sorts_length_group_batches_at_a_time(tiny_specs, ner_data):
    """``training.length_group_batches`` sets the stream's length-sorting buffer as it sets the sampler's groups."""
    grouped = {}
    for k in (1, 3):
        specs = stream_specs(tiny_specs, ner_data)
        specs["training"]["length_group_batches"] = k
        pipe = FineTunePipeLine(specs)
        pipe.setup()
        grouped[k] = list(pipe.datasets["train"].batches(4, 0))
    assert len(grouped[3]) == len(grouped[1]) == 24  # 96 records in batches of 4
    assert _aligned_groups_sorted(grouped[3], 3)
    assert not _aligned_groups_sorted(grouped[1], 3)
