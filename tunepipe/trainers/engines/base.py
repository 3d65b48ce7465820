"""The engine protocol: what the one training loop (trainers/loop.py) asks of a distributed/precision engine.

An engine owns the processes, the devices and the numerics; the loop owns the order of things (what the
transformers Trainer does, step for step). Every engine provides:

- ``launch()``: start or join the processes (idempotent); ``world_size``, ``rank``, ``is_main_process``,
  ``is_local_main_process``, ``device``;
- ``setup(model, optimizer) -> (model, optimizer)``: device placement and DDP/FSDP/DeepSpeed wrapping;
  ``unwrap(model)``, ``raw_optimizer(optimizer)``: the objects a checkpoint holds;
- ``to_device(batch)``, ``autocast()`` (the mixed-precision context), ``backward(loss)``,
  ``no_sync(model, skip)`` (no gradient all-reduce on an accumulating micro-batch),
  ``clip_grad_norm(model, optimizer, max_norm)`` (unscales first under fp16), ``optimizer_step(optimizer)``
  (returns False when the gradient scaler skipped the step), ``scaler`` (None unless fp16);
- ``reduce(tensor, op)`` over the ranks (``mean`` | ``sum`` | ``max``) and ``barrier()``.

Data sharding is the same for every engine (here): whole batches dealt round robin to the ranks, as
accelerate's ``BatchSamplerShard`` deals them for the hf backend, and evaluation rows gathered back by index.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils.data import BatchSampler, DataLoader


class SkipFirstBatches:
    """A batch sampler without the first ``skip`` batches (resuming mid-epoch)."""

    def __init__(self, batches, skip: int):
        self.batches, self.skip = batches, skip

    def __len__(self):
        return len(self.batches) - self.skip

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i >= self.skip:
                yield batch


def sharded_loader(dataset, sampler, batch_size: int, collator, args, world: int, rank: int, drop_last=False,
                   skip: int = 0):
    """The sharding accelerate.prepare gives the hf backend: whole batches dealt round robin to the ranks, the last
    ones completed from the start so every rank runs the same number of steps.

    No generator of its own, as the Trainer's loaders: starting an iterator draws its base seed from the global
    RNG, the one dropout uses, so every epoch (and every evaluation) moves dropout's stream as on the hf backend."""
    from accelerate.data_loader import BatchSamplerShard
    batches = BatchSampler(sampler, batch_size, drop_last)
    if world > 1:
        batches = BatchSamplerShard(batches, num_processes=world, process_index=rank, even_batches=True)
    if skip:
        batches = SkipFirstBatches(batches, skip)
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collator, num_workers=args.dataloader_num_workers,
                      pin_memory=args.dataloader_pin_memory)


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (a list of one without a process group)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [obj]
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


class Engine:
    """Defaults shared by the engines; each engine overrides what its library does."""

    name = "base"
    scaler = None

    def launch(self) -> None:
        """Nothing to start: the processes come from an outside launcher (or there is one)."""

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    def unwrap(self, model):
        return model

    def raw_optimizer(self, optimizer):
        return getattr(optimizer, "optimizer", optimizer)

    def autocast(self):
        return contextlib.nullcontext()

    def no_sync(self, model, skip: bool):
        return contextlib.nullcontext()

    def clip_grad_norm(self, model, optimizer, max_norm: float):
        params = [p for p in self.unwrap(model).parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def optimizer_step(self, optimizer) -> bool:
        optimizer.step()
        return True

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()
