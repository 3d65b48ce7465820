"""Shared fixtures: tiny models from config, a tokenizer trained here, small generated datasets. Offline."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_TRACKING_URI", "")
# the tokenization cache of this test session, never the user's own (~/.cache/tunepipe)
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

os.environ["TUNEPIPE_CACHE_DIR"] = tempfile.mkdtemp(prefix="tunepipe-test-cache-")
atexit.register(shutil.rmtree, os.environ["TUNEPIPE_CACHE_DIR"], True)

import pytest  # noqa: E402

ASSETS = Path(__file__).parent / "assets"

TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 128}

POSITIVE = ["a warm and funny film", "great acting and a clever plot", "i loved every minute", "a joy to watch",
            "beautiful music and a moving story", "smart , sharp and kind", "the best film this year"]
NEGATIVE = ["a dull and lifeless film", "bad acting and a silly plot", "i hated every minute", "a chore to watch",
            "ugly music and a boring story", "slow , flat and cruel", "the worst film this year"]


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def ner_data(tmp_path_factory) -> dict[str, str]:
    from tunepipe.demo import make_demo_ner
    return make_demo_ner(tmp_path_factory.mktemp("ner"), n_train=96, n_validation=24)


@pytest.fixture(scope="session")
def cls_data(tmp_path_factory) -> dict[str, str]:
    rng = random.Random(0)
    d = tmp_path_factory.mktemp("cls")

    def rows(n):
        out = []
        for _ in range(n):
            label = rng.randint(0, 1)
            out.append({"text": rng.choice(POSITIVE if label else NEGATIVE), "label": ["neg", "pos"][label]})
        return out

    return {"train": str(write_jsonl(d / "train.jsonl", rows(64))),
            "validation": str(write_jsonl(d / "validation.jsonl", rows(16)))}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, ner_data) -> str:
    """A small WordPiece tokenizer trained on the fixtures' text (no download)."""
    from tunepipe.tiny import train_wordpiece_tokenizer
    texts = [" ".join(json.loads(line)["tokens"]) for line in open(ner_data["train"])]
    texts += POSITIVE + NEGATIVE
    out = tmp_path_factory.mktemp("tokenizer")
    train_wordpiece_tokenizer(texts * 3, out, vocab_size=400)
    return str(out)


@pytest.fixture
def tiny_specs(tmp_path, tokenizer_dir):
    """Build specs for a tiny from-config BERT: tiny_specs(task, data, **sections)."""

    def make(task: str, data: dict, **sections) -> dict:
        specs = {"task": task, "output_dir": str(tmp_path / "run"), "model": {"from_config": dict(TINY_BERT)},
                 "tokenizer": {"name_or_path": tokenizer_dir}, "data": dict(data),
                 "training": {"num_train_epochs": 1, "per_device_train_batch_size": 8, "learning_rate": 1e-3,
                              "logging_steps": 2, "save_strategy": "no", "disable_tqdm": True,
                              "dataloader_pin_memory": False}}
        for key, value in sections.items():
            specs[key] = {**specs.get(key, {}), **value} if isinstance(value, dict) else value
        return specs

    return make


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (tiny models gain nothing from more), restored afterwards."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def close_to(value, abs_tol: float = 1e-5):
    """``value`` with every float replaced by pytest.approx: for predictions made in batches of other shapes
    (padding changes the last bits of a score, never a label or a span)."""
    if isinstance(value, float):
        return pytest.approx(value, abs=abs_tol)
    if isinstance(value, dict):
        return {k: close_to(v, abs_tol) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(close_to(v, abs_tol) for v in value)
    return value
