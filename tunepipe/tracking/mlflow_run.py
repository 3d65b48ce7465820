"""MLflow tracking (``tracking.mlflow``): one MLflow run per training.

Params: the resolved specs, flattened to dot keys (``training.learning_rate``) and cut to MLflow's value-length
limit with a marker. Metrics: every training log (with its step), every evaluation, and the resource monitor's
fields. Artifacts: specs.yaml, train_log.jsonl, resources.json, a loss plot, metrics.json, the model card, and the
model or adapter with ``log_model: true``.

Tracking must never cost a training run: every MLflow call goes through :meth:`MlflowTracker._call`, which turns a
failure into ONE :class:`TrackingWarning` and pauses tracking for ``RETRY_AFTER_S`` seconds (so a dead server
costs at most a few short requests per minute). HTTP requests use short timeouts and one retry unless the user set
the ``MLFLOW_HTTP_REQUEST_*`` variables. The client API (``MlflowClient``) is used rather than the fluent
``mlflow.start_run``, so tunepipe neither reads nor changes a user's active run.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

from tunepipe import __version__

from ..errors import DependencyError
from .mlflow_params import (  # noqa: F401 - importable from here as before
    TRUNCATION_MARKER,
    clean_name,
    default_tracking_uri,
    flatten,
    mlflow_limits,
    plot_loss,
    read_train_log,
    specs_params,
    truncate,
)

log = logging.getLogger("tunepipe")

RETRY_AFTER_S = 60.0
TAG_VALUE_LIMIT = 8000  # MLflow 3 MAX_TAG_VAL_LENGTH
DEFAULT_REQUEST_TIMEOUT = 5  # seconds per HTTP request (MLflow's default: 120)
DEFAULT_MAX_RETRIES = 1  # MLflow's default: 7, with exponential backoff (minutes against a dead server)


class TrackingWarning(UserWarning):
    """MLflow could not be reached or refused a call; training continues."""


# ---- sending metrics off the training thread ------------------------------------------------------------------------
class MetricSender:
    """Sends metrics from a background thread, coalescing whatever piled up into one request: a logging step only
    appends to a list, so training never waits for the network (docs/tracking.md gives what a synchronous request
    per logging step cost)."""

    def __init__(self, send: Callable[[list], None], batch_limit: int = 1000):
        self._send, self._batch_limit = send, batch_limit
        self._pending: list = []
        self._busy = self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="tunepipe-mlflow-metrics", daemon=True)
        self._thread.start()

    def add(self, metrics: list) -> None:
        with self._cond:
            self._pending.extend(metrics)
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                batch, self._pending, self._busy = self._pending, [], True
            try:
                for i in range(0, len(batch), self._batch_limit):
                    self._send(batch[i: i + self._batch_limit])
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until everything added so far was sent (or dropped after a failure); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float) -> None:
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()


# ---- the tracker -----------------------------------------------------------------------------------------------
class MlflowTracker(TrainerCallback):
    """One MLflow run per training, fed by the trainer's callback events (every backend drives them).

    Lifecycle (``FineTunePipeLine`` drives it): :meth:`start` before training, metrics from ``on_log`` /
    ``on_evaluate``, :meth:`log_training_outputs` after the model is saved, :meth:`log_evaluation_outputs` after
    evaluation, :meth:`finish` with FINISHED, FAILED (an exception) or KILLED (an interrupt).
    Only the main process logs.
    """

    def __init__(self, spec, specs, output_dir: str | Path):
        self.spec, self.specs, self.output_dir = spec, specs, Path(output_dir)
        self.tracking_uri = spec.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or \
            default_tracking_uri(self.output_dir)
        self.local_store = not (spec.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.failures = 0
        self.warned = False
        self.finished = False
        self.truncated_params: list[str] = []
        self._client = None
        self._paused_until = 0.0
        self._logged_step: tuple[int, set[str]] = (-1, set())
        self._wanted = False
        self._sender: MetricSender | None = None

    def __getstate__(self):  # spawned worker processes get a copy without the client and the sender thread
        return {**self.__dict__, "_client": None, "_sender": None}

    def ui_hint(self) -> str:
        """How to look at the run: the ``mlflow ui`` command for a store on disk, else the server's address."""
        uri = self.tracking_uri
        if uri.startswith(("http://", "https://")):
            return f"{uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}" if self.run_id else uri
        if uri.startswith(("sqlite:", "file:", "postgresql", "mysql", "mssql", "/", ".")):
            return f"mlflow ui --backend-store-uri {uri}"
        return uri

    # ---- guarded calls -------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """A run exists (MLflow accepts metrics and files for an ended run: ``train()`` then ``evaluate()``)."""
        return self.run_id is not None

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one MLflow call; a failure gives one warning (per tracker) and pauses tracking, never raises."""
        if time.monotonic() < self._paused_until:
            return None
        try:
            return fn()
        except Exception as e:  # any failure of the tracking server, store or network
            self.failures += 1
            self._paused_until = time.monotonic() + RETRY_AFTER_S
            if not self.warned:
                self.warned = True
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                warnings.warn(TrackingWarning(
                    f"MLflow tracking failed while {what} ({self.tracking_uri}): {type(e).__name__}: {first}. "
                    f"Training continues; tracking retries every {RETRY_AFTER_S:.0f} s without further warnings. "
                    f"Every log is also in {self.output_dir / 'train_log.jsonl'}."), stacklevel=2)
            return None

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _set_http_limits(self) -> None:
        """Short timeouts / few retries unless the specs or the environment say otherwise. MLflow reads these
        variables at each request, so they apply to this process."""
        values = {"MLFLOW_HTTP_REQUEST_TIMEOUT": self.spec.request_timeout,
                  "MLFLOW_HTTP_REQUEST_MAX_RETRIES": self.spec.max_retries}
        defaults = {"MLFLOW_HTTP_REQUEST_TIMEOUT": DEFAULT_REQUEST_TIMEOUT,
                    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": DEFAULT_MAX_RETRIES,
                    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": 1}
        for name, default in defaults.items():
            value = values.get(name)
            if value is not None:
                os.environ[name] = str(int(value))
            else:
                os.environ.setdefault(name, str(default))

    # ---- the run ---------------------------------------------------------------------------------------------
    def start(self) -> str | None:
        """Create (or reuse) the experiment and start the run with params and tags. Returns the run id."""
        if self.run_id is not None:
            return self.run_id
        self._wanted = True  # a failed start is retried at later logging steps, once the pause is over
        self._set_http_limits()
        if self.local_store:
            (self.output_dir / "mlruns").mkdir(parents=True, exist_ok=True)
        self.experiment_id = self._call("creating the experiment", self._experiment_id)
        if self.experiment_id is None:
            return None
        tags = {"tunepipe.task": self.specs.task, "tunepipe.backend": self.specs.backend,
                "tunepipe.output_dir": str(self.output_dir.resolve()), "tunepipe.version": __version__,
                "tunepipe.specs_fingerprint": self.specs.fingerprint(), **self.spec.tags}
        run_name = self.spec.run_name or self.output_dir.resolve().name
        run = self._call("starting the run", lambda: self.client.create_run(
            self.experiment_id, run_name=run_name,
            tags={clean_name(k): truncate(str(v), TAG_VALUE_LIMIT) for k, v in tags.items()}))
        if run is None:
            return None
        self.run_id = run.info.run_id
        self._log_params()
        log.info("MLflow run %s (%s) in experiment '%s' at %s", run_name, self.run_id, self.spec.experiment,
                 self.tracking_uri)
        return self.run_id

    def _experiment_id(self) -> str:
        name = self.spec.experiment
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = (self.output_dir / "mlruns" / "artifacts").resolve().as_uri() if self.local_store else None
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:  # created meanwhile by another process
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _log_params(self) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH
        params, self.truncated_params = specs_params(self.specs.to_dict())
        items = [Param(k, v) for k, v in params.items()]
        tags = []
        if self.truncated_params:
            tags = [RunTag("tunepipe.truncated_params", truncate(", ".join(self.truncated_params), 5000))]
        for i in range(0, max(len(items), 1), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = items[i: i + MAX_PARAMS_TAGS_PER_BATCH]
            extra = tags if i == 0 else []
            self._call("logging params", lambda c=chunk, t=extra: self.client.log_batch(
                self.run_id, params=c, tags=t, synchronous=True))

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        items = [Metric(clean_name(k), float(v), now, int(step)) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if not items:
            return
        if self._sender is None:
            from mlflow.utils.validation import MAX_METRICS_PER_BATCH
            self._sender = MetricSender(lambda batch: self._call("logging metrics", lambda: self.client.log_batch(
                self.run_id, metrics=batch, synchronous=True)), MAX_METRICS_PER_BATCH)
        self._sender.add(items)
        logged_step, keys = self._logged_step
        keys = keys if logged_step == step else set()
        self._logged_step = (step, keys | {m.key for m in items})

    def flush(self) -> bool:
        """Wait (boundedly: each request times out) until the metrics logged so far reached MLflow."""
        if self._sender is None:
            return True
        timeout = 2 * int(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", DEFAULT_REQUEST_TIMEOUT)) * (
            1 + int(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", DEFAULT_MAX_RETRIES))) + 5
        return self._sender.flush(timeout)

    def log_files(self, files: dict[str, Path]) -> None:
        """``{artifact path (directory, '' = root): local file or directory}``; missing paths are skipped."""
        if not self.active:
            return
        for artifact_dir, path in files.items():
            path = Path(path)
            if path.is_dir():
                self._call(f"uploading {path.name}/", lambda p=path, a=artifact_dir: self.client.log_artifacts(
                    self.run_id, str(p), a or None))
            elif path.is_file():
                self._call(f"uploading {path.name}", lambda p=path, a=artifact_dir: self.client.log_artifact(
                    self.run_id, str(p), a or None))

    def log_training_outputs(self, model_dir: Path | None = None) -> None:
        """After the model is saved: specs, logs, resources, loss plot; the model/adapter with log_model."""
        if not self.active:
            return
        self.flush()
        out = self.output_dir
        plot = plot_loss(out / "train_log.jsonl", out / "loss.png")
        for name in ("specs.yaml", "train_log.jsonl", "resources.json", "training_curves.svg"):
            self.log_files({"": out / name})
        if not (out / "specs.yaml").is_file():
            self._call("uploading specs.yaml", lambda: self.client.log_text(
                self.run_id, self.specs.to_yaml(), "specs.yaml"))
        if plot is not None:
            self.log_files({"": plot})
        if self.spec.log_model and model_dir is not None and Path(model_dir).is_dir():
            self.log_files({Path(model_dir).name: Path(model_dir)})

    def log_evaluation_outputs(self) -> None:
        """After evaluation: metrics.json and the model card."""
        self.flush()
        for name in ("metrics.json", "README.md", "training_curves.svg"):
            self.log_files({"": self.output_dir / name})

    def finish(self, status: str = "FINISHED", error: BaseException | None = None) -> None:
        if not self.active or self.finished:
            return
        self.flush()
        if self._sender is not None:
            self._sender.close(0)
            self._sender = None
        self._paused_until = 0.0  # the final status is worth one more try
        if error is not None:
            message = truncate(f"{type(error).__name__}: {error}", 5000)
            self._call("recording the error", lambda: self.client.set_tag(self.run_id, "tunepipe.error", message))
        self._call(f"ending the run ({status})", lambda: self.client.set_terminated(self.run_id, status))
        self.finished = True

    # ---- callback events ---------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.run_id is None:
            self.start()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.run_id is None and self._wanted:
            self.start()  # the server was down when training began
        if state.is_world_process_zero and logs:
            self.log_metrics({k: v for k, v in logs.items() if _finite_number(v)}, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.flush()  # also when the callback is used without FineTunePipeLine

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        """Evaluation metrics not already received through on_log at this step."""
        if not (state.is_world_process_zero and metrics):
            return
        step, keys = self._logged_step
        seen = keys if step == state.global_step else set()
        missing = {k: v for k, v in metrics.items() if clean_name(k) not in seen and _finite_number(v)}
        if missing:
            self.log_metrics(missing, state.global_step)


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require_mlflow(tracking_uri: str) -> None:
    """Asked-for tracking without the package is a setup error, raised before any training. A server URI needs
    only the client (mlflow-skinny will do); a local SQLite store needs full mlflow (SQLAlchemy, Alembic)."""
    if importlib.util.find_spec("mlflow") is None:
        raise DependencyError("tracking.mlflow is set but MLflow is not installed", field="tracking.mlflow",
                              suggestions=["pip install 'tunepipe[mlflow]'", "or remove tracking.mlflow"])
    if tracking_uri.startswith("sqlite:") and importlib.util.find_spec("sqlalchemy") is None:
        raise DependencyError("A local MLflow store needs full mlflow (only mlflow-skinny is installed)",
                              field="tracking.mlflow.tracking_uri",
                              suggestions=["pip install 'tunepipe[mlflow]'",
                                           "or set tracking.mlflow.tracking_uri to a running mlflow server"])
