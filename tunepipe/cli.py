"""The `tunepipe` command. Only argparse is imported at start-up so that --help answers instantly;
each command imports what it needs."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .cli_commands import COMMANDS
from .startup_gc import predict_gc

EXIT_USER_ERROR = 2
EXIT_INTERNAL = 1
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
    p.add_argument("--output-dir", help="shortcut for --set output_dir=DIR (default: the specs' output_dir)")
    p.add_argument("--backend", choices=["hf", "accelerate", "lightning", "lightning+accelerate"],
                   help="training backend (default: from specs, else hf)")


def _add_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print the report as JSON on stdout, a failure as {\"ok\": false, \"error\": ...} "
                        "(default: a readable report; train takes --json only with --dry-run)")
    p.add_argument("--sample", type=int, default=2000, metavar="N",
                   help="records per split tokenized for length statistics (0: all; default 2000)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a tunepipe output_dir, a saved model or adapter directory, "
                                                  "or a base model (with --adapter)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a PEFT adapter on the model, by name (repeatable; default: none)")
    p.add_argument("--task", help="task of the model (default: from specs.yaml or the model config)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="inputs per forward pass of the model (default 32); lower it when memory runs short")
    p.add_argument("--device", help="cpu, cuda, cuda:1, xpu, mps (default: cuda if available, else cpu); checked "
                                    "before the model loads")
    p.add_argument("--dtype", help="float32 (default), bfloat16, auto (bf16 where fast) or int8 (CPU)")
    p.add_argument("--max-adapters", type=int, default=8, metavar="N",
                   help="adapters kept in memory; the least recently used is unloaded beyond (default 8)")
    _add_trust_arg(p)


def _add_trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code shipped with the model (its config's auto_map); off by default, and never "
                        "switched on by a setting saved in a model, adapter or run folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunepipe", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks and all library logging (the exit status is the same: 2 for a "
                             "user error, 1 for a tunepipe fault)")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train, save and evaluate from a specs file")
    _add_specs_args(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace a tunepipe run of other specs in output_dir (default: refused)")
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
    p.add_argument("--model", help="model directory (default: <output_dir>/model, or <output_dir>/adapter for "
                                    "a peft run)")
    p = sub.add_parser("predict", help="predict with a trained model (text or a JSON Lines file)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _lazy_epilog(p, _predict_settings_help)
    _add_model_args(p)
    p.add_argument("--input", required=True,
                   help="a text, or a .txt (one input per line), .jsonl, .json, .csv, .tsv or .parquet file of "
                        "inputs (a record may name its adapter in an 'adapter' field); a file's predictions carry "
                        "the input's \"line\"")
    p.add_argument("--output", help="write JSON Lines to this file, in an existing directory (default: stdout); "
                                    "never the input or a model file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file (default: refused)")
    p.add_argument("--use", metavar="NAME", help="adapter for inputs that name none (default: the only adapter given)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a prediction setting of the model's task (repeatable); each task's settings are "
                        "listed below")
    p = sub.add_parser("serve", help="serve predictions over HTTP: /v1/predict, /v1/adapters, /health, /docs")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only; "
                                                       "any other needs an API key)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default 8000)")
    p.add_argument("--api-key", help="key every route but /health requires (Authorization: Bearer KEY; default: "
                                     "$TUNEPIPE_API_KEY, else none); prefer $TUNEPIPE_API_KEY or --api-key-file: "
                                     "a flag shows in the process list")
    p.add_argument("--api-key-file", help="read the API key from this file (default: --api-key, else "
                                          "$TUNEPIPE_API_KEY, else no key)")
    p.add_argument("--allow-adapter-management", action="store_true",
                   help="turn on POST/DELETE /v1/adapters and load/unload (off by default; needs --adapter-root)")
    p.add_argument("--adapter-root", action="append", default=[], metavar="DIR",
                   help="directory whose adapters may be registered over the API (repeatable; default: none)")
    p.add_argument("--scheduling", choices=["fair", "fifo"], default="fair",
                   help="fair (default): micro-batches of --batch-size taken from each request in turn; "
                        "fifo: each request whole, in arrival order")
    p.add_argument("--no-adapter-loading", action="store_true", help=argparse.SUPPRESS)  # the default now
    g = p.add_argument_group("serve limits (docs/serving.md)")
    g.add_argument("--max-batch", type=int, default=64, help="most inputs in one request (default 64)")
    g.add_argument("--max-input-chars", type=int, default=20_000,
                   help="longest input, in characters (default 20000)")
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
    p.add_argument("--force", action="store_true",
                   help="replace FILE if it is a starter file that `tunepipe init` wrote (its first line says so); "
                        "any other file is never replaced (default: an existing file is refused)")
    p = sub.add_parser("demo", help="fine-tune the bundled MiniLM on a generated NER set (offline; measured 2-10 min "
                                    "on 2 CPU cores shared with other jobs)")
    p.add_argument("--output-dir", default="runs/demo",
                   help="directory for the demo's generated data and its run (default runs/demo)")
    p = sub.add_parser("merge", help="merge a PEFT run's adapter into its (full-precision) base: a full model")
    p.add_argument("output_dir", help="the output_dir of a run trained with a peft section (or its adapter dir)")
    p.add_argument("--to", dest="target", help="directory to write (default: <output_dir>/merged)")
    _add_trust_arg(p)
    p = sub.add_parser("cache", help="show or clear the cache of read and tokenized datasets (TUNEPIPE_CACHE_DIR, "
                                     "default ~/.cache/tunepipe)")
    p.add_argument("action", choices=("info", "clear"), nargs="?", default="info",
                   help="info: where the cache is and its size; clear: empty it (default info)")
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
    if program and args.command == "train":  # malloc settings are the process's: only where it is tunepipe's own
        from .heap_reuse import reuse_freed_memory
        reuse_freed_memory()
    try:
        # library noise held back on normal runs (all of it under --debug); predict's start-up and exit GC
        with quiet_libraries(debug=args.debug), predict_gc(args.command, program):
            return COMMANDS[args.command](args) or 0
    except TunepipeError as e:
        _print_error(e, args, argv)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        error = ErrorHandler.translate(e)  # a typed error (a symlink loop, a full disk ...) is the user's to fix
        internal = ErrorHandler.is_internal(error)
        _print_error(error, args, argv, traceback_of=e if internal else None)
        return EXIT_INTERNAL if internal else EXIT_USER_ERROR


def _print_error(e, args=None, argv=None, traceback_of: BaseException | None = None) -> None:
    """The error on the console, after its traceback under --debug (the exit status stays what the error says:
    scripts tell a user error from a fault the same way with or without --debug), and appended to the run
    directory's tunepipe.log when that directory is already tunepipe's (console.log_error); tunepipe's own faults
    go there with their traceback. Called inside the ``except`` block: the traceback is the exception handled."""
    import traceback
    if args is not None and args.command in LOGGED_COMMANDS and not getattr(args, "dry_run", False):
        from .console import log_error
        run_dir = getattr(args, "run_dir", None) or getattr(args, "output_dir", None)
        details = "".join(traceback.format_exception(traceback_of)) if traceback_of is not None else ""
        log_error(run_dir, argv or [], e, details)
    if args is not None and args.debug:
        traceback.print_exc(file=sys.stderr)
    print(f"error: {e.render()}", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
