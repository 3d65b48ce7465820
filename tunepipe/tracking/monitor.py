"""Resource monitor: CPU, memory, GPU and throughput at every logging step, and a summary at the end of training.

It is a transformers ``TrainerCallback``, so every backend drives it the same way. Measurements are taken only at
logging steps (a few psutil / torch.cuda calls); per batch it only counts samples and non-padding tokens with a
forward pre-hook on the model, which costs one tensor sum and never synchronises a GPU.
The fields are added to the ``logs`` dict of each training-step log, so ``train_log.jsonl``, MLflow and the
progress printer all receive them; the monitor has to run before the log writer (``place_before_log_writer``).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..output import write_json

MB = 2 ** 20
# Fields added to each training-step record of train_log.jsonl.
STEP_FIELDS = ("step_time", "samples_per_second", "tokens_per_second", "cpu_percent", "rss_mb",
               "gpu_mem_mb", "gpu_mem_peak_mb", "gpu_util")


def peak_rss_mb() -> float | None:
    """The OS's lifetime peak resident set of this process (catches spikes between samples)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (MB if sys.platform == "darwin" else 1024), 1)  # bytes on macOS, KiB on Linux


class ResourceMonitor(TrainerCallback):
    """Adds resource and throughput fields to each training log; writes ``resources.json`` at the end.

    Throughput counts what the model's forward receives while training (``input_ids`` rows; ``attention_mask``
    ones, i.e. non-padding tokens). Time spent in evaluation and checkpoint saves is left out of step time and
    throughput. In multi-process runs the main process's counts are multiplied by the number of processes.
    """

    def __init__(self, output_dir: str | Path | None = None, verbose: bool = True):
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.verbose = verbose
        self.summary: dict[str, Any] | None = None
        self._hook = None
        self._process = None
        self._nvml = None

    def __getstate__(self):  # spawned worker processes: no hook, process or NVML handles
        return {**self.__dict__, "_hook": None, "_process": None, "_nvml": None}

    # ---- sampling ----------------------------------------------------------------------------------------
    def _count_batch(self, module, args, kwargs) -> None:
        if not module.training:
            return
        ids = kwargs.get("input_ids")
        if ids is None and args and hasattr(args[0], "shape"):
            ids = args[0]
        mask = kwargs.get("attention_mask")
        first = ids if ids is not None else mask if mask is not None else kwargs.get("inputs_embeds")
        if first is None or not getattr(first, "shape", None):
            return
        self._samples += int(first.shape[0])
        if mask is not None and getattr(mask, "dim", lambda: 0)() == 2:
            tokens = mask.detach().sum()  # stays on the device until a logging step reads it
            self._tokens = tokens if self._tokens is None else self._tokens + tokens
        elif ids is not None and getattr(ids, "dim", lambda: 0)() == 2:
            self._tokens_plain += int(ids.numel())

    def _token_count(self) -> int | None:
        if self._tokens is None and not self._tokens_plain:
            return None
        return int(self._tokens.item() if self._tokens is not None else 0) + self._tokens_plain

    def _gpu_snapshot(self) -> dict[str, float]:
        import torch
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return {}
        out = {"gpu_mem_mb": round(torch.cuda.memory_allocated() / MB, 1),
               "gpu_mem_peak_mb": round(torch.cuda.max_memory_allocated() / MB, 1)}
        util = self._utilization()
        if util is not None:
            out["gpu_util"] = util
            self._gpu_util.append(util)
        return out

    def _utilization(self) -> float | None:
        """GPU busy % over NVML's last sample period, through pynvml when it is importable. The device handle is
        looked up once (torch.cuda.utilization would initialise NVML at every call)."""
        if self._nvml is None:
            self._nvml = False
            try:
                import pynvml
                import torch
                pynvml.nvmlInit()
                device = torch.cuda.current_device()
                index = torch.cuda._get_nvml_device_index(device) if hasattr(torch.cuda, "_get_nvml_device_index") \
                    else device  # CUDA_VISIBLE_DEVICES order -> NVML order
                self._nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(index))
            except Exception:  # not importable, no driver, not NVIDIA: memory only
                return None
        if not self._nvml:
            return None
        pynvml, handle = self._nvml
        try:
            return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:
            self._nvml = False
            return None

    def _snapshot(self) -> dict[str, float]:
        cpu = self._process.cpu_percent(interval=None)  # since the previous call
        rss = self._process.memory_info().rss / MB
        self._cpu.append(cpu)
        self._rss_max = max(self._rss_max, rss)
        return {"cpu_percent": round(cpu, 1), "rss_mb": round(rss, 1), **self._gpu_snapshot()}

    def _mark_excluded(self) -> None:
        now = time.perf_counter()
        self._excluded += now - self._mark
        self._excluded_total += now - self._mark
        self._mark = now

    # ---- callback events ---------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import psutil
        self._process = psutil.Process()
        self._process.cpu_percent(interval=None)  # primes the counter
        self._cpu_times0 = self._process.cpu_times()
        self._world = max(int(getattr(args, "world_size", 1) or 1), 1)
        self._batch = getattr(args, "train_batch_size", None) or args.per_device_train_batch_size
        self._samples, self._tokens, self._tokens_plain = 0, None, 0
        self._logged_samples, self._logged_tokens = 0, 0
        self._cpu: list[float] = []
        self._gpu_util: list[float] = []
        self._rss_max = 0.0
        self._nvml = None  # (pynvml, device handle) once looked up; False when unavailable
        self._start_step = self._last_step = state.global_step
        self._t0 = self._mark = self._last_end = self._step_end = time.perf_counter()
        self._excluded = self._excluded_total = 0.0
        if self._hook is not None:
            self._hook.remove()
        self._hook = None
        if model is not None and hasattr(model, "register_forward_pre_hook"):
            self._hook = model.register_forward_pre_hook(self._count_batch, with_kwargs=True)

    def on_step_end(self, args, state, control, **kwargs):
        self._step_end = self._mark = time.perf_counter()

    def on_evaluate(self, args, state, control, **kwargs):
        if self._process is not None:
            self._mark_excluded()

    def on_save(self, args, state, control, **kwargs):
        if self._process is not None:
            self._mark_excluded()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._process is None or logs is None or not ("loss" in logs or "train_runtime" in logs):
            return  # evaluation records keep their own metrics only
        if "loss" in logs:
            logs.update(self._interval(args, state))
        logs.update(self._snapshot())

    def _interval(self, args, state) -> dict[str, float]:
        steps = state.global_step - self._last_step
        seconds = self._step_end - self._last_end - self._excluded
        self._last_step, self._last_end, self._excluded = state.global_step, self._step_end, 0.0
        if steps <= 0 or seconds <= 0:
            return {}
        samples = self._samples - self._logged_samples
        if samples <= 0:  # the forward hook saw nothing (an unusual model call): derive from the batch size
            samples = steps * self._batch * args.gradient_accumulation_steps
        tokens = self._token_count()
        out = {"step_time": round(seconds / steps, 4),
               "samples_per_second": round(samples * self._world / seconds, 3)}
        if tokens is not None:
            out["tokens_per_second"] = round((tokens - self._logged_tokens) * self._world / seconds, 1)
            self._logged_tokens = tokens
        self._logged_samples = self._samples
        return out

    def on_train_end(self, args, state, control, **kwargs):
        if self._process is None:
            return
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.summary = self._summarize(state)
        if self._nvml:
            try:
                self._nvml[0].nvmlShutdown()
            except Exception:
                pass
            self._nvml = None
        if state.is_world_process_zero:
            if self.output_dir is not None:
                write_json(self.output_dir / "resources.json", self.summary)
            if self.verbose:
                print(format_summary(self.summary), flush=True)

    def _summarize(self, state) -> dict[str, Any]:
        end = time.perf_counter()
        wall = end - self._t0
        seconds = max(wall - self._excluded_total, 1e-9)
        steps = state.global_step - self._start_step
        tokens = self._token_count()
        rss = self._process.memory_info().rss / MB
        times = self._process.cpu_times()
        cpu_seconds = (times.user - self._cpu_times0.user) + (times.system - self._cpu_times0.system)
        summary: dict[str, Any] = {
            "train_seconds": round(seconds, 3), "wall_seconds": round(wall, 3),
            "eval_and_save_seconds": round(self._excluded_total, 3), "steps": steps,
            "step_time": round(seconds / steps, 4) if steps else None,
            "samples": self._samples * self._world,
            "samples_per_second": round(self._samples * self._world / seconds, 3),
            "tokens": tokens * self._world if tokens is not None else None,
            "tokens_per_second": round(tokens * self._world / seconds, 1) if tokens is not None else None,
            "cpu_percent_mean": round(100 * cpu_seconds / wall, 1) if wall > 0 else None,
            "rss_mb": round(rss, 1),
            "rss_peak_mb": round(max(peak_rss_mb() or 0.0, self._rss_max, rss), 1),
            "processes": self._world,
        }
        summary.update(self._gpu_summary())
        return summary

    def _gpu_summary(self) -> dict[str, Any]:
        import torch
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return {"gpu": None}
        out: dict[str, Any] = {"gpu": torch.cuda.get_device_name(),
                               "gpu_mem_peak_mb": round(torch.cuda.max_memory_allocated() / MB, 1),
                               "gpu_mem_reserved_peak_mb": round(torch.cuda.max_memory_reserved() / MB, 1)}
        if self._gpu_util:
            out["gpu_util_mean"] = round(sum(self._gpu_util) / len(self._gpu_util), 1)
        return out


def format_summary(s: dict[str, Any]) -> str:
    parts = [f"{s['steps']} steps in {s['train_seconds']:.1f} s"]
    if s.get("step_time"):
        parts.append(f"{s['step_time'] * 1000:.0f} ms/step")
    parts.append(f"{s['samples_per_second']:.1f} samples/s")
    if s.get("tokens_per_second") is not None:
        parts.append(f"{s['tokens_per_second']:.0f} tokens/s")
    if s.get("cpu_percent_mean") is not None:
        parts.append(f"CPU {s['cpu_percent_mean']:.0f}%")
    parts.append(f"peak RSS {s['rss_peak_mb'] / 1024:.2f} GiB")
    if s.get("gpu"):
        gpu = f"GPU peak {s['gpu_mem_peak_mb'] / 1024:.2f} GiB"
        if "gpu_util_mean" in s:
            gpu += f", util {s['gpu_util_mean']:.0f}%"
        parts.append(gpu)
    return "Resources: " + ", ".join(parts)


def place_before_log_writer(trainer, callback) -> bool:
    """Move ``callback`` ahead of the train_log.jsonl writer in the trainer's callback list, so the fields it adds
    to ``logs`` in ``on_log`` are written. Works for the transformers Trainer (``callback_handler``) and the
    tunepipe loops (``handler``); returns False when the callback is not found."""
    from ..trainers.hf import _JsonlLogCallback
    handler = getattr(trainer, "callback_handler", None) or getattr(trainer, "handler", None)
    callbacks = getattr(handler, "callbacks", None)
    if callbacks is None or callback not in callbacks:
        return False
    writer = next((i for i, cb in enumerate(callbacks) if isinstance(cb, _JsonlLogCallback)), None)
    if writer is not None and callbacks.index(callback) > writer:
        callbacks.remove(callback)
        callbacks.insert(writer, callback)
    return True
