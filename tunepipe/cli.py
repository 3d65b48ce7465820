"""The `tunepipe` command. Only argparse is imported at start-up so that --help answers instantly;
each command imports what it needs."""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_INTERNAL = 1
# Python's cyclic GC while torch/transformers import and a model loads: ~1000 collections (6 full ones over a
# growing heap of module objects) cost ~0.6 s of a one-sentence predict on 2 cores (benchmarks/startup.py); with a
# young generation of 50,000 allocations instead of 700 the same start-up collects in ~0.15 s (_fewer_gc_passes).
FEWER_GC_PASSES = (50_000, 20, 100)
LOGGED_COMMANDS = ("train", "evaluate", "demo", "merge")  # commands that write a run: errors go to its tunepipe.log

DESCRIPTION = """Fine-tune Hugging Face NLP models end to end from one specs file.

  tunepipe demo                         fine-tune the bundled MiniLM on a generated NER set (no network)
  tunepipe init token_classification   write a commented starter specs file
  tunepipe train ner.yaml --set training.learning_rate=3e-5
  tunepipe check ner.yaml               validate specs and every record, print statistics; writes nothing
  tunepipe evaluate ner.yaml            evaluate output_dir/model on the validation/test data
  tunepipe predict --model runs/ner --input "Ada Lovelace lived in London"
  tunepipe serve --model minilm --adapter ner=runs/ner-lora --adapter sst=runs/sst-lora
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


def _add_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the check report as JSON (with --dry-run for train)")
    p.add_argument("--sample", type=int, default=2000, metavar="N",
                   help="records per split tokenized for length statistics (0: all; default 2000)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a tunepipe output_dir, a saved model or adapter directory, "
                                                  "or a base model (with --adapter)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a PEFT adapter on the model, by name (repeatable)")
    p.add_argument("--task", help="task of the model (default: from specs.yaml or the model config)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", help="float32 (default), bfloat16, auto (bf16 where fast) or int8 (CPU)")
    p.add_argument("--max-adapters", type=int, default=8, help="adapters kept in memory (least recently used go)")
    _add_trust_arg(p)


def _add_trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code shipped with the model (its config's auto_map); off by default, and never "
                        "switched on by a setting saved in a model, adapter or run folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunepipe", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train, save and evaluate from a specs file")
    _add_specs_args(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run of other specs in output_dir (else refused)")
    p.add_argument("--dry-run", action="store_true", help="run every check and print what `tunepipe check` prints; "
                                                          "train nothing, write nothing")
    _add_check_args(p)
    p = sub.add_parser("check", help="validate specs and every record; print data statistics, parameters, steps "
                                     "and a memory estimate; write nothing (exit 0: the run would start)")
    _add_specs_args(p)
    p.add_argument("--overwrite", action="store_true", help="check as `train --overwrite` would run")
    _add_check_args(p)
    p = sub.add_parser("evaluate", help="evaluate a trained model on the specs' validation/test data")
    _add_specs_args(p)
    p.add_argument("--model", help="model directory (default: <output_dir>/model)")
    p = sub.add_parser("predict", help="predict with a trained model (text or a JSON Lines file)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _lazy_epilog(p, _predict_settings_help)
    _add_model_args(p)
    p.add_argument("--input", required=True, help="a text, or a .jsonl/.txt file of inputs (a jsonl record may name "
                                                  "its adapter in an 'adapter' field)")
    p.add_argument("--output", help="write JSON Lines here (default: stdout); never the input or a model file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--use", metavar="NAME", help="adapter for inputs that name none (default: the only adapter given)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a prediction setting of the model's task (repeatable); each task's settings are "
                        "listed below")
    p = sub.add_parser("serve", help="serve predictions over HTTP: /v1/predict, /v1/adapters, /health, /docs")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only; "
                                                       "any other needs an API key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="key every route but /health requires (Authorization: Bearer KEY); prefer "
                                     "$TUNEPIPE_API_KEY or --api-key-file: a flag shows in the process list")
    p.add_argument("--api-key-file", help="read the API key from this file")
    p.add_argument("--allow-adapter-management", action="store_true",
                   help="turn on POST/DELETE /v1/adapters and load/unload (off by default; needs --adapter-root)")
    p.add_argument("--adapter-root", action="append", default=[], metavar="DIR",
                   help="directory whose adapters may be registered over the API (repeatable)")
    p.add_argument("--scheduling", choices=["fair", "fifo"], default="fair",
                   help="fair (default): micro-batches of --batch-size taken from each request in turn; "
                        "fifo: each request whole, in arrival order")
    p.add_argument("--no-adapter-loading", action="store_true", help=argparse.SUPPRESS)  # the default now
    g = p.add_argument_group("serve limits (docs/serving.md)")
    g.add_argument("--max-batch", type=int, default=64, help="most inputs in one request (default 64)")
    g.add_argument("--max-input-chars", type=int, default=20_000, help="longest input, in characters")
    g.add_argument("--max-body-bytes", type=int, default=2_000_000, help="largest request body (default 2 MB)")
    g.add_argument("--max-concurrent-requests", type=int, default=64,
                   help="requests in progress at once; beyond: 503 with Retry-After (default 64)")
    g.add_argument("--max-queued-inputs", type=int, default=2048,
                   help="inputs admitted and not yet answered, all requests together; beyond: 503 (default 2048)")
    g.add_argument("--max-connections", type=int, default=1000, help="open connections (default 1000)")
    g.add_argument("--header-timeout", type=float, default=10.0, help="seconds for a request head (default 10)")
    g.add_argument("--body-timeout", type=float, default=30.0, help="seconds for a request body (default 30)")
    g.add_argument("--keep-alive-timeout", type=float, default=5.0, help="idle seconds between requests (default 5)")
    sub.add_parser("tasks", help="list tasks and their default specs")
    p = sub.add_parser("init", help="write a commented starter specs file for a task")
    p.add_argument("task", help="a task name or alias (ner, qa, mlm, clm ...); `tunepipe tasks` lists the tasks")
    p.add_argument("--output", "-o", help="file to write (default: <task>.yaml; '-' for stdout)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p = sub.add_parser("demo", help="fine-tune the bundled MiniLM on a generated NER set (offline; measured 2-10 min "
                                    "on 2 CPU cores shared with other jobs)")
    p.add_argument("--output-dir", default="runs/demo")
    p = sub.add_parser("merge", help="merge a PEFT run's adapter into its (full-precision) base: a full model")
    p.add_argument("output_dir", help="the output_dir of a run trained with a peft section (or its adapter dir)")
    p.add_argument("--to", dest="target", help="directory to write (default: <output_dir>/merged)")
    _add_trust_arg(p)
    p = sub.add_parser("cache", help="show or clear the cache of read and tokenized datasets (TUNEPIPE_CACHE_DIR, "
                                     "default ~/.cache/tunepipe)")
    p.add_argument("action", choices=("info", "clear"), nargs="?", default="info")
    return parser


def _lazy_epilog(p: argparse.ArgumentParser, make) -> None:
    """Build ``p``'s epilog only when its help is shown: it imports the task registry, which `tunepipe --help` and
    every other command should not pay for."""
    plain = p.format_help

    def format_help() -> str:
        p.epilog = make()
        return plain()

    p.format_help = format_help


def _predict_settings_help() -> str:
    """Each task's prediction settings, read from its ``predict`` signature as model_loading.check_predict_kwargs
    reads them, so the help lists exactly what the model's task accepts."""
    import inspect
    import textwrap

    from .serving.model_loading import _GENERATIVE_CLASSES
    from .specs import GenerationSpec
    from .tasks import get_task, task_names
    by_settings: dict[str, list[str]] = {}  # tasks with the same settings share a line
    for name in task_names():
        cls = get_task(name)
        params = inspect.signature(cls.predict).parameters
        choices = getattr(cls, "predict_choices", {})
        parts = []
        for key, param in params.items():
            if key in ("self", "model", "tokenizer", "inputs", "batch_size") or param.kind not in (
                    param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                continue
            values = "|".join(choices[key]) if key in choices else (
                "true|false" if isinstance(param.default, bool) else "N")
            shown = json.dumps(param.default).strip('"')  # false, 5, first
            parts.append(f"{key}={values} (default {shown})")
        if any(param.kind == param.VAR_KEYWORD for param in params.values()):
            if cls.auto_model_class in _GENERATIVE_CLASSES:
                parts.append("generation settings: " + ", ".join(GenerationSpec.model_fields) +
                             " and other transformers GenerationConfig names (default: the run's generation section)")
            else:
                parts.append(", ".join(getattr(cls, "predict_settings", ())) + " (default: the run's data section)")
        by_settings.setdefault("; ".join(parts) or "none", []).append(name)
    lines = ["prediction settings (--param KEY=VALUE) by the model's task:"]
    for settings, names in by_settings.items():
        lines += textwrap.wrap(f"{', '.join(names)}: {settings}", 100, initial_indent="  ", subsequent_indent="      ")
    lines.append("e.g. --param aggregation_strategy=simple, --param all_scores=true, --param num_beams=4")
    return "\n".join(lines)


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
    from .console import quiet_libraries
    from .errors import ErrorHandler, TunepipeError
    program = argv is None  # main is the process (console script, python -m tunepipe), not a caller's function
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # library noise held back on normal runs (all of it under --debug); predict's start-up and exit GC
        with quiet_libraries(debug=args.debug), _predict_gc(args.command, program):
            return COMMANDS[args.command](args) or 0
    except TunepipeError as e:
        _print_error(e, args, argv)
        if args.debug:
            raise
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        error = ErrorHandler.translate(e)  # a typed error (a symlink loop, a full disk ...) is the user's to fix
        internal = ErrorHandler.is_internal(error)
        _print_error(error, args, argv, traceback_of=e if internal else None)
        if args.debug:
            raise
        return EXIT_INTERNAL if internal else EXIT_USER_ERROR


@contextlib.contextmanager
def _predict_gc(command: str, program: bool):
    """`tunepipe predict`: fewer cyclic-GC passes for the whole command (restored right after loading, the next
    allocation would pay the postponed full collection, ~0.25 s); then, when main is the process, every object is
    frozen before the process exits: the interpreter's shutdown would otherwise walk all of torch/transformers with
    the cyclic GC (~0.9 s of a ~4.5 s call on 2 cores, benchmarks/startup.py) and they are left to the OS. Safe for
    predict: its --output file is closed before this, stdout/stderr are flushed by the interpreter and atexit
    handlers still run; a caller of main() keeps its own garbage collection."""
    if command != "predict":
        yield
        return
    with _fewer_gc_passes():
        try:
            yield
        finally:
            if program:
                gc.freeze()


@contextlib.contextmanager
def _fewer_gc_passes():
    """Fewer cyclic-GC passes (FEWER_GC_PASSES) while modules import and the model loads; young garbage is still
    collected, every 50,000 allocations. The thresholds in force before come back afterwards."""
    before = gc.get_threshold()
    gc.set_threshold(*FEWER_GC_PASSES)
    try:
        yield
    finally:
        gc.set_threshold(*before)


def _print_error(e, args=None, argv=None, traceback_of: BaseException | None = None) -> None:
    """The error on the console (under --debug the traceback says it), and appended to the run directory's
    tunepipe.log when that directory is already tunepipe's (console.log_error); tunepipe's own faults go there
    with their traceback."""
    if args is not None and args.command in LOGGED_COMMANDS and not getattr(args, "dry_run", False):
        import traceback

        from .console import log_error
        run_dir = getattr(args, "run_dir", None) or getattr(args, "output_dir", None)
        details = "".join(traceback.format_exception(traceback_of)) if traceback_of is not None else ""
        log_error(run_dir, argv or [], e, details)
    if args is None or not args.debug:
        print(f"error: {e.render()}", file=sys.stderr)


def _overrides(args) -> list[str]:
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.backend:
        overrides.append(f"backend={args.backend}")
    if getattr(args, "overwrite", False):
        overrides.append("overwrite_output_dir=true")
    return overrides


def _pipeline(args):
    from .pipeline import FineTunePipeLine
    pipe = FineTunePipeLine(args.config, overrides=_overrides(args))
    args.run_dir = pipe.output_dir  # where a later error is logged (console.log_error)
    return pipe


def cmd_check(args) -> int:
    """`tunepipe check` and `train --dry-run`: the checks of a run, a report, nothing written (tunepipe/check.py).
    With --json a failure is JSON on stdout too ({"ok": false, "error": ...}), and the exit status is still 2."""
    from .check import check_run, render
    from .errors import TunepipeError
    try:
        report = check_run(args.config, overrides=_overrides(args), sample=max(args.sample, 0))
    except TunepipeError as e:
        if args.json:
            print(json.dumps({"ok": False, "error": {"code": e.code, "message": e.message, "field": e.field,
                                                     "file": e.file, "line": e.line, "suggestions": e.suggestions}}))
        raise
    if args.json:
        print(json.dumps(report.to_dict(), default=str, indent=1))
    else:
        render(report)
    return 0


def cmd_train(args) -> int:
    if args.dry_run:
        return cmd_check(args)
    if args.json:
        from .errors import ConfigError
        raise ConfigError("--json prints the report of a dry run", field="--json",
                          suggestions=["tunepipe train SPECS --dry-run --json, or tunepipe check SPECS --json"])
    pipe = _pipeline(args)
    _say(f"training {pipe.specs.task} on the {pipe.specs.backend} backend -> {pipe.output_dir}")
    pipe.run()
    _print_metrics(pipe)
    _say(f"model saved to {pipe.output_dir / ('adapter' if pipe.specs.peft.method != 'none' or pipe.specs.peft.config else 'model')}")
    _say_where(pipe)
    return 0


def cmd_evaluate(args) -> int:
    pipe = _pipeline(args)
    from .modeling.peft_support import peft_enabled
    pipe.setup(trained_dir=args.model or pipe.output_dir / ("adapter" if peft_enabled(pipe.specs) else "model"))
    pipe.evaluate()
    _print_metrics(pipe)
    return 0


def _adapter_args(values: list[str]) -> dict[str, str]:
    from .errors import ConfigError
    out: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"--adapter expects NAME=DIR, got '{value}'", field="--adapter",
                              suggestions=["e.g. --adapter ner=runs/ner-lora"])
        if name in out:
            raise ConfigError(f"Two adapters named '{name}'", field="--adapter", suggestions=["give each a name"])
        out[name.strip()] = path.strip()
    return out


def _inference_pipeline(args):
    from .serving.inference import InferencePipeLine
    return InferencePipeLine(args.task, args.model, adapter_config=_adapter_args(args.adapter) or None,
                             device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                             max_adapters_in_memory=args.max_adapters, trust_remote_code=args.trust_remote_code)


def _param_args(items: list[str]) -> dict:
    """--param KEY=VALUE pairs, values read as YAML like --set's (3 -> int, true -> bool, text stays text)."""
    from .specs import parse_assignment
    params = {}
    for item in items:
        keys, value = parse_assignment(item, example="--param aggregation_strategy=simple")
        params[".".join(keys)] = value
    return params


def _input_records(text: str) -> tuple[list, bool]:
    """(records or texts, whether they came from a file); a value that looks like a path but is not a readable
    file is an error, not a text to predict on (data.read_predict_inputs)."""
    from .data import read_predict_inputs
    return read_predict_inputs(text)


def _model_dirs(args) -> list[str]:
    """The model, adapter and base directories a predict call reads (its --output must not replace them)."""
    from .serving.model_loading import resolve_checkpoint
    from .modeling.peft_support import is_adapter_dir, read_adapter_info, resolve_base
    ck = resolve_checkpoint(args.model)
    dirs = [ck.path]
    for path in _adapter_args(args.adapter).values():
        dirs.append(str(Path(path).expanduser() / "adapter") if is_adapter_dir(Path(path).expanduser() / "adapter")
                    else path)
    for d in list(dirs):
        if is_adapter_dir(d):
            dirs.append(resolve_base(d, read_adapter_info(d)))
    return dirs


def cmd_predict(args) -> int:
    from .errors import ConfigError
    if args.output:  # before the model loads: a wrong --output fails in a second
        from .ownership import check_output_file, expand
        source = expand(args.input)
        check_output_file(args.output, overwrite=args.overwrite,
                          inputs={"input file": [source] if source.is_file() else [], "model": _model_dirs(args)})
    pipe = _inference_pipeline(args)
    names = [a["name"] for a in pipe.adapters.list_adapters()] if pipe.adapters else []
    if args.use and args.use not in names:
        raise ConfigError(f"--use {args.use}: no such adapter", field="--use",
                          suggestions=[f"adapters given: {', '.join(names) or 'none'}"])
    default = args.use or pipe.default_adapter or (names[0] if len(names) == 1 else None)
    params = _param_args(args.param)
    rows, from_file = _input_records(args.input)
    adapters = [r.get("adapter") or default if isinstance(r, dict) else default for r in rows]
    inputs = pipe.inputs_from_records(rows, adapters)
    target = Path(args.output).expanduser() if args.output else None
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}") if target else None
    out = open(tmp, "w", encoding="utf-8") if tmp else sys.stdout
    chunk = max(1, args.batch_size * 8)
    try:
        from tqdm import tqdm
        with tqdm(total=len(inputs), unit="input", disable=not from_file, file=sys.stderr) as bar:
            for start in range(0, len(inputs), chunk):
                part = inputs[start:start + chunk]
                for result in pipe.predict_grouped(part, adapters[start:start + chunk], **params):
                    out.write(json.dumps(result, ensure_ascii=False) + "\n")
                bar.update(len(part))
        if tmp:
            out.close()
            os.replace(tmp, target)
    finally:
        if tmp:
            out.close()
            tmp.unlink(missing_ok=True)
    return 0


def cmd_serve(args) -> int:
    from .serving.serve import Limits, check_bind, read_api_key, serve
    api_key = read_api_key(args.api_key, args.api_key_file)
    check_bind(args.host, api_key)  # before minutes of model loading
    limits = Limits(max_batch=args.max_batch, max_input_chars=args.max_input_chars,
                    max_body_bytes=args.max_body_bytes, max_concurrent_requests=args.max_concurrent_requests,
                    max_queued_inputs=args.max_queued_inputs, max_connections=args.max_connections,
                    header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                    keep_alive_timeout=args.keep_alive_timeout)
    if args.allow_adapter_management and not args.adapter_root:
        from .errors import ConfigError
        raise ConfigError("--allow-adapter-management needs --adapter-root DIR", field="adapter_root",
                          suggestions=["only adapters under an adapter root can be registered over the API"])
    if args.no_adapter_loading:
        _say("--no-adapter-loading is the default now and is ignored (see --allow-adapter-management)")
    with _fewer_gc_passes():
        pipe = _inference_pipeline(args)
    if api_key is None:
        _say("no API key: serving this machine only (loopback); set TUNEPIPE_API_KEY to expose it (docs/serving.md)")
    _say(f"serving {pipe.task_name or 'adapters'} from {args.model} on http://{args.host}:{args.port} "
         f"(API docs at /docs; adapter management {'on' if args.allow_adapter_management else 'off'})")
    serve(pipe, args.host, args.port, limits, api_key=api_key, allow_adapter_management=args.allow_adapter_management,
          adapter_roots=args.adapter_root, scheduling=args.scheduling)
    return 0


def cmd_tasks(args) -> int:
    import yaml
    from .tasks import builtin_task, planned_task_names, plugin_tasks, task_names
    plugins, skipped = plugin_tasks()  # tasks other packages register (entry point group tunepipe.tasks)
    for name, cls in [(n, builtin_task(n)) for n in task_names()] + list(plugins.items()):
        origin = f", from {cls.__module__.split('.')[0]}" if name in plugins else ""
        print(f"{name}  ({cls.description}{origin})")
        print("  " + yaml.safe_dump(cls.default_specs(), sort_keys=False).replace("\n", "\n  ").rstrip())
    for why in skipped:
        _say(f"warning: {why}")
    if planned_task_names():
        print(f"planned, not in this version: {', '.join(planned_task_names())}")
    return 0


def cmd_init(args) -> int:
    from .errors import TunepipeIOError
    from .starter import starter_yaml
    from .tasks import get_task
    cls = get_task(args.task)
    if args.task != cls.name:  # the file says the task's own name: tell the user why it differs from theirs
        _say(f"'{args.task}' is an alias of {cls.name}; the specs say task: {cls.name}")
    text = starter_yaml(cls)
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    path = Path(args.output or f"{cls.name}.yaml").expanduser()
    if path.exists() and not args.force:
        raise TunepipeIOError(f"{path} already exists", file=str(path), suggestions=["pass --force to overwrite"])
    path.write_text(text, encoding="utf-8")
    _say(f"wrote {path}; edit data paths, then: tunepipe train {path} (examples/ in the repository: a runnable "
         f"version with sample data)")
    return 0


def cmd_demo(args) -> int:
    import time
    from .demo import demo_specs
    from .ownership import claim_dir
    from .pipeline import FineTunePipeLine
    start = time.time()
    claim_dir(args.output_dir, kind="run", field="--output-dir")  # before its data is written there
    specs = demo_specs(str(Path(args.output_dir).expanduser()))
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
    _say_where(pipe)
    return 0


def _say(text: str) -> None:
    print(f"tunepipe: {text}", file=sys.stderr, flush=True)


def _print_metrics(pipe) -> None:
    from .console import print_metrics
    print_metrics(pipe.task, pipe.metrics)


def _say_where(pipe) -> None:
    """The last line of a run: where it is and how to look at it (card, curves, MLflow / TensorBoard)."""
    from .console import run_summary
    _say(run_summary(pipe.output_dir, pipe.tracking, getattr(pipe.specs.training, "report_to", None)))


def cmd_cache(args) -> int:
    from .data import cache
    root = cache.datasets_dir()
    if args.action == "clear":
        freed = cache.clear()
        print(f"removed {freed / 2**20:.1f} MiB from {root}" if freed or not root.exists() else
              f"{root} is not tagged as tunepipe's cache (no {cache.TAG}): left alone")
        return 0
    files = [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
    entries = [p for p in root.glob("*/*") if (p / cache.DONE).is_file()] if root.is_dir() else []
    print(f"{root}: {len(entries)} entries, {sum(p.stat().st_size for p in files) / 2**20:.1f} MiB "
          "(`tunepipe cache clear` empties it; data.cache: false turns it off)")
    return 0


def cmd_merge(args) -> int:
    from .serving.merge import merge_and_unload
    target = merge_and_unload(args.output_dir, args.target, trust_remote_code=args.trust_remote_code)
    _say(f"merged model saved to {target} (loads with plain transformers from_pretrained)")
    return 0


COMMANDS = {"train": cmd_train, "check": cmd_check, "evaluate": cmd_evaluate, "predict": cmd_predict, "tasks": cmd_tasks,
            "init": cmd_init, "demo": cmd_demo, "merge": cmd_merge, "serve": cmd_serve, "cache": cmd_cache}

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
