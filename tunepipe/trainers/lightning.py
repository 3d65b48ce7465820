"""Lightning backend: a LightningModule that wraps the Task's model (no task logic here) + ``lightning.Trainer``.

Lightning owns the loop: hooks, gradient accumulation, clipping call, optimizer/scheduler stepping, device
placement, mixed precision (its ``bf16-mixed`` / ``16-mixed`` plugins) and multi-process strategies (DDP, FSDP,
DeepSpeed; it launches the processes itself). Shared with the other backends (trainers/common.py): settings,
optimizer/scheduler factory, sampler and sharding (accelerate's BatchSamplerShard, as the HF and Accelerate
backends shard), evaluation collection, the callback protocol and train_log.jsonl, and the HF checkpoint layout.

Combined mode (``backend: lightning+accelerate``): Lightning still owns the loop, its hooks, the process launch
and the DDP wrapping. An ``accelerate.Accelerator`` supplies, through :class:`AcceleratePrecision` (a Lightning
precision plugin) and ``transfer_batch_to_device``:
  - device placement of every batch (``accelerate.utils.send_to_device`` to ``accelerator.device``; Lightning's
    strategy puts the module on its root device, checked to be the same device at setup),
  - autocast around every training/validation step (``accelerator.autocast()``: bf16 on CPUs with AVX512-BF16 and
    on GPUs, fp16 on CUDA),
  - the backward pass (``accelerator.backward``) and, for fp16, gradient scaling (unscale before clipping,
    ``scaler.step`` / ``scaler.update``).
"""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import Precision

from ..checkpoints import StopOnSignal, load_model_weights, load_rng, restore_rng_state, resume_setting
from ..errors import TrainingError
from .common import (DictCollator, EvalCollector, FlopCounter, JsonlLogWriter, LoopBookkeeping, TrainResult,
                     callback_handler, create_optimizer, create_scheduler, data_state, eval_order, evaluation_metrics,
                     keep_model_columns, label_names, log_metrics, new_state, prediction_step,
                     prepare_model_for_training, speed_metrics, token_weighted_loss, train_sampler, training_schedule,
                     training_settings, truncate_log_after)
from .distributed import check_launch, lightning_devices, lightning_strategy
from .finite import flag_non_finite_metrics

warnings.filterwarnings("ignore", message=".*You defined a `validation_step` but have no `val_dataloader`.*")
warnings.filterwarnings("ignore", message=".*does not have many workers which may be a bottleneck.*")


class AcceleratePrecision(Precision):
    """Lightning precision plugin backed by an Accelerator: autocast, backward and fp16 gradient scaling come
    from Accelerate. The Accelerator is created on first use, after Lightning has set up the process group."""

    def __init__(self, mixed_precision: str, cpu: bool):
        super().__init__()
        self.mixed_precision, self.cpu = mixed_precision, cpu
        self.precision = {"bf16": "bf16-mixed", "fp16": "16-mixed"}.get(mixed_precision, "32-true")
        self._accelerator = None

    def bind(self, trainer: pl.Trainer) -> None:
        """Create the Accelerator inside each launched process, after Lightning set up the process group, with
        Lightning's ranks in the environment: Accelerate reads (and on CPU rewrites) RANK / WORLD_SIZE /
        LOCAL_RANK / LOCAL_WORLD_SIZE, which must describe the processes Lightning started."""
        if trainer.world_size > 1:
            os.environ.update(RANK=str(trainer.global_rank), WORLD_SIZE=str(trainer.world_size),
                              LOCAL_RANK=str(trainer.local_rank),
                              LOCAL_WORLD_SIZE=str(trainer.world_size // max(trainer.num_nodes, 1)))
        _ = self.accelerator

    @property
    def accelerator(self):
        if self._accelerator is None:
            from accelerate import Accelerator
            from accelerate.state import AcceleratorState
            AcceleratorState._reset_state(reset_partial_state=False)
            # accumulation stays Lightning's (it divides the loss); Accelerate must not divide again
            self._accelerator = Accelerator(mixed_precision=self.mixed_precision, cpu=self.cpu,
                                            gradient_accumulation_steps=1)
        return self._accelerator

    def forward_context(self):
        return self.accelerator.autocast()

    def backward(self, tensor, model, optimizer, *args, **kwargs) -> None:
        self.accelerator.backward(tensor, *args, **kwargs)

    def optimizer_step(self, optimizer, model, closure, **kwargs):
        scaler = self.accelerator.scaler
        if scaler is None:
            return super().optimizer_step(optimizer, model, closure, **kwargs)
        closure_result = closure()
        scaler.unscale_(optimizer)  # clipping (in _after_closure) must see true gradients
        self._after_closure(model, optimizer)
        if closure_result is None:  # the closure skipped backward (e.g. a None loss)
            return None
        step = scaler.step(optimizer, **kwargs)
        scaler.update()
        return step

    def state_dict(self) -> dict[str, Any]:
        scaler = self._accelerator.scaler if self._accelerator is not None else None
        return scaler.state_dict() if scaler is not None else {}


class _IndexedDataset(torch.utils.data.Dataset):
    """Evaluation rows carry their dataset index, so predictions gathered from all ranks go back in order."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return {**self.dataset[i], "__index__": i}


class _IndexedCollator:
    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        index = torch.tensor([f.pop("__index__") for f in features])
        return {**self.collator(features), "__index__": index}


class _SkipFirstBatches:
    """A batch sampler that leaves out the first ``skip`` batches of its first pass only (resuming mid-epoch);
    its length stays the full epoch's, so Lightning's count of batches per epoch is unchanged."""

    def __init__(self, batches, skip: int):
        self.batches, self.skip = batches, skip

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        skip, self.skip = self.skip, 0
        for i, batch in enumerate(self.batches):
            if i >= skip:
                yield batch


def _sharded_loader(dataset, sampler, batch_size: int, collator, args, world: int, rank: int, drop_last=False,
                    skip: int = 0):
    """The same sharding as accelerate.prepare gives the HF and Accelerate backends: whole batches dealt round
    robin to the ranks, the last ones completed from the start so every rank runs the same number of steps.

    No generator of its own, as the Trainer's loaders: starting an iterator draws its base seed from the global RNG,
    the one dropout uses, so every epoch (and every evaluation) moves dropout's stream as it does on the HF and
    Accelerate backends. A private generator here gave other dropout masks from the first step on."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, DataLoader
    batches = BatchSampler(sampler, batch_size, drop_last)
    if world > 1:
        batches = BatchSamplerShard(batches, num_processes=world, process_index=rank, even_batches=True)
    if skip:
        batches = _SkipFirstBatches(batches, skip)
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collator, num_workers=args.dataloader_num_workers,
                      pin_memory=args.dataloader_pin_memory)


class TaskModule(pl.LightningModule):
    """Wraps the Task's transformers model; every hook hands over to the owning backend object."""

    def __init__(self, owner: "_LightningTrainer", model):
        super().__init__()
        self.model = model
        self.__dict__["_owner"] = owner  # a plain reference, not a registered submodule
        self._eval_results: list[tuple] = []

    def setup(self, stage: str) -> None:
        precision = self.trainer.precision_plugin
        if isinstance(precision, AcceleratePrecision):
            precision.bind(self.trainer)

    # ---- data --------------------------------------------------------------------------------------------
    def train_dataloader(self):
        owner = self._owner
        return owner.train_loader(self.trainer.world_size, self.trainer.global_rank, skip=owner.resume_skip,
                                  for_training=True)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        precision = self.trainer.precision_plugin if self._trainer is not None else None
        if isinstance(precision, AcceleratePrecision):
            from accelerate.utils import send_to_device
            return send_to_device(batch, precision.accelerator.device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # ---- optimization ------------------------------------------------------------------------------------
    def configure_optimizers(self):
        owner = self._owner
        schedule = owner.schedule_for(self.trainer.world_size, self.trainer.global_rank)
        optimizer = create_optimizer(self.model, owner.args)
        scheduler = create_scheduler(optimizer, owner.args, schedule.max_steps)
        owner.optimizer, owner.lr_scheduler = optimizer, scheduler
        if owner.resume_path is not None:  # weights, optimizer and scheduler as saved; the rest at train start
            owner.resumed_state, _ = owner.checkpoint_manager().load_loop_state(
                owner.resume_path, model=self.model, optimizer=optimizer, scheduler=scheduler, restore_rng=False,
                verify=False)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch, batch_idx):
        owner = self._owner
        if batch_idx % owner.args.gradient_accumulation_steps == 0:
            owner.control = owner.handler.on_step_begin(owner.args, owner.state, owner.control)
        owner.batch_device = next(v.device for v in batch.values() if hasattr(v, "device"))
        device_type = owner.batch_device.type
        owner.autocast_in_step = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        # train mode at every step, as the Trainer's training_step sets it: from_pretrained returns the model in
        # eval mode and Lightning (>= 2.2) keeps each submodule's mode, so a pretrained model trained without dropout
        self.model.train()
        loss = self.model(**batch)["loss"]
        if owner.loss_weighting is not None:
            loss = owner.loss_weighting(loss, batch)
        owner.finite_guard.observe_loss(loss)
        step_loss = loss.detach() / owner.args.gradient_accumulation_steps
        if owner.tr_loss is None:
            owner.tr_loss = torch.zeros((), device=step_loss.device)
        owner.tr_loss += step_loss if torch.isfinite(step_loss) else owner.tr_loss / max(
            1, owner.state.global_step - owner.last_logged + 1)
        owner.flops.add(batch)
        return loss

    def on_before_optimizer_step(self, optimizer):
        owner = self._owner
        owner.learning_rate = optimizer.param_groups[0]["lr"]  # the rate this step uses, as the Trainer logs
        owner.control = owner.handler.on_pre_optimizer_step(owner.args, owner.state, owner.control)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip as the Trainer does, then the shared NaN / inf check: Lightning calls this hook after backward and
        before the optimizer steps (also in combined mode and under fp16's scaler), so a NaN step never reaches
        the weights."""
        owner, max_norm = self._owner, self._owner.args.max_grad_norm
        owner.grad_norm = None
        scaler = owner._grad_scaler()
        if not isinstance(self.trainer.strategy, (pl.strategies.DDPStrategy, pl.strategies.SingleDeviceStrategy)):
            if max_norm and max_norm > 0:
                self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
            owner._check_finite(scaler=scaler)  # sharded gradients clip their own way: the loss is checked
            return
        params = [p for p in self.model.parameters() if p.grad is not None]
        if max_norm and max_norm > 0:
            plugin_scaler = getattr(self.trainer.precision_plugin, "scaler", None)
            if plugin_scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
                # Lightning leaves unscaling to fused optimizers; clipping needs it now
                plugin_scaler.unscale_(optimizer)
            owner.grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        owner._check_finite(owner.grad_norm, params, scaler)

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        owner = self._owner
        owner.control = owner.handler.on_optimizer_step(owner.args, owner.state, owner.control)

    # ---- the Trainer's bookkeeping, per optimizer step ---------------------------------------------------
    def on_train_start(self):
        self._owner.on_train_start(self.trainer)

    def on_train_epoch_start(self):
        owner = self._owner
        if hasattr(owner.sampler, "set_epoch"):  # seeded samplers reshuffle per epoch; sequential has none
            owner.sampler.set_epoch(self.current_epoch + owner.epoch_offset)
        owner.control = owner.handler.on_epoch_begin(owner.args, owner.state, owner.control)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        owner = self._owner
        global_step = self.trainer.global_step + owner.step_offset
        if global_step == owner.state.global_step:
            owner.control = owner.handler.on_substep_end(owner.args, owner.state, owner.control)
            return
        skipped = owner.resume_skip if self.current_epoch == 0 else 0
        owner.after_optimizer_step(global_step, self.current_epoch + owner.epoch_offset
                                   + (batch_idx + skipped + 1) / owner.schedule.steps_in_epoch)
        if owner.control.should_training_stop or owner.control.should_epoch_stop:
            self.trainer.should_stop = owner.control.should_training_stop
            owner.control.should_epoch_stop = False

    def on_train_epoch_end(self):
        self._owner.after_epoch()

    def on_train_end(self):
        self._owner.finish_training(self.trainer)

    # ---- evaluation: Lightning's validation hooks, also driven directly during fit ----------------------
    def validation_step(self, batch, batch_idx):
        owner = self._owner
        index = batch.pop("__index__")
        loss, preds, labels = prediction_step(self.model, batch, owner.task, owner.label_names)
        size = len(index)
        self._eval_results.append((index.cpu().numpy(), None if loss is None else _to_cpu(loss.reshape(1).repeat(size)),
                                   _to_cpu(preds), _to_cpu(labels)))
        owner.control = owner.handler.on_prediction_step(owner.args, owner.state, owner.control)

    def on_validation_epoch_start(self):
        self._eval_results = []
        state = self._owner.state
        state.is_world_process_zero, state.is_local_process_zero = self.trainer.is_global_zero, self.trainer.local_rank == 0

    def on_validation_epoch_end(self):
        results, self._eval_results = self._eval_results, []
        self._owner.finish_evaluation(results, self.trainer)


def _to_cpu(x):
    """CPU tensors (picklable for all_gather_object; EvalLoopContainer concatenates tensors)."""
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    return x.detach().float().cpu() if x.is_floating_point() else x.detach().cpu()


def _gather_objects(obj, trainer) -> list:
    if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [obj]
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


class _LightningTrainer(LoopBookkeeping):
    def __init__(self, task, specs, model, tokenizer, datasets: dict[str, Any], output_dir: str | Path,
                 callbacks: list | None = None):
        from transformers import TrainerControl, TrainerState, set_seed
        self.task, self.specs, self.tokenizer, self.model = task, specs, tokenizer, model
        self.output_dir = Path(output_dir)
        self.train_dataset, self.eval_dataset = datasets.get("train"), datasets.get("validation")
        self.loss_weighting = token_weighted_loss(specs, self.train_dataset)
        self.args = training_settings(specs, self.output_dir / "checkpoints", has_eval=self.eval_dataset is not None)
        set_seed(self.args.seed)
        check_launch(specs.backend, specs.distributed)
        self.combined = specs.backend == "lightning+accelerate"
        self.collator = DictCollator(task.collator(tokenizer))
        self.label_names = label_names(model)
        self.handler = callback_handler(self.args, model, tokenizer, callbacks,
                                        JsonlLogWriter(self.output_dir / "train_log.jsonl"))
        self.state, self.control = TrainerState(), TrainerControl()
        self.module = TaskModule(self, model)
        self._pl: pl.Trainer | None = None
        self.sampler = self.schedule = self.optimizer = self.lr_scheduler = None
        self.tr_loss = self.grad_norm = self.learning_rate = self.autocast_in_step = self.batch_device = None
        self.total_loss, self.last_logged, self.flops = 0.0, 0, FlopCounter(model)
        self.last_metrics: dict[str, Any] = {}
        self.train_metrics: dict[str, Any] = {}
        # resuming: Lightning counts from 0; these place its steps/epochs/batches in the original run
        self.resume_path = self.resumed_state = None
        self.step_offset = self.epoch_offset = self.resume_skip = 0

    # ---- the backend contract ----------------------------------------------------------------------------
    @property
    def is_main_process(self) -> bool:
        if self._pl is not None:
            return self._pl.is_global_zero
        return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0" \
            and os.environ.get("NODE_RANK", "0") == "0"

    def trained_model(self):
        return self.model

    def lightning_trainer(self) -> pl.Trainer:
        """One lightning.Trainer for fit and validate (a second one would launch the processes again)."""
        if self._pl is None:
            args, dist = self.args, self.specs.distributed
            batches = len(self.train_loader(self._world_size(), 0)) if self.train_dataset is not None else 1
            schedule = training_schedule(batches, args)  # evaluation-only runs have no training data
            kwargs: dict[str, Any] = {}
            use_cpu = bool(args.use_cpu) or not torch.cuda.is_available()
            if self.combined:
                mixed = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
                kwargs["plugins"] = [AcceleratePrecision(mixed, cpu=use_cpu)]
            else:
                kwargs["precision"] = "bf16-mixed" if args.bf16 else "16-mixed" if args.fp16 else "32-true"
            accelerator = dist.accelerator if dist.accelerator != "auto" else ("cpu" if use_cpu else "auto")
            self._pl = pl.Trainer(
                accelerator=accelerator, devices=lightning_devices(dist), num_nodes=dist.num_nodes,
                strategy=lightning_strategy(dist), max_steps=schedule.max_steps - self.step_offset,
                max_epochs=schedule.num_epochs - self.epoch_offset,
                accumulate_grad_batches=args.gradient_accumulation_steps, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                use_distributed_sampler=False, default_root_dir=str(self.output_dir), **kwargs)
        return self._pl

    def _world_size(self) -> int:
        dist = self.specs.distributed
        devices = lightning_devices(dist)
        count = len(devices) if isinstance(devices, list) else int(devices) if str(devices).isdigit() else 1
        return count * dist.num_nodes

    def schedule_for(self, world: int, rank: int):
        """Optimizer steps from the per-rank loader, exactly as the Trainer derives them."""
        loader = self.train_loader(world, rank)
        self.schedule = training_schedule(len(loader), self.args)
        if self.schedule.max_steps - self.step_offset != self.lightning_trainer().max_steps:
            raise TrainingError(f"Lightning runs {world} processes but {self._world_size()} were planned",
                                suggestions=["set distributed.devices / num_nodes to the processes you launch"])
        return self.schedule

    def train_loader(self, world: int, rank: int, skip: int = 0, for_training: bool = False):
        if self.sampler is None:
            self.sampler = train_sampler(self.train_dataset, self.args, self.tokenizer)
        dataset = keep_model_columns(self.train_dataset, self.model)
        if for_training and self.resume_path is not None and not skip:
            # resuming at an epoch boundary: the saved RNG is the one before the next epoch's iterator started
            # (which draws from it); Lightning starts that iterator right after this hook
            restore_rng_state(load_rng(self.resume_path, rank))
        return _sharded_loader(dataset, self.sampler, self.args.train_batch_size, self.collator, self.args,
                               world, rank, drop_last=self.args.dataloader_drop_last, skip=skip)

    def run_training(self) -> TrainResult:
        prepare_model_for_training(self.model, self.args)
        self.model.train()  # before fit too: Lightning warns about modules found in eval mode at its start
        self._prepare_resume()
        if self.resume_path is not None and self.step_offset >= self.schedule.max_steps:
            return self._already_trained()
        trainer = self.lightning_trainer()
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None:
            # Lightning's SIGTERM handler ends fit with SystemExit after the current batch, without a checkpoint;
            # StopOnSignal lets the optimizer step finish, saves, and stops (ranks agree through a reduce)
            connector.register_signal_handlers = lambda: None
        with StopOnSignal() as guard:
            self.stop_guard = guard
            trainer.fit(self.module)
        self.stop_guard = None
        if self.stopped_by_signal:
            raise guard.interrupted(self.state.global_step, self.last_checkpoint)
        state = self.state
        return TrainResult(global_step=state.global_step, train_metrics=dict(self.train_metrics),
                           log_history=list(state.log_history))

    def _already_trained(self) -> TrainResult:
        """The checkpoint holds the whole run: its weights and state, no training."""
        from transformers import TrainerState

        from ..checkpoints import log
        load_model_weights(self.resume_path, self.model)
        self.state = TrainerState.load_from_json(str(self.resume_path / "trainer_state.json"))
        log.warning("%s already holds all %d training steps: nothing left to train", self.resume_path,
                    self.state.global_step)
        return TrainResult(global_step=self.state.global_step, train_metrics={"epoch": self.state.epoch},
                           log_history=list(self.state.log_history))

    def _prepare_resume(self) -> None:
        """``resume: auto | <path>``: verify the checkpoint and place Lightning's run after it (steps and epochs
        left, batches of the current epoch to skip); weights/optimizer/scheduler load in configure_optimizers."""
        manager = self.checkpoint_manager()
        path = manager.resolve(resume_setting(self.specs))
        if path is None:
            return
        from transformers import TrainerState
        world = self._world_size()
        self.schedule = training_schedule(len(self.train_loader(world, 0)), self.args)
        manager.verify(path, data_state=data_state(self.args, self.schedule, len(self.train_dataset), world, 0))
        saved = TrainerState.load_from_json(str(path / "trainer_state.json"))
        self.resume_path, self.step_offset = path, saved.global_step
        if self.is_main_process:
            truncate_log_after(self.output_dir / "train_log.jsonl", saved.global_step)
        self.epoch_offset, done = divmod(saved.global_step, self.schedule.updates_per_epoch)
        self.resume_skip = done * self.args.gradient_accumulation_steps
        if hasattr(self.sampler, "set_epoch"):  # Lightning starts the first loader before on_train_epoch_start
            self.sampler.set_epoch(self.epoch_offset)
        self._pl = None  # built again with the steps and epochs left

    # ---- called from the module's hooks ------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer) -> None:
        self._train_start = time.time()  # like the Trainer's clock: after setup, when the first batch is due
        self._check_devices(trainer)
        self.state = new_state(self.args, self.schedule, trainer.is_global_zero, trainer.local_rank == 0)
        self.args.device, self.args.process_index, self.args.world_size = (trainer.strategy.root_device,
                                                                           trainer.global_rank, trainer.world_size)
        if self.resumed_state is not None:
            loaded, state = self.resumed_state, self.state
            state.global_step, state.log_history, state.epoch = loaded.global_step, loaded.log_history, loaded.epoch
            state.best_metric, state.best_model_checkpoint = loaded.best_metric, loaded.best_model_checkpoint
            self.last_logged = loaded.global_step
            scaler = self._grad_scaler()
            if scaler is not None and (self.resume_path / "scaler.pt").is_file():
                from ..checkpoints import safe_load
                scaler.load_state_dict(safe_load(self.resume_path / "scaler.pt", "gradient scaler state"))
            if self.resume_skip:  # mid-epoch: after the epoch's iterator started, as in the uninterrupted run
                restore_rng_state(load_rng(self.resume_path, trainer.global_rank))
        for name, value in (("model", self.model), ("optimizer", self.optimizer),
                            ("lr_scheduler", self.lr_scheduler)):
            setattr(self.handler, name, value)
        self.control = self.handler.on_train_begin(self.args, self.state, self.control)

    def _check_devices(self, trainer: pl.Trainer) -> None:
        precision = trainer.precision_plugin
        if isinstance(precision, AcceleratePrecision):
            acc_device, root = precision.accelerator.device, trainer.strategy.root_device
            if acc_device.type != root.type or (acc_device.index or 0) != (root.index or 0):
                raise TrainingError(f"Accelerate places batches on {acc_device} but Lightning put the model on "
                                    f"{root}", suggestions=["set distributed.accelerator/devices to match the "
                                                            "Accelerator's device (CUDA_VISIBLE_DEVICES, LOCAL_RANK)"])

    def finish_training(self, trainer: pl.Trainer) -> None:
        """At on_train_end, while every rank still holds the process group: the Trainer's final train metrics."""
        state, schedule, args = self.state, self.schedule, self.args
        if self.tr_loss is not None:
            self.total_loss += self._mean_over_ranks(self.tr_loss)
        state.total_flos = self._mean_over_ranks(torch.tensor(self.flops.total, dtype=torch.float64)) * trainer.world_size
        steps = state.global_step - self.step_offset
        samples = (schedule.max_steps * args.train_batch_size * args.gradient_accumulation_steps * trainer.world_size
                   if args.max_steps > 0 else len(self.train_dataset) * args.num_train_epochs)
        metrics = speed_metrics("train", self._train_start, samples * steps / max(schedule.max_steps, 1), steps)
        metrics.update(total_flos=state.total_flos, train_loss=self.total_loss / max(steps, 0.001))
        self.control = log_metrics(self.handler, args, state, self.control, dict(metrics))
        self.train_metrics = {**metrics, "epoch": state.epoch}
        if args.load_best_model_at_end and state.best_model_checkpoint and not self.stopped_by_signal:
            load_model_weights(Path(state.best_model_checkpoint), self.model)
        self.control = self.handler.on_train_end(args, state, self.control)

    def after_optimizer_step(self, global_step: int, epoch: float) -> None:
        self.state.global_step, self.state.epoch = global_step, epoch
        self.control = self.handler.on_step_end(self.args, self.state, self.control)
        self.total_loss, self.last_logged = self._maybe_log_save_evaluate(
            self.tr_loss, self.grad_norm, self.learning_rate, self.total_loss, self.last_logged)

    def after_epoch(self) -> None:
        self.control = self.handler.on_epoch_end(self.args, self.state, self.control)
        self.total_loss, self.last_logged = self._maybe_log_save_evaluate(
            self.tr_loss, self.grad_norm, self.learning_rate, self.total_loss, self.last_logged)

    def _mean_over_ranks(self, tensor) -> float:
        trainer = self._pl
        if trainer is None or trainer.world_size <= 1:
            return float(tensor)
        return float(trainer.strategy.reduce(tensor.to(trainer.strategy.root_device), reduce_op="mean"))

    def _max_over_ranks(self, tensor) -> float:
        trainer = self._pl
        if trainer is None or trainer.world_size <= 1:
            return float(tensor)
        return float(trainer.strategy.reduce(tensor.to(trainer.strategy.root_device), reduce_op="max"))

    def _barrier(self) -> None:
        if self._pl is not None and self._pl.world_size > 1:
            self._pl.strategy.barrier()

    def _checkpoint_objects(self):
        return self.model, self.optimizer, self.lr_scheduler

    def _grad_scaler(self):
        precision = self._pl.precision_plugin if self._pl is not None else None
        if isinstance(precision, AcceleratePrecision):
            return precision.accelerator.scaler
        return getattr(precision, "scaler", None)

    def _data_state(self) -> dict[str, Any]:
        world = self._pl.world_size if self._pl is not None else self._world_size()
        return data_state(self.args, self.schedule, len(self.train_dataset), world, self.state.global_step)

    # ---- evaluation --------------------------------------------------------------------------------------
    def eval_loader(self, dataset, world: int, rank: int):
        order = eval_order(dataset)
        data = _IndexedDataset(keep_model_columns(dataset, self.model))
        return _sharded_loader(data, order, self.args.eval_batch_size, _IndexedCollator(self.collator), self.args,
                               world, rank)

    def run_evaluation(self, dataset=None, split: str = "validation") -> dict[str, Any]:
        trainer = self.lightning_trainer()
        dataset = dataset if dataset is not None else self.eval_dataset
        self._eval_split, self._eval_start = split, time.time()
        self._eval_size = len(dataset)
        # global_rank / world_size come from the cluster environment, valid before Lightning launches processes
        loader = self.eval_loader(dataset, trainer.world_size, trainer.global_rank)
        trainer.validate(self.module, dataloaders=loader, verbose=False)
        return flag_non_finite_metrics(self.last_metrics, split)

    def _evaluate(self, dataset, split: str) -> dict[str, Any]:
        """Evaluation inside fit, at the steps DefaultFlowCallback asks for: the module's validation hooks run
        directly (Lightning's own validation loop cannot follow optimizer-step cadence), under Lightning's
        precision context, on every rank."""
        trainer, module = self._pl, self.module
        self._eval_split, self._eval_start, self._eval_size = split, time.time(), len(dataset)
        loader = self.eval_loader(dataset, trainer.world_size, trainer.global_rank)
        was_training = module.training
        module.eval()
        module.on_validation_epoch_start()
        context = trainer.precision_plugin.val_step_context()
        with torch.no_grad(), context:
            for i, batch in enumerate(loader):
                batch = module.transfer_batch_to_device(batch, trainer.strategy.root_device, 0)
                module.validation_step(batch, i)
        module.on_validation_epoch_end()
        module.train(was_training)
        return {f"eval_{k}": v for k, v in self.last_metrics.items() if k != "epoch"}

    def finish_evaluation(self, results: list[tuple], trainer: pl.Trainer) -> None:
        """Gather every rank's (index, loss, preds, labels) batches, drop the rows repeated to even out the last
        batches, restore dataset order, and compute the task's metrics (the same on every rank)."""
        import numpy as np
        batches = [b for rank_results in _gather_objects(results, trainer) for b in rank_results]
        pad = self._pred_pad()
        collector = EvalCollector(pred_pad=pad)
        indices = []
        for index, losses, preds, labels in batches:
            indices.append(index)
            collector.add(losses, preds, labels)
        losses, preds, labels = collector.arrays()
        order = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
        _, first = np.unique(order, return_index=True)  # ascending dataset index, first occurrence
        pick = (lambda a: None if a is None else type(a)(pick(x) for x in a) if isinstance(a, (list, tuple))
                else a[first])
        steps = len(batches)
        metrics = evaluation_metrics(self.task, pick(losses), pick(preds), pick(labels),
                                     time.time() - self._eval_start, self._eval_size, steps)
        split = self._eval_split
        prefix = "eval" if split == "eval" else split
        logged = {f"{prefix}_{k}": v for k, v in metrics.items()}
        self.state.is_world_process_zero = trainer.is_global_zero
        self.control = log_metrics(self.handler, self.args, self.state, self.control, dict(logged))
        self.control = self.handler.on_evaluate(self.args, self.state, self.control, metrics=logged)
        if self.state.epoch is not None:  # the Trainer's evaluate() returns the epoch too
            metrics["epoch"] = self.state.epoch
        self.last_metrics = metrics

    def _pred_pad(self) -> int:
        if not self.task.generative:
            return -100
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return pad if pad is not None else getattr(self.model.config, "pad_token_id", 0) or 0


class NLPTrainerWithLightning(_LightningTrainer):
    """lightning.Trainer for encoder tasks (classification, tagging, QA, MLM, causal LM).
    With ``backend: lightning+accelerate`` an Accelerator supplies batch placement and autocast."""


class NLPSeq2SeqTrainerWithLightning(_LightningTrainer):
    """lightning.Trainer for generative tasks: evaluation decodes with ``generate(**task.generation_kwargs())``."""

