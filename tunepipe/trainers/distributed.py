"""Multi-process training on the engines' own launchers: the ``distributed`` spec section translated into each
engine's native settings, and checks for launches that silently do something else than asked.

- HF backend: ``torchrun --nproc_per_node N -m tunepipe train specs.yaml`` (or ``accelerate launch``);
  DeepSpeed / FSDP through TrainingArguments ``deepspeed`` / ``fsdp`` + ``fsdp_config``.
- Accelerate backend: ``accelerate launch --multi_gpu --num_processes N -m tunepipe train specs.yaml`` (gives
  MULTI_CPU / gloo on a machine without GPUs) or torchrun; DeepSpeed / FSDP through Accelerate's plugins.
- Lightning backends: ``tunepipe train`` alone; Lightning starts the processes from ``distributed.devices`` /
  ``num_nodes`` / ``strategy`` (Fabric's DDPStrategy, FSDPStrategy, DeepSpeedStrategy).
"""
from __future__ import annotations

import os
import warnings
from typing import Any

from ..errors import ConfigError

LAUNCHER_BACKENDS = ("hf", "accelerate")


def world_size_from_env() -> int:
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def accelerate_cpu_launch_trap() -> bool:
    """``accelerate launch --cpu --num_processes N`` (N > 1) without MPI starts ONE process: the simple launcher
    sets MASTER_ADDR for N > 1 and ACCELERATE_USE_CPU, but no WORLD_SIZE / MPI rank variables."""
    env = os.environ
    return (env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1") and "MASTER_ADDR" in env
            and world_size_from_env() == 1 and "RANK" not in env and "LOCAL_RANK" not in env)


def check_launch(backend: str, dist) -> None:
    """Warn when the way the job was started cannot give the processes the specs ask for."""
    if accelerate_cpu_launch_trap():
        warnings.warn("`accelerate launch --cpu --num_processes N` runs a single process here (multi-CPU needs "
                      "MPI / oneCCL). Use `accelerate launch --multi_gpu --num_processes N` (MULTI_CPU with gloo "
                      "on a machine without GPUs) or `torchrun --nproc_per_node N`.", stacklevel=2)
    devices = dist.devices
    asked = devices if isinstance(devices, int) else len(devices) if isinstance(devices, list) else None
    if backend in LAUNCHER_BACKENDS and asked and asked > 1 and world_size_from_env() == 1:
        warnings.warn(f"distributed.devices={asked} is read by the Lightning backends only; the {backend} backend "
                      "takes its processes from the launcher: `torchrun --nproc_per_node N -m tunepipe train ...` "
                      "or `accelerate launch --multi_gpu --num_processes N -m tunepipe train ...`", stacklevel=2)
    if dist.deepspeed is not None and dist.fsdp is not None:
        raise ConfigError("distributed.deepspeed and distributed.fsdp are both set", field="distributed",
                          suggestions=["choose one sharding engine"])


def hf_training_values(dist) -> dict[str, Any]:
    """TrainingArguments values for the HF backend."""
    values: dict[str, Any] = {"ddp_find_unused_parameters": dist.find_unused_parameters}
    if dist.process_group_backend:
        values["ddp_backend"] = dist.process_group_backend
    if dist.deepspeed is not None:
        values["deepspeed"] = dist.deepspeed
    if dist.fsdp is not None:
        config = dict(dist.fsdp)
        values["fsdp"] = config.pop("fsdp", "full_shard auto_wrap")
        values["fsdp_config"] = config
    return values


def accelerator_kwargs(dist) -> dict[str, Any]:
    """Accelerator(...) keyword arguments for the Accelerate backend."""
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs
    handlers: list[Any] = [DistributedDataParallelKwargs(find_unused_parameters=dist.find_unused_parameters)]
    if dist.process_group_backend:
        handlers.append(InitProcessGroupKwargs(backend=dist.process_group_backend))
    kwargs: dict[str, Any] = {"kwargs_handlers": handlers}
    if dist.deepspeed is not None:
        from accelerate.utils import DeepSpeedPlugin
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=dist.deepspeed)
    if dist.fsdp is not None:
        from accelerate.utils import FullyShardedDataParallelPlugin
        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(**dist.fsdp)
    return kwargs


def lightning_devices(dist):
    """Lightning's ``devices``; under torchrun, the launcher's per-node process count."""
    if "LOCAL_WORLD_SIZE" in os.environ and dist.devices == "auto":
        return int(os.environ["LOCAL_WORLD_SIZE"])
    return dist.devices if dist.devices != "auto" else 1


def lightning_strategy(dist):
    """The ``lightning.Fabric`` strategy object (or name) for the ``distributed`` section."""
    if dist.deepspeed is not None:
        from lightning.fabric.strategies import DeepSpeedStrategy
        return DeepSpeedStrategy(config=dist.deepspeed)
    if dist.fsdp is not None:
        from lightning.fabric.strategies import FSDPStrategy
        return FSDPStrategy(**dist.fsdp)
    name = dist.strategy
    if name in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook"):
        from lightning.fabric.strategies import DDPStrategy
        start = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork", "ddp_notebook": "fork"}[name]
        return DDPStrategy(start_method=start, find_unused_parameters=dist.find_unused_parameters,
                           process_group_backend=dist.process_group_backend)
    return name
