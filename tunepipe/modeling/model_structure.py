"""What a model is made of, read from its modules: a meta-device skeleton, the task head outside the pretrained
backbone, the linear layers (LoRA/QLoRA targets). Used by PEFT, quantization and `tunepipe check`."""
from __future__ import annotations

import re

from ..errors import ConfigError


def model_skeleton(auto_cls, config):
    """The model on the meta device: its module names, at no memory or time cost."""
    import torch
    with torch.device("meta"):
        return auto_cls.from_config(config)


def head_modules(model) -> list[str]:
    """Modules outside the pretrained backbone (the task head), minus weights tied to the embeddings.

    A head that contains tied weights (BERT's MLM head: transform + tied decoder) is split into its untied parts.
    """
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    if backbone is None or backbone is model:
        return []
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = {id(p) for p in model.get_input_embeddings().parameters()}
    if out_emb is not None:
        tied |= {id(p) for p in out_emb.parameters()}

    def visit(name: str, module) -> list[str]:
        params = list(module.parameters())
        if not params or module is out_emb:
            return []
        if not any(id(p) in tied for p in params):
            return [name]
        return [n for child_name, child in module.named_children() for n in visit(f"{name}.{child_name}", child)]

    return [n for name, child in model.named_children() if name != prefix for n in visit(name, child)]


def linear_module_names(model, exclude: list[str] = ()) -> list[str]:
    """Full names of the Linear (and GPT-2 Conv1D) layers outside ``exclude`` and the output embeddings."""
    import torch
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if not (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D") or module is out_emb:
            continue
        if any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        names.append(name)
    return names


def backbone_target_regex(model) -> str:
    """All linear layers of the backbone as one regex (layer numbers generalised): the QLoRA recipe's targets."""
    names = linear_module_names(model, head_modules(model))
    if not names:
        raise ConfigError(f"{type(model).__name__} has no linear layers to put LoRA on", field="peft.target_modules",
                          suggestions=["set peft.target_modules to module names of this model"])
    patterns = {r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in n.split(".")) for n in names}
    return "^(?:" + "|".join(sorted(patterns)) + ")$"
