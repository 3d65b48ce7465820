"""Translation quality: tunepipe's default recipe vs the plain run_translation.py recipe, side by side.

Multi30k en->de, the same model for both (the only pretrained seq2seq available offline: a bert2bert warm-started
from the bundled MiniLM encoder on both sides, cross-attention new), the same first N training pairs, epochs,
learning rate, batch size and seed, and the same first M validation pairs.

- plain: what `run_translation.py --predict_with_generate` does with its defaults: labels keep [CLS], random
  batches, greedy search with max_length = val_max_target_length (128), BLEU against labels decoded back from ids.
  Also shown: the same trained model generating with the library default length (max_length 20), which is what a
  hand-written Seq2SeqTrainer script gets when it sets no generation length.
- tunepipe: FineTunePipeLine with only the shared settings given; everything else is the task's defaults.

Both recipes' outputs are scored by the same code against the references as written (cased, with umlauts). MiniLM's
tokenizer is uncased and strips accents, so cased BLEU is low for both; `bleu_normalized` scores lower-cased,
accent-free text, the form this model can produce. Budget: ~13 min on 2 cores with the defaults (measured with
one torch thread while another job used the second core).

    python benchmarks/quality_translation.py [--max-train 8000 --max-eval 200 --epochs 1 --lr 3e-4 --batch-size 8]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import unicodedata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"
PLAIN_MAX_LENGTH = 128  # run_translation / run_summarization: val_max_target_length defaults to max_target_length


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def normalise(text: str) -> str:
    """Lower case without accents: what an uncased, accent-stripping tokenizer can reproduce."""
    return "".join(c for c in unicodedata.normalize("NFKD", text.lower()) if not unicodedata.combining(c))


def bert2bert(seed: int):
    """The warm-started encoder-decoder, with the start/end/pad ids run_translation requires to be set."""
    import transformers
    from transformers import AutoTokenizer, EncoderDecoderModel, set_seed

    from tunepipe.modeling.models import bundled_model_dir
    path = str(bundled_model_dir())
    set_seed(seed)
    tok = AutoTokenizer.from_pretrained(path)
    transformers.logging.set_verbosity_error()
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(path, path)
    transformers.logging.set_verbosity_warning()
    for target in (model.config, model.generation_config):
        target.decoder_start_token_id, target.eos_token_id = tok.cls_token_id, tok.sep_token_id
        target.pad_token_id = tok.pad_token_id
    return model, tok


def output_stats(ids, tok) -> dict:
    """Generated tokens per output (no start/end/pad) and the share of outputs that never produced the end token,
    i.e. were cut by the length cap."""
    ids = np.where(np.asarray(ids) < 0, tok.pad_token_id, np.asarray(ids))
    special = set(tok.all_special_ids)
    end = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    lengths = [sum(1 for t in row[1:] if int(t) not in special) for row in ids]
    cut = [end not in row[1:].tolist() for row in ids]
    return {"gen_len": float(np.mean(lengths)), "gen_len_max": int(max(lengths)), "cut_at_cap": float(np.mean(cut))}


def plain_seq2seq(train_pairs, eval_pairs, args, out, source_max_length: int):
    """The run_translation.py / run_summarization.py recipe on (source, target) pairs; returns the trained
    trainer, the tokenized eval set and the training metrics."""
    import datasets
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

    model, tok = bert2bert(args.seed)

    def preprocess_function(batch):
        model_inputs = tok(batch["source"], max_length=source_max_length, truncation=True)
        labels = tok(text_target=batch["target"], max_length=128, truncation=True)
        model_inputs["labels"] = labels["input_ids"]
        return model_inputs

    def dataset(pairs):
        ds = datasets.Dataset.from_list([{"source": s, "target": t} for s, t in pairs])
        return ds.map(preprocess_function, batched=True, remove_columns=["source", "target"])

    targs = Seq2SeqTrainingArguments(
        output_dir=out, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=32,
        learning_rate=args.lr, num_train_epochs=args.epochs, seed=args.seed, predict_with_generate=True,
        generation_max_length=PLAIN_MAX_LENGTH, save_strategy="no", report_to="none", logging_steps=50,
        disable_tqdm=True)
    trainer = Seq2SeqTrainer(model=model, args=targs, train_dataset=dataset(train_pairs),
                             data_collator=DataCollatorForSeq2Seq(tok, model=model, label_pad_token_id=-100),
                             processing_class=tok)
    cpu = time.process_time()
    train_metrics = trainer.train().metrics
    train_metrics["train_cpu_seconds"] = time.process_time() - cpu
    return trainer, tok, dataset(eval_pairs), train_metrics


def plain_generate(trainer, tok, eval_ds, max_length):
    """trainer.predict as the script's evaluate does (max_length given or, when None, the library default)."""
    t0 = time.perf_counter()
    kwargs = {"max_length": max_length} if max_length else {}
    if not max_length:
        trainer.args.generation_max_length = None  # a script that sets no generation length
    pred = trainer.predict(eval_ds, **kwargs)
    ids = np.where(pred.predictions < 0, tok.pad_token_id, pred.predictions)
    texts = [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]
    labels = np.where(pred.label_ids != -100, pred.label_ids, tok.pad_token_id)
    decoded_labels = [t.strip() for t in tok.batch_decode(labels, skip_special_tokens=True)]
    return {"texts": texts, "decoded_labels": decoded_labels, "stats": output_stats(ids, tok),
            "eval_seconds": time.perf_counter() - t0,
            "self_reported_gen_len": float(np.mean([np.count_nonzero(r != tok.pad_token_id) for r in ids]))}


def tunepipe_recipe(task, train, val, args, out, data_extra=None, overrides=(), model=None):
    """FineTunePipeLine as a user runs it; the evaluation's generated ids and texts are captured on the way."""
    from tunepipe import FineTunePipeLine
    specs = {"task": task, "output_dir": out, "model": model or {"encoder_decoder": "minilm"},
             "data": {"train": train, "validation": val, **(data_extra or {})},
             "training": {"num_train_epochs": args.epochs, "learning_rate": args.lr, "seed": args.seed,
                          "per_device_train_batch_size": args.batch_size, "save_strategy": "no",
                          "eval_strategy": "no", "logging_steps": 50, "disable_tqdm": True}}
    pipe = FineTunePipeLine(specs, overrides=list(overrides)).setup()
    seen: dict = {}
    compute, score = pipe.trainer.compute_metrics, pipe.task.score

    def capture_ids(eval_pred):
        seen["ids"] = eval_pred.predictions
        return compute(eval_pred)

    def capture_texts(predictions, references):
        seen["texts"], seen["references"] = predictions, references
        return score(predictions, references)

    pipe.trainer.compute_metrics, pipe.task.score = capture_ids, capture_texts
    cpu = time.process_time()
    train_metrics = {**pipe.train().train_metrics, "train_cpu_seconds": time.process_time() - cpu}
    t0 = time.perf_counter()
    metrics = pipe.evaluate(splits=("validation",))["validation"]
    return {"metrics": metrics, "train_metrics": train_metrics, "eval_seconds": time.perf_counter() - t0,
            "texts": seen["texts"], "references": seen["references"], "ids": seen["ids"], "pipe": pipe,
            "stats": output_stats(seen["ids"], pipe.tokenizer), "generation": pipe.task.generation_kwargs()}


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch threads " \
           f"{__import__('torch').get_num_threads()}"


def arguments(doc: str, max_train: int, max_eval: int, epochs: float, lr: float, batch_size: int,
              plain_reuse: bool = False, one_side: bool = False, extra=None):
    """The benchmarks' common command line; ``extra(parser)`` adds a script's own options."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-train", type=int, default=max_train, help="first N training records, both recipes")
    ap.add_argument("--max-eval", type=int, default=max_eval, help="first M validation records, both recipes")
    ap.add_argument("--epochs", type=float, default=epochs)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--batch-size", type=int, default=batch_size)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: all cores on an idle machine, else 1: two-thread runs next to "
                         "other jobs thrash on 2 cores: measured many times slower)")
    ap.add_argument("--output", type=Path, default=None, help="results JSON (default: benchmarks/results/...)")
    if plain_reuse:
        ap.add_argument("--plain-from", type=Path, metavar="JSON",
                        help="reuse the plain recipe's scores from an earlier result with the same data size, epochs, "
                             "learning rate, batch size and seed (the plain recipe does not change with tunepipe)")
    if one_side:
        ap.add_argument("--only", choices=["tunepipe", "plain"],
                        help="run one recipe and keep its scores for --combine (the two can run in parallel)")
        ap.add_argument("--combine", action="store_true",
                        help="no training: pair the runs saved by --only into the results JSON")
        ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a tunepipe spec for an ablation, e.g. training.warmup_steps=0")
    if extra:
        extra(ap)
    args = ap.parse_args()
    import torch
    args.threads = args.threads or (os.cpu_count() if os.getloadavg()[0] < 0.5 else 1)
    torch.set_num_threads(args.threads)
    return args


def reused_result(args, n_train: int, n_eval: int) -> dict:
    """An earlier result file whose plain side ran with these settings."""
    earlier = json.loads(Path(args.plain_from).read_text())
    for key, value in (("n_train", n_train), ("n_eval", n_eval), ("epochs", args.epochs),
                       ("learning_rate", args.lr), ("batch_size", args.batch_size), ("seed", args.seed)):
        if earlier.get(key) != value:
            raise SystemExit(f"--plain-from {args.plain_from}: {key} is {earlier.get(key)!r}, this run's is {value!r}")
    return earlier


def write_result(result: dict, name: str, output: Path | None) -> None:
    path = output or RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results written to {path}")


def main():
    from tunepipe.tasks.seq2seq_metrics import bleu_chrf
    args = arguments(__doc__, max_train=8000, max_eval=200, epochs=1, lr=3e-4, batch_size=8, plain_reuse=True)
    train = read_jsonl(DATA / "multi30k_en_de" / "train.jsonl", args.max_train)
    val = read_jsonl(DATA / "multi30k_en_de" / "validation.jsonl", args.max_eval)
    refs = [[r["translation"]["de"]] for r in val]
    load_before = os.getloadavg()
    earlier = reused_result(args, len(train), len(val)) if args.plain_from else None

    def scores(texts):
        return {**bleu_chrf(texts, refs), "bleu_normalized": bleu_chrf(
            [normalise(t) for t in texts], [[normalise(r[0])] for r in refs])["bleu"]}

    with tempfile.TemporaryDirectory() as tmp:
        ours = tunepipe_recipe("translation", train, val, args, f"{tmp}/tunepipe",
                               {"source_lang": "en", "target_lang": "de"})
        if not args.plain_from:
            pairs = [(r["translation"]["en"], r["translation"]["de"]) for r in train]
            eval_pairs = [(r["translation"]["en"], r["translation"]["de"]) for r in val]
            trainer, tok, eval_ds, plain_train = plain_seq2seq(pairs, eval_pairs, args, f"{tmp}/plain", 1024)
            plain = plain_generate(trainer, tok, eval_ds, PLAIN_MAX_LENGTH)
            capped = plain_generate(trainer, tok, eval_ds, None)

    ours_scores = bleu_chrf(ours["texts"], ours["references"])  # evaluation order may be length-grouped
    ours_scores["bleu_normalized"] = bleu_chrf([normalise(t) for t in ours["texts"]],
                                               [[normalise(r[0])] for r in ours["references"]])["bleu"]
    result = {
        "task": "translation", "data": "multi30k_en_de (en->de)", "model": "bert2bert warm-started from MiniLM",
        "n_train": len(train), "n_eval": len(val), "epochs": args.epochs, "learning_rate": args.lr,
        "batch_size": args.batch_size, "seed": args.seed,
        "tunepipe": {**ours_scores, **ours["stats"], "reported": {k: ours["metrics"][k] for k in (
            "bleu", "chrf", "gen_len")}, "generation": ours["generation"],
            "train_samples_per_second": ours["train_metrics"]["train_samples_per_second"],
            "eval_seconds": ours["eval_seconds"],
            "examples": [[h, r[0]] for h, r in zip(ours["texts"][:3], ours["references"][:3])]},
    }
    if args.plain_from:
        result["plain_run_translation"] = earlier["plain_run_translation"]
        result["plain_library_default_length"] = earlier["plain_library_default_length"]
        result["plain_from"] = str(args.plain_from)
    else:
        result["plain_run_translation"] = {**scores(plain["texts"]), **plain["stats"],
                                  "self_reported_bleu_vs_decoded_labels": bleu_chrf(
                                      plain["texts"], [[t] for t in plain["decoded_labels"]])["bleu"],
                                  "self_reported_gen_len": plain["self_reported_gen_len"],
                                  "generation": {"max_length": PLAIN_MAX_LENGTH, "num_beams": 1},
                                  "train_samples_per_second": plain_train["train_samples_per_second"],
                                  "eval_seconds": plain["eval_seconds"],
                                  "examples": [[h, r[0]] for h, r in zip(plain["texts"][:3], refs[:3])]}
        result["plain_library_default_length"] = {**scores(capped["texts"]), **capped["stats"],
                                                  "generation": {"max_length": 20, "num_beams": 1}}
    result.update({
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "machine": machine(),
        "note": "Other jobs may have shared the CPU: see load_average_before_after.",
    })
    t, p = result["tunepipe"], result["plain_run_translation"]
    result["throughput_ratio"] = t["train_samples_per_second"] / p["train_samples_per_second"]
    result["acceptance"] = {"bleu_ge_plain": t["bleu"] >= p["bleu"], "chrf_ge_plain": t["chrf"] >= p["chrf"],
                            "not_stuck_at_cap": t["cut_at_cap"] < 0.5 and t["gen_len_max"] > 20}
    for name, r in (("tunepipe", t), ("plain run_translation", p),
                    ("plain, library default length", result["plain_library_default_length"])):
        print(f"{name:<32} BLEU {r['bleu']:6.2f}  chrF {r['chrf']:6.2f}  BLEU(normalised) {r['bleu_normalized']:6.2f}"
              f"  gen_len {r['gen_len']:5.1f} (max {r['gen_len_max']}, cut at cap {100 * r['cut_at_cap']:.0f}%)")
    print(f"training throughput: tunepipe {t['train_samples_per_second']:.2f} vs plain "
          f"{p['train_samples_per_second']:.2f} samples/s -> ratio x{result['throughput_ratio']:.2f}")
    print(f"load average before/after: {result['load_average_before_after']}")
    write_result(result, "quality_translation.json", args.output)


if __name__ == "__main__":
    main()
