"""Summarization quality: tunepipe's default recipe vs the plain run_summarization.py recipe, side by side.

SciTLDR (abstract -> one-sentence TLDR), the same model for both (bert2bert warm-started from the bundled MiniLM),
the same first N training papers, epochs, learning rate, batch size and seed, the same first M validation papers,
and abstracts truncated to the same number of tokens (--max-source-length; run_summarization's default of 1024 is
past BERT's 512 positions, so a user of this model has to lower it anyway).

- plain: `run_summarization.py --predict_with_generate` defaults: labels keep [CLS], random batches, greedy search
  with max_length = val_max_target_length (128), ROUGE against the single label decoded back from ids. Also shown:
  the library default length (max_length 20), what a script that sets no generation length gets.
- tunepipe: FineTunePipeLine with only the shared settings given; everything else is the task's defaults.

Both recipes' outputs are scored by the same code (rouge-score, Porter stemming, sentences on separate lines for
ROUGE-Lsum) against all the references each validation paper has (1-4; the best one counts, as in SciTLDR's own
evaluation). Budget: ~10-15 min on 2 quiet cores with the defaults.

    python benchmarks/quality_summarization.py [--max-train 800 --max-eval 100 --epochs 1 --lr 1e-4]
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_translation import (DATA, PLAIN_MAX_LENGTH, arguments, machine, plain_generate,  # noqa: E402
                                 plain_seq2seq, read_jsonl, tunepipe_recipe, write_result)


def main():
    from tunepipe.tasks.seq2seq_metrics import rouge
    args = arguments(__doc__, max_train=800, max_eval=100, epochs=1, lr=1e-4, batch_size=8)
    source_max_length = 256
    train = read_jsonl(DATA / "scitldr" / "train.jsonl", args.max_train)
    val = read_jsonl(DATA / "scitldr" / "validation.jsonl", args.max_eval)
    refs = [r.get("references") or [r["summary"]] for r in val]
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        ours = tunepipe_recipe("summarization", train, val, args, f"{tmp}/tunepipe",
                               {"max_length": source_max_length})
        pairs = [(r["document"], r["summary"]) for r in train]
        eval_pairs = [(r["document"], r["summary"]) for r in val]
        trainer, tok, eval_ds, plain_train = plain_seq2seq(pairs, eval_pairs, args, f"{tmp}/plain",
                                                           source_max_length)
        plain = plain_generate(trainer, tok, eval_ds, PLAIN_MAX_LENGTH)
        capped = plain_generate(trainer, tok, eval_ds, None)

    result = {
        "task": "summarization", "data": "scitldr (SciTLDR-A)", "model": "bert2bert warm-started from MiniLM",
        "n_train": len(train), "n_eval": len(val), "epochs": args.epochs, "learning_rate": args.lr,
        "batch_size": args.batch_size, "seed": args.seed, "source_max_length": source_max_length,
        "tunepipe": {**rouge(ours["texts"], ours["references"]), **ours["stats"],
                     "reported": {k: ours["metrics"][k] for k in ("rouge1", "rouge2", "rougeL", "rougeLsum",
                                                                  "gen_len")},
                     "generation": ours["generation"],
                     "train_samples_per_second": ours["train_metrics"]["train_samples_per_second"],
                     "eval_seconds": ours["eval_seconds"], "examples": ours["texts"][:3]},
        "plain_run_summarization": {
            **rouge(plain["texts"], refs), **plain["stats"],
            "self_reported_vs_decoded_label": rouge(plain["texts"], [[t] for t in plain["decoded_labels"]]),
            "self_reported_gen_len": plain["self_reported_gen_len"],
            "generation": {"max_length": PLAIN_MAX_LENGTH, "num_beams": 1},
            "train_samples_per_second": plain_train["train_samples_per_second"],
            "eval_seconds": plain["eval_seconds"], "examples": plain["texts"][:3]},
        "plain_library_default_length": {**rouge(capped["texts"], refs), **capped["stats"],
                                         "generation": {"max_length": 20, "num_beams": 1}},
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "machine": machine(),
        "note": "Other jobs may have shared the CPU: see load_average_before_after.",
    }
    t, p = result["tunepipe"], result["plain_run_summarization"]
    result["throughput_ratio"] = t["train_samples_per_second"] / p["train_samples_per_second"]
    result["acceptance"] = {f"{k}_ge_plain": t[k] >= p[k] for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
    result["acceptance"]["not_stuck_at_cap"] = t["cut_at_cap"] < 0.5 and t["gen_len_max"] > 20
    for name, r in (("tunepipe", t), ("plain run_summarization", p),
                    ("plain, library default length", result["plain_library_default_length"])):
        print(f"{name:<32} ROUGE-1 {r['rouge1']:6.2f}  ROUGE-2 {r['rouge2']:6.2f}  ROUGE-L {r['rougeL']:6.2f}  "
              f"ROUGE-Lsum {r['rougeLsum']:6.2f}  gen_len {r['gen_len']:5.1f} (max {r['gen_len_max']}, "
              f"cut at cap {100 * r['cut_at_cap']:.0f}%)")
    print(f"training throughput: tunepipe {t['train_samples_per_second']:.2f} vs plain "
          f"{p['train_samples_per_second']:.2f} samples/s -> ratio x{result['throughput_ratio']:.2f}")
    print(f"load average before/after: {result['load_average_before_after']}")
    write_result(result, "quality_summarization.json", args.output)


if __name__ == "__main__":
    main()
