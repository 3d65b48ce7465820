"""MLflow tracking against a real `mlflow server` on localhost (started once for the module), a local default store,
and a server killed in the middle of a run."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pytest

pytest.importorskip("mlflow")
from transformers import TrainerCallback  # noqa: E402

from tunepipe import FineTunePipeLine  # noqa: E402
from tunepipe.tracking.mlflow_run import (TRUNCATION_MARKER, MlflowTracker, TrackingWarning, clean_name,  # noqa: E402
                               mlflow_limits, specs_params)

LONG_NOTE = "n" * 7000  # over MLflow's 6000-character param limit, under its 8000-character tag limit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` (sqlite store, artifacts proxied to a local folder); restartable on the same
    store and port after a test kills it."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]
        self.log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.kill()
        raise RuntimeError("mlflow server did not answer /health in time")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the server's process group (the server and the workers it started)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    yield srv
    srv.kill()


@pytest.fixture
def mlflow_uri(server):
    if not server.alive:  # a test killed it
        server.start()
    return server.uri


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Small models run fastest on one thread, and so do several tests sharing a small machine."""


def client(uri):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def only_run(uri, experiment):
    exp = client(uri).get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} not created"
    runs = client(uri).search_runs([exp.experiment_id])
    assert len(runs) == 1, f"expected one run, found {len(runs)}"
    return runs[0]


def log_records(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "train_log.jsonl").read_text().splitlines()]


class AtStep(TrainerCallback):
    def __init__(self, step: int, action):
        self.step, self.action, self.done = step, action, False

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and not self.done:
            self.done = True
            self.action()


# ---- unit: params ------------------------------------------------------------------------------------------------
def test_specs_flatten_to_dot_keys_and_long_values_are_truncated_with_a_marker():
    limit, _ = mlflow_limits()
    assert limit == 6000  # MLflow 3's MAX_PARAM_VAL_LENGTH (mlflow/utils/validation.py)
    params, truncated = specs_params({"training": {"learning_rate": 1e-3, "tags": {"a b:c": "x"}},
                                      "data": {"labels": ["O", "B-PER"], "train": None},
                                      "note": "y" * 7000})
    assert params["training.learning_rate"] == "0.001"
    assert params["data.labels"] == '["O", "B-PER"]'
    assert "data.train" not in params  # None leaves are left to the specs.yaml artifact
    assert params["training.tags.a b_c"] == "x"  # ':' is refused on Windows stores
    assert len(params["note"]) == limit and params["note"].endswith(TRUNCATION_MARKER)
    assert truncated == ["note"]
    assert clean_name("eval/f1 (macro)") == "eval/f1 _macro_"


def test_a_failing_store_gives_one_warning_and_never_raises(tmp_path):
    from tunepipe.specs import MlflowSpec, load_specs
    specs = load_specs({"task": "token_classification", "output_dir": str(tmp_path / "run")})
    tracker = MlflowTracker(MlflowSpec(tracking_uri=f"http://127.0.0.1:{free_port()}"), specs, tmp_path / "run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tracker.start() is None  # nobody listens on that port: refused at once
        tracker.log_metrics({"loss": 1.0}, 1)
        state = type("State", (), {"is_world_process_zero": True, "global_step": 2})()
        tracker.on_log(None, state, None, logs={"loss": 1.0})  # retries start() only after the pause
        tracker.finish("FINISHED")
    assert [w.category for w in caught if issubclass(w.category, TrackingWarning)] == [TrackingWarning]
    assert tracker.failures == 1 and tracker.run_id is None
    tracker._paused_until = 0.0  # the pause is over: the next logging step tries again, silently
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker.on_log(None, state, None, logs={"loss": 1.0})
    assert tracker.failures == 2 and not [w for w in caught if issubclass(w.category, TrackingWarning)]
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"  # short limits unless the user set them


def test_tracking_without_mlflow_installed_fails_before_training(tmp_path, monkeypatch):
    import importlib.util

    from tunepipe.errors import DependencyError
    from tunepipe.specs import load_specs
    from tunepipe.tracking.run_tracking import Tracking
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    specs = load_specs({"task": "token_classification", "output_dir": str(tmp_path / "run"),
                        "tracking": {"mlflow": {"experiment": "x"}}})
    with pytest.raises(DependencyError) as err:
        Tracking(specs, tmp_path / "run")
    assert err.value.code == "IMPORT_ERROR" and err.value.field == "tracking.mlflow"
    assert any("tunepipe[mlflow]" in s for s in err.value.suggestions)


# ---- against a real server -----------------------------------------------------------------------------------------
def test_real_server_gets_params_step_metrics_eval_metrics_and_artifacts(mlflow_uri, tiny_specs, ner_data):
    specs = tiny_specs("token_classification", ner_data, tracking={"mlflow": {
        "tracking_uri": mlflow_uri, "experiment": "ner-real-server", "run_name": "tiny-ner",
        "tags": {"team": "nlp", "note": LONG_NOTE}, "log_model": True}})
    pipe = FineTunePipeLine(specs)
    pipe.run()

    run = only_run(mlflow_uri, "ner-real-server")
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-ner"
    assert run.data.tags["team"] == "nlp" and run.data.tags["tunepipe.task"] == "token_classification"
    params = run.data.params
    assert params["training.learning_rate"] == "0.001" and params["task"] == "token_classification"
    assert params["model.from_config.hidden_size"] == "32"
    note = params["tracking.mlflow.tags.note"]
    assert len(note) == 6000 and note.endswith(TRUNCATION_MARKER) and note.startswith("nnn")
    assert "tracking.mlflow.tags.note" in run.data.tags["tunepipe.truncated_params"]

    # every training log, with its step, as train_log.jsonl has it
    records = [r for r in log_records(pipe.output_dir) if "loss" in r]
    assert len(records) == pipe.train_result.global_step // 2  # logging_steps: 2
    history = client(mlflow_uri).get_metric_history(run.info.run_id, "loss")
    assert [(m.step, round(m.value, 6)) for m in history] == [(r["step"], round(r["loss"], 6)) for r in records]
    speed = client(mlflow_uri).get_metric_history(run.info.run_id, "samples_per_second")
    assert [m.step for m in speed] == [r["step"] for r in records]
    # evaluation during training (eval_*) and the final evaluation (validation_*)
    final_step = pipe.train_result.global_step
    eval_f1 = client(mlflow_uri).get_metric_history(run.info.run_id, "eval_f1")
    assert [m.step for m in eval_f1] == [final_step]
    assert run.data.metrics["validation_f1"] == pytest.approx(pipe.metrics["validation"]["f1"])
    assert run.data.metrics["resources.samples"] == 96

    artifacts = {a.path for a in client(mlflow_uri).list_artifacts(run.info.run_id)}
    assert {"specs.yaml", "metrics.json", "loss.png", "README.md", "train_log.jsonl", "resources.json",
            "model"} <= artifacts
    model_files = {Path(a.path).name for a in client(mlflow_uri).list_artifacts(run.info.run_id, "model")}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= model_files
    import mlflow.artifacts
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="specs.yaml",
                                                tracking_uri=mlflow_uri, dst_path=str(pipe.output_dir / "dl"))
    assert Path(local).read_text() == (pipe.output_dir / "specs.yaml").read_text()


def test_train_then_evaluate_separately_fill_one_run(mlflow_uri, tiny_specs, ner_data):
    specs = tiny_specs("token_classification", ner_data, tracking={"mlflow": {
        "tracking_uri": mlflow_uri, "experiment": "train-then-evaluate"}},
                       training={"eval_strategy": "no"})
    pipe = FineTunePipeLine(specs).setup()
    pipe.train()
    run = only_run(mlflow_uri, "train-then-evaluate")
    assert run.info.status == "FINISHED" and "validation_f1" not in run.data.metrics
    pipe.evaluate()
    run = only_run(mlflow_uri, "train-then-evaluate")
    assert run.data.metrics["validation_f1"] == pytest.approx(pipe.metrics["validation"]["f1"])
    assert {"metrics.json", "README.md", "specs.yaml"} <= {
        a.path for a in client(mlflow_uri).list_artifacts(run.info.run_id)}
    assert "model" not in {a.path for a in client(mlflow_uri).list_artifacts(run.info.run_id)}  # log_model off


def test_crashed_training_leaves_its_run_failed_in_the_local_default_store(tiny_specs, ner_data):
    specs = tiny_specs("token_classification", ner_data, tracking={"mlflow": {"experiment": "crash"}})
    pipe = FineTunePipeLine(specs).setup()

    def boom():
        raise RuntimeError("boom at step 3")

    pipe.trainer.add_callback(AtStep(3, boom))
    with pytest.raises(Exception, match="boom at step 3"):
        pipe.train()
    store = pipe.output_dir / "mlruns" / "mlflow.db"  # no tracking_uri: a SQLite store under output_dir
    assert store.is_file()
    uri = f"sqlite:///{store}"
    run = only_run(uri, "crash")
    assert run.info.status == "FAILED" and run.info.end_time is not None
    assert "boom at step 3" in run.data.tags["tunepipe.error"]
    assert [m.step for m in client(uri).get_metric_history(run.info.run_id, "loss")] == [2]  # logged before it
    assert not (pipe.output_dir / "model").exists()


def test_run_status_names_why_training_ended():
    from tunepipe.errors import TrainingError
    from tunepipe.tracking.run_tracking import Tracking

    class Recorder:
        def finish(self, status, error=None):
            self.status = status

    class Interrupted(TrainingError):
        code = "TRAINING_INTERRUPTED"

    tracking = Tracking.__new__(Tracking)
    tracking.monitor, tracking.mlflow = None, Recorder()
    for error, status in ((None, "FINISHED"), (RuntimeError("x"), "FAILED"), (KeyboardInterrupt(), "KILLED"),
                          (Interrupted("stopped by SIGTERM"), "KILLED"), (TrainingError("nan loss"), "FAILED")):
        tracking.finish(error)
        assert tracking.mlflow.status == status, error


def test_server_killed_mid_run_warns_once_and_training_completes(server, mlflow_uri, tiny_specs, ner_data,
                                                                  recwarn):
    specs = tiny_specs("token_classification", ner_data, tracking={"mlflow": {
        "tracking_uri": mlflow_uri, "experiment": "ner-server-dies"}})
    pipe = FineTunePipeLine(specs).setup()
    killed_at = {}

    def kill():
        assert pipe.tracking.mlflow.flush()  # steps 2 and 4 reached the server (metrics go from a thread)
        server.kill()
        killed_at["t"] = time.monotonic()

    pipe.trainer.add_callback(AtStep(5, kill))
    result = pipe.train()
    pipe.evaluate()
    after_kill = time.monotonic() - killed_at["t"]

    assert not server.alive and result.global_step == 12
    assert (pipe.output_dir / "model" / "model.safetensors").is_file()
    assert (pipe.output_dir / "metrics.json").is_file() and (pipe.output_dir / "README.md").is_file()
    assert [r["step"] for r in log_records(pipe.output_dir) if "loss" in r] == [2, 4, 6, 8, 10, 12]
    tracking_warnings = [w for w in recwarn if issubclass(w.category, TrackingWarning)]
    assert len(tracking_warnings) == 1, [str(w.message) for w in tracking_warnings]
    assert "Training continues" in str(tracking_warnings[0].message)
    assert after_kill < 30, f"a dead server stalled training for {after_kill:.0f} s"

    # what was logged before the kill is on the server (restarted on the same store)
    server.start()
    run = only_run(server.uri, "ner-server-dies")
    steps = [m.step for m in client(server.uri).get_metric_history(run.info.run_id, "loss")]
    assert steps[:2] == [2, 4] and 12 not in steps
    assert run.info.status == "RUNNING"  # the end could not be recorded; the warning said so


@pytest.mark.slow
def test_two_process_run_logs_once_from_the_main_process(tiny_specs, ner_data, tmp_path):
    """torchrun, 2 CPU processes (gloo): one MLflow run, each logging step once, throughput scaled to both ranks."""
    specs = tiny_specs("token_classification", ner_data, tracking={"mlflow": {"experiment": "ddp"}})
    (tmp_path / "specs.json").write_text(json.dumps(specs))
    script = tmp_path / "train.py"
    script.write_text("import json, sys\nfrom tunepipe import FineTunePipeLine\n"
                      "FineTunePipeLine(json.load(open(sys.argv[1]))).run()\n")
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), str(script),
                    str(tmp_path / "specs.json")], check=True, timeout=300,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = Path(specs["output_dir"])
    uri = f"sqlite:///{out / 'mlruns' / 'mlflow.db'}"
    run = only_run(uri, "ddp")
    assert run.info.status == "FINISHED"
    assert [m.step for m in client(uri).get_metric_history(run.info.run_id, "loss")] == [2, 4, 6]  # 48 per rank
    summary = json.loads((out / "resources.json").read_text())
    assert summary["processes"] == 2 and summary["samples"] == 96
