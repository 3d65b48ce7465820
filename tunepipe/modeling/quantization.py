"""QuantizationManager: bitsandbytes 4/8-bit loading for QLoRA, early refusal of what the device cannot do, and
post-training quantization for inference.

What bitsandbytes 0.50.2 does on a CPU (checked on this project's machines; GPU paths follow the library's docs):
- 4-bit (nf4, fp4, with or without double quantization) + LoRA / DoRA / IA3 / prompt tuning train and reload.
- 8-bit + LoRA / IA3 / prompt tuning train and reload; 8-bit + DoRA breaks at the first no-grad forward after a
  training step, so it is refused on CPU.
- The task head must stay out of quantization (``get_peft_model`` cannot make integer weights trainable, and
  4-bit layers need out_features divisible by 32): the head's modules are always in the skip list.
- On CPUs with AVX512-BF16, a no-grad forward repacks 4-bit weights into an inference-only layout after which
  training fails; :meth:`QuantizationManager.fix_cpu_layers` turns that repacking off, and reloads do the same so
  a reloaded adapter computes exactly what the trained one did.
- The compute dtype follows the input on CPU when the input is fp32/bf16 (bitsandbytes' own rule).
"""
from __future__ import annotations

import copy
import importlib.util
import io
import logging
import time
import warnings
from typing import Any

from ..errors import ConfigError, CudaError, DependencyError
from .model_structure import head_modules, model_skeleton
from .peft_names import peft_enabled
from .peft_names import peft_method as method_of
from .type_utils import TypeUtils, is_quantized, quantization_type

INFERENCE_METHODS = ("bf16", "dynamic_int8", "torchao_int8_weight_only")
_CAST_WARNING = "MatMul8bitLt: inputs will be cast"


class _DropCastWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _CAST_WARNING not in record.getMessage()


def _silence_int8_cast_warning() -> None:
    """bitsandbytes logs the same 8-bit cast warning at every matmul; keep it out of the training log."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropCastWarning) for f in logger.filters):
        logger.addFilter(_DropCastWarning())


def training_device(specs=None) -> str:
    """The device type training will run on: cuda | xpu | mps | cpu."""
    import torch
    if specs is not None and getattr(specs.training, "use_cpu", False):
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class QuantizationManager:
    """Quantized loading (bitsandbytes) for one run, built from ``specs.quantization`` and ``specs.peft``.

    ``peft.method: qlora`` implies 4-bit NF4 when the quantization section does not choose otherwise.
    """

    def __init__(self, specs=None, *, bits: int | None = None, quant_type: str = "nf4", double_quant: bool = True,
                 compute_dtype: str = "bfloat16", skip_modules: list[str] | None = None, peft_method: str = "none"):
        if specs is not None:
            q = specs.quantization
            peft_method = method_of(specs) if peft_enabled(specs) else "none"
            if q.load_in_4bit and q.load_in_8bit:
                raise ConfigError("quantization.load_in_4bit and load_in_8bit are both on", field="quantization",
                                  suggestions=["choose one: 4-bit (QLoRA) or 8-bit"])
            bits = 4 if q.load_in_4bit else 8 if q.load_in_8bit else (4 if peft_method == "qlora" else None)
            quant_type, double_quant, compute_dtype = q.quant_type, q.double_quant, q.compute_dtype
            skip_modules = q.skip_modules
        self.specs = specs
        self.bits = bits
        self.quant_type = quant_type
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        self.skip_modules = list(skip_modules or [])
        self.peft_method = peft_method

    @classmethod
    def from_info(cls, info: dict[str, Any] | None) -> "QuantizationManager":
        """Rebuild from the ``quantization`` record saved next to an adapter."""
        info = info or {}
        return cls(bits=info.get("bits"), quant_type=info.get("quant_type", "nf4"),
                   double_quant=info.get("double_quant", True), compute_dtype=info.get("compute_dtype", "bfloat16"),
                   skip_modules=info.get("skip_modules"))

    @property
    def enabled(self) -> bool:
        return self.bits is not None

    def describe(self) -> dict[str, Any] | None:
        if not self.enabled:
            return None
        return {"bits": self.bits, "quant_type": self.quant_type if self.bits == 4 else None,
                "double_quant": self.double_quant if self.bits == 4 else None,
                "compute_dtype": self.compute_dtype, "skip_modules": self.skip_modules}

    # ---- early checks --------------------------------------------------------------------------------------
    def check_supported(self, device: str | None = None) -> None:
        """Fail before any data or model is loaded when this device / method / library cannot do it."""
        if not self.enabled:
            return
        field = "quantization.load_in_8bit" if self.bits == 8 else "quantization.load_in_4bit"
        if self.peft_method == "none":
            raise ConfigError("A quantized base model cannot be fully fine-tuned: its weights are frozen integers",
                              field=field, suggestions=["add `peft: {method: lora}` to train LoRA on the quantized "
                                                        "base (QLoRA)", "or remove the quantization section"])
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise DependencyError("Quantized loading needs bitsandbytes", field=field,
                                  suggestions=["pip install 'tunepipe[quantization]' (bitsandbytes>=0.45)",
                                               "or remove the quantization section / use peft.method: lora"]) from None
        device = device or training_device(self.specs)
        if device == "mps":
            raise CudaError("bitsandbytes has no Apple MPS backend", field=field,
                            suggestions=["use peft: {method: lora} without quantization on MPS",
                                         "or train on CPU (training.use_cpu: true) or a CUDA GPU"])
        if device == "cpu" and self.bits == 8 and self.peft_method == "dora":
            raise ConfigError("DoRA on an 8-bit base fails on CPU with bitsandbytes (the 8-bit no-grad matmul "
                              "used by evaluation breaks after a training step)", field="peft.method",
                              suggestions=["use 4-bit (quantization.load_in_4bit: true) with DoRA",
                                           "or peft.method: lora on the 8-bit base"])

    # ---- loading -------------------------------------------------------------------------------------------
    def bnb_config(self, skip_modules: list[str] | None = None):
        import torch
        from transformers import BitsAndBytesConfig
        skip = sorted(set(self.skip_modules) | set(skip_modules or []))
        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip or None)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.quant_type,
                                  bnb_4bit_use_double_quant=self.double_quant,
                                  bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
                                  llm_int8_skip_modules=skip or None)

    def load_kwargs(self, auto_cls, path: str, **kwargs) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments: the bitsandbytes config with the task head (found on a meta-device
        skeleton of the model) kept in full precision; empty when quantization is off."""
        if not self.enabled:
            return {}
        from transformers import AutoConfig

        config_keys = ("revision", "trust_remote_code", "num_labels", "id2label", "label2id")
        config = AutoConfig.from_pretrained(path, **{k: v for k, v in kwargs.items() if k in config_keys})
        skeleton = model_skeleton(auto_cls, config)
        _silence_int8_cast_warning()
        return {"quantization_config": self.bnb_config(head_modules(skeleton) + _output_embedding_names(skeleton))}

    def load(self, auto_cls, path: str, **kwargs):
        """``auto_cls.from_pretrained(path, quantization_config=...)``, ready to train or to predict."""
        model = auto_cls.from_pretrained(path, **self.load_kwargs(auto_cls, path, **kwargs), **kwargs)
        self.fix_cpu_layers(model)
        return model

    @staticmethod
    def fix_cpu_layers(model) -> int:
        """Turn off the AVX512-BF16 inference-only repacking of 4-bit weights (see the module docstring)."""
        try:
            import bitsandbytes as bnb
        except ImportError:
            return 0
        n = 0
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
                n += 1
        return n

    @staticmethod
    def prepare_for_training(model, gradient_checkpointing: bool = False):
        """peft's ``prepare_model_for_kbit_training`` (freeze, fp32 norms); checkpointing is enabled separately,
        non-reentrant, by the caller."""
        from peft import prepare_model_for_kbit_training
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

    # ---- inspection ----------------------------------------------------------------------------------------
    is_quantized = staticmethod(is_quantized)
    quantization_type = staticmethod(quantization_type)

    @staticmethod
    def check_peft_compatible(model, method: str, device: str | None = None) -> None:
        """Raise a ConfigError when ``method`` cannot train on this (possibly quantized) model here."""
        qtype = QuantizationManager.quantization_type(model)
        if qtype is None:
            return
        if qtype in ("dynamic_int8", "torchao"):
            raise ConfigError(f"A model quantized for inference ({qtype}) cannot be trained",
                              field="peft.method", suggestions=["load the full-precision model to train"])
        if method == "none":
            raise ConfigError("A bitsandbytes-quantized model cannot be fully fine-tuned", field="peft.method",
                              suggestions=["use peft.method: lora (QLoRA)"])
        device = device or next(model.parameters()).device.type
        if device == "cpu" and qtype == "bnb_8bit" and method == "dora":
            raise ConfigError("DoRA on an 8-bit base is not supported on CPU by bitsandbytes", field="peft.method",
                              suggestions=["use 4-bit with DoRA, or LoRA on the 8-bit base"])

    # ---- post-training quantization for inference ----------------------------------------------------------
    @staticmethod
    def available_inference_methods() -> list[str]:
        import torch
        out = ["bf16"]
        if not torch.cuda.is_available():
            out.append("dynamic_int8")
        if importlib.util.find_spec("torchao") is not None:
            out.append("torchao_int8_weight_only")
        return out

    @staticmethod
    def quantize_for_inference(model, method: str):
        """A quantized copy of ``model`` for inference. bf16: a cast (device-checked); dynamic_int8: torch.ao
        dynamic quantization of Linear layers (CPU only); torchao_int8_weight_only: torchao, if installed."""
        import torch

        if method not in INFERENCE_METHODS:
            raise ConfigError(f"Unknown inference quantization '{method}'",
                              suggestions=[f"choose one of: {', '.join(INFERENCE_METHODS)}"])
        if QuantizationManager.is_quantized(model):
            raise ConfigError("The model is already quantized", suggestions=["start from the full-precision model"])
        if hasattr(model, "merge_and_unload") and not getattr(model.active_peft_config, "is_prompt_learning", False):
            model = copy.deepcopy(model).merge_and_unload()
        else:
            model = copy.deepcopy(model)
        model.eval()
        device = next(model.parameters()).device.type
        if method == "bf16":
            return TypeUtils.convert(model, "bfloat16")
        if method == "dynamic_int8":
            if device != "cpu":
                raise CudaError("torch dynamic int8 quantization runs on CPU only",
                                suggestions=["use bf16 on GPU, or move the model to CPU"])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        try:
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
        except ImportError:
            raise DependencyError("torchao is not installed", suggestions=["pip install torchao",
                                                                           "or use bf16 / dynamic_int8"]) from None
        quantize_(model, Int8WeightOnlyConfig())
        return model


def _output_embedding_names(model) -> list[str]:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None:
        return []
    return [name for name, module in model.named_modules() if module is out]


def serialized_size(model) -> int:
    """Bytes of ``torch.save(model.state_dict())`` — what a checkpoint of this model costs on disk."""
    import torch
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def measure_inference(model, batches: list[dict], repeats: int = 1) -> dict[str, float]:
    """Seconds and examples/s for ``repeats`` passes over pre-tokenized ``batches`` (CPU/GPU, no grad)."""
    import torch
    device = next(model.parameters()).device
    n = sum(len(b["input_ids"]) for b in batches) * repeats
    with torch.inference_mode():
        model(**{k: v.to(device) for k, v in batches[0].items()})  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            for b in batches:
                model(**{k: v.to(device) for k, v in b.items()})
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "examples_per_second": n / seconds}
