"""What each `tunepipe` command does (cli.py parses the arguments and prints errors). Every command imports the
modules it needs, tunepipe's and the libraries, inside its function, so that `tunepipe --help` and a specs typo
answer at once (tests/test_import_placement.py lets this file and cli.py do so)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .startup_gc import fewer_gc_passes


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
    if not pipe.trainer.is_main_process:  # one report per run, not one per process
        return 0
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


def _input_records(text: str):
    """The records or texts of --input with their (file, line); a value that looks like a path but is not a
    readable file is an error, not a text to predict on (data.read_predict_records). Blank lines of a file are
    skipped with a warning naming them: each output record carries its input's line."""
    from .data import read_predict_records
    found = read_predict_records(text)
    if found.blank_lines:
        shown = ", ".join(map(str, found.blank_lines[:10])) + (", ..." if len(found.blank_lines) > 10 else "")
        _say(f"warning: --input {text.strip()}: blank line{'s' if len(found.blank_lines) > 1 else ''} {shown} "
             "skipped (nothing to predict); each output record's \"line\" names its input line")
    return found


def _checked_inputs(pipe, found, adapters: list) -> list:
    """What the model's task reads of each input, each checked (type, emptiness) before any is predicted, so
    that an error names its file and line (or --input) instead of a position in a batch."""
    from .serving.inference import at_origin
    from .serving.model_loading import empty_input
    from .errors import TunepipeError, ValidationError
    inputs = pipe.inputs_from_records(found.items, adapters, found.origins)
    tasks: dict = {}
    for value, adapter, origin in zip(inputs, adapters, found.origins):
        task = tasks[adapter] = tasks.get(adapter) or pipe.task_for(adapter)
        where = f"The input on line {origin[1]}" if origin else "--input"
        try:
            task.prepare_input(value, where)
        except TunepipeError as e:
            raise at_origin(e, origin) from None
        problem = empty_input(task, value)
        if problem:
            raise ValidationError(f"{where} {problem}: nothing to predict", field=None if origin else "--input",
                                  file=origin[0] if origin else None, line=origin[1] if origin else None,
                                  suggestions=["give a text (training data refuses empty texts as well)"])
    return inputs


def _with_line(result, origin):
    """A prediction from a file input, led by its input's line (record number for .json / .parquet)."""
    if origin is None:
        return result
    if isinstance(result, dict) and "line" not in result:
        return {"line": origin[1], **result}
    return {"line": origin[1], "prediction": result}


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
    """Predictions as JSON Lines, in input order; each from a file input carries that input's "line"."""
    from .errors import ConfigError
    from .serving.model_loading import check_device
    args.device = check_device(args.device, "--device")  # a device this machine lacks fails before loading
    if args.output:  # before the model loads: a wrong --output fails in a second
        from .output_paths import check_file_parent
        from .ownership import check_output_file, expand
        check_file_parent(expand(args.output), "--output")
        source = expand(args.input)
        check_output_file(args.output, overwrite=args.overwrite,
                          inputs={"input file": [source] if source.is_file() else [], "model": _model_dirs(args)})
    found = _input_records(args.input)  # a missing or unreadable input file fails before loading as well
    params = _param_args(args.param)
    pipe = _inference_pipeline(args)
    names = [a["name"] for a in pipe.adapters.list_adapters()] if pipe.adapters else []
    if args.use and args.use not in names:
        raise ConfigError(f"--use {args.use}: no such adapter", field="--use",
                          suggestions=[f"adapters given: {', '.join(names) or 'none'}"])
    default = args.use or pipe.default_adapter or (names[0] if len(names) == 1 else None)
    adapters = [r.get("adapter") or default if isinstance(r, dict) else default for r in found.items]
    inputs = _checked_inputs(pipe, found, adapters)
    from_file, origins = found.from_file, found.origins
    target = Path(args.output).expanduser() if args.output else None
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}") if target else None
    out = open(tmp, "w", encoding="utf-8") if tmp else sys.stdout
    chunk = max(1, args.batch_size * 8)
    try:
        from tqdm import tqdm
        with tqdm(total=len(inputs), unit="input", disable=not from_file, file=sys.stderr) as bar:
            for start in range(0, len(inputs), chunk):
                part = inputs[start:start + chunk]
                results = pipe.predict_grouped(part, adapters[start:start + chunk], **params)
                for result, origin in zip(results, origins[start:start + chunk]):
                    out.write(json.dumps(_with_line(result, origin), ensure_ascii=False) + "\n")
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
    from .serving.model_loading import check_device
    from .serving.serve import Limits, check_bind, read_api_key, serve
    args.device = check_device(args.device, "--device")  # before minutes of model loading
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
    with fewer_gc_passes():
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
    _check_init_target(path, f"{cls.name}.yaml", args.force)
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise TunepipeIOError(f"Cannot write {path}: {e.strerror or e}", field="--output", file=str(path),
                              suggestions=["choose another file"]) from None
    _say(f"wrote {path}; edit data paths, then: tunepipe train {path} (examples/ in the repository: a runnable "
         f"version with sample data)")
    return 0


def _check_init_target(path: Path, name: str, force: bool) -> None:
    """Where `init` may write: a new file in an existing directory, or (with --force) a file `init` wrote before,
    recognised by the starter's first line. A directory, and any other file (data, notes, a specs file of the
    user's own), is refused whatever the flags: --force is for regenerating a starter, not for replacing files."""
    from .errors import TunepipeIOError
    from .output_paths import check_file_parent
    from .starter import is_starter_file
    if path.is_dir():
        raise TunepipeIOError(f"--output {path} is a directory", field="--output", file=str(path),
                              suggestions=[f"name a file in it: --output {path / name}"])
    check_file_parent(path, "--output")
    if not (path.exists() or path.is_symlink()):
        return
    if not is_starter_file(path):
        raise TunepipeIOError(f"{path} already exists and is not a starter file that `tunepipe init` wrote: it is "
                              "never replaced", field="--output", file=str(path),
                              suggestions=[f"choose another file, e.g. --output {path.with_name(name)}"
                                           if path.name != name else "choose another file name",
                                           "--force replaces only a file written by `tunepipe init`"])
    if not force:
        raise TunepipeIOError(f"{path} already exists (a starter file from `tunepipe init`)", field="--output",
                              file=str(path), suggestions=["pass --force to replace it (edits made to it are lost)",
                                                           "or choose another file"])


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
