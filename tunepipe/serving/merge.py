"""Export a PEFT run as one full model: the adapter merged into its base, in plain ``save_pretrained`` layout.

A quantized base is never merged into: the base is reloaded in full precision and the adapter merged there, so the
export is an ordinary fp32 model. Prompt/prefix tuning adds virtual tokens, not weights, so it cannot be merged.
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path

from ..disk_space import disk_full_as_io_error, model_weight_bytes
from ..errors import ConfigError, ErrorHandler, ModelNotFoundError
from ..modeling.peft_support import MERGEABLE_METHODS, is_adapter_dir, load_adapter, read_adapter_info, resolve_base
from ..output import atomic_dir
from ..output_paths import check_dir_parent
from ..ownership import check_claim, expand, read_marker, write_marker


def find_adapter(path: str | Path) -> Path:
    """The adapter directory of a run directory (``<output_dir>/adapter``) or the adapter directory itself."""
    path = Path(path)
    for candidate in (path / "adapter", path):
        if is_adapter_dir(candidate):
            return candidate
    if not path.exists():
        parent = path.parent if str(path.parent) else Path(".")
        close = difflib.get_close_matches(path.name, sorted(p.name for p in parent.iterdir()), n=2) \
            if parent.is_dir() else []
        raise ModelNotFoundError(f"{path} not found", file=str(path),
                                 suggestions=[f"did you mean '{parent / c}'?" for c in close] +
                                 ["pass the output_dir of a run trained with a peft section (paths are relative to "
                                  "the directory you run tunepipe from)"])
    raise ModelNotFoundError(f"No PEFT adapter in {path}", file=str(path),
                             suggestions=["pass the output_dir of a run trained with a peft section",
                                          "a full fine-tuning run already has a full model in <output_dir>/model"])


def merge_and_unload(output_dir: str | Path, target: str | Path | None = None, trust_remote_code: bool = False) -> Path:
    """Merge the run's adapter into its full-precision base and save model + tokenizer to ``target``
    (default ``<output_dir>/merged``) atomically; returns the directory written. ``trust_remote_code`` is the
    caller's to give: the adapter's own record never turns it on."""
    adapter = find_adapter(output_dir)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    peft_type = str(cfg.get("peft_type", "")).lower()
    if peft_type in ("prompt_tuning", "p_tuning", "prefix_tuning") or cfg.get("num_virtual_tokens"):
        raise ConfigError(f"A {peft_type} adapter cannot be merged: it adds virtual tokens to the input, not "
                          "weights to the model", field="peft.method", file=str(adapter),
                          suggestions=["use the adapter as it is: `tunepipe predict --model "
                                       f"{Path(output_dir)}` or PeftModel.from_pretrained(base, '{adapter}')",
                                       f"or retrain with one of {', '.join(MERGEABLE_METHODS)} to get a mergeable "
                                       "adapter"])
    info = read_adapter_info(adapter)
    root = adapter.parent if adapter.name == "adapter" else adapter
    target = _merge_target(root, target, adapter, resolve_base(adapter, info))
    with ErrorHandler.guard(f"merging the adapter in {adapter}"):
        model, tokenizer = load_adapter(adapter, full_precision=True, trust_remote_code=trust_remote_code)
        try:
            merged = model.merge_and_unload()
        except (ValueError, AttributeError, NotImplementedError) as e:
            raise ConfigError(f"peft cannot merge this {peft_type} adapter: {str(e).splitlines()[0]}",
                              file=str(adapter), suggestions=["use the adapter unmerged with PeftModel"]) from None
        if cfg.get("task_type") == "QUESTION_ANS":
            _segments_as_the_adapter_saw_them(merged)
        if info.get("task"):
            merged.config.tunepipe_task = info["task"]  # lets `tunepipe predict` find the task

        def write(tmp: Path) -> None:
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_marker(tmp, "merged")

        with disk_full_as_io_error(target, model_weight_bytes(merged), "the merged model's weights", "merged model"):
            atomic_dir(target, write)
    return target


def _segments_as_the_adapter_saw_them(model) -> None:
    """peft's PeftModelForQuestionAnswering does not pass token_type_ids on to its base, so a QA adapter was
    trained and predicts with segment 0 everywhere; the merged model would read the segment ids its tokenizer
    gives (question 0, context 1) and answer differently. Every segment's embedding becomes segment 0's."""
    import torch
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("token_type_embeddings") and isinstance(module, torch.nn.Embedding):
                module.weight[1:] = module.weight[0]


def _merge_target(root: Path, target: str | Path | None, adapter: Path, base: str) -> Path:
    """Where the merged model may go (ownership): a new or empty directory, a previous merge, or the run's own
    ``merged/``; never the adapter, its base or a directory holding them."""
    default = root / "merged"
    path = expand(target) if target else default
    inputs = {"adapter": [adapter], "base model": [base]}
    check_dir_parent(path, "--to")  # before minutes of loading and merging
    try:
        if path.resolve() == default.resolve() and read_marker(root) is not None:
            check_claim(path.parent, kind="run", inputs=inputs, writes=("merged",), field="--to")
            return path
        return check_claim(path, kind="merged", inputs=inputs, field="--to")
    except ConfigError as e:  # merge has no --overwrite: say what --to may be instead
        e.suggestions = [s for s in e.suggestions if "--overwrite" not in s]
        e.suggestions.append("--to may also name the output of an earlier `tunepipe merge`, which it replaces")
        if target and path != default:
            e.suggestions.append(f"or leave --to out: {default}")
        raise
