"""Multi-process training on the engines' own launchers (CPU, gloo): sharding (each example once per epoch across
ranks), rank-0-only outputs, metrics gathered across ranks, the `distributed` section passed through to each
engine, and the `accelerate launch --cpu` trap detected."""
import json
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tunepipe.specs import load_specs

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()
TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 128}


# ---- the distributed section, per engine --------------------------------------------------------------------------
def _dist(**values):
    return load_specs({"task": "token_classification", "model": "m", "data": {"train": "x"},
                       "distributed": values}).distributed


@pytest.mark.parametrize("backend,section,field", [
    ("accelerate", {"fsdp": {"sharding_strategy": "FULL_SHARD"}}, "distributed.fsdp"),
    ("lightning", {"strategy": "fsdp"}, "distributed.strategy"),
    ("lightning", {"strategy": "deepspeed_stage_3"}, "distributed.strategy"),
    ("lightning+accelerate", {"deepspeed": {"zero_optimization": {"stage": 2}}}, "distributed.deepspeed"),
])
def test_sharded_strategies_refused_where_the_loop_would_save_one_shard(backend, section, field):
    from tunepipe.errors import ConfigError
    with pytest.raises(ConfigError) as caught:
        load_specs({"task": "token_classification", "model": "m", "data": {"train": "x"}, "backend": backend,
                    "distributed": section})
    assert caught.value.field == field and "backend: hf" in str(caught.value.suggestions)
    # the hf backend hands them to transformers' Trainer; ddp stays open everywhere
    load_specs({"task": "token_classification", "model": "m", "data": {"train": "x"}, "distributed": section})
    load_specs({"task": "token_classification", "model": "m", "data": {"train": "x"}, "backend": backend,
                "distributed": {"strategy": "ddp"}})


def test_accelerate_launch_with_fsdp_or_deepspeed_is_refused_by_the_loop(monkeypatch):
    """FSDP/DeepSpeed switched on by `accelerate launch`'s own config reach the Accelerator, not the specs."""
    from accelerate.utils import DistributedType

    from tunepipe.errors import TrainingError
    from tunepipe.trainers.engines import accelerate as engine
    for kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        engine.refuse_sharding(kind)

    class ShardingAccelerator:
        def __init__(self, **kwargs):
            self.distributed_type = DistributedType.FSDP
    monkeypatch.setattr(engine, "Accelerator", ShardingAccelerator)
    specs = load_specs({"task": "token_classification", "model": "m", "data": {"train": "x"}, "backend": "accelerate"})
    args = type("Args", (), {"bf16": False, "fp16": False, "use_cpu": True})()
    with pytest.raises(TrainingError, match="FSDP") as caught:
        engine.AccelerateEngine(args, specs)
    assert "backend: hf" in str(caught.value.suggestions)
    with pytest.raises(TrainingError, match="DEEPSPEED"):
        engine.refuse_sharding(DistributedType.DEEPSPEED)


def test_distributed_section_passes_configs_through():
    from tunepipe.trainers.distributed import accelerator_kwargs, hf_training_values, lightning_strategy
    ds = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}
    assert hf_training_values(_dist(deepspeed=ds))["deepspeed"] == ds
    fsdp = hf_training_values(_dist(fsdp={"fsdp": "full_shard auto_wrap", "min_num_params": 1000}))
    assert fsdp["fsdp"] == "full_shard auto_wrap" and fsdp["fsdp_config"] == {"min_num_params": 1000}
    hf = hf_training_values(_dist(process_group_backend="gloo", find_unused_parameters=True))
    assert hf == {"ddp_backend": "gloo", "ddp_find_unused_parameters": True}
    # Accelerate: DDP kwargs and the process-group backend as kwargs handlers
    kwargs = accelerator_kwargs(_dist(process_group_backend="gloo"))
    kinds = {type(h).__name__: h for h in kwargs["kwargs_handlers"]}
    assert kinds["DistributedDataParallelKwargs"].find_unused_parameters is False
    assert kinds["InitProcessGroupKwargs"].backend == "gloo"
    # Lightning: strategy objects built from the same section
    ddp = lightning_strategy(_dist(strategy="ddp", process_group_backend="gloo"))
    assert type(ddp).__name__ == "DDPStrategy" and ddp._process_group_backend == "gloo"
    assert ddp._start_method == "popen"
    fsdp_strategy = lightning_strategy(_dist(fsdp={"sharding_strategy": "SHARD_GRAD_OP"}))
    assert type(fsdp_strategy).__name__ == "FSDPStrategy"
    assert lightning_strategy(_dist()) == "auto"
    # the HF backend's TrainingArguments receive the values
    from tunepipe.trainers.settings import training_values
    specs = load_specs({"task": "token_classification", "model": "m", "data": {"train": "x"},
                        "distributed": {"process_group_backend": "gloo"}})
    values = training_values(specs, has_eval=False)
    assert values["ddp_backend"] == "gloo" and values["ddp_find_unused_parameters"] is False
    with pytest.raises(Exception) as err:
        load_specs({"task": "token_classification", "model": "m", "data": {"train": "x"},
                    "distributed": {"devcies": 2}})
    assert "devices" in str(err.value)


def test_launch_checks(monkeypatch):
    from tunepipe.trainers.distributed import check_launch
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "ACCELERATE_USE_CPU", "PMI_SIZE"):
        monkeypatch.delenv(key, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_launch("accelerate", _dist())  # plain single process: silent
    # what `accelerate launch --cpu --num_processes 2` leaves in the environment of its single process
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.warns(UserWarning, match="--multi_gpu"):
        check_launch("accelerate", _dist())
    monkeypatch.setenv("WORLD_SIZE", "2")  # a real multi-process launch: silent
    monkeypatch.setenv("RANK", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_launch("accelerate", _dist())
    for key in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(key)
    with pytest.warns(UserWarning, match="torchrun"):
        check_launch("hf", _dist(devices=2))  # devices is Lightning's; the hf backend needs a launcher


# ---- sharding, simulated ranks in one process ---------------------------------------------------------------------
def _args(strategy: str, batch_size: int = 4):
    from tunepipe.trainers.settings import training_settings
    specs = load_specs({"task": "token_classification", "model": "m", "data": {"train": "x"},
                        "training": {"train_sampling_strategy": strategy, "per_device_train_batch_size": batch_size}})
    return training_settings(specs, Path("/tmp/unused"), has_eval=False)


@pytest.mark.parametrize("strategy", ["group_by_length", "random", "sequential"])
@pytest.mark.parametrize("size", [48, 45])
def test_each_example_once_per_epoch_across_ranks(strategy, size):
    """Lightning's loaders (our BatchSamplerShard) and the Accelerate backend's (accelerate.prepare) deal every
    example to exactly one rank per epoch; with a size that does not divide, only the last batches are completed
    with repeated examples (fewer than world_size x batch_size), so all ranks run the same number of steps."""
    import datasets
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    from tunepipe.trainers.data import train_sampler
    from tunepipe.trainers.engines.base import sharded_loader as _sharded_loader
    rng = random.Random(size)
    ds = datasets.Dataset.from_dict({"idx": list(range(size)), "length": [rng.randint(3, 30) for _ in range(size)]})
    args, world = _args(strategy), 2

    def collate(rows):
        return [r["idx"] for r in rows]

    def lightning_ranks():
        samplers = [train_sampler(ds, args) for _ in range(world)]  # one per process, built independently
        return [(s, _sharded_loader(ds, s, args.train_batch_size, collate, args, world, r)) for r, s in enumerate(samplers)]

    def accelerate_ranks():
        out = []
        for r in range(world):
            s = train_sampler(ds, args)
            loader = prepare_data_loader(DataLoader(ds, batch_size=args.train_batch_size, sampler=s, collate_fn=collate),
                                         num_processes=world, process_index=r, put_on_device=False,
                                         use_seedable_sampler=True, data_seed=args.seed)
            out.append((loader, loader))
        return out

    for build in (lightning_ranks, accelerate_ranks):
        ranks = build()
        orders = []
        for epoch in range(3):
            seen = []
            for sampler, loader in ranks:
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(epoch)
                seen.append([i for batch in loader for i in batch])
            assert len(seen[0]) == len(seen[1])  # same number of steps on every rank
            flat = seen[0] + seen[1]
            assert set(flat) == set(range(size)), build.__name__
            repeats = len(flat) - size
            if size % (world * args.train_batch_size) == 0:
                assert repeats == 0 and len(flat) == len(set(flat)), build.__name__
            else:
                assert 0 < repeats < world * args.train_batch_size, build.__name__
            orders.append(flat)
        if strategy != "sequential":
            assert orders[0] != orders[1]  # reshuffled every epoch, identically on every rank


@pytest.mark.parametrize("strategy", ["group_by_length", "random"])
def test_two_ranks_train_on_the_batches_of_one_process_with_the_same_global_batch(strategy):
    """2 ranks x batch 4 see, step by step, the same examples as 1 process x batch 8: a DDP run then trains the
    model a single process would (up to dropout draws and padding), not one of another data order. Length groups
    are cut at the global batch (per device x accumulation x ranks) so that the two ranks' batches of a step are
    halves of the one-process batch."""
    import datasets
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    from tunepipe.trainers.data import train_sampler
    from tunepipe.trainers.engines.base import sharded_loader
    rng = random.Random(3)
    ds = datasets.Dataset.from_dict({"idx": list(range(64)), "length": [rng.randint(3, 60) for _ in range(64)]})

    def collate(rows):
        return [r["idx"] for r in rows]

    one = _args(strategy, batch_size=8)
    single = [set(b) for b in sharded_loader(ds, train_sampler(ds, one), 8, collate, one, 1, 0)]
    two = _args(strategy, batch_size=4)
    two.world_size = 2
    loop_ranks = [list(sharded_loader(ds, train_sampler(ds, two), 4, collate, two, 2, r)) for r in range(2)]
    hf_ranks = [list(prepare_data_loader(DataLoader(ds, batch_size=4, sampler=train_sampler(ds, two),
                                                    collate_fn=collate), num_processes=2, process_index=r,
                                         put_on_device=False, use_seedable_sampler=True, data_seed=two.seed))
                for r in range(2)]
    for ranks in (loop_ranks, hf_ranks):
        assert [set(a) | set(b) for a, b in zip(*ranks)] == single


# ---- real processes ------------------------------------------------------------------------------------------------
PROBE = r'''
"""Run one training with a forward hook that records, per rank, the examples each training step sees."""
import json, os, sys
from pathlib import Path
import yaml
from tunepipe.pipeline import FineTunePipeLine

pipe = FineTunePipeLine(yaml.safe_load(Path(sys.argv[1]).read_text()))
pipe.setup()
seen = []
def hook(module, args, kwargs):
    if module.training and "labels" in kwargs:
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        seen.append([row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu())])
pipe.model.register_forward_pre_hook(hook, with_kwargs=True)
pipe.train()
pipe.evaluate()
rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
Path(sys.argv[2], f"seen-{rank}.json").write_text(json.dumps(seen))
'''


@pytest.fixture(scope="module")
def ddp_job(tmp_path_factory):
    """Unique sentences (so each tokenized row names its example), a tokenizer, and the probe script."""
    d = tmp_path_factory.mktemp("ddp")
    rng = random.Random(7)
    sentences = set()
    while len(sentences) < 64:
        # lengths vary a lot: padded batch shapes then differ between ranks (as in real data)
        sentences.add(tuple(rng.choice(WORDS) for _ in range(rng.randint(3, 40))))
    rows = [{"tokens": list(s), "ner_tags": [rng.choice(["O", "B-LOC", "O"]) for _ in s]} for s in sorted(sentences)]
    for split, part in (("train", rows[:48]), ("validation", rows[48:])):
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    from tunepipe.tiny import train_wordpiece_tokenizer
    train_wordpiece_tokenizer([" ".join(r["tokens"]) for r in rows] * 3, d / "tok", vocab_size=200)
    (d / "probe.py").write_text(PROBE)
    return d


def _launch(ddp_job, tmp_path, backend: str, command: list[str], model: dict | None = None, **training):
    import yaml
    out = tmp_path / "out"
    out.mkdir()
    specs = {"task": "token_classification", "output_dir": str(tmp_path / "run"), "backend": backend,
             "model": {"from_config": model or dict(TINY_BERT)}, "tokenizer": {"name_or_path": str(ddp_job / "tok")},
             "data": {"train": str(ddp_job / "train.jsonl"), "validation": str(ddp_job / "validation.jsonl")},
             "training": {"num_train_epochs": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
                          "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True, "bf16": False,
                          "eval_strategy": "no", "dataloader_pin_memory": False, **training},
             "distributed": {"devices": 2, "strategy": "ddp"} if "lightning" in backend else {}}
    config = tmp_path / "specs.yaml"
    config.write_text(yaml.safe_dump(specs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(command + [str(ddp_job / "probe.py"), str(config), str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, tmp_path / "run", load_specs(str(config))


def _check_ddp_run(ddp_job, out: Path, run: Path, specs):
    # sharding: per epoch, the two ranks together see every training example exactly once (48 = 2 x 4 x 6)
    seen = [json.loads((out / f"seen-{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 12  # 6 steps per epoch per rank, 2 epochs
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(ddp_job / "tok"))
    train = [json.loads(line) for line in open(ddp_job / "train.jsonl")]
    ids = {tuple(tok(r["tokens"], is_split_into_words=True)["input_ids"]): i for i, r in enumerate(train)}
    assert len(ids) == len(train)
    for epoch in range(2):
        rows = [tuple(row) for rank in seen for batch in rank[epoch * 6:(epoch + 1) * 6] for row in batch]
        assert sorted(ids[row] for row in rows) == list(range(len(train))), f"epoch {epoch}"
    # rank 0 alone wrote the log (each step once) and the model; metrics gathered from both ranks equal a
    # single-process evaluation of the saved model on the whole validation set
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 13))
    metrics = json.loads((run / "metrics.json").read_text())["validation"]
    from tunepipe.pipeline import FineTunePipeLine
    single = FineTunePipeLine({**specs.to_dict(), "backend": "hf", "output_dir": str(run.parent / "single"),
                               "data": {"train": str(ddp_job / "train.jsonl"),
                                        "validation": str(ddp_job / "validation.jsonl")}, "distributed": {}})
    single.setup()
    single.load_trained(run / "model")
    single.trainer.model = single.model
    again = single.evaluate(["validation"])["validation"]
    assert metrics["f1"] == pytest.approx(again["f1"], abs=1e-9)
    assert metrics["accuracy"] == pytest.approx(again["accuracy"], abs=1e-9)
    assert metrics["loss"] == pytest.approx(again["loss"], rel=1e-4)


def _free_port() -> str:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _accelerate_cli():
    return [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", _free_port()]


def test_accelerate_launch_two_processes(ddp_job, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU: MULTI_CPU with gloo."""
    out, run, specs = _launch(ddp_job, tmp_path, "accelerate", _accelerate_cli())
    _check_ddp_run(ddp_job, out, run, specs)


def test_two_processes_train_as_one_with_the_same_global_batch(ddp_job, tmp_path):
    """Default sampling (length groups, token-weighted loss), no dropout, fp32: 2 processes x batch 4 under
    `accelerate launch` log the per-step losses of 1 process x batch 8 — DDP changes the speed, not the model."""
    no_dropout = {**TINY_BERT, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    losses = []
    for name, command, batch in (("one", [sys.executable], 8), ("two", _accelerate_cli(), 4)):
        (tmp_path / name).mkdir()
        _, run, _ = _launch(ddp_job, tmp_path / name, "accelerate", command, model=no_dropout,
                            per_device_train_batch_size=batch)
        records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
        losses.append([r["loss"] for r in records if "loss" in r])
    assert len(losses[0]) == len(losses[1]) == 12
    assert losses[1] == pytest.approx(losses[0], rel=2e-3)


def _torchrun():
    return [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", _free_port()]


@pytest.mark.slow
def test_torchrun_two_processes_hf(ddp_job, tmp_path):
    out, run, specs = _launch(ddp_job, tmp_path, "hf", _torchrun(), train_sampling_strategy="random")
    _check_ddp_run(ddp_job, out, run, specs)


@pytest.mark.slow
def test_torchrun_two_processes_hf_group_by_length(ddp_job, tmp_path):
    """transformers' own length-grouped sampler draws its order from the global RNG, which dropout advances
    differently on each rank; the hf backend re-seeds it with seed + epoch, so every rank builds the same order."""
    out, run, specs = _launch(ddp_job, tmp_path, "hf", _torchrun(), train_sampling_strategy="group_by_length")
    _check_ddp_run(ddp_job, out, run, specs)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["lightning", "lightning+accelerate"])
def test_lightning_ddp_two_processes(ddp_job, tmp_path, backend):
    """Lightning launches the second process itself (strategy ddp, devices 2) by re-running the script."""
    out, run, specs = _launch(ddp_job, tmp_path, backend, [sys.executable])
    _check_ddp_run(ddp_job, out, run, specs)


@pytest.mark.slow
def test_accelerate_launch_cpu_trap_warns(ddp_job, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process: the run says so instead of staying silent."""
    import yaml
    config = tmp_path / "specs.yaml"
    config.write_text(yaml.safe_dump({
        "task": "token_classification", "output_dir": str(tmp_path / "run"), "backend": "accelerate",
        "model": {"from_config": dict(TINY_BERT)}, "tokenizer": {"name_or_path": str(ddp_job / "tok")},
        "data": {"train": str(ddp_job / "train.jsonl")},
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "save_strategy": "no", "disable_tqdm": True}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--cpu", "--num_processes", "2",
               "--main_process_port", _free_port(), "-m", "tunepipe", "train", str(config)]
    proc = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "runs a single process" in proc.stderr and "--multi_gpu" in proc.stderr
