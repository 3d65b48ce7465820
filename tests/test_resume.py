"""Exact resume on every backend, for token classification and a seq2seq task: a training process killed with
SIGKILL at a random step (mid-epoch, after at least one checkpoint) and resumed with ``resume: auto`` ends with the
weights, per-step losses and evaluation metrics of the uninterrupted run. SIGTERM stops a run cleanly: it finishes
the step, saves a checkpoint and raises TRAINING_INTERRUPTED; ``resume: auto`` then completes the run.

The interrupted runs are child processes forked from a forkserver that has imported the libraries once, so each
costs a fraction of a second to start; references and resumptions run in this process, with one thread as in the
children."""
import json
import multiprocessing
import os
import random
import signal

import pytest
import torch

from tunepipe.pipeline import FineTunePipeLine

BACKENDS = ["hf", "accelerate", "lightning", "lightning+accelerate"]
SEED = int(os.environ.get("TUNEPIPE_RESUME_SEED", "20261125"))  # picks the kill steps; printed on failure
TINY_T5 = {"model_type": "t5", "d_model": 32, "d_ff": 64, "num_layers": 2, "num_heads": 2, "d_kv": 16}
EN = "man woman dog cat red blue big small runs sits eats sleeps the a on under park house".split()


# ---- the interrupted child ---------------------------------------------------------------------------------------
def _train_child(specs: dict, kill_at: int, mode: str, queue) -> None:
    """Train; at the end of step ``kill_at`` SIGKILL itself (mode 'kill'), or report each step and let the parent
    send SIGTERM (mode 'term')."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if mode == "kill" and state.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if mode == "term":
                queue.put(("step", state.global_step))
                import time
                time.sleep(0.15)  # leave the parent time to send the signal mid-run

    pipe = FineTunePipeLine(specs)
    pipe.setup()
    handler = pipe.trainer if hasattr(pipe.trainer, "add_callback") else pipe.trainer.handler
    handler.add_callback(Interrupt())
    try:
        pipe.train()
    except Exception as e:  # noqa: BLE001 - reported to the parent
        queue.put(("error", getattr(e, "code", type(e).__name__), str(e)))
        return
    queue.put(("done", pipe.train_result.global_step))


@pytest.fixture(scope="module")
def forkserver():
    if torch.cuda.is_available():  # the preloads touch CUDA, and CUDA cannot live on in a forked child
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "tunepipe.pipeline", "tunepipe.trainers.hf",
                                "tunepipe.trainers.accelerated", "tunepipe.trainers.lightning", "peft"])
    return ctx


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Small models run fastest on one thread, and so do several tests sharing a small machine."""


def _run_child(ctx, specs, kill_at, mode="kill"):
    queue = ctx.Queue()
    proc = ctx.Process(target=_train_child, args=(specs, kill_at, mode, queue))
    proc.start()
    return proc, queue


# ---- data and specs ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mt_files(tmp_path_factory):
    rng = random.Random(0)
    d = tmp_path_factory.mktemp("mt")
    files = {}
    for split, n in (("train", 64), ("validation", 12)):
        rows = []
        for _ in range(n):
            words = [rng.choice(EN) for _ in range(rng.randint(3, 8))]
            rows.append({"translation": {"en": " ".join(words), "de": " ".join(w[::-1] + "en" for w in words)}})
        files[split] = d / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    from tunepipe.tiny import train_unigram_tokenizer
    texts = [r["translation"][k] for r in map(json.loads, open(files["train"])) for k in ("en", "de")]
    train_unigram_tokenizer(texts * 3, d / "tok", vocab_size=150)
    return {"train": str(files["train"]), "validation": str(files["validation"]), "tokenizer": str(d / "tok")}


# steps per epoch, epochs, save every: checkpoints fall inside epochs, and the runs cross an epoch boundary
NER = {"batches": 12, "epochs": 2, "save_steps": 5}
MT = {"batches": 8, "epochs": 2, "save_steps": 3}


def _training(plan):
    return {"num_train_epochs": plan["epochs"], "save_strategy": "steps", "save_steps": plan["save_steps"],
            "save_total_limit": None, "logging_steps": 1, "eval_strategy": "no", "warmup_steps": 2,
            "train_sampling_strategy": "group_by_length", "disable_tqdm": True, "dataloader_pin_memory": False}


def ner_specs(tiny_specs, ner_data, backend, out):
    specs = tiny_specs("token_classification", ner_data, backend=backend, training=_training(NER))
    specs["output_dir"] = str(out)
    return specs  # dropout stays on: resuming must restore the RNG


def mt_specs(mt_files, backend, out):
    return {"task": "translation", "output_dir": str(out), "backend": backend,
            "model": {"from_config": dict(TINY_T5)}, "tokenizer": {"name_or_path": mt_files["tokenizer"]},
            "data": {"train": mt_files["train"], "validation": mt_files["validation"], "source_lang": "en",
                     "target_lang": "de"},
            "training": {"per_device_train_batch_size": 8, "learning_rate": 3e-3, **_training(MT)},
            "generation": {"max_new_tokens": 12, "num_beams": 1}}


def kill_step(plan, rng: random.Random) -> int:
    """A step after the first checkpoint, never at an epoch boundary (the kill and the resumed checkpoint are
    mid-epoch, unless the plan saves at epoch ends: then the newest checkpoint before the kill is the first
    epoch's last step)."""
    total = plan["batches"] * plan["epochs"]
    choices = [k for k in range(plan["save_steps"] + 1, total) if k % plan["batches"]]
    if plan.get("boundary"):
        choices = [k for k in choices if k > plan["batches"]][: plan["save_steps"] - 1]
    return rng.choice(choices)


class _StepCounter:
    """Counts the optimizer steps this process actually runs (a resumed run must not start over)."""

    def __init__(self):
        from transformers import TrainerCallback

        class Count(TrainerCallback):
            def on_step_end(inner, args, state, control, **kwargs):
                self.steps.append(state.global_step)

        self.steps, self.callback = [], Count()


def _train_here(specs, counter: _StepCounter | None = None):
    pipe = FineTunePipeLine(specs)
    pipe.setup()
    if counter is not None:
        (pipe.trainer if hasattr(pipe.trainer, "add_callback") else pipe.trainer.handler).add_callback(counter.callback)
    result = pipe.trainer.run_training()
    metrics = pipe.trainer.run_evaluation(pipe.datasets["validation"], "validation")
    weights = {k: v.detach().clone() for k, v in pipe.trainer.trained_model().state_dict().items()}
    losses = {e["step"]: e["loss"] for e in result.log_history if "loss" in e}
    return result, metrics, weights, losses


def _check_exact_resume(ctx, make_specs, plan, backend, tmp_path, case: str):
    rng = random.Random(f"{SEED}-{case}-{backend}")
    kill_at = kill_step(plan, rng)
    why = f"{case}/{backend}: killed at step {kill_at} (TUNEPIPE_RESUME_SEED={SEED})"
    _, ref_metrics, ref_weights, ref_losses = _train_here(make_specs(backend, tmp_path / "reference"))

    interrupted = make_specs(backend, tmp_path / "interrupted")
    proc, _ = _run_child(ctx, interrupted, kill_at)
    proc.join(180)
    assert proc.exitcode == -signal.SIGKILL, f"{why}: child exit code {proc.exitcode}"
    checkpoints = sorted((tmp_path / "interrupted" / "checkpoints").glob("*-*"), key=lambda p: int(p.name.split("-")[1]))
    steps = [int(p.name.split("-")[1]) for p in checkpoints]
    expected = [s for s in range(plan["save_steps"], kill_at, plan["save_steps"])]
    assert steps == expected, f"{why}: checkpoints {steps}"
    resumed_from = steps[-1]
    assert bool(resumed_from % plan["batches"]) != bool(plan.get("boundary")), f"{why}: resumed from {resumed_from}"

    specs = dict(interrupted)
    specs["training"] = {**interrupted["training"], "resume": "auto"}
    counter = _StepCounter()
    result, metrics, weights, losses = _train_here(specs, counter)
    total = plan["batches"] * plan["epochs"]
    assert result.global_step == total, why
    assert counter.steps == list(range(resumed_from + 1, total + 1)), f"{why}: resumed run stepped {counter.steps}"
    assert sorted(losses) == list(range(1, total + 1)), f"{why}: logged steps {sorted(losses)}"
    records = [json.loads(line) for line in (tmp_path / "interrupted" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, total + 1)), f"{why}: train_log.jsonl"
    reference = [json.loads(line) for line in (tmp_path / "reference" / "train_log.jsonl").read_text().splitlines()]
    evaluated = [r["step"] for r in reference if "eval_loss" in r]
    assert [r["step"] for r in records if "eval_loss" in r] == evaluated, f"{why}: evaluations"
    assert [r["step"] for r in result.log_history if "eval_loss" in r] == evaluated, f"{why}: log history"
    for step in range(resumed_from + 1, total + 1):
        assert losses[step] == pytest.approx(ref_losses[step], rel=1e-5), f"{why}: loss at step {step}"
    assert weights.keys() == ref_weights.keys()
    worst = max((weights[k].float() - ref_weights[k].float()).abs().max().item() for k in weights)
    assert worst <= 1e-5, f"{why}: final weights differ by up to {worst:g}"
    assert ref_losses[total] < ref_losses[1], f"{why}: the reference did not train"
    for key, value in ref_metrics.items():
        if key in ("runtime", "samples_per_second", "steps_per_second"):
            continue
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), f"{why}: metric {key}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_resume_token_classification(forkserver, tiny_specs, ner_data, tmp_path, backend):
    _check_exact_resume(forkserver, lambda b, out: ner_specs(tiny_specs, ner_data, b, out), NER, backend,
                        tmp_path, "ner")


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_resume_seq2seq(forkserver, mt_files, tmp_path, backend):
    _check_exact_resume(forkserver, lambda b, out: mt_specs(mt_files, b, out), MT, backend, tmp_path, "mt")


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_resume_lora_adapter(forkserver, tiny_specs, ner_data, tmp_path, backend):
    """PEFT runs checkpoint only the adapter; resuming restores it (and the optimizer over its parameters)."""
    def make(b, out):
        specs = ner_specs(tiny_specs, ner_data, b, out)
        specs["peft"] = {"method": "lora", "r": 4, "dropout": 0.1}
        return specs

    _check_exact_resume(forkserver, make, NER, backend, tmp_path, "lora")


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_resume_from_an_epoch_end_with_per_epoch_evaluation(forkserver, tiny_specs, ner_data, tmp_path,
                                                                  backend):
    """A checkpoint at an epoch's last step, evaluated at the epoch's end: the checkpoint must hold that
    evaluation (log history) and the RNG after it, or the resumed run's dropout drifts from the uninterrupted
    one's."""
    plan = {**NER, "save_steps": 6, "boundary": True}

    def make(b, out):
        specs = ner_specs(tiny_specs, ner_data, b, out)
        specs["training"].update(save_steps=plan["save_steps"], eval_strategy="epoch")
        return specs

    _check_exact_resume(forkserver, make, plan, backend, tmp_path, "epoch-end")


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_resume_masked_language_modeling(forkserver, tiny_specs, tmp_path, backend):
    """Training masks are drawn afresh for every batch: a resumed run must draw the ones the uninterrupted run
    drew (they come from the RNG the checkpoint restores)."""
    words = "the a cat dog sat ran on under mat park red big small quick brown fox jumps over lazy".split()
    rng = random.Random(1)
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))) for _ in range(108)]
    (tmp_path / "train.txt").write_text("\n".join(lines[:96]) + "\n")
    (tmp_path / "validation.txt").write_text("\n".join(lines[96:]) + "\n")
    plan = {"batches": 12, "epochs": 2, "save_steps": 5}

    def make(b, out):
        specs = tiny_specs("masked_language_modeling", {"train": str(tmp_path / "train.txt"),
                                                        "validation": str(tmp_path / "validation.txt"),
                                                        "packing": False, "max_length": 24},
                           backend=b, training=_training(plan))
        specs["output_dir"] = str(out)
        return specs

    _check_exact_resume(forkserver, make, plan, backend, tmp_path, "mlm")


# ---- SIGTERM: finish the step, save, stop cleanly; then resume ---------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_sigterm_saves_and_stops_then_resumes(forkserver, tiny_specs, ner_data, tmp_path, backend):
    from tunepipe.trainers.checkpoints import CheckpointManager
    specs = ner_specs(tiny_specs, ner_data, backend, tmp_path / "run")
    specs["training"].update(save_strategy="no")  # the checkpoint comes from the signal alone
    proc, queue = _run_child(forkserver, specs, 0, mode="term")
    last = 0
    while last < 3:
        kind, *rest = queue.get(timeout=120)
        assert kind == "step", (kind, rest)
        last = rest[0]
    os.kill(proc.pid, signal.SIGTERM)
    while True:
        kind, *rest = queue.get(timeout=120)
        if kind != "step":
            break
        last = rest[0]
    proc.join(60)
    assert proc.exitcode == 0, proc.exitcode  # a clean exit, no crash
    assert kind == "error" and rest[0] == "TRAINING_INTERRUPTED", (kind, rest)
    stopped, text = last, rest[1]
    assert 3 <= stopped < NER["batches"] * NER["epochs"]
    assert f"after step {stopped}" in text and "resume" in text
    manager = CheckpointManager(tmp_path / "run" / "checkpoints")
    assert [CheckpointManager.step_of(p) for p in manager.checkpoints()] == [stopped]
    manager.verify(manager.latest())
    assert not (tmp_path / "run" / "model").exists()  # an interrupted run does not save a final model

    resumed = dict(specs)
    resumed["training"] = {**specs["training"], "resume": "auto"}
    pipe = FineTunePipeLine(resumed)
    pipe.setup()
    result = pipe.trainer.run_training()
    assert result.global_step == NER["batches"] * NER["epochs"]
    assert [e["step"] for e in result.log_history if "loss" in e] == list(range(1, result.global_step + 1))


@pytest.mark.parametrize("stop_at", [NER["batches"], NER["batches"] - 5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_signal_keeps_the_epochs_evaluation_only_at_its_end(tiny_specs, ner_data, tmp_path, backend, stop_at):
    """SIGTERM during an epoch's last step: the epoch-end evaluation still runs before the checkpoint is saved,
    so the checkpoint and the log hold it (the resumed run will not evaluate that epoch again). Mid-epoch: no
    evaluation runs (the resumed run would not have it), and the checkpoint is not written again after one."""
    from transformers import TrainerCallback

    from tunepipe.errors import TunepipeError
    specs = ner_specs(tiny_specs, ner_data, backend, tmp_path / "run")
    specs["training"].update(save_strategy="epoch", eval_strategy="epoch")
    pipe = FineTunePipeLine(specs)
    pipe.setup()
    trainer = pipe.trainer

    class Term(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)

    (trainer if hasattr(trainer, "add_callback") else trainer.handler).add_callback(Term())
    with pytest.raises(TunepipeError) as err:
        trainer.run_training()
    assert err.value.code == "TRAINING_INTERRUPTED" and f"after step {stop_at}" in err.value.message
    evaluated = [stop_at] if stop_at == NER["batches"] else []
    saved = json.loads((trainer.last_checkpoint / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in saved if "eval_loss" in e] == evaluated, backend
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == evaluated, backend


# ---- two processes: every rank's RNG is saved, and a SIGTERM seen by one rank stops all at the same step ----------
DDP_SCRIPT = r'''
import os, signal, sys
from pathlib import Path
import yaml
from transformers import TrainerCallback
from tunepipe.pipeline import FineTunePipeLine

specs, term_at = yaml.safe_load(Path(sys.argv[1]).read_text()), int(sys.argv[2])
pipe = FineTunePipeLine(specs)
pipe.setup()


class TermRankZero(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == term_at and state.is_world_process_zero:
            os.kill(os.getpid(), signal.SIGTERM)


(pipe.trainer if hasattr(pipe.trainer, "add_callback") else pipe.trainer.handler).add_callback(TermRankZero())
try:
    pipe.train()
except Exception as e:
    if getattr(e, "code", "") == "TRAINING_INTERRUPTED":
        print("INTERRUPTED", e, flush=True)
        sys.exit(3)
    raise
'''


def _free_port() -> str:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch_two(backend, script, config, term_at, cwd):
    import subprocess
    import sys
    from pathlib import Path
    bin_dir = Path(sys.executable).parent
    if backend == "accelerate":
        command = [str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", _free_port()]
    elif backend == "hf":
        command = [str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", _free_port()]
    else:
        command = [sys.executable]  # Lightning starts the second process itself
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command + [str(script), str(config), str(term_at)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["hf", "accelerate", "lightning"])
def test_two_process_sigterm_on_one_rank_then_exact_resume(tiny_specs, ner_data, tmp_path, backend):
    import yaml
    from safetensors.torch import load_file
    script = tmp_path / "train.py"
    script.write_text(DDP_SCRIPT)

    def config(name, **training):
        specs = ner_specs(tiny_specs, ner_data, backend, tmp_path / name)
        specs["training"].update(per_device_train_batch_size=4, **training)
        if backend == "lightning":
            specs["distributed"] = {"devices": 2, "strategy": "ddp", "accelerator": "cpu"}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(specs))
        return path

    done = _launch_two(backend, script, config("reference"), 0, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    stopped = _launch_two(backend, script, config("run"), 7, tmp_path)
    assert stopped.returncode != 0 and "INTERRUPTED" in stopped.stdout, stopped.stdout[-2000:] + stopped.stderr[-3000:]
    checkpoint = tmp_path / "run" / "checkpoints" / ("checkpoint-7" if backend == "hf" else "step-7")
    assert (checkpoint / "manifest.json").is_file()
    assert {p.name for p in checkpoint.glob("rng_state*.pth")} >= {"rng_state_1.pth"}
    resumed = _launch_two(backend, script, config("run", resume="auto"), 0, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref, got = (load_file(str(tmp_path / n / "model" / "model.safetensors")) for n in ("reference", "run"))
    worst = max((ref[k] - got[k]).abs().max().item() for k in ref)
    assert worst <= 1e-5, f"{backend}: final weights differ by up to {worst:g}"
