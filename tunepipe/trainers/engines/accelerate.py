"""Accelerate engine: ``accelerate.Accelerator`` does placement, DDP/DeepSpeed/FSDP wrapping, autocast and fp16
scaling. Processes come from ``accelerate launch`` or ``torchrun``; accumulation stays the loop's (the Accelerator
runs with ``gradient_accumulation_steps=1``)."""
from __future__ import annotations

import contextlib

from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import send_to_device

from ...errors import TrainingError
from ..distributed import accelerator_kwargs
from ..settings import has_gpu
from .base import Engine


def mixed_precision(args) -> str:
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "no"


def refuse_sharding(distributed_type) -> None:
    """FSDP / DeepSpeed switched on by `accelerate launch` (its config file or ACCELERATE_USE_* variables), which
    the specs check cannot see: the loop would save one rank's shard as the whole model (docs/backends.md)."""
    kind = str(getattr(distributed_type, "value", distributed_type)).upper()
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise TrainingError(f"accelerate launched this run with {kind}, which backend: accelerate cannot save yet "
                            "(its checkpoints and final model would hold one rank's shard)", field="backend",
                            suggestions=["use backend: hf with the same launcher (transformers' Trainer saves "
                                         "sharded state)", "or launch with plain DDP (`accelerate launch "
                                                               "--multi_gpu`, no FSDP/DeepSpeed config)"])


class AccelerateEngine(Engine):
    name = "accelerate"

    def __init__(self, args, specs):
        # Like TrainingArguments does: a previous Accelerator in this process (another run, a test) must not pin
        # its mixed-precision setting on this one.
        AcceleratorState._reset_state(reset_partial_state=False)
        # cpu=True also without a GPU: Accelerate only recognises a CPU multi-process launch (MULTI_CPU, gloo)
        # when told it runs on CPU; otherwise each launched process would train alone on the whole data.
        self.accelerator = Accelerator(mixed_precision=mixed_precision(args), cpu=bool(args.use_cpu) or not has_gpu(),
                                       gradient_accumulation_steps=1, **accelerator_kwargs(specs.distributed))
        refuse_sharding(self.accelerator.distributed_type)

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def is_local_main_process(self) -> bool:
        return self.accelerator.is_local_main_process

    @property
    def device(self):
        return self.accelerator.device

    @property
    def scaler(self):
        return self.accelerator.scaler

    def setup(self, model, optimizer):
        return self.accelerator.prepare(model, optimizer)

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    def to_device(self, batch):
        return send_to_device(batch, self.accelerator.device)

    def autocast(self):
        return self.accelerator.autocast()

    def backward(self, loss) -> None:
        self.accelerator.backward(loss)

    def no_sync(self, model, skip: bool):
        return self.accelerator.no_sync(model) if skip else contextlib.nullcontext()

    def clip_grad_norm(self, model, optimizer, max_norm: float):
        return self.accelerator.clip_grad_norm_(model.parameters(), max_norm)

    def optimizer_step(self, optimizer) -> bool:
        optimizer.step()
        return not self.accelerator.optimizer_step_was_skipped

    def reduce(self, tensor, op: str = "mean") -> float:
        gathered = self.accelerator.gather(tensor.reshape(1).to(self.device))  # as the Trainer's nested_gather
        return float(getattr(gathered, op)() if op != "max" else gathered.max())

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()
