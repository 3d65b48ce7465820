"""Masked-LM quality: validation perplexity before and after training with tunepipe's default recipe, from the
pretrained MiniLM encoder and from scratch (a BERT built from config + a WordPiece tokenizer trained on the training
text), side by side with the plain transformers run_mlm.py recipe at the same model, data and budget.

Data: ../shared/data/gutenberg_mlm, capped identically for both recipes (the first --max-train-texts training
paragraphs for MiniLM, --max-train-texts-scratch for the smaller from-scratch model, the first --max-eval-texts
validation paragraphs), texts packed into blocks of --chunk-size tokens. The caps keep the whole run near 10-15
minutes on 2 CPU cores.

- tunepipe: FineTunePipeLine with only the shared settings given (task defaults otherwise: bf16 autocast where the
  CPU supports it, length-grouped sampler, masking collator, fixed seeded evaluation masks).
- plain: run_mlm.py -- tokenize(return_special_tokens_mask) -> group_texts (remainder dropped) ->
  DataCollatorForLanguageModeling(mlm_probability) -> Trainer with TrainingArguments defaults (fp32). From scratch,
  it gets the same config and the tokenizer tunepipe trained (saved with tunepipe's model).

Perplexity = exp(mean negative log-likelihood per masked token). "before"/"after" are measured on tunepipe's fixed
evaluation masks (the same tokens every time); both recipes' final models are also scored on those same masks
(reloaded from disk / taken in fp32), and the plain recipe's own run_mlm-style number (exp(eval_loss), fresh random
masks) is reported too. Throughput is reported per wall second and per CPU second of the training process (the
second is steadier when other jobs share the machine). Writes benchmarks/results/quality_mlm.json.

    python benchmarks/quality_mlm.py [--max-train-texts 600 --max-train-texts-scratch 1500 --max-eval-texts 150]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from itertools import chain
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gutenberg_mlm"
RESULTS = Path(__file__).resolve().parent / "results"
SCRATCH_BERT = {"model_type": "bert", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                "intermediate_size": 1024, "max_position_embeddings": 512}


def read_texts(path: Path, limit: int) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["text"] for r in rows[:limit]]


def fixed_mask_perplexity(model, dataset, collator, batch_size: int = 32) -> float:
    """Perplexity of ``model`` on tunepipe's pre-masked validation blocks (the same masked tokens for every model)."""
    import torch
    from torch.utils.data import DataLoader

    from tunepipe.tasks.masked_lm import token_nll
    model.eval()
    nll = count = 0.0
    with torch.inference_mode():
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
            labels = batch.pop("labels")
            stats = token_nll(model(**batch).logits, labels)
            nll += float(stats[:, 0].sum())
            count += float(stats[:, 1].sum())
    return math.exp(nll / count)


# ---------------------------------------------------------------------------------------------------------------
# tunepipe's default recipe
# ---------------------------------------------------------------------------------------------------------------
def tunepipe_run(label: str, model: dict | str, tokenizer: dict | None, lr: float, max_train: int, args, out: Path):
    from tunepipe import FineTunePipeLine
    specs = {"task": "masked_language_modeling", "output_dir": str(out / f"tunepipe-{label}"), "model": model,
             "data": {"train": str(DATA / "train.jsonl"), "validation": str(DATA / "validation.jsonl"),
                      "chunk_size": args.chunk_size, "max_train_samples": max_train,
                      "max_eval_samples": args.max_eval_texts},
             "training": {"num_train_epochs": args.epochs, "learning_rate": lr,
                          "per_device_train_batch_size": args.batch_size, "seed": args.seed,
                          "eval_strategy": "no", "save_strategy": "no", "logging_steps": 20, "disable_tqdm": True}}
    if tokenizer:
        specs["tokenizer"] = tokenizer
    pipe = FineTunePipeLine(specs)
    start = time.time()
    pipe.setup()
    setup_s = time.time() - start
    before = pipe.trainer.run_evaluation(pipe.datasets["validation"])
    cpu = time.process_time()
    pipe.train()
    cpu = time.process_time() - cpu
    after = pipe.evaluate()["validation"]
    train = pipe.train_result.train_metrics
    result = {"perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"],
              "reduction": 1 - after["perplexity"] / before["perplexity"],
              "masked_eval_tokens": after["predicted_tokens"], "train_blocks": len(pipe.datasets["train"]),
              "eval_blocks": len(pipe.datasets["validation"]), "setup_s": round(setup_s, 1),
              "train_runtime_s": train["train_runtime"], "train_samples_per_second": train["train_samples_per_second"],
              "train_cpu_s": round(cpu, 1), "train_samples_per_cpu_second": len(pipe.datasets["train"]) * args.epochs / cpu,
              "bf16": bool(pipe.trainer.args.bf16), "learning_rate": lr}
    print(f"[tunepipe {label}] perplexity {result['perplexity_before']:.1f} -> {result['perplexity_after']:.2f} "
          f"({100 * result['reduction']:.1f}% lower), {result['train_samples_per_second']:.2f} blocks/s", flush=True)
    return result, pipe


# ---------------------------------------------------------------------------------------------------------------
# The plain recipe: run_mlm.py (group_texts, DataCollatorForLanguageModeling, Trainer)
# ---------------------------------------------------------------------------------------------------------------
def plain_run_mlm(label: str, model_source: str | None, config: dict | None, tokenizer_dir: str, lr: float,
                  train_texts: list[str], val_texts: list[str], args, out: Path):
    import datasets
    from transformers import (AutoConfig, AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling,
                              Trainer, TrainingArguments, set_seed)
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if model_source:
        model = AutoModelForMaskedLM.from_pretrained(model_source)
    else:
        cfg = dict(config)
        model = AutoModelForMaskedLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), vocab_size=len(tokenizer),
                                                                      **cfg))
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    block = args.chunk_size

    def tokenize_function(examples):
        return tokenizer(examples["text"], return_special_tokens_mask=True)

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // block) * block
        return {k: [t[i:i + block] for i in range(0, total_length, block)] for k, t in concatenated.items()}

    def prepare(texts):
        raw = datasets.Dataset.from_dict({"text": texts})
        tokenized = raw.map(tokenize_function, batched=True, remove_columns=["text"])
        return tokenized.map(group_texts, batched=True)

    train_ds, val_ds = prepare(train_texts), prepare(val_texts)
    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=0.15)
    targs = TrainingArguments(output_dir=str(out / f"plain-{label}"), per_device_train_batch_size=args.batch_size,
                              per_device_eval_batch_size=32, learning_rate=lr, num_train_epochs=args.epochs,
                              seed=args.seed, report_to="none", save_strategy="no", eval_strategy="no",
                              logging_steps=20, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=val_ds,
                      processing_class=tokenizer, data_collator=collator)
    cpu = time.process_time()
    train = trainer.train().metrics
    cpu = time.process_time() - cpu
    own_eval = trainer.evaluate()
    result = {"own_eval_perplexity": math.exp(own_eval["eval_loss"]), "train_blocks": len(train_ds),
              "train_runtime_s": train["train_runtime"], "train_samples_per_second": train["train_samples_per_second"],
              "train_cpu_s": round(cpu, 1), "train_samples_per_cpu_second": len(train_ds) * args.epochs / cpu,
              "bf16": False, "learning_rate": lr}
    print(f"[plain {label}] run_mlm eval perplexity {result['own_eval_perplexity']:.2f}, "
          f"{result['train_samples_per_second']:.2f} blocks/s", flush=True)
    return result, trainer.model


def compare(label: str, tp: dict, tp_pipe, plain: dict, plain_model) -> dict:
    """Score both final models in fp32 on tunepipe's fixed evaluation masks."""
    from transformers import AutoModelForMaskedLM
    dataset = tp_pipe.datasets["validation"]
    collator = tp_pipe.task.collator(tp_pipe.tokenizer)
    saved = AutoModelForMaskedLM.from_pretrained(tp_pipe.output_dir / "model")
    tp["perplexity_after_fp32_reloaded"] = fixed_mask_perplexity(saved, dataset, collator)
    plain["perplexity_after_fixed_masks"] = fixed_mask_perplexity(plain_model.float(), dataset, collator)
    ratio = tp["train_samples_per_second"] / plain["train_samples_per_second"]
    cpu_ratio = tp["train_samples_per_cpu_second"] / plain["train_samples_per_cpu_second"]
    print(f"[{label}] fixed-mask perplexity after training: tunepipe {tp['perplexity_after_fp32_reloaded']:.2f} vs "
          f"plain {plain['perplexity_after_fixed_masks']:.2f}; throughput ratio tunepipe/plain {ratio:.2f}x wall, "
          f"{cpu_ratio:.2f}x per CPU second", flush=True)
    return {"tunepipe": tp, "plain_run_mlm": plain, "throughput_ratio_tunepipe_over_plain": ratio,
            "throughput_ratio_cpu_time": cpu_ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-train-texts", type=int, default=600, help="pretrained MiniLM runs")
    parser.add_argument("--max-train-texts-scratch", type=int, default=1500, help="from-scratch runs (a 4x smaller "
                                                                                  "model)")
    parser.add_argument("--max-eval-texts", type=int, default=150)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr-pretrained", type=float, default=5e-5, help="the task default")
    parser.add_argument("--lr-scratch", type=float, default=5e-4)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", default=str(RESULTS / "quality_mlm.json"))
    args = parser.parse_args()

    import torch
    loadavg_before = os.getloadavg()
    start = time.time()
    train_texts = read_texts(DATA / "train.jsonl", args.max_train_texts)
    scratch_texts = read_texts(DATA / "train.jsonl", args.max_train_texts_scratch)
    val_texts = read_texts(DATA / "validation.jsonl", args.max_eval_texts)
    results: dict = {
        "benchmark": "masked LM perplexity before/after training: tunepipe default recipe vs plain run_mlm recipe",
        "data": {"dataset": "gutenberg_mlm", "train_texts_pretrained": len(train_texts),
                 "train_texts_scratch": len(scratch_texts), "eval_texts": len(val_texts),
                 "train_chars_pretrained": sum(map(len, train_texts)),
                 "train_chars_scratch": sum(map(len, scratch_texts)), "eval_chars": sum(map(len, val_texts)),
                 "cap": "first N paragraphs of each split, identical for both recipes"},
        "settings": {"chunk_size": args.chunk_size, "epochs": args.epochs, "batch_size": args.batch_size,
                     "mlm_probability": 0.15, "seed": args.seed},
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads(),
                    "cpu_count": os.cpu_count(), "loadavg_before": loadavg_before},
    }
    with tempfile.TemporaryDirectory(prefix="quality-mlm-") as tmp:
        out = Path(tmp)
        from tunepipe.modeling.models import bundled_model_dir
        minilm = str(bundled_model_dir())
        tp, tp_pipe = tunepipe_run("pretrained", "minilm", None, args.lr_pretrained, len(train_texts), args, out)
        plain, plain_model = plain_run_mlm("pretrained", minilm, None, minilm, args.lr_pretrained, train_texts,
                                           val_texts, args, out)
        results["pretrained_minilm"] = compare("pretrained", tp, tp_pipe, plain, plain_model)
        del tp_pipe, plain_model

        tokenizer = {"train": {"type": "wordpiece", "vocab_size": args.vocab_size}}
        tp, tp_pipe = tunepipe_run("scratch", {"from_config": SCRATCH_BERT}, tokenizer, args.lr_scratch,
                                   len(scratch_texts), args, out)
        plain, plain_model = plain_run_mlm("scratch", None, SCRATCH_BERT, str(tp_pipe.output_dir / "model"),
                                           args.lr_scratch, scratch_texts, val_texts, args, out)
        results["from_scratch"] = compare("scratch", tp, tp_pipe, plain, plain_model)
        results["from_scratch"]["model"] = {**SCRATCH_BERT, "vocab_size": len(tp_pipe.tokenizer),
                                            "tokenizer": "WordPiece trained on the capped training text"}
    results["acceptance"] = {
        f"{key}_perplexity_at_least_30pct_lower": results[key]["tunepipe"]["reduction"] >= 0.30
        for key in ("pretrained_minilm", "from_scratch")}
    results["machine"]["loadavg_after"] = os.getloadavg()
    results["total_seconds"] = round(time.time() - start, 1)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["acceptance"]), f"total {results['total_seconds']}s -> {args.output}")


if __name__ == "__main__":
    main()
