"""The `tunepipe` command. Only argparse is imported at start-up so that --help answers instantly;
each command imports what it needs."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_INTERNAL = 1

DESCRIPTION = """Fine-tune Hugging Face NLP models end to end from one specs file.

  tunepipe demo                         fine-tune the bundled MiniLM on a generated NER set (no network)
  tunepipe init token_classification   write a commented starter specs file
  tunepipe train ner.yaml --set training.learning_rate=3e-5
  tunepipe evaluate ner.yaml            evaluate output_dir/model on the validation/test data
  tunepipe predict --model runs/ner --input "Ada Lovelace lived in London"
  tunepipe tasks                        list tasks and their default specs
  tunepipe merge runs/ner-lora          merge a PEFT adapter into its base (a full model in runs/ner-lora/merged)
"""


def _add_specs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="specs file (YAML or JSON)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one value, e.g. --set training.learning_rate=3e-5 (repeatable)")
    p.add_argument("--output-dir", help="shortcut for --set output_dir=DIR")
    p.add_argument("--backend", choices=["hf", "accelerate", "lightning", "lightning+accelerate"],
                   help="training backend (default: from specs, else hf)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunepipe", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train, save and evaluate from a specs file")
    _add_specs_args(p)
    p = sub.add_parser("evaluate", help="evaluate a trained model on the specs' validation/test data")
    _add_specs_args(p)
    p.add_argument("--model", help="model directory (default: <output_dir>/model)")
    p = sub.add_parser("predict", help="predict with a trained model (text or a JSON Lines file)")
    p.add_argument("--model", required=True, help="a tunepipe output_dir or a saved model directory")
    p.add_argument("--input", required=True, help="a text, or a .jsonl/.txt file of inputs")
    p.add_argument("--output", help="write JSON Lines here (default: stdout)")
    p.add_argument("--task", help="task of the model (default: from specs.yaml or the model config)")
    p.add_argument("--batch-size", type=int, default=32)
    sub.add_parser("tasks", help="list tasks and their default specs")
    p = sub.add_parser("init", help="write a commented starter specs file for a task")
    p.add_argument("task")
    p.add_argument("--output", "-o", help="file to write (default: <task>.yaml; '-' for stdout)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p = sub.add_parser("demo", help="fine-tune the bundled MiniLM on a generated NER set (offline, < 3 min)")
    p.add_argument("--output-dir", default="runs/demo")
    p = sub.add_parser("merge", help="merge a PEFT run's adapter into its (full-precision) base: a full model")
    p.add_argument("output_dir", help="the output_dir of a run trained with a peft section (or its adapter dir)")
    p.add_argument("--to", dest="target", help="directory to write (default: <output_dir>/merged)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__
        print(__version__)
        return 0
    if not args.command:
        parser.print_help()
        return 0
    from .errors import ErrorHandler, TunepipeError
    try:
        return COMMANDS[args.command](args) or 0
    except TunepipeError as e:
        if args.debug:
            raise
        _print_error(e)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        if args.debug:
            raise
        _print_error(ErrorHandler.translate(e))
        return EXIT_INTERNAL


def _print_error(e) -> None:
    print(f"error: {e.render()}", file=sys.stderr)


def _pipeline(args):
    from .pipeline import FineTunePipeLine
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.backend:
        overrides.append(f"backend={args.backend}")
    return FineTunePipeLine(args.config, overrides=overrides)


def cmd_train(args) -> int:
    pipe = _pipeline(args)
    _say(f"training {pipe.specs.task} on the {pipe.specs.backend} backend -> {pipe.output_dir}")
    pipe.run()
    _print_metrics(pipe)
    _say(f"model saved to {pipe.output_dir / ('adapter' if pipe.specs.peft.method != 'none' or pipe.specs.peft.config else 'model')}")
    return 0


def cmd_evaluate(args) -> int:
    pipe = _pipeline(args)
    pipe.setup(trained_dir=args.model or pipe.output_dir / "model")
    pipe.evaluate()
    _print_metrics(pipe)
    return 0


def _read_inputs(text: str, task) -> list:
    path = Path(text)
    if not (path.suffix in (".jsonl", ".txt") and path.is_file()):
        return [text]
    from .data import Records, read_jsonl, read_text
    records = Records()
    if path.suffix == ".txt":
        read_text(path, records, "text")
    else:
        read_jsonl(path, records)
    return [task.input_from_record(r) if path.suffix == ".jsonl" else r["text"] for r in records.rows]


def cmd_predict(args) -> int:
    from .errors import ModelNotFoundError
    from .models import task_from_model_dir
    from .pipeline import FineTunePipeLine
    root = Path(args.model)
    model_dir = root / "model" if (root / "model" / "config.json").is_file() else root
    if not (root / "model" / "config.json").is_file() and (root / "adapter" / "adapter_config.json").is_file():
        model_dir = root / "adapter"  # a PEFT run: base model + adapter
    if not (model_dir / "config.json").is_file() and not (model_dir / "adapter_config.json").is_file():
        raise ModelNotFoundError(f"No model found in {root}", file=str(root),
                                 suggestions=["pass a tunepipe output_dir or a directory with config.json"])
    specs_file = model_dir.parent / "specs.yaml"
    if specs_file.is_file():
        pipe = FineTunePipeLine(str(specs_file), overrides=[f"output_dir={model_dir.parent}"])
    else:
        from .peft_support import is_adapter_dir, read_adapter_info
        task = args.task or task_from_model_dir(model_dir) or (
            read_adapter_info(model_dir).get("task") if is_adapter_dir(model_dir) else None)
        if not task:
            from .errors import TaskTypeError
            raise TaskTypeError("Cannot tell the model's task", suggestions=["pass --task"])
        pipe = FineTunePipeLine({"task": task, "output_dir": str(model_dir.parent)})
    pipe.load_trained(model_dir)
    results = pipe.predict(_read_inputs(args.input, pipe.task), batch_size=args.batch_size)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for r in results:
            out.write(json.dumps(r, ensure_ascii=False) + "\n")
    finally:
        if args.output:
            out.close()
    return 0


def cmd_tasks(args) -> int:
    import yaml
    from .tasks import get_task, planned_task_names, task_names
    for name in task_names():
        cls = get_task(name)
        print(f"{name}  ({cls.description})")
        print("  " + yaml.safe_dump(cls.default_specs(), sort_keys=False).replace("\n", "\n  ").rstrip())
    if planned_task_names():
        print(f"planned, not in this version: {', '.join(planned_task_names())}")
    return 0


def cmd_init(args) -> int:
    from .errors import TunepipeIOError
    from .starter import starter_yaml
    from .tasks import get_task
    cls = get_task(args.task)
    text = starter_yaml(cls)
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    path = Path(args.output or f"{cls.name}.yaml")
    if path.exists() and not args.force:
        raise TunepipeIOError(f"{path} already exists", file=str(path), suggestions=["pass --force to overwrite"])
    path.write_text(text, encoding="utf-8")
    _say(f"wrote {path}; edit data paths, then: tunepipe train {path}")
    return 0


def cmd_demo(args) -> int:
    import time
    from .demo import demo_specs
    from .pipeline import FineTunePipeLine
    start = time.time()
    specs = demo_specs(args.output_dir)
    _say(f"demo: NER on {specs['model'].get('name_or_path', 'a tiny from-config BERT')}, "
         f"generated data in {args.output_dir}/data")
    pipe = FineTunePipeLine(specs)
    pipe.run()
    _print_metrics(pipe)
    example = "Greta Varga flew from Lisbon to meet Bluefin Robotics ."
    print(f"\nprediction for: {example}")
    for ent in pipe.predict(example)["entities"]:
        print(f"  {ent['label']:<4} {ent['text']!r} [{ent['start']}:{ent['end']}] score={ent['score']:.3f}")
    _say(f"done in {time.time() - start:.0f}s; model in {pipe.output_dir / 'model'}")
    return 0


def _say(text: str) -> None:
    print(f"tunepipe: {text}", file=sys.stderr, flush=True)


def _print_metrics(pipe) -> None:
    for split, metrics in pipe.metrics.items():
        if split == "train":
            continue
        print(f"\n{split} metrics")
        for key, value in pipe.task.metric_table(metrics):
            if key.endswith("_support") or key in ("runtime", "steps_per_second"):
                continue
            print(f"  {key:<24} {value:.4f}" if isinstance(value, float) else f"  {key:<24} {value}")


def cmd_merge(args) -> int:
    from .merge import merge_and_unload
    target = merge_and_unload(args.output_dir, args.target)
    _say(f"merged model saved to {target} (loads with plain transformers from_pretrained)")
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "tasks": cmd_tasks,
            "init": cmd_init, "demo": cmd_demo, "merge": cmd_merge}

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
