"""SharedBase: a base model read from disk once, and each task's model built around its weights in memory.

MultiAdapterManager needs one model per head group (a NER head, a sentiment head, a QA head: ``AutoModelFor<Task>``
classes with heads of different shapes), all on one backbone. Loading the base once per group read the weights from
disk each time and built a backbone per group before dropping all but one. Here the base is loaded once, as it was
saved (its own architecture, with its own head when it has one, e.g. a fine-tuned model used as the base), and moved
and cast once. Each group's model is then built with ``from_pretrained(None, config=..., state_dict=...)`` over the
base's in-memory tensors: transformers maps the keys (``bert.`` prefixes), shares the tensors instead of copying
them, initialises what the base does not have (a new head, the adapter brings its trained copy) and reports sizes
that differ. The group's backbone module is then replaced by the one shared module, so peft injects every group's
adapter layers into the same backbone, and no group holds a backbone of its own. One exception: a checkpoint whose
saved class leaves backbone weights on disk unused (bert-base-uncased is saved as BertForMaskedLM, without its
pooler) is read again for a task class that needs them, as before, rather than run with a newly initialised pooler.

A base saved quantized (bitsandbytes) is refused: its packed weights cannot be rebuilt into other task classes. Adapters
trained on a quantized base (QLoRA) run on the full-precision base, as after merging.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any

from ..errors import ConfigError, ErrorHandler
from ..modeling.quantization import QuantizationManager
from .load_policy import remote_code
from .model_loading import place

log = logging.getLogger("tunepipe")


class SharedBase:
    """The base model's weights, loaded once (``loads`` counts reads from disk), and the models built on them."""

    def __init__(self, path: str, device: str, dtype: Any = None, trust_remote_code: bool = False):
        self.path = path
        self.device = device
        self.dtype = dtype
        self.trust_remote_code = bool(trust_remote_code)
        self.loads = 0
        self.model = None  # the base as saved, moved and cast; never wrapped by peft
        self.backbone = None  # the module every group's model uses as its backbone
        self._state: dict[str, Any] | None = None  # the base's tensors as loaded (views, no copies)
        self._dropped: set[str] = set()  # weights in the checkpoint that the loaded base left out

    # ---- the one load --------------------------------------------------------------------------------------
    def load(self):
        """Read the base from disk (once) and return it."""
        if self.model is not None:
            return self.model
        import transformers

        trust = remote_code(self.trust_remote_code)
        with ErrorHandler.guard(f"loading the base model {self.path}"), _quiet():
            config = transformers.AutoConfig.from_pretrained(self.path, **trust)
            model, info = _saved_class(config).from_pretrained(self.path, output_loading_info=True, **trust)
        self.loads += 1
        # weights on disk that the saved class does not use (bert-base-uncased: the pooler under BertForMaskedLM)
        self._dropped = set(info.get("unexpected_keys") or ())
        if QuantizationManager.is_quantized(model):
            kind = QuantizationManager.quantization_type(model)
            del model
            raise ConfigError(f"The base model {self.path} is saved quantized ({kind}); adapters of several tasks "
                              "share a full-precision base", field="base_model",
                              suggestions=["serve the base model saved in full precision (QLoRA adapters run on it "
                                           "as after merging)", "or load one adapter alone on its quantized base: "
                                           "InferencePipeLine(checkpoint=<adapter dir>)"])
        self.model = place(model, self.device, self.dtype).eval()
        self._state = self.model.state_dict()  # taken before peft injects adapter layers into the backbone
        prefix = getattr(self.model, "base_model_prefix", "")
        self.backbone = getattr(self.model, prefix, None) if prefix else None
        if self.backbone is None:
            self.backbone = self.model  # the bare backbone (AutoModel), or a model without a separate one
        log.info("loaded the base model %s (%s) once for all adapters", self.path, type(self.model).__name__)
        return self.model

    # ---- the models of the groups --------------------------------------------------------------------------
    def build(self, auto_model_class: str, model_kwargs: dict[str, Any]):
        """An ``auto_model_class`` model with the head ``model_kwargs`` describe, on the shared backbone, placed."""
        import torch
        import transformers

        self.load()
        base_config = self.model.config
        auto_cls = getattr(transformers, auto_model_class)
        with ErrorHandler.guard(f"building {auto_model_class} on the base model {self.path}"), _quiet():
            # the base's config with the head's settings, as from_pretrained(base, **model_kwargs) would read it
            config, unused = type(base_config).from_dict(base_config.to_dict(), return_unused_kwargs=True,
                                                         **model_kwargs)
            with torch.device("meta"):  # only the class: nothing allocated
                cls = type(auto_cls.from_config(config, **remote_code(self.trust_remote_code)))
            kwargs = {"ignore_mismatched_sizes": True} if "num_labels" in model_kwargs else {}
            dtype = next(self.model.parameters()).dtype  # the base's: its tensors are shared, not cast copies
            model, info = cls.from_pretrained(None, config=config, state_dict=self._state, dtype=dtype,
                                              output_loading_info=True, **kwargs, **unused)
            missing = self._left_on_disk(model, info.get("missing_keys") or ())
            if missing:  # on disk, but not in the loaded base: read as before, for this class
                log.info("%s needs %s from %s: loading it from disk", auto_model_class, missing[0], self.path)
                model = auto_cls.from_pretrained(self.path, **model_kwargs, **kwargs,
                                                 **remote_code(self.trust_remote_code))
                self.loads += 1
        self._share_backbone(model)
        return place(model, self.device, self.dtype).eval()

    def _left_on_disk(self, model, missing) -> list[str]:
        """The backbone weights ``model`` lacks that the checkpoint holds and the shared backbone has not got."""
        prefix = getattr(model, "base_model_prefix", "")
        out = []
        for key in missing:
            inner = key[len(prefix) + 1:] if prefix and key.startswith(prefix + ".") else None
            if inner and getattr(self.backbone, inner.split(".")[0], None) is None and any(
                    u == inner or u.endswith("." + inner) for u in self._dropped):
                out.append(key)
        return out

    def _share_backbone(self, model) -> None:
        prefix = getattr(model, "base_model_prefix", "")
        backbone = getattr(model, prefix, None) if prefix else None
        if backbone is None or backbone is model:
            raise ConfigError(f"{type(model).__name__} has no separate backbone to share between adapters",
                              suggestions=["load each adapter alone with InferencePipeLine(checkpoint=<adapter>)"])
        if type(backbone) is not type(self.backbone):
            raise ConfigError(f"Backbones differ ({type(backbone).__name__} vs {type(self.backbone).__name__})",
                              suggestions=["register adapters of one base model per manager"])
        for child_name, child in backbone.named_children():  # e.g. a pooler the base's own model left out
            if getattr(self.backbone, child_name, None) is None:
                setattr(self.backbone, child_name, place(child, self.device, self.dtype))
        setattr(model, prefix, self.backbone)
        if hasattr(model, "tie_weights"):
            model.tie_weights()


def _saved_class(config):
    """The transformers class the base was saved as (``architectures``), so its own head is kept; else AutoModel.
    Only a class of transformers itself for this config: a folder's metadata never selects remote code."""
    import transformers
    from transformers import PreTrainedModel
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names and isinstance(names[0], str) else None
    if isinstance(cls, type) and issubclass(cls, PreTrainedModel) and cls.config_class is type(config):
        return cls
    return transformers.AutoModel


@contextlib.contextmanager
def _quiet():
    """No load report (the "newly initialised head": the adapter brings its own) and no progress bar."""
    import transformers
    from transformers.utils import logging as hf_logging
    verbosity, bar = transformers.logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
