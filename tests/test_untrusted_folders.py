"""A run folder received from elsewhere must not run code on load (docs/security.md).

The crafted run below asks for remote code everywhere a folder can: its specs.yaml and adapter record say
trust_remote_code, the record's model_kwargs carry trust_remote_code/subfolder/code_revision, the base's config and
the adapter's tokenizer config name Python files through auto_map. Those files write a marker when imported. No
entry point may import them (predict, merge, InferencePipeLine, MultiAdapterManager, the server's adapter route),
and the same folder *does* run them when the caller passes trust_remote_code, so the marker check can fail.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunepipe.cli import main as cli_main
from tunepipe.errors import ConfigError, TunepipeError

LABELS = ["O", "B-PER", "I-PER"]
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 64}

# Each class writes the marker when used, not only when imported: a module imported once stays cached in the
# process, and later entry points must be caught too.
EVIL_MODEL = '''
import pathlib
pathlib.Path({marker!r}).write_text("model code ran")
from transformers import BertConfig, BertForTokenClassification


class EvilConfig(BertConfig):
    model_type = "bert"

    def __init__(self, **kwargs):
        pathlib.Path({marker!r}).write_text("config code ran")
        super().__init__(**kwargs)


class EvilModel(BertForTokenClassification):
    config_class = EvilConfig

    def __init__(self, config):
        pathlib.Path({marker!r}).write_text("model code ran")
        super().__init__(config)
'''
EVIL_TOKENIZER = '''
import pathlib
pathlib.Path({marker!r}).write_text("tokenizer code ran")
from transformers import PreTrainedTokenizerFast


class EvilTokenizer(PreTrainedTokenizerFast):
    def __init__(self, *args, **kwargs):
        pathlib.Path({marker!r}).write_text("tokenizer code ran")
        super().__init__(*args, **kwargs)
'''


class _Payload:
    """A pickle that writes the marker when unpickled (an adapter_model.bin from elsewhere)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"import pathlib; pathlib.Path({self.marker!r}).write_text('pickle ran')",))


def _crafted_run(root: Path, tokenizer_dir: str, marker: Path) -> Path:
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    run = root / "run"
    base, adapter = run / "base_model", run / "adapter"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_labels=len(LABELS),
                        **TINY)
    model = BertForTokenClassification(config)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(task_type=TaskType.TOKEN_CLS, r=2, target_modules=["query"]))
    peft_model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    (base / "evil_model.py").write_text(EVIL_MODEL.format(marker=str(marker)))
    cfg = json.loads((base / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil_model.EvilConfig", "AutoModel": "evil_model.EvilModel",
                       "AutoModelForTokenClassification": "evil_model.EvilModel"}
    (base / "config.json").write_text(json.dumps(cfg))
    (adapter / "evil_tokenizer.py").write_text(EVIL_TOKENIZER.format(marker=str(marker)))
    tok_cfg = json.loads((adapter / "tokenizer_config.json").read_text())
    tok_cfg["auto_map"] = {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", "evil_tokenizer.EvilTokenizer"]}
    (adapter / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    record = {"task": "token_classification", "auto_model_class": "AutoModelForTokenClassification",
              "peft_method": "lora", "base_model": str(base), "base_model_relative": "../base_model",
              "trust_remote_code": True, "vocab_size": len(tokenizer),
              "model_kwargs": {"num_labels": len(LABELS), "id2label": dict(enumerate(LABELS)),
                               "label2id": {x: i for i, x in enumerate(LABELS)}, "trust_remote_code": True,
                               "code_revision": "main", "subfolder": "", "auto_map": cfg["auto_map"]}}
    (adapter / "tunepipe_adapter.json").write_text(json.dumps(record))
    (run / "specs.yaml").write_text(yaml.safe_dump({
        "task": "token_classification", "output_dir": str(run),
        "model": {"name_or_path": str(base), "trust_remote_code": True},
        "data": {"train": str(root / "train.jsonl"), "labels": LABELS}}))
    return run


@pytest.fixture(scope="module")
def crafted(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("untrusted")
    marker = root / "MARKER"
    return {"run": _crafted_run(root, tokenizer_dir, marker), "marker": marker, "root": root}


@pytest.fixture(autouse=True)
def no_marker(crafted):
    crafted["marker"].unlink(missing_ok=True)
    yield
    assert not crafted["marker"].exists(), f"code from the folder ran: {crafted['marker'].read_text()}"


def test_predict_cli_runs_no_code_from_the_folder(crafted, capsys, one_torch_thread):
    assert cli_main(["predict", "--model", str(crafted["run"]), "--input", "Ada lives here"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["entities"] is not None


def test_merge_runs_no_code_from_the_folder(crafted, one_torch_thread):
    target = crafted["root"] / "merged"
    assert cli_main(["merge", str(crafted["run"]), "--to", str(target)]) == 0
    assert (target / "config.json").is_file()


def test_inference_pipeline_runs_no_code_from_the_folder(crafted, one_torch_thread):
    from tunepipe import InferencePipeLine
    pipe = InferencePipeLine(checkpoint=str(crafted["run"]))
    assert pipe.task_name == "token_classification"
    assert isinstance(pipe.predict("Ada lives here")["entities"], list)


def test_multi_adapter_manager_runs_no_code_from_the_folder(crafted, one_torch_thread):
    from tunepipe import MultiAdapterManager
    manager = MultiAdapterManager()
    manager.register_adapter("crafted", crafted["run"] / "adapter")
    manager.load_adapter("crafted")
    assert len(manager.predict(["Ada lives here"], adapter="crafted")) == 1


def test_server_adapter_route_runs_no_code_from_the_folder(crafted, tmp_path, one_torch_thread):
    pytest.importorskip("fastapi")
    import shutil

    from fastapi.testclient import TestClient

    from tunepipe import InferencePipeLine
    from tunepipe.serving.serve import create_app
    clean = crafted["root"] / "clean-adapter"  # a plain peft adapter on the same base: the server starts with it
    if not clean.exists():
        shutil.copytree(crafted["run"] / "adapter", clean,
                        ignore=shutil.ignore_patterns("tunepipe_adapter.json", "evil_*", "tokenizer*"))
    pipe = InferencePipeLine(checkpoint=str(crafted["run"] / "base_model"), task_type="token_classification",
                             adapter_config={"clean": str(clean)})
    client = TestClient(create_app(pipe, **_adapter_route_options(crafted["root"])), headers=_auth_headers())
    response = client.post("/v1/adapters", json={"name": "crafted", "path": str(crafted["run"])})
    assert response.status_code == 201, response.text
    response = client.post("/v1/predict", json={"inputs": "Ada lives here", "adapter": "crafted"})
    assert response.status_code == 200, response.text


def _adapter_route_options(root: Path) -> dict:
    """create_app's options for `serve --api-key ... --allow-adapter-management --adapter-root ROOT`."""
    return {"api_key": "test-key-0123456789", "allow_adapter_management": True, "adapter_roots": [str(root)]}


def _auth_headers() -> dict:
    return {"Authorization": "Bearer test-key-0123456789"}


def test_a_relative_base_that_climbs_out_is_not_followed(crafted, tmp_path):
    """Only ``../base_model`` beside the adapter is honoured; a record pointing elsewhere falls back to the
    recorded base_model (absent here: a typed error, nothing loaded)."""
    import shutil

    from tunepipe.modeling.peft_support import read_adapter_info, resolve_base
    adapter = tmp_path / "adapter"
    shutil.copytree(crafted["run"] / "adapter", adapter)
    record = json.loads((adapter / "tunepipe_adapter.json").read_text())
    record.update(base_model_relative="../../" + os.path.relpath(crafted["run"] / "base_model", tmp_path.parent),
                  base_model=None)
    (adapter / "tunepipe_adapter.json").write_text(json.dumps(record))
    with pytest.raises(TunepipeError) as err:
        resolve_base(adapter, read_adapter_info(adapter))
    assert err.value.code == "MODEL_NOT_FOUND"


def test_the_record_keeps_only_the_head_description(crafted):
    from tunepipe.modeling.peft_support import read_adapter_info
    info = read_adapter_info(crafted["run"] / "adapter")
    assert set(info["model_kwargs"]) == {"num_labels", "id2label", "label2id"}
    assert "trust_remote_code" not in info


def test_a_pickled_adapter_from_elsewhere_is_not_unpickled(crafted, tmp_path):
    import shutil

    from tunepipe import InferencePipeLine
    run = tmp_path / "run"
    shutil.copytree(crafted["run"], run)
    (run / "adapter" / "adapter_model.safetensors").unlink()
    with open(run / "adapter" / "adapter_model.bin", "wb") as fh:
        pickle.dump({"weights": _Payload(str(crafted["marker"]))}, fh)
    with pytest.raises(Exception):
        InferencePipeLine(checkpoint=str(run))


def test_an_adapter_config_naming_a_module_to_import_is_refused(crafted, tmp_path):
    import shutil

    from tunepipe.modeling.peft_support import read_adapter_info
    adapter = tmp_path / "adapter"
    shutil.copytree(crafted["run"] / "adapter", adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(megatron_config={"tensor_model_parallel_size": 1}, megatron_core="evil_model")
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as err:
        read_adapter_info(adapter)
    assert err.value.field == "megatron_config"


def test_the_callers_flag_does_run_the_folders_code(crafted, tmp_path):
    """The positive control: the marker check above can fail. In a child process, with its own module cache."""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    script = ("import sys; from tunepipe import InferencePipeLine; "
              "InferencePipeLine(checkpoint=sys.argv[1], trust_remote_code=True)")
    subprocess.run([sys.executable, "-c", script, str(crafted["run"])], env=env, check=False,
                   capture_output=True, timeout=300)
    assert crafted["marker"].exists()
    crafted["marker"].unlink()
