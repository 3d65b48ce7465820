"""Summarization quality: tunepipe's default recipe vs the plain run_summarization.py recipe, side by side.

SciTLDR (abstract -> one-sentence TLDR), the same model for both (bert2bert warm-started from the bundled MiniLM),
the same first N training papers, epochs, learning rate, batch size and seed, the same first M validation papers,
and abstracts truncated to the same number of tokens (256; run_summarization's default of 1024 is past BERT's 512
positions, so a user of this model has to lower it anyway).

- plain: `run_summarization.py --predict_with_generate` defaults: labels keep [CLS], random batches, greedy search
  with max_length = val_max_target_length (128), ROUGE against the single label decoded back from ids. Also shown:
  the library default length (max_length 20), what a script that sets no generation length gets.
- tunepipe: FineTunePipeLine with only the shared settings given; everything else is the task's defaults.

Both recipes' outputs are scored by the same code (rouge-score, Porter stemming, sentences on separate lines for
ROUGE-Lsum) against all the references each validation paper has (1-4; the best one counts, as in SciTLDR's own
evaluation). `distinct_outputs` is the share of validation papers whose summary no other paper got: a model that
writes one sentence for every input scores ROUGE without reading it, so a comparison only counts when both
recipes' summaries depend on their input.

Each recipe can run in its own process (one torch thread each, in parallel on two cores); --combine pairs the runs
with the same settings into benchmarks/results/quality_summarization.json:

    python benchmarks/quality_summarization.py --only tunepipe --max-train 1990 --epochs 3 --threads 1
    python benchmarks/quality_summarization.py --only plain --max-train 1990 --epochs 3 --threads 1
    python benchmarks/quality_summarization.py --combine
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_translation import (DATA, PLAIN_MAX_LENGTH, RESULTS, arguments, machine,  # noqa: E402
                                 plain_generate, plain_seq2seq, read_jsonl, tunepipe_recipe, write_result)

RUNS = RESULTS / "quality_summarization_runs"
SOURCE_MAX_LENGTH = 256
ROUGE = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def distinct_outputs(texts: list[str]) -> float:
    """Share of outputs that no other input produced (1.0: every summary is its own; ~0: one sentence for all)."""
    counts: dict[str, int] = {}
    for t in texts:
        counts[t] = counts.get(t, 0) + 1
    return sum(1 for t in texts if counts[t] == 1) / len(texts)


def tunepipe_side(train, val, args, tmp) -> dict:
    from tunepipe.tasks.seq2seq_metrics import rouge
    ours = tunepipe_recipe("summarization", train, val, args, f"{tmp}/tunepipe", {"max_length": SOURCE_MAX_LENGTH},
                           overrides=args.overrides)
    return {**rouge(ours["texts"], ours["references"]), **ours["stats"],
            "distinct_outputs": distinct_outputs(ours["texts"]),
            "reported": {k: ours["metrics"][k] for k in (*ROUGE, "gen_len")}, "generation": ours["generation"],
            "train_samples_per_second": ours["train_metrics"]["train_samples_per_second"],
            "train_cpu_seconds": ours["train_metrics"]["train_cpu_seconds"],
            "eval_seconds": ours["eval_seconds"], "examples": ours["texts"][:5]}


def plain_side(train, val, args, tmp) -> dict:
    from tunepipe.tasks.seq2seq_metrics import rouge
    refs = [r.get("references") or [r["summary"]] for r in val]
    pairs = [(r["document"], r["summary"]) for r in train]
    eval_pairs = [(r["document"], r["summary"]) for r in val]
    trainer, tok, eval_ds, plain_train = plain_seq2seq(pairs, eval_pairs, args, f"{tmp}/plain", SOURCE_MAX_LENGTH)
    plain = plain_generate(trainer, tok, eval_ds, PLAIN_MAX_LENGTH)
    capped = plain_generate(trainer, tok, eval_ds, None)
    return {**rouge(plain["texts"], refs), **plain["stats"], "distinct_outputs": distinct_outputs(plain["texts"]),
            "self_reported_vs_decoded_label": rouge(plain["texts"], [[t] for t in plain["decoded_labels"]]),
            "self_reported_gen_len": plain["self_reported_gen_len"],
            "generation": {"max_length": PLAIN_MAX_LENGTH, "num_beams": 1},
            "train_samples_per_second": plain_train["train_samples_per_second"],
            "train_cpu_seconds": plain_train["train_cpu_seconds"],
            "eval_seconds": plain["eval_seconds"], "examples": plain["texts"][:5],
            "library_default_length": {**rouge(capped["texts"], refs), **capped["stats"],
                                       "distinct_outputs": distinct_outputs(capped["texts"]),
                                       "generation": {"max_length": 20, "num_beams": 1}}}


def settings_of(args, n_train: int, n_eval: int) -> dict:
    return {"n_train": n_train, "n_eval": n_eval, "epochs": args.epochs, "learning_rate": args.lr,
            "batch_size": args.batch_size, "seed": args.seed, "source_max_length": SOURCE_MAX_LENGTH}


def run_name(side: str, s: dict, overrides=()) -> str:
    """One file per recipe and settings; tunepipe runs with --set overrides (ablations) get their own."""
    return (f"{side}_n{s['n_train']}_v{s['n_eval']}_e{s['epochs']:g}_lr{s['learning_rate']:g}"
            f"_b{s['batch_size']}_s{s['seed']}" + "".join(f"_{o}" for o in overrides) + ".json")


def compare(settings: dict, ours: dict, plain: dict, overrides: list[str],
            plain_key: str = "plain_run_summarization") -> dict:
    row = {**settings, "tunepipe_overrides": overrides, "tunepipe": ours, plain_key: plain,
           "throughput_ratio_cpu_time": plain["train_cpu_seconds"] / ours["train_cpu_seconds"]
           if ours.get("train_cpu_seconds") and plain.get("train_cpu_seconds") else None,
           "throughput_ratio": ours["train_samples_per_second"] / plain["train_samples_per_second"]}
    row["acceptance"] = {f"{k}_ge_plain": ours[k] >= plain[k] for k in ROUGE}
    row["acceptance"]["not_stuck_at_cap"] = ours["cut_at_cap"] < 0.5 and ours["gen_len_max"] > 20
    row["both_depend_on_input"] = min(ours["distinct_outputs"], plain["distinct_outputs"]) >= 0.5
    return row


def paired_runs(runs: Path):
    """(tunepipe run, plain run) records with equal settings."""
    for ours_file in sorted(runs.glob("tunepipe_*.json")):
        ours = json.loads(ours_file.read_text())
        plain_file = runs / run_name("plain", ours["settings"])
        if plain_file.is_file():
            yield ours, json.loads(plain_file.read_text())


def combine() -> None:
    """Pair tunepipe and plain runs with equal settings; every configuration measured is kept."""
    rows = [compare(ours["settings"], ours["tunepipe"], plain["plain_run_summarization"],
                    ours.get("tunepipe_overrides", [])) for ours, plain in paired_runs(RUNS)]
    if not rows:
        raise SystemExit(f"no configuration has both recipes in {RUNS}")
    rows.sort(key=lambda r: (r["n_train"] * r["epochs"], r["learning_rate"], r["tunepipe_overrides"]))
    for r in rows:
        print(f"{r['n_train']} papers x {r['epochs']:g} epochs, lr {r['learning_rate']:g}, {r['n_eval']} evaluated"
              + (f", tunepipe with {' '.join(r['tunepipe_overrides'])}" if r["tunepipe_overrides"] else "") + ":")
        for name, s in (("tunepipe", r["tunepipe"]), ("plain run_summarization", r["plain_run_summarization"]),
                        ("plain, library default length", r["plain_run_summarization"]["library_default_length"])):
            print(f"  {name:<30} ROUGE-1/2/L/Lsum {s['rouge1']:5.2f} {s['rouge2']:5.2f} {s['rougeL']:5.2f} "
                  f"{s['rougeLsum']:5.2f}  gen_len {s['gen_len']:5.1f} (max {s['gen_len_max']}, cut at cap "
                  f"{100 * s['cut_at_cap']:.0f}%)  distinct outputs {100 * s['distinct_outputs']:.0f}%")
        ratio = r["throughput_ratio_cpu_time"]
        print(f"  training throughput x{r['throughput_ratio']:.2f} (samples/s)"
              + (f", x{ratio:.2f} (CPU seconds)" if ratio else "")
              + ("" if r["both_depend_on_input"] else "   [a model ignores its input: not evidence of quality]"))
    write_result({"task": "summarization", "data": "scitldr (SciTLDR-A)",
                  "model": "bert2bert warm-started from MiniLM", "machine": machine(),
                  "note": "each recipe ran in its own process with one torch thread, possibly next to the other "
                          "(see each run's load averages); CPU seconds are the steadier throughput figure",
                  "configurations": rows}, "quality_summarization.json", None)


def main():
    args = arguments(__doc__, max_train=800, max_eval=100, epochs=1, lr=1e-4, batch_size=8, one_side=True)
    if args.combine:
        return combine()
    train = read_jsonl(DATA / "scitldr" / "train.jsonl", args.max_train)
    val = read_jsonl(DATA / "scitldr" / "validation.jsonl", args.max_eval)
    settings = settings_of(args, len(train), len(val))
    run_recipes(args, settings, RUNS, {"tunepipe": lambda tmp: tunepipe_side(train, val, args, tmp),
                                       "plain": lambda tmp: plain_side(train, val, args, tmp)},
                {"tunepipe": "tunepipe", "plain": "plain_run_summarization"})
    if not args.only:
        combine()


def run_recipes(args, settings: dict, runs: Path, sides: dict, keys: dict) -> None:
    """Run the recipes --only names (else all), each in a temporary folder; keep each one's scores in its run file."""
    runs.mkdir(parents=True, exist_ok=True)
    for side in ([args.only] if args.only else list(sides)):
        load_before = os.getloadavg()
        with tempfile.TemporaryDirectory() as tmp:
            scores = sides[side](tmp)
        overrides = args.overrides if side == "tunepipe" else []
        record = {"settings": settings, "tunepipe_overrides": overrides, keys[side]: scores, "machine": machine(),
                  "load_average_before_after": [list(load_before), list(os.getloadavg())]}
        (runs / run_name(side, settings, overrides)).write_text(json.dumps(record, indent=2) + "\n")
        print(f"{side}: ROUGE-1 {scores['rouge1']:.2f}, distinct outputs {100 * scores['distinct_outputs']:.0f}%, "
              f"examples {scores['examples'][:2]}")


if __name__ == "__main__":
    main()
