"""`tunepipe check SPECS` / `tunepipe train SPECS --dry-run`: every check a run makes before its first training
step, and what the run would be (rows, labels, token lengths, parameters, steps, memory), with nothing written.

Not ``FineTunePipeLine.setup()``, which creates and locks output_dir, may write a PEFT base and loads weights: the
same checks run in the same order on the same objects, but the model is a meta-device skeleton (weights are not
read: a damaged weights file is found only by ``train``) and output_dir gets the read-only ``check_output_dir``.
"""
from __future__ import annotations

import copy
import math
import os
import random
import sys
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .data import DatasetModules, with_all_keys
from .errors import ConfigError, TaskTypeError, TunepipeIOError
from .modeling.limits import check_lengths
from .modeling.models import (ModelModules, TokenizerModules, _load_error, adopt_model_config, check_model_dir,
                              encoder_decoder_sides, resolve_model_path)
from .modeling.peft_support import (build_peft_config, check_peft_specs, head_modules, model_skeleton, peft_enabled,
                                    peft_method, trainable_parameters)
from .modeling.quantization import QuantizationManager, training_device
from .modeling.type_utils import GB, MIXED_PRECISION_ACTIVATION_BYTES, TypeUtils, _alternatives, resolve_precision
from .ownership import LOCK
from .trainers import select_trainer
from .trainers.settings import training_arguments, training_schedule, training_settings

DEFAULT_SAMPLE = 2000  # records tokenized per split for the length statistics; larger splits are sampled
LIFTED = 1_000_000  # a length no record reaches: the second tokenization measures lengths before truncation
PERCENTILES = (50, 90, 95, 99)


@dataclass
class CheckReport:
    """What `tunepipe check` found; ``to_dict()`` is the ``--json`` output."""
    task: str
    backend: str
    output_dir: str
    output_dir_state: str
    model: str
    tokenizer: str
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    steps: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    ok: bool = True
    written: str = "nothing"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_run(source, overrides: list[str] | None = None, sample: int | None = DEFAULT_SAMPLE) -> CheckReport:
    """Run the pre-training checks of ``FineTunePipeLine._setup`` in its order; raise its typed errors (the same
    messages as ``train``) or return the report. ``sample``: records tokenized per split (0/None: all)."""
    from .pipeline import FineTunePipeLine
    pipe = FineTunePipeLine(source, overrides=overrides)  # specs first: a typo fails before torch is imported
    specs, task = pipe.specs, pipe.task
    pipe._check_supported()
    pipe.data = DatasetModules(specs, task)
    pipe.data.load()
    trainer_cls = select_trainer(task, specs.backend)
    pipe.check_output_dir(None)
    m = specs.model
    model_name = (f"encoder_decoder {m.encoder_decoder}" if m.encoder_decoder else
                  f"from_config ({m.from_config.get('model_type')})" if m.from_config else str(m.name_or_path))
    report = CheckReport(task=task.name, backend=specs.backend, output_dir=str(pipe.output_dir),
                         output_dir_state=_output_dir_state(pipe), model=model_name, tokenizer="")
    tokenizer = _tokenizer(specs, task, report)
    model = _skeleton(specs, task, tokenizer)
    trainable, total = trainable_parameters(model)
    report.parameters = {"total": total, "trainable": trainable, "trainable_percent": round(100 * trainable / max(
        total, 1), 4), "peft": peft_method(specs) if peft_enabled(specs) else None, "counted_on": "meta device"}
    report.memory = _memory(model, specs)
    datasets, examples = _tokenize(pipe, tokenizer, sample or 0, report)
    pipe.data._check_accumulation(examples)  # on the whole train split (its estimated size when sampled)
    pipe.datasets = datasets
    pipe._check_metric_for_best_model()
    report.steps = _steps(specs, trainer_cls, pipe.output_dir / "checkpoints", "validation" in datasets, examples,
                          report.splits["train"]["examples_estimated"])
    return report


# ---- pieces -------------------------------------------------------------------------------------------------
def _output_dir_state(pipe) -> str:
    """What the run would do to output_dir (read-only: writability by permission bits, the lock by its pid file)."""
    out = Path(pipe.output_dir)
    existing = next(p for p in [out, *out.parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):  # what ensure_writable would meet when creating it
        raise TunepipeIOError(f"Cannot write to output_dir {out}: Permission denied", field="output_dir",
                              suggestions=["choose another output_dir", "check the directory's permissions"])
    if not out.exists():
        return "new directory (created when training starts)"
    if not any(out.iterdir()):
        return "empty directory"
    resume = pipe.specs.training.resume
    state = "holds a tunepipe run " + ("of other specs: replaced when training starts (overwrite_output_dir)"
                                       if pipe._replace_previous else f"(training.resume: {resume})" if resume
                                       else "of the same specs: trained again (its checkpoints and logs "
                                       "replaced when training starts)")
    pid = (out / LOCK).read_text().strip() if (out / LOCK).is_file() else ""
    try:  # signal 0: is the lock's holder alive (its flock is not touched: that would be taking the lock)
        os.kill(int(pid), 0)
        state += f"; process {pid} seems to be writing it now (train would be refused while it runs)"
    except (OSError, ValueError):
        pass
    return state


def _tokenizer(specs, task, report: CheckReport):
    """The run's tokenizer; a tokenizer the specs train is trained in a temporary directory, removed here."""
    modules = TokenizerModules(specs)
    try:
        tokenizer = modules.load(task)
    finally:
        if getattr(modules, "_workdir", None) is not None:
            modules._workdir.cleanup()
    report.tokenizer = (f"trained on the training text in a temporary directory, removed again "
                        f"({specs.tokenizer.train.get('type', 'wordpiece')})" if specs.tokenizer.train
                        else modules.source()) + f", {len(tokenizer)} tokens"
    return tokenizer


def _skeleton(specs, task, tokenizer):
    """The model the run would build, on the meta device, through the checks ModelModules.load makes (vocabulary,
    position limits, the task's model settings, peft applied as finish_model applies it)."""
    import torch
    import transformers

    modules, spec = ModelModules(specs), specs.model
    if spec.encoder_decoder:
        model = _encoder_decoder_skeleton(modules, task, tokenizer)
    elif spec.from_config:
        with torch.device("meta"):  # the very code of a real run, allocating nothing
            model = modules._from_config(task, tokenizer)
    elif not spec.name_or_path:
        modules._load(task, tokenizer)  # raises "No model given" before anything loads
    else:
        name = resolve_model_path(spec.name_or_path)
        check_model_dir(name)
        adopt_model_config(task, name, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        try:
            config = transformers.AutoConfig.from_pretrained(name, revision=spec.revision,
                                                             trust_remote_code=spec.trust_remote_code,
                                                             **task.model_kwargs())
            model = model_skeleton(getattr(transformers, task.auto_model_class), config)
        except Exception as e:  # noqa: BLE001 - translated as ModelModules._load does
            if task.auto_model_class == "AutoModelForSeq2SeqLM" and "Unrecognized configuration class" in str(e):
                raise TaskTypeError(f"'{spec.name_or_path}' is not a sequence-to-sequence model",
                                    field="model.name_or_path", suggestions=[
                                        f"warm-start one from it: model: {{encoder_decoder: {spec.name_or_path}}}",
                                        "or use a T5/BART-style checkpoint"]) from None
            raise _load_error(e, name, "model") from None
    modules._check_vocabulary(model, tokenizer)
    check_lengths(task, model.config)
    if getattr(task, "configure_model", None) is not None:
        task.configure_model(model, tokenizer)
    if not peft_enabled(specs):
        return model
    from peft import get_peft_model  # finish_model's peft step (its quantization steps change dtypes and flags)
    check_peft_specs(specs, task, skeleton=model)
    config = build_peft_config(specs, task, model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft reads a deprecated transformers property
            return get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError(f"peft could not apply {peft_method(specs)}: {str(e).splitlines()[0]}", field="peft",
                          suggestions=["set peft.target_modules to this model's layer names",
                                       "or pass a complete peft.config"]) from None


def _encoder_decoder_skeleton(modules, task, tokenizer):
    import torch
    import transformers

    if not task.generative:
        modules._encoder_decoder(task, tokenizer)  # raises its TaskTypeError before anything loads
    sides = [resolve_model_path(p) for p in encoder_decoder_sides(modules.specs.model.encoder_decoder)]
    try:
        config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(
            *(transformers.AutoConfig.from_pretrained(p) for p in sides))
        with torch.device("meta"):
            model = transformers.EncoderDecoderModel(config=config)
    except Exception as e:  # noqa: BLE001
        raise _load_error(e, " + ".join(sides), "encoder-decoder") from None
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    for target in (model.config, model.generation_config):
        target.decoder_start_token_id, target.eos_token_id, target.pad_token_id = start, end, tokenizer.pad_token_id
    return model


def _memory(model, specs) -> dict[str, Any]:
    """TypeUtils' estimate of one training step (what the run's check_memory warns with), on the device the run
    would use (the skeleton's own device is 'meta')."""
    import torch

    t, qm = specs.training, QuantizationManager(specs)
    bf16, fp16 = resolve_precision(t)
    seq = specs.data.max_length or min(getattr(model.config, "max_position_embeddings", 512) or 512, 512)
    kw = {"gradient_checkpointing": t.gradient_checkpointing,
          "activation_bytes": MIXED_PRECISION_ACTIVATION_BYTES if bf16 or fp16 else 4}
    weights = None
    if qm.enabled:  # linear layers outside the head at 4 or 8 bits a weight; the rest as they are
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        skip, out_emb = set(qm.skip_modules) | set(head_modules(base)), base.get_output_embeddings()
        quantized = {id(mod.weight) for n, mod in base.named_modules() if isinstance(mod, torch.nn.Linear)
                     and mod is not out_emb and "lora_" not in n and not any(f".{k}." in f".{n}." for k in skip)}
        weights = int(sum(w.numel() * (qm.bits / 8 if id(w) in quantized else w.element_size())
                          for w in model.parameters()))
    est = TypeUtils.estimate_memory(model, t.per_device_train_batch_size, seq, device=training_device(specs),
                                    weight_bytes=weights, **kw)
    if not est.fits():
        est.suggestions = _alternatives(model, specs, seq, est, kw)
    out = {k: round(v / GB, 3) if isinstance(v, int) and k != "suggestions" else v for k, v in est.to_dict().items()}
    return {**out, "unit": "GB", "fits": est.fits(), "batch": t.per_device_train_batch_size, "seq_len": seq,
            "precision": "bf16" if bf16 else "fp16" if fp16 else "fp32"}


def _tokenize(pipe, tokenizer, sample: int, report: CheckReport) -> tuple[dict[str, Any], int]:
    """DatasetModules.prepare on every record, or on ``sample`` records of a larger split; statistics per split.
    Returns the datasets and the train split's example count (scaled up from the sample when sampled)."""
    import datasets as hf_datasets
    data, rng = pipe.data, random.Random(pipe.specs.training.seed)
    view = copy.copy(data)
    view.records = {split: records.take(sorted(rng.sample(range(len(records)), sample)))
                    if sample and len(records) > sample else records for split, records in data.records.items()}
    view._check_accumulation = lambda examples: None  # checked by the caller on the whole split
    bars_on = hf_datasets.is_progress_bar_enabled()
    hf_datasets.disable_progress_bars()
    try:
        prepared = view.prepare(tokenizer)
    finally:
        if bars_on:
            hf_datasets.enable_progress_bars()
    for split, ds in prepared.items():
        rows, used = len(data.records[split].rows), len(view.records[split].rows)
        examples = len(ds) if used == rows else round(len(ds) * rows / used)
        stats = {"records": rows, "tokenized": used, "sampled": used < rows, "examples": examples,
                 "examples_estimated": used < rows and len(ds) != used,
                 "labels": _label_counts(pipe.task, data.records[split].rows),
                 "lengths": _lengths(pipe.task, tokenizer, view.records[split].rows, ds, split)}
        report.notes += [f"{split}: {rows} records make {'~' * stats['examples_estimated']}{examples} examples (long "
                         "records cut into windows, or texts packed into blocks)"] * (examples != rows) + [
            f"{split}: token statistics and the over-length check cover a sample of {used} of {rows} records "
            "(--sample)"] * (used < rows)
        report.splits[split] = stats
    return prepared, report.splits.get("train", {}).get("examples", 0)


def _label_counts(task, rows: list[dict]) -> dict[str, int] | None:
    if not getattr(task, "uses_labels", False):
        return None
    values = [row.get(task.column("label")) for row in rows]
    names = list(getattr(task, "labels", None) or [])

    def shown(x) -> str:  # label ids in the data, named by data.labels, are shown by name
        return names[x] if isinstance(x, int) and not isinstance(x, bool) and 0 <= x < len(names) else str(x)
    counts = Counter(shown(x) for v in values for x in (v if isinstance(v, list) else [v]) if x is not None)
    return dict(counts.most_common()) or None


def _lengths(task, tokenizer, rows: list[dict], ds, split: str) -> list[dict[str, Any]]:
    """Token-length percentiles per length setting. Measured before truncation (the task's own preprocessing
    run again with the setting lifted to LIFTED) where records map one to one to examples; else the lengths of
    the prepared examples (windows, blocks)."""
    out = []
    for setting in task.length_settings():
        column = {"input": "input_ids", "output": "labels"}[setting.side]
        if setting.field.startswith("generation.") or column not in ds.column_names or (
                setting.side == "output" and getattr(task, "decoder_only", True)):
            continue
        limit = setting.value
        if limit is None and isinstance(tokenizer.model_max_length, int) and tokenizer.model_max_length < LIFTED:
            limit = tokenizer.model_max_length
        raw = _untruncated(task, tokenizer, rows, split, setting.field, column) \
            if setting.field in ("data.max_length", "data.max_target_length") else None
        values = raw if raw is not None else [len(x) for x in ds[column]]
        values = sorted(v for v in values if v)
        if values:
            out.append({"field": setting.field, "limit": limit, "column": column,
                        "measured": "before truncation" if raw is not None else "after preprocessing",
                        "count": len(values), "mean": round(sum(values) / len(values), 1), "max": values[-1],
                        **{f"p{p}": values[min(len(values) - 1, math.ceil(p / 100 * len(values)) - 1)]
                           for p in PERCENTILES},  # nearest rank
                        "over_limit": sum(v > limit for v in values) if raw is not None and limit else None})
    return out


def _untruncated(task, tokenizer, rows, split, field_name, column) -> list[int] | None:
    """The task's preprocessing with ``field_name`` lifted; None when it does not give one example per record."""
    lifted = copy.copy(task)  # keeps what the task adopted from the model config (decoder-only seq2seq)
    data = task.specs.data.model_copy(update={field_name.split(".", 1)[1]: LIFTED})
    lifted.specs = task.specs.model_copy(update={"data": data})
    fn = lifted.preprocess if split == "train" else lifted.preprocess_eval
    saved, tokenizer.model_max_length = tokenizer.model_max_length, LIFTED + 1
    lengths: list[int] = []
    try:
        rows = with_all_keys(list(rows))
        for start in range(0, len(rows), 256):
            chunk = rows[start:start + 256]
            out = fn({k: [r.get(k) for r in chunk] for k in chunk[0]}, tokenizer)
            if column not in out or len(out[column]) != len(chunk):
                return None
            lengths += [len(x) for x in out[column]]
    except Exception:  # noqa: BLE001 - statistics only: the real preprocessing above already passed
        return None
    finally:
        tokenizer.model_max_length = saved
    return lengths


def _steps(specs, trainer_cls, checkpoints: Path, has_eval: bool, examples: int, estimated: bool) -> dict[str, Any]:
    """The trainer's arguments built as it builds them (TrainingArguments validates passed-through settings on the
    hf backend), then optimizer steps as the trainers count them: batches per epoch on one rank (DistributedSampler
    pads to ceil(examples / world)), then trainers.settings.training_schedule (transformers' rule)."""
    if trainer_cls.__module__.endswith(".hf"):  # extra_arguments: a plain function of the specs on hf trainers
        args = training_arguments(specs, checkpoints, has_eval=has_eval, cls=getattr(trainer_cls, "args_class", None),
                                  **trainer_cls.extra_arguments(None, specs))
    else:
        args = training_settings(specs, checkpoints, has_eval=has_eval)
    t, devices = specs.training, specs.distributed.devices
    world = max(int(getattr(args, "world_size", 1) or 1), int(os.environ.get("WORLD_SIZE", "1") or 1))
    if specs.backend.startswith("lightning") and isinstance(devices, int):  # Lightning launches its own processes
        world = devices * specs.distributed.num_nodes
    per_rank = math.ceil(examples / world)
    batch = t.per_device_train_batch_size
    drop_last = bool(getattr(args, "dataloader_drop_last", False))
    batches = max(per_rank // batch if drop_last else math.ceil(per_rank / batch), 1)
    schedule = training_schedule(batches, t)
    return {"examples": examples, "estimated": estimated, "per_device_batch": batch,
            "gradient_accumulation_steps": t.gradient_accumulation_steps, "world_size": world,
            "effective_batch": batch * t.gradient_accumulation_steps * world, "batches_per_epoch": batches,
            "steps_per_epoch": schedule.updates_per_epoch, "epochs": schedule.num_epochs,
            "total": schedule.max_steps, "max_steps_set": t.max_steps > 0}


# ---- printing -------------------------------------------------------------------------------------------------
def render(report: CheckReport, file=None) -> None:
    """The report for people: rich tables where rich is installed, plain columns otherwise."""
    file, (p, s, m) = file or sys.stdout, (report.parameters, report.steps, report.memory)
    head = {"task": f"{report.task} ({report.backend} backend)", "model": report.model, "tokenizer": report.tokenizer,
            "output_dir": f"{report.output_dir}: {report.output_dir_state}",
            "parameters": f"{p['total']:,} total, {p['trainable']:,} trainable ({p['trainable_percent']:.2f}%)"
                          + f", peft {p['peft']}" * bool(p["peft"]),
            "steps": f"{s['total']:,} = {s['epochs']} epoch(s) x {s['steps_per_epoch']:,} ({'~' * s['estimated']}"
                     f"{s['examples']:,} examples / batch {s['per_device_batch']} x accumulation "
                     f"{s['gradient_accumulation_steps']} x {s['world_size']} process(es))"
                     + ", training.max_steps" * s["max_steps_set"],
            "memory": f"~{m['total']:.2f} GB on {m['device']}" + f" of {m['available'] or 0:.1f} GB available"
                      * bool(m.get("available")) + f" (weights {m['weights']:.2f}, gradients {m['gradients']:.2f}, "
                      f"optimizer {m['optimizer']:.2f}, activations {m['activations']:.2f} at batch {m['batch']} x "
                      f"{m['seq_len']} tokens {m['precision']}, runtime {m['overhead']:.2f})"
                      + ": MAY NOT FIT" * (not m["fits"])}
    cols = ["split", "records", "examples", "tokenized", "tokens of", "limit", *(f"p{q}" for q in PERCENTILES), "max",
            "over limit"]
    rows = []
    for split, st in report.splits.items():
        lead = [split, f"{st['records']:,}", f"{'~' * st['examples_estimated']}{st['examples']:,}",
                f"{st['tokenized']:,}" + " (sample)" * st["sampled"]]
        for ln in st["lengths"] or [None]:
            over = ln and ln["over_limit"]
            rows.append(lead + ([ln["column"] + " (prepared)" * (ln["measured"] != "before truncation"), str(
                ln["limit"]), *(str(ln[f"p{q}"]) for q in PERCENTILES), str(ln["max"]), "-" if over is None else
                f"{over} ({100 * over / ln['count']:.1f}%)"] if ln else ["-"] * (len(cols) - 4)))
            lead = [""] * 4
    labels = [[split, ", ".join(f"{k} {v:,} ({100 * v / sum(st['labels'].values()):.1f}%)" for k, v in list(
        st["labels"].items())[:12]) + ", ..." * (len(st["labels"]) > 12)] for split, st in report.splits.items()
              if st["labels"]]
    tail = [f"note: {n}" for n in report.notes] + [f"memory: to fit, {x}" for x in m.get("suggestions") or []] + [
        "token lengths are counted before truncation (\"prepared\": of the examples after windows/packing); "
        "the run would start; nothing was written"]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        lines = [f"{k:<11} {v}" for k, v in head.items()] + ["  ".join(f"{c:<9}" for c in r) for r in [cols] + rows]
        print("\n".join(lines + [f"labels {a}: {b}" for a, b in labels] + tail), file=file)
        return
    console = Console(file=file, width=max(120, Console(file=file).width), highlight=False)
    grid = Table.grid(padding=(0, 2))
    for k, v in head.items():
        grid.add_row(f"[bold]{k}[/bold]", v)
    console.print(grid)
    for title, columns, body in (("data", cols, rows), ("labels", ["split", "label count (share)"], labels)):
        if body:
            table = Table(*columns, title=title, title_justify="left")
            for row in body:
                table.add_row(*row)
            console.print(table)
    console.print("\n".join(tail), markup=False)
