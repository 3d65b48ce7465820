"""What FineTunePipeLine attaches to a run for tracking, on every backend: the resource monitor, the MLflow run,
``training.report_to``'s integrations where tunepipe drives them, and a progress bar for generative evaluation."""
from __future__ import annotations

import contextlib
from pathlib import Path

from ..tasks import get_task
from .mlflow_run import MlflowTracker, require_mlflow
from .monitor import ResourceMonitor, place_before_log_writer
from .reporting import check_report_to, loop_callbacks, point_trainer_callbacks


def _generation_progress(specs):
    """A generation bar for tasks evaluated by generating, unless the specs turn progress bars off."""
    if not getattr(get_task(specs.task), "generative", False) or getattr(specs.training, "disable_tqdm", False):
        return None
    from .progress import GenerationProgress
    return GenerationProgress(max_new_tokens=specs.generation.max_new_tokens,
                              eval_batch_size=specs.training.per_device_eval_batch_size)


class Tracking:
    """The callbacks every backend gets from the pipeline: the ``tracking:`` section's (resource monitor, MLflow
    run), ``training.report_to``'s integrations where tunepipe drives them (reporting.py), and the generation
    progress bar of generative tasks (progress.py); plus the pipeline's hooks into them."""

    def __init__(self, specs, output_dir: str | Path):
        self.output_dir = Path(output_dir)
        self.monitor = ResourceMonitor(output_dir) if specs.tracking.resources else None
        mlflow_spec = specs.tracking.mlflow
        self.mlflow = MlflowTracker(mlflow_spec, specs, output_dir) if mlflow_spec is not None else None
        if self.mlflow is not None:
            require_mlflow(self.mlflow.tracking_uri)
        check_report_to(specs)
        self.reporters = loop_callbacks(specs, output_dir)
        self.progress = _generation_progress(specs)

    @property
    def callbacks(self) -> list:
        return [cb for cb in (self.monitor, self.mlflow, *self.reporters, self.progress) if cb is not None]

    def attach(self, trainer) -> None:
        """The monitor adds fields to ``logs``: it must run before the train_log.jsonl writer. TensorBoard's files
        go to the run's directory. With the generation bar, transformers' evaluation bar steps aside."""
        if self.monitor is not None:
            place_before_log_writer(trainer, self.monitor)
        point_trainer_callbacks(trainer, self.output_dir)
        if self.progress is not None:
            from transformers.trainer_callback import ProgressCallback

            from .progress import TrainingProgress
            handler = getattr(trainer, "callback_handler", None) or getattr(trainer, "handler", None)
            for i, callback in enumerate(getattr(handler, "callbacks", [])):
                if type(callback) is ProgressCallback:
                    handler.callbacks[i] = TrainingProgress()
            self.progress.eval_dataset = getattr(trainer, "eval_dataset", None)
            self.progress.watch(getattr(trainer, "model", None))

    @contextlib.contextmanager
    def evaluating(self, split: str, dataset, is_main_process: bool = True):
        """Around an evaluation the pipeline runs: the generation bar shows (main process only)."""
        if self.progress is None or not is_main_process:
            yield
            return
        self.progress.arm(split, dataset)
        try:
            yield
        finally:
            self.progress.disarm()

    def start(self, is_main_process: bool) -> None:
        if self.mlflow is not None and is_main_process:
            self.mlflow.start()

    def training_done(self, model_dir: Path | None, step: int = 0) -> None:
        if self.mlflow is None:
            return
        summary = self.monitor.summary if self.monitor is not None else None
        if summary:
            self.mlflow.log_metrics({f"resources.{k}": v for k, v in summary.items()}, step)
        self.mlflow.log_training_outputs(model_dir)

    def evaluation_done(self) -> None:
        if self.mlflow is not None:
            self.mlflow.log_evaluation_outputs()

    def finish(self, error: BaseException | None = None) -> None:
        if self.mlflow is None:
            return
        if error is None:
            self.mlflow.finish("FINISHED")
        else:  # stopped on purpose (Ctrl-C, or SIGTERM/SIGINT after a checkpoint) -> KILLED; anything else FAILED
            stopped = isinstance(error, KeyboardInterrupt) or getattr(error, "code", None) == "TRAINING_INTERRUPTED"
            self.mlflow.finish("KILLED" if stopped else "FAILED", error)
