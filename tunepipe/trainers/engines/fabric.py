"""Lightning engines on ``lightning.Fabric``: Fabric launches the processes (``distributed.devices`` /
``num_nodes``; re-running the command for the extra ranks, SLURM and TorchElastic through its cluster
environments), applies the strategy (DDP, FSDP, DeepSpeed), places the model and does mixed precision
(``bf16-mixed`` / ``16-mixed``).

Combined mode (``lightning+accelerate``) is :class:`FabricAccelerateEngine`: Fabric still launches, applies the
strategy and places the model; an ``accelerate.Accelerator`` created inside each launched process places every
batch (``send_to_device``), autocasts (``accelerator.autocast()``), runs backward (``accelerator.backward``) and,
for fp16, scales gradients (unscale before clipping, ``scaler.step`` / ``scaler.update``).
"""
from __future__ import annotations

import contextlib
import os

from accelerate import Accelerator
from accelerate.state import AcceleratorState
from lightning.fabric import Fabric
from lightning.fabric.strategies import Strategy
from lightning.fabric.wrappers import _FabricModule

from ...errors import TrainingError
from ...modeling.quantization import QuantizationManager
from ..distributed import lightning_devices, lightning_strategy
from ..settings import has_gpu
from .accelerate import AccelerateEngine, mixed_precision
from .base import Engine


class FabricEngine(Engine):
    name = "lightning"
    def __init__(self, args, specs):
        dist = specs.distributed
        self.use_cpu, self.num_nodes = bool(args.use_cpu) or not has_gpu(), dist.num_nodes
        accelerator = dist.accelerator if dist.accelerator != "auto" else ("cpu" if self.use_cpu else "auto")
        self.fabric = Fabric(accelerator=accelerator, devices=lightning_devices(dist), num_nodes=dist.num_nodes,
                             strategy=lightning_strategy(dist), precision=self._precision(args))
        self._launched = False

    def _precision(self, args) -> str:
        return {"bf16": "bf16-mixed", "fp16": "16-mixed", "no": "32-true"}[mixed_precision(args)]

    def launch(self) -> None:
        if not self._launched:
            self.fabric.launch()  # ddp: re-runs this command for ranks 1..N-1, then joins the process group
            self._launched = True

    @property
    def world_size(self) -> int:
        return self.fabric.world_size

    @property
    def rank(self) -> int:
        return self.fabric.global_rank

    @property
    def is_local_main_process(self) -> bool:
        return self.fabric.local_rank == 0

    @property
    def device(self):
        return self.fabric.device

    @property
    def scaler(self):
        return getattr(self.fabric.strategy.precision, "scaler", None)

    def setup(self, model, optimizer):
        # quantized (bitsandbytes) weights sit where from_pretrained put them and cannot be moved
        return self.fabric.setup(model, optimizer, move_to_device=not QuantizationManager.is_quantized(model))

    def unwrap(self, model):
        return model._original_module if isinstance(model, _FabricModule) else model

    def to_device(self, batch):
        return self.fabric.to_device(batch)

    def autocast(self):
        return self.fabric.autocast()

    def backward(self, loss) -> None:
        self.fabric.backward(loss)

    def no_sync(self, model, skip: bool):
        return self.fabric.no_backward_sync(model, enabled=True) if skip and self.world_size > 1 \
            else contextlib.nullcontext()

    def clip_grad_norm(self, model, optimizer, max_norm: float):
        """Single-device and DDP: the norm over the model's parameters in the model's order, as on every other
        backend. Fabric's own clipping sums them in the optimizer's order (weight-decay group first), which rounds
        the total norm differently, so the losses drift from the other backends' step by step. Strategies that
        clip their own shards (FSDP, DeepSpeed) keep Fabric's."""
        strategy = self.fabric.strategy
        sharded = type(strategy).clip_gradients_norm is not Strategy.clip_gradients_norm
        # fp16: unscale first; Fabric's sharded clipping unscales through its own precision plugin, not through
        # the Accelerator's scaler (combined mode)
        if self.scaler is not None and not (sharded and self.scaler is getattr(strategy.precision, "scaler", None)):
            self.scaler.unscale_(self.raw_optimizer(optimizer))
        if sharded:
            return self.fabric.clip_gradients(model, optimizer, max_norm=max_norm, error_if_nonfinite=False)
        return super().clip_grad_norm(model, optimizer, max_norm)

    def reduce(self, tensor, op: str = "mean") -> float:
        if self.world_size <= 1:
            return float(tensor)
        return float(self.fabric.all_reduce(tensor.reshape(1).to(self.device).float(), reduce_op=op))

    def barrier(self) -> None:
        if self.world_size > 1:
            self.fabric.barrier()


class FabricAccelerateEngine(FabricEngine):
    """lightning+accelerate: Fabric launches, shards the strategy and places the model; Accelerate places batches,
    autocasts, runs backward and scales fp16 gradients."""

    name = "lightning+accelerate"

    def __init__(self, args, specs):
        self.mixed_precision = mixed_precision(args)
        super().__init__(args, specs)
        self.accelerator = None

    def _precision(self, args) -> str:
        return "32-true"  # Fabric leaves the numerics to the Accelerator

    def launch(self) -> None:
        """The Accelerator is created inside each launched process, after Fabric set up the process group, with
        Fabric's ranks in the environment: Accelerate reads (and on CPU rewrites) RANK / WORLD_SIZE / LOCAL_RANK /
        LOCAL_WORLD_SIZE."""
        if self._launched:
            return
        super().launch()
        fabric = self.fabric
        if fabric.world_size > 1:
            os.environ.update(RANK=str(fabric.global_rank), WORLD_SIZE=str(fabric.world_size),
                              LOCAL_RANK=str(fabric.local_rank),
                              LOCAL_WORLD_SIZE=str(fabric.world_size // max(self.num_nodes, 1)))
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(mixed_precision=self.mixed_precision, cpu=self.use_cpu,
                                       gradient_accumulation_steps=1)
        acc_device, root = self.accelerator.device, fabric.device
        if acc_device.type != root.type or (acc_device.index or 0) != (root.index or 0):
            raise TrainingError(f"Accelerate places batches on {acc_device} but Lightning put the model on {root}",
                                suggestions=[("set distributed.accelerator/devices to match the Accelerator's "
                                              "device (CUDA_VISIBLE_DEVICES, LOCAL_RANK)")])

    @property
    def scaler(self):
        return self.accelerator.scaler if self.accelerator is not None else None

    # the Accelerator places batches, autocasts and runs backward, as on the Accelerate engine
    to_device = AccelerateEngine.to_device
    autocast = AccelerateEngine.autocast
    backward = AccelerateEngine.backward

    def optimizer_step(self, optimizer) -> bool:
        if self.scaler is None:
            optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(self.raw_optimizer(optimizer))
        self.scaler.update()
        return self.scaler.get_scale() >= scale
