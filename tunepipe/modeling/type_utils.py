"""Precision and dtypes: which mixed precision a run uses on this hardware (bf16 where it is fast, fp16 only on
CUDA); TypeUtils: what a model holds (parameters per dtype and device), safe dtype conversion, and a memory estimate
for model + method + batch that warns before an out-of-memory crash and says what would fit.

The activation estimate is the per-layer formula of Korthikanti et al. (2022, "Reducing Activation Recomputation
in Large Transformer Models"), an upper bound for padded batches of ``max_length``; its two constants below were
calibrated against the tensors a training step saves for backward (docs/validation.md, "The memory estimate").
"""
from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, CudaError
from .peft_names import peft_enabled

log = logging.getLogger("tunepipe")
GB = 1024 ** 3
# Resident memory of a Python process with torch + transformers + datasets + peft imported (measured on CPU, ~0.6
# GB), or a CUDA context on a GPU.
RUNTIME_OVERHEAD = {"cpu": int(0.6 * GB), "cuda": int(0.5 * GB)}
MIXED_PRECISION_ACTIVATION_BYTES = 3.5  # bytes per activation under bf16/fp16 autocast (calibrated)
LORA_DROPOUT_ACTIVATION_FACTOR = 1.33  # LoRA dropout > 0 keeps a copy of each adapted input (calibrated)
_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "fp16": "float16", "half": "float16"}


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run faster than fp32 there (docs/backends.md, "Precision")."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def bf16_supported() -> bool:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_fast_bf16()


def resolve_precision(training) -> tuple[bool, bool]:
    """(bf16, fp16) to use. 'auto' = bf16 where the device runs it fast; fp16 only on CUDA."""
    import torch
    if training.fp16:
        if not torch.cuda.is_available():
            raise CudaError("fp16 mixed precision needs a CUDA GPU", field="training.fp16",
                            suggestions=["remove fp16 (bf16 is used automatically where the CPU supports it)"])
        if training.bf16 is True:
            raise ConfigError("fp16 and bf16 are both on", field="training.bf16", suggestions=["choose one"])
        return False, True
    if training.bf16 == "auto":
        return bf16_supported(), False
    if training.bf16 and not torch.cuda.is_available() and not cpu_has_fast_bf16():
        warnings.warn("bf16 on a CPU without AVX512-BF16/AMX is emulated and slow", stacklevel=2)
    return bool(training.bf16), False


def parameter_count(p) -> int:
    """Parameters a tensor holds: a 4-bit packed weight (uint8, two values a byte) counts its original shape."""
    state = getattr(p, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return int(state.shape.numel())
    return int(p.numel())


@dataclass
class MemoryEstimate:
    """Bytes per component of one training step's peak, and the memory available on the device."""
    weights: int
    gradients: int
    optimizer: int
    activations: int
    overhead: int
    device: str = "cpu"
    available: int | None = None
    suggestions: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead

    def fits(self, margin: float = 0.9) -> bool:
        return self.available is None or self.total <= margin * self.available

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}

    def render(self) -> str:
        parts = ", ".join(f"{k} {getattr(self, k) / GB:.2f}" for k in
                          ("weights", "gradients", "optimizer", "activations", "overhead"))
        avail = f" of {self.available / GB:.1f} GB available" if self.available else ""
        return f"~{self.total / GB:.2f} GB on {self.device}{avail} ({parts} GB)"


class TypeUtils:
    """Dtype and memory helpers. All static: ``TypeUtils.parameter_report(model)``."""

    @staticmethod
    def dtype(name_or_dtype):
        import torch
        if isinstance(name_or_dtype, torch.dtype):
            return name_or_dtype
        key = _DTYPE_NAMES.get(str(name_or_dtype).replace("torch.", "").lower())
        if key is None:
            raise ConfigError(f"Unknown dtype '{name_or_dtype}'", suggestions=["use float32, bfloat16 or float16"])
        return getattr(torch, key)

    @staticmethod
    def parameter_report(model) -> dict[str, Any]:
        """Parameters (count, trainable, bytes) per dtype and device, plus totals."""
        by: dict[str, dict[str, dict[str, int]]] = {}
        total = trainable = nbytes = 0
        for p in model.parameters():
            n, b = parameter_count(p), p.numel() * p.element_size()
            row = by.setdefault(str(p.dtype).replace("torch.", ""), {}).setdefault(
                str(p.device), {"parameters": 0, "trainable": 0, "bytes": 0})
            row["parameters"] += n
            row["bytes"] += b
            total += n
            nbytes += b
            if p.requires_grad:
                row["trainable"] += n
                trainable += n
        return {"total": total, "trainable": trainable, "bytes": nbytes, "by_dtype": by}

    @staticmethod
    def format_report(report: dict[str, Any]) -> str:
        lines = [f"{report['total']:,} parameters, {report['trainable']:,} trainable "
                 f"({100 * report['trainable'] / max(report['total'], 1):.2f}%), {report['bytes'] / 2**20:.1f} MiB"]
        for dtype, devices in report["by_dtype"].items():
            for device, row in devices.items():
                lines.append(f"  {dtype:<9} {device:<7} {row['parameters']:>14,} params "
                             f"{row['trainable']:>12,} trainable {row['bytes'] / 2**20:>9.1f} MiB")
        return "\n".join(lines)

    # ---- conversion ------------------------------------------------------------------------------------------
    @staticmethod
    def device_supports(dtype, device: str = "cpu") -> tuple[bool, str | None]:
        """(supported, note). A note on a supported pair says why it may be slow."""
        import torch

        dtype, kind = TypeUtils.dtype(dtype), str(device).split(":")[0]
        if dtype == torch.float32:
            return True, None
        if kind == "cuda":
            if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
                return False, "this GPU has no bf16 support (needs Ampere or newer)"
            return True, None
        if kind == "cpu":
            if dtype == torch.float16:
                return False, "fp16 on CPU has slow or missing kernels and no mixed-precision training"
            return True, None if cpu_has_fast_bf16() else "bf16 is emulated on this CPU (no AVX512-BF16/AMX): slow"
        return True, None

    @staticmethod
    def convert(model, dtype, device: str | None = None):
        """Cast (and optionally move) a full-precision model, refusing pairs the device cannot run."""
        dtype = TypeUtils.dtype(dtype)
        device = device or next(model.parameters()).device.type
        if is_quantized(model):
            raise ConfigError(f"Cannot cast a quantized model ({quantization_type(model)}) "
                              f"to {dtype}", suggestions=["reload the model in full precision, then convert"])
        ok, note = TypeUtils.device_supports(dtype, device)
        if not ok:
            err = CudaError if str(device).startswith("cuda") else ConfigError
            raise err(f"{dtype} on {device}: {note}",
                      suggestions=["use bfloat16 on CPU" if str(device).startswith("cpu") else "use float16 or float32"])
        if note:
            warnings.warn(note, stacklevel=2)
        return model.to(device=device, dtype=dtype)

    @staticmethod
    @contextlib.contextmanager
    def plain_forward(model):
        """Run ``model`` without the mixed-precision forward wrapper accelerate leaves on it after Trainer
        training, so in-memory predictions equal those of the saved model reloaded in full precision."""
        original, patched = model.__dict__.get("_original_forward"), model.__dict__.get("forward")
        if original is None or patched is None:
            yield model
            return
        model.forward = original
        try:
            yield model
        finally:
            model.forward = patched

    # ---- memory ----------------------------------------------------------------------------------------------
    @staticmethod
    def available_memory(device: str = "cpu") -> int | None:
        try:
            if str(device).startswith("cuda"):
                import torch
                return int(torch.cuda.mem_get_info()[0])
            import psutil
            return int(psutil.virtual_memory().available)
        except Exception:  # noqa: BLE001 - an estimate must never stop training
            return None

    @staticmethod
    def estimate_memory(model, batch_size: int, seq_len: int, gradient_checkpointing: bool = False,
                        activation_bytes: float = 4, device: str | None = None, optimizer_states: int = 2,
                        trainable: int | None = None, weight_bytes: int | None = None) -> MemoryEstimate:
        """Peak bytes of one training step: weights + fp32 gradients and AdamW states of the trainable
        parameters + activations for ``batch_size x seq_len`` + runtime overhead."""
        device = device or next(model.parameters()).device.type
        if weight_bytes is None:
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
                b.numel() * b.element_size() for b in model.buffers())
        if trainable is None:
            trainable = sum(parameter_count(p) for p in model.parameters() if p.requires_grad)
        activations = _activation_bytes(model.config, batch_size, seq_len, gradient_checkpointing, activation_bytes)
        if _lora_dropout(model) > 0:
            activations *= LORA_DROPOUT_ACTIVATION_FACTOR
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if out is not None and getattr(out, "out_features", 0):
            activations += 3 * batch_size * seq_len * out.out_features * 4  # logits, softmax, gradient
        return MemoryEstimate(weights=int(weight_bytes), gradients=4 * trainable,
                              optimizer=4 * optimizer_states * trainable, activations=int(activations),
                              overhead=RUNTIME_OVERHEAD.get(str(device).split(":")[0], RUNTIME_OVERHEAD["cpu"]),
                              device=str(device), available=TypeUtils.available_memory(device))

    @staticmethod
    def check_memory(model, specs, seq_len: int | None = None) -> MemoryEstimate:
        """Estimate the training step of ``specs`` on ``model``; warn with what would fit when it does not."""
        t = specs.training
        bf16, fp16 = resolve_precision(t)
        seq = seq_len or specs.data.max_length or min(getattr(model.config, "max_position_embeddings", 512), 512)
        kw = {"gradient_checkpointing": t.gradient_checkpointing,
              "activation_bytes": MIXED_PRECISION_ACTIVATION_BYTES if bf16 or fp16 else 4}
        est = TypeUtils.estimate_memory(model, t.per_device_train_batch_size, seq, **kw)
        if est.fits():
            return est
        est.suggestions = _alternatives(model, specs, seq, est, kw)
        message = (f"Training may run out of memory: estimated {est.render()} for batch "
                   f"{t.per_device_train_batch_size} x {seq} tokens")
        log.warning("%s; to fit: %s", message, "; ".join(est.suggestions))
        warnings.warn(message + "\n  -> " + "\n  -> ".join(est.suggestions), ResourceWarning, stacklevel=2)
        return est


def _layers_hidden_heads(config) -> tuple[int, int, int]:
    layers = getattr(config, "num_hidden_layers", None) or 12
    if getattr(config, "is_encoder_decoder", False):
        layers += getattr(config, "num_decoder_layers", None) or getattr(config, "decoder_layers", 0) or layers
    hidden = getattr(config, "hidden_size", None) or 768
    heads = getattr(config, "num_attention_heads", None) or max(hidden // 64, 1)
    return int(layers), int(hidden), int(heads)


def _lora_dropout(model) -> float:
    configs = getattr(model, "peft_config", None) or {}
    return max((getattr(c, "lora_dropout", 0.0) or 0.0 for c in configs.values()), default=0.0)


def _activation_bytes(config, b: int, s: int, checkpointing: bool, act_bytes: float) -> float:
    layers, h, a = _layers_hidden_heads(config)
    per_layer = s * b * h * (34 + 5 * a * s / h) * act_bytes / 2
    if checkpointing:
        return layers * s * b * h * act_bytes + per_layer
    return layers * per_layer


def _alternatives(model, specs, seq: int, est: MemoryEstimate, kw: dict[str, Any]) -> list[str]:
    """What would fit: the cheapest changes first, each with its estimate."""
    t, out = specs.training, []
    n = sum(parameter_count(p) for p in model.parameters())
    if not t.gradient_checkpointing:
        e = TypeUtils.estimate_memory(model, t.per_device_train_batch_size, seq, **{**kw, "gradient_checkpointing": True})
        out.append(f"training.gradient_checkpointing: true (~{e.total / GB:.1f} GB)")
    if not peft_enabled(specs):
        e = TypeUtils.estimate_memory(model, t.per_device_train_batch_size, seq, trainable=n // 100, **kw)
        out.append(f"peft: {{method: lora}} (~{e.total / GB:.1f} GB)")
    if specs.quantization.load_in_4bit is False and specs.peft.method != "qlora":
        e = TypeUtils.estimate_memory(model, t.per_device_train_batch_size, seq, trainable=n // 100,
                                      weight_bytes=est.weights // 7, **kw)
        out.append(f"peft: {{method: qlora}} (4-bit base, ~{e.total / GB:.1f} GB)")
    for b in (t.per_device_train_batch_size // 2, t.per_device_train_batch_size // 4, 1):
        if b >= 1:
            e = TypeUtils.estimate_memory(model, b, seq, **kw)
            if e.fits():
                acc = t.gradient_accumulation_steps * t.per_device_train_batch_size // b
                out.append(f"training.per_device_train_batch_size: {b} with gradient_accumulation_steps: {acc} "
                           f"(~{e.total / GB:.1f} GB)")
                break
    out.append("a smaller data.max_length")
    return out


def is_quantized(model) -> bool:
    return quantization_type(model) is not None


def quantization_type(model) -> str | None:
    """'bnb_4bit_nf4' | 'bnb_4bit_fp4' | 'bnb_8bit' | 'dynamic_int8' | 'torchao' | None (also through PEFT)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "is_loaded_in_4bit", False):
        qc = getattr(base.config, "quantization_config", None)
        qt = qc.get("bnb_4bit_quant_type") if isinstance(qc, dict) else getattr(qc, "bnb_4bit_quant_type", None)
        return f"bnb_4bit_{qt or 'nf4'}"
    if getattr(base, "is_loaded_in_8bit", False):
        return "bnb_8bit"
    for module in base.modules():
        name = type(module).__module__
        if name.startswith("torch.ao.nn.quantized") or name.startswith("torch.nn.quantized"):
            return "dynamic_int8"
    for p in base.parameters():
        if type(p).__module__.startswith("torchao") or type(p.data).__module__.startswith("torchao"):
            return "torchao"
    return None
