"""Write the small sample data sets that the example specs in examples/ train on.

Every sentence comes from templates and word lists written for tunepipe (people, towns and companies are
invented); nothing is copied from a third-party data set. The data is deterministic (fixed seeds), so
running this script again rewrites the committed files byte for byte:

    python examples/data/make_samples.py            # from the repository root; or --out DIR

Each folder holds train.jsonl and validation.jsonl in the record layout of its task (the columns that
`tunepipe init TASK` writes). The sets are big enough to show the pipeline end to end, far too
small to learn a useful model: each example yaml names the public data set to use for real work.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

N_TRAIN, N_VALIDATION = 48, 24

FIRST = ["Amara", "Bruno", "Celia", "Dario", "Edda", "Femi", "Gwen", "Hakon", "Iris", "Joao", "Kirra", "Luca",
         "Mira", "Niko", "Olga", "Pavel", "Rhea", "Sami", "Talia", "Viktor"]
LAST = ["Abara", "Brandt", "Cortes", "Dunmore", "Eskola", "Fontaine", "Gallo", "Holm", "Ibsen", "Jovanic",
        "Kerr", "Lindgren", "Mbeki", "Novak", "Ortiz", "Pell"]
TOWNS = ["Ashford", "Bramwick", "Caldera Bay", "Dunmoor", "Elmstead", "Fairhaven", "Glenrock", "Harrowgate",
         "Ironbridge", "Juniper Falls", "Kestrel Point", "Lowmere"]
ORGS = ["Brightwater Mills", "Cobalt Systems", "Dovetail Books", "Evergreen Clinic", "Foxglove Foods",
        "Harbourline Ferries", "Kingfisher Bank", "Larkspur Studios", "Moss and Pine", "Northgate Rail"]
EVENTS = ["Lantern Festival", "Spring Regatta", "Winter Book Fair", "Harvest Cup", "Open Garden Week"]
JOBS = ["baker", "carpenter", "nurse", "pilot", "teacher", "chemist", "gardener", "librarian", "plumber",
        "architect"]
SUBJECTS = ["music", "chemistry", "history", "engineering", "botany", "law", "economics", "medicine"]


def person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def a_or_an(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def write_split(folder: Path, split: str, records: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"{split}.jsonl").open("w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def distinct(make, n: int, rng: random.Random, key=lambda r: json.dumps(r, sort_keys=True)) -> list[dict]:
    """``n`` records from ``make(rng)`` with no duplicates (train and validation are drawn in one list and split,
    so no validation record repeats a training record)."""
    seen, out = set(), []
    while len(out) < n:
        record = make(rng)
        if key(record) not in seen:
            seen.add(key(record))
            out.append(record)
    return out


def splits(folder: Path, make, seed: int, key=lambda r: json.dumps(r, sort_keys=True)) -> None:
    records = distinct(make, N_TRAIN + N_VALIDATION, random.Random(seed), key)
    write_split(folder, "train", records[:N_TRAIN])
    write_split(folder, "validation", records[N_TRAIN:])


# ---- token classification: CoNLL-style tokens + BIO tags (PER, LOC, ORG, MISC) -------------------------------
NER_TEMPLATES = [
    "{PER} opened a bakery in {LOC} last spring .",
    "{ORG} will sponsor the {MISC} in {LOC} .",
    "The {MISC} drew large crowds to {LOC} on Saturday .",
    "{PER} joined {ORG} as head of research .",
    "Engineers from {ORG} repaired the old bridge near {LOC} .",
    "{PER} and {PER} met in {LOC} to sign the deal .",
    "A court in {LOC} fined {ORG} for late payments .",
    "{PER} won first prize at the {MISC} .",
    "Ferries to {LOC} were cancelled because of the storm .",
    "{ORG} reported higher sales in {LOC} this year .",
    "According to {PER} , the museum will reopen in May .",
    "The library was quiet on a cold Tuesday morning .",
]


def ner_record(rng: random.Random) -> dict:
    tokens, tags = [], []
    for piece in rng.choice(NER_TEMPLATES).split():
        kind = piece[1:-1] if piece.startswith("{") else None
        if kind is None:
            tokens.append(piece)
            tags.append("O")
            continue
        words = {"PER": person(rng), "LOC": rng.choice(TOWNS), "ORG": rng.choice(ORGS),
                 "MISC": rng.choice(EVENTS)}[kind].split()
        tokens += words
        tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
    return {"tokens": tokens, "ner_tags": tags}


# ---- text classification: review sentences, positive / negative ------------------------------------------------
ITEMS = ["the new cafe", "this phone", "the hotel", "the concert", "this novel", "the museum tour", "the bike",
         "the cooking class", "this game", "the train service"]
GOOD = ["excellent", "delightful", "well made", "great value", "a pleasure", "worth every penny", "charming",
        "reliable"]
BAD = ["awful", "disappointing", "badly made", "overpriced", "a chore", "not worth the money", "dull",
       "unreliable"]
CLS_TEMPLATES = ["{item} was {a} and {b} .", "honestly , {item} is {a} .", "i found {item} {a} , even {b} .",
                 "my verdict on {item} : {a} and {b} ."]


def cls_record(rng: random.Random) -> dict:
    label = rng.choice(["positive", "negative"])
    words = GOOD if label == "positive" else BAD
    a, b = rng.sample(words, 2)
    return {"text": rng.choice(CLS_TEMPLATES).format(item=rng.choice(ITEMS), a=a, b=b), "label": label}


# ---- question answering: SQuAD v1.1 layout (answer_start = character offset in the context) -----------------------
def qa_record(rng: random.Random) -> dict:
    name, town, town2 = person(rng), *rng.sample(TOWNS, 2)
    year, job, subject, org = str(rng.randint(1950, 2001)), rng.choice(JOBS), rng.choice(SUBJECTS), rng.choice(ORGS)
    context = (f"{name} was born in {town} in {year}. {name.split()[0]} studied {subject} before working as "
               f"{a_or_an(job)} for {org}. Later {name.split()[0]} moved to {town2}, where the family still lives.")
    question, answer = rng.choice([
        (f"Where was {name} born?", town),
        (f"In which year was {name} born?", year),
        (f"What did {name} study?", subject),
        (f"Which company did {name} work for?", org),
        (f"Where did {name} move to later?", town2),
        (f"What was {name}'s job?", job),
    ])
    start = context.index(answer) if answer != town2 else context.rindex(answer)
    assert context[start:start + len(answer)] == answer
    return {"id": "", "title": name, "context": context, "question": question,
            "answers": {"text": [answer], "answer_start": [start]}}


def qa_splits(folder: Path, seed: int) -> None:
    records = distinct(qa_record, N_TRAIN + N_VALIDATION, random.Random(seed),
                       key=lambda r: r["question"] + r["context"])
    for i, record in enumerate(records):
        record["id"] = f"sample-{i:03d}"
    write_split(folder, "train", records[:N_TRAIN])
    write_split(folder, "validation", records[N_TRAIN:])


# ---- translation: English -> German, flat source/target records ---------------------------------------------------
EN_DE_SUBJECTS = [("A man", "Ein Mann"), ("A woman", "Eine Frau"), ("The boy", "Der Junge"),
                  ("The girl", "Das Mädchen"), ("An old man", "Ein alter Mann"),
                  ("A young woman", "Eine junge Frau"), ("The doctor", "Der Arzt"), ("A child", "Ein Kind")]
EN_DE_PREDICATES = [("rides a bike.", "fährt Fahrrad."), ("reads a book.", "liest ein Buch."),
                    ("plays football in the park.", "spielt Fußball im Park."), ("drinks coffee.", "trinkt Kaffee."),
                    ("sings a song.", "singt ein Lied."), ("waits for the bus.", "wartet auf den Bus."),
                    ("sits on a bench.", "sitzt auf einer Bank."), ("paints a picture.", "malt ein Bild."),
                    ("swims in the lake.", "schwimmt im See."), ("opens the door.", "öffnet die Tür."),
                    ("eats an apple.", "isst einen Apfel."), ("writes a letter.", "schreibt einen Brief.")]


def translation_record(rng: random.Random) -> dict:
    (en_s, de_s), (en_p, de_p) = rng.choice(EN_DE_SUBJECTS), rng.choice(EN_DE_PREDICATES)
    return {"source": f"{en_s} {en_p}", "target": f"{de_s} {de_p}"}


# ---- summarization: short council reports -> one-line summaries (validation: two references) -------------------
TOPICS = [("a new cycle lane", "build a cycle lane on the high street"),
          ("the closing of the old pool", "keep the old pool open for two more years"),
          ("parking fees", "double parking fees in the town centre"),
          ("a summer market", "hold a weekly summer market by the harbour"),
          ("street lighting", "replace every street lamp with an LED lamp"),
          ("the library hours", "open the library on Sundays"),
          ("a new school", "build a primary school on the old factory site"),
          ("bus routes", "add a night bus to the train station")]
MONTHS = ["January", "March", "April", "June", "September", "November"]


def summarization_record(rng: random.Random) -> dict:
    town, (topic, decision), month = rng.choice(TOWNS), rng.choice(TOPICS), rng.choice(MONTHS)
    votes = rng.randint(5, 9)
    speaker = person(rng)
    document = (f"The council of {town} met on Thursday evening to discuss {topic}. More than forty residents "
                f"came to the meeting, and several of them spoke for and against the plan. {speaker}, who chairs "
                f"the council, said the town had waited long enough for a decision. After two hours of debate, "
                f"the members voted {votes} to {10 - votes} to {decision}. The change takes effect in {month}, and "
                f"the council will report on its cost at the end of the year.")
    summary = f"{town} council votes {votes} to {10 - votes} to {decision}, starting in {month}."
    other = f"The council of {town} decided to {decision} from {month}."
    return {"document": document, "summary": summary, "references": [summary, other]}


def summarization_splits(folder: Path, seed: int) -> None:
    """Validation records keep two references (ROUGE takes the best match); training records need only one."""
    records = distinct(summarization_record, N_TRAIN + N_VALIDATION, random.Random(seed),
                       key=lambda r: r["summary"])
    for record in records[:N_TRAIN]:
        del record["references"]
    write_split(folder, "train", records[:N_TRAIN])
    write_split(folder, "validation", records[N_TRAIN:])


# ---- text generation: data-to-text (a record of fields -> one sentence) -------------------------------------------
def text_generation_record(rng: random.Random) -> dict:
    name, job, town, year = person(rng), rng.choice(JOBS), rng.choice(TOWNS), rng.randint(1950, 2001)
    source = f"name: {name} | job: {job} | town: {town} | born: {year}"
    target = f"{name}, born in {year}, works as {a_or_an(job)} in {town}."
    return {"source": source, "target": target}


# ---- masked LM: plain paragraphs -------------------------------------------------------------------------------
MLM_SENTENCES = [
    "The harbour of {town} is busy in the early morning.",
    "Fishing boats return before noon and the market opens soon after.",
    "{person} has sold bread on the same corner for twenty years.",
    "In winter the wind from the sea is cold and sharp.",
    "Children walk to school along the old stone wall.",
    "The town hall clock has been five minutes slow since the storm.",
    "Every summer {org} rents boats to visitors from {town}.",
    "On clear evenings the lighthouse can be seen from the hills.",
    "A small museum tells the story of the railway and the mill.",
    "Most families grow apples and pears in their gardens.",
]


def mlm_record(rng: random.Random) -> dict:
    sentences = rng.sample(MLM_SENTENCES, rng.randint(3, 5))
    text = " ".join(s.format(town=rng.choice(TOWNS), person=person(rng), org=rng.choice(ORGS)) for s in sentences)
    return {"text": text}


# ---- causal LM: prompt/completion records (loss on the completion only) --------------------------------------------
OPPOSITES = [("hot", "cold"), ("early", "late"), ("open", "closed"), ("full", "empty"), ("light", "heavy"),
             ("fast", "slow"), ("wide", "narrow"), ("loud", "quiet"), ("rough", "smooth"), ("high", "low"),
             ("wet", "dry"), ("young", "old"), ("cheap", "expensive"), ("strong", "weak"), ("short", "tall"),
             ("thick", "thin"), ("easy", "hard"), ("clean", "dirty"), ("near", "far"), ("sweet", "sour")]


def causal_lm_record(rng: random.Random) -> dict:
    word, opposite = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        word, opposite = opposite, word
    if rng.random() < 0.5:
        return {"prompt": f"Question: what is the opposite of '{word}'? Answer:", "completion": f" {opposite}"}
    name, job, town = person(rng), rng.choice(JOBS), rng.choice(TOWNS)
    return {"prompt": f"Write one sentence about {name}, {a_or_an(job)} from {town}.\n",
            "completion": f"{name} is {a_or_an(job)} who lives and works in {town}."}


def write_all(out: Path) -> list[Path]:
    """Write every sample set under ``out``; return the files written."""
    splits(out / "ner", ner_record, seed=1)
    splits(out / "text_classification", cls_record, seed=2)
    qa_splits(out / "question_answering", seed=3)
    splits(out / "translation", translation_record, seed=4)
    summarization_splits(out / "summarization", seed=5)
    splits(out / "text_generation", text_generation_record, seed=6)
    splits(out / "masked_language_modeling", mlm_record, seed=7)
    splits(out / "causal_lm", causal_lm_record, seed=8)
    return sorted(out.glob("*/*.jsonl"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent), help="folder to write (default: here)")
    for path in write_all(Path(parser.parse_args().out)):
        print(path)
