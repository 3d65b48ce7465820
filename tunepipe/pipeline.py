"""FineTunePipeLine: orchestration only (no task logic). Reads the typed specs and runs the seven steps.

Order differs from the design map in one way, on purpose: the data is read and validated *before* the model is
loaded, so a bad record fails in a second instead of after a model download.

Other stages' modules are imported inside the functions that use them: this file is on the start-up
path of `tunepipe train`, where a specs typo is reported before they load (tests/test_import_placement.py).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from . import saved_run
from .errors import ConfigError, ErrorHandler
from .evaluation_records import add_evaluation, adopt_trained_labels
from .evaluation_records import reported_metrics as _reported_metrics
from .specs import Specs, load_specs

log = logging.getLogger("tunepipe")
SPECS_FILE_NAMES = ("specs.yaml", "specs.yml", "config.yaml", "config.yml", "args.json", "config.json")


def _legacy_extras(task_type, chosen_metric, quantization, peft_method, peft_config, use_lightning, use_accelerate):
    extra: dict[str, Any] = {"task_type": task_type}
    if chosen_metric:
        extra["training"] = {"metric_for_best_model": chosen_metric}
    if quantization:
        extra["quantization_type"] = quantization
    if peft_method:
        extra["use_peft"], extra["peft_method"] = True, peft_method
    if peft_config:
        extra.setdefault("peft", {})["config"] = dict(peft_config)
        extra.setdefault("use_peft", True)
    if use_lightning:
        extra["use_lightning"] = True
    if use_accelerate:
        extra["use_accelerate"] = True
    return extra


def _resolve_source(source):
    """The original design passed ``args_dir``: accept a directory holding a specs file, too."""
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        for name in SPECS_FILE_NAMES:
            if (Path(source) / name).is_file():
                return Path(source) / name
        raise ConfigError(f"No specs file in directory {source}", file=str(source),
                          suggestions=[f"put one of {', '.join(SPECS_FILE_NAMES)} there"])
    return source


class FineTunePipeLine:
    """Fine-tune a model end to end from one specs object.

    ``FineTunePipeLine(specs)`` with a dict, a YAML/JSON path or a :class:`Specs`; or the original signature
    ``FineTunePipeLine(args_dir, task_type, chosen_metric=None, quantization=None, peft_method=None,
    peft_config=None, use_lightning=False, use_accelerate=False)``.
    """

    def __init__(self, args_dir=None, task_type: str | None = None, chosen_metric: str | None = None,
                 quantization: str | None = None, peft_method: str | None = None, peft_config: dict | None = None,
                 use_lightning: bool = False, use_accelerate: bool = False, *, specs=None,
                 overrides: Sequence[str] | None = None):
        source = specs if specs is not None else args_dir
        if source is None:
            raise ConfigError("FineTunePipeLine needs specs: a dict, a YAML/JSON path, or a Specs object",
                              suggestions=["FineTunePipeLine('ner.yaml') or FineTunePipeLine({'task': ...})"])
        extras = _legacy_extras(task_type, chosen_metric, quantization, peft_method, peft_config,
                                use_lightning, use_accelerate)
        extras = {k: v for k, v in extras.items() if v is not None}
        if isinstance(source, dict):
            source = {**source, **{k: v for k, v in extras.items() if k != "training"}}
            if "training" in extras:
                source["training"] = {**(source.get("training") or {}), **extras["training"]}
            extras = {}
        self.specs: Specs = load_specs(_resolve_source(source), overrides=list(overrides or []), **extras)
        from .extensions import build_task
        self.task = build_task(self.specs)  # the task, with the specs' metrics: functions around compute_metrics
        from .ownership import expand
        self.specs.output_dir = str(expand(self.specs.output_dir))  # `~/runs/x`, everywhere the specs are read
        self.output_dir = Path(self.specs.output_dir)
        self.model = None
        self.tokenizer = None
        self.trainer = None
        self.data = None
        self.datasets: dict[str, Any] = {}
        self.metrics: dict[str, Any] = {}
        self.tracking = None  # tracking.Tracking: resource monitor + MLflow run (set up in setup())
        self._in_run = False
        self._locked = False  # holds output_dir's write lock (ownership.acquire)
        self._replace_previous = False  # a run of other specs is replaced (--overwrite)
        self._replaced_entries: list[str] = []  # what of a previous run goes when training starts
        self._created_dir = None  # the top-most directory of output_dir that setup() created
        self._trained_dir = None  # set by setup(trained_dir): evaluating a saved model (`tunepipe evaluate`)

    # ---- steps -------------------------------------------------------------------------------------------
    def _check_supported(self) -> None:
        """Refuse PEFT / quantization combinations this task, model or device cannot run, before loading data."""
        from .modeling.peft_support import check_peft_specs, skeleton_for_specs
        from .modeling.quantization import QuantizationManager
        if self.specs.data.streaming:
            from .data.stream import check_streaming_specs
            check_streaming_specs(self.specs, self.task)
        QuantizationManager(self.specs).check_supported()
        if self.specs.training.fp16:  # fp16 needs CUDA: say so before any data is read or directory made
            from .modeling.type_utils import resolve_precision
            resolve_precision(self.specs.training)
        check_peft_specs(self.specs, self.task, skeleton=skeleton_for_specs(self.specs, self.task))
        from .tracking.reporting import check_report_to
        check_report_to(self.specs)  # training.report_to: names, packages, backend (a typed error before the data)

    def setup(self, trained_dir: str | Path | None = None) -> "FineTunePipeLine":
        """Steps 1-4 (see ``_setup``); an output_dir this call created is removed again if setting up fails."""
        import shutil

        from .output import first_missing_dir
        created = self._created_dir = first_missing_dir(Path(self.output_dir))
        try:
            return self._setup(trained_dir)
        except BaseException:
            self._unlock()
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            raise

    def _input_paths(self, trained_dir) -> dict[str, set[str]]:
        """What this run reads from disk, which its writes must never replace (ownership.check_inputs)."""
        from .modeling.models import encoder_decoder_sides
        inputs = {f"{split} data": {s.name for s in sources if s.kind in ("file", "saved")}
                  for split, sources in self.data.sources.items()}
        spec = self.specs.model
        models = {spec.name_or_path, self.specs.tokenizer.name_or_path, trained_dir}
        if spec.encoder_decoder:
            models |= set(encoder_decoder_sides(spec.encoder_decoder))
        inputs["model being loaded"] = {str(m) for m in models if m and Path(str(m)).expanduser().exists()}
        return inputs

    def _check_before_writing(self, trained_dir) -> None:
        """Data and specs that fit, yet would fail (or destroy something) once training starts; then the
        output_dir is claimed (ownership: a fresh directory or a tunepipe run, locked for this process)."""
        from .ownership import make_claimed
        target = self.check_output_dir(trained_dir)
        make_claimed(target, kind="run")
        self._locked = True

    def check_output_dir(self, trained_dir=None) -> Path:
        """The read-only half of ``_check_before_writing`` (also what `tunepipe check` runs): output_dir rules,
        a previous run of other specs, validation data the settings need. Creates and locks nothing."""
        from .output import EVALUATION_ENTRIES, RUN_ENTRIES
        from .ownership import check_claim
        writes = EVALUATION_ENTRIES if trained_dir is not None else RUN_ENTRIES
        target = check_claim(self.output_dir, kind="run", writes=writes, inputs=self._input_paths(trained_dir))
        t = self.specs.training
        if trained_dir is None and not getattr(t, "resume", None) and not t.resume_from_checkpoint:
            # a previous run's files (all of it with --overwrite, else its history) go when training starts
            self._replaced_entries, self._replace_previous = saved_run.replaced_entries(self.output_dir, self.specs)
        if trained_dir is None and not (self.data.records.get("validation")
                                        and len(self.data.records["validation"])):
            hint = "add validation data: data.validation (a file) or data.validation_split: 0.1"
            if t.load_best_model_at_end:
                raise ConfigError("load_best_model_at_end needs validation data to tell the best model",
                                  suggestions=[hint, "or set training.load_best_model_at_end: false"],
                                  field="training.load_best_model_at_end")
            if t.eval_strategy == "steps":
                raise ConfigError("eval_strategy 'steps' evaluates on validation data, and there is none",
                                  field="training.eval_strategy",
                                  suggestions=[hint, "or set training.eval_strategy: no"])
        return target

    def _unlock(self) -> None:
        if self._locked:
            from .ownership import release
            release(Path(self.output_dir).resolve())
            self._locked = False

    def _lock(self) -> None:
        if not self._locked:
            from .ownership import acquire
            acquire(Path(self.output_dir).resolve())
            self._locked = True

    def _check_metric_for_best_model(self) -> None:
        """A metric name the task does not report fails at the first evaluation, after a whole epoch: check it
        now, by scoring a perfect prediction of (some of) the validation labels with the task's compute_metrics."""
        import difflib
        t = self.specs.training
        name = t.metric_for_best_model
        ds = self.datasets.get("validation")
        if not name or ds is None or self.task.generative or "labels" not in ds.column_names or (
                t.eval_strategy == "no" and not t.load_best_model_at_end):
            return
        key = name[len("eval_"):] if name.startswith("eval_") else name
        for n in (64, len(ds)):
            produced = _reported_metrics(self.task, ds[:n]["labels"])
            if produced is None or key in produced:
                return
        raise ConfigError(f"training.metric_for_best_model '{name}' is not a metric {self.task.name} reports",
                          field="training.metric_for_best_model",
                          suggestions=[f"did you mean '{c}'?" for c in dict.fromkeys(
                              [m for m in sorted(produced) if key.startswith(m) or m.startswith(key)]
                              + difflib.get_close_matches(key, sorted(produced), n=2, cutoff=0.4))][:2] + [
                              f"{self.task.name} reports: {', '.join(sorted(produced))}"])

    def _setup(self, trained_dir: str | Path | None = None) -> "FineTunePipeLine":
        """Steps 1-4: data (validated first), tokenizer, model, tokenized datasets, trainer.
        With ``trained_dir`` the model and tokenizer come from a finished run (for evaluation)."""
        from .data import DatasetModules
        from .modeling.models import ModelModules, TokenizerModules
        from .output import ensure_writable
        from .trainers import select_trainer

        self._check_supported()
        self.data = DatasetModules(self.specs, self.task)
        self._trained_dir = trained_dir  # evaluating a saved model: only the splits it scores are read
        streaming = self.specs.data.streaming and trained_dir is None  # train is read while training
        scored = ("validation", "test") if trained_dir is not None or streaming else None
        if trained_dir is not None:
            adopt_trained_labels(self.task, trained_dir)
        self.data.load(scored)
        trainer_cls = select_trainer(self.task, self.specs.backend)  # after the data: its import takes seconds
        self._check_before_writing(trained_dir)
        ensure_writable(self.output_dir)
        with ErrorHandler.guard("setting the seed"):
            from transformers import set_seed
            set_seed(self.specs.training.seed)
        if trained_dir is not None:
            self.load_trained(trained_dir)
        else:
            self.tokenizer = TokenizerModules(self.specs).load(self.task)
            self.model = ModelModules(self.specs).load(self.task, self.tokenizer)
            from .modeling.type_utils import TypeUtils
            self.memory_estimate = TypeUtils.check_memory(self.model, self.specs)  # warns before an OOM
        self.datasets = self.data.prepare(self.tokenizer, scored)
        if streaming:
            self.datasets["train"] = self.data.stream(self.tokenizer)
        if trained_dir is None:
            self._check_metric_for_best_model()
        from .tracking.run_tracking import Tracking
        self.tracking = Tracking(self.specs, self.output_dir)
        self.trainer = trainer_cls(self.task, self.specs, self.model, self.tokenizer, self.datasets, self.output_dir,
                                   callbacks=self.tracking.callbacks)
        self.tracking.attach(self.trainer)
        return self

    def train(self):
        """Step 5-6: train, then save the final model (atomically) with specs and logs."""
        if self.trainer is None:
            self.setup()
        self._lock()
        if self._replaced_entries and self.trainer.is_main_process:
            from .ownership import remove_entries
            remove_entries(self.output_dir, self._replaced_entries)
            self._replaced_entries = []
        self.tracking.start(self.trainer.is_main_process)
        saved = None
        try:
            with ErrorHandler.guard("training"):
                self.train_result = self.trainer.run_training()
            self.model = self.trainer.trained_model()
            if self.trainer.is_main_process:
                saved = self.save()
                if not self.specs.training.keep_optimizer_state:  # the run is done: its optimizer state goes
                    from .trainers.checkpoints import CheckpointManager
                    CheckpointManager.for_specs(self.specs).drop_optimizer_state()
        except BaseException as e:  # the MLflow run ends FAILED (KILLED on Ctrl-C), then the error goes on
            if self.trainer.is_main_process:
                # the curve up to the failure (a diverging loss, say); nothing else half-made stays
                saved_run.write_curves(self.specs, self.task, self.output_dir)
                saved_run.remove_failed_leftovers(self.output_dir, self._created_dir)
            self.tracking.finish(error=e)
            if not self._in_run:
                self._unlock()
            raise
        if self.trainer.is_main_process:
            saved_run.write_curves(self.specs, self.task, self.output_dir)
        self.tracking.training_done(saved, self.train_result.global_step)
        if not self._in_run:
            self.tracking.finish()
            self._unlock()
        return self.train_result

    def evaluate(self, splits: Sequence[str] = ("validation", "test")) -> dict[str, Any]:
        """Step 7: task metrics on each labelled split -> metrics.json."""
        if self.trainer is None:
            self.setup()
        self._lock()
        try:
            return self._evaluate(splits)
        finally:
            if not self._in_run:
                self._unlock()

    def _evaluate(self, splits: Sequence[str]) -> dict[str, Any]:
        for split in splits:
            ds = self.datasets.get(split)
            if ds is None:
                continue
            if not self.task.can_evaluate(ds):  # said, not skipped silently: the split was given to be scored
                log.warning("the %s split has no labels: it is not scored (tunepipe predict writes its "
                            "predictions)", split)
                continue
            reused = self.trainer.final_evaluation(ds, split)  # training scored these very weights already
            if reused is not None:
                self.metrics[split] = reused
                continue
            self.task.eval_split = split
            with ErrorHandler.guard(f"evaluating on {split}"), \
                    self.tracking.evaluating(split, ds, self.trainer.is_main_process):
                self.metrics[split] = self.trainer.run_evaluation(ds, split=split)
            if self._trained_dir is not None:  # a saved model scored: no training epoch to report (it said 0)
                self.metrics[split].pop("epoch", None)
            self.task.eval_split = "validation"
        if getattr(self, "train_result", None) is not None:  # a finished run resumed keeps its training's metrics
            self.metrics["train"] = (self.train_result.already_trained and saved_run.train_metrics(self.output_dir)
                                     or self.train_result.train_metrics)
        if self.trainer.is_main_process and self._trained_dir is not None:  # beside the run's records, never over
            add_evaluation(self.output_dir, self.metrics, self._trained_dir, self.data)
        elif self.trainer.is_main_process:
            from .output import write_json
            write_json(self.output_dir / "metrics.json", self.metrics)
            saved_run.write_curves(self.specs, self.task, self.output_dir)
            saved_run.write_card(self.specs, self.task, self.output_dir, self.metrics, self.datasets)
        if self.trainer.is_main_process:
            self.tracking.evaluation_done()
        return self.metrics

    def run(self):
        """Train, save, evaluate; returns ``(model, tokenizer)``."""
        self._in_run = True  # one MLflow run for train + evaluate
        try:
            self.setup()
            self.train()
            self.evaluate()
        except BaseException as e:
            if self.tracking is not None:
                self.tracking.finish(error=e)
            raise
        finally:
            self._in_run = False
            self._unlock()
        self.tracking.finish()
        return self.model, self.tokenizer

    def predict(self, inputs, batch_size: int = 32, **kwargs) -> list[dict[str, Any]] | dict[str, Any]:
        """Task post-processed predictions for one input or a list (the trained model, or output_dir/model)."""
        # a list is always a batch (pre-split words: a list of lists); a dict is one record (QA: question+context)
        single = isinstance(inputs, (str, dict))
        items = [inputs] if single else list(inputs)
        if self.model is None:
            self.load_trained()
        from .modeling.type_utils import TypeUtils
        with TypeUtils.plain_forward(self.model):  # full precision, as the saved model will be reloaded
            results = self.task.predict(self.model, self.tokenizer, items, batch_size=batch_size, **kwargs)
        return results[0] if single else results

    def load_trained(self, model_dir: str | Path | None = None):
        """Load the saved model of this run (output_dir/model) for prediction or evaluation."""
        self.model, self.tokenizer = saved_run.load_trained(self.specs, self.task, self.output_dir, model_dir)
        return self.model, self.tokenizer

    # ---- output (written by saved_run.py) -----------------------------------------------------------------
    def save(self) -> Path:
        """The trained model (or adapter) and specs.yaml into output_dir; returns where the model went."""
        return saved_run.save_model(self.model, self.tokenizer, self.specs, self.task, self.output_dir)


def run_from_specs(source, overrides: Sequence[str] | None = None) -> FineTunePipeLine:
    pipe = FineTunePipeLine(source, overrides=overrides)
    pipe.run()
    return pipe
