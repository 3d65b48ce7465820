"""`tunepipe serve` over a real socket on 127.0.0.1: three adapters (two NER adapters, one classifier) on the
bundled MiniLM base; requests alternating between them each get their own adapter's output and no adapter is
loaded twice; adapters are listed, loaded, unloaded and removed over the API; bad requests get a 4xx with a clear
message, never a 500."""
import os
import socket
import threading
import time

import httpx
import pytest
import torch

NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
TEXTS = ["Greta Varga moved to Lisbon .", "Omar spoke in Cork on Monday .", "Hi"]
REVIEWS = ["a warm and funny film", "a dull and lifeless film", "i loved every minute"]


def build_adapter(directory, task_name, labels, seed, inputs):
    """A LoRA adapter on MiniLM with random (non-zero) weights and head, saved as tunepipe saves adapters; returns
    what the in-memory model predicts for ``inputs`` (the adapter's own output)."""
    import transformers
    from peft import get_peft_model

    from tunepipe.modeling.models import bundled_model_dir
    from tunepipe.modeling.peft_support import build_peft_config, save_adapter
    from tunepipe.specs import load_specs
    from tunepipe.tasks import get_task
    specs = load_specs({"task": task_name, "model": "minilm", "output_dir": str(directory),
                        "data": {"labels": labels}, "peft": {"method": "lora", "r": 4}})
    task = get_task(task_name)(specs)
    base = bundled_model_dir()
    torch.manual_seed(seed)
    model = getattr(transformers, task.auto_model_class).from_pretrained(base, **task.model_kwargs())
    config = build_peft_config(specs, task, model)
    config.init_lora_weights = False  # random B: the adapter really changes the backbone's output
    model = get_peft_model(model, config).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    save_adapter(model, tokenizer, directory / "adapter", specs, task)
    return task.predict(model, tokenizer, inputs)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    specs = {"ner": ("token_classification", NER_LABELS, 1, TEXTS),
             "ner2": ("token_classification", NER_LABELS, 2, TEXTS),
             "sst": ("text_classification", ["negative", "positive"], 3, REVIEWS)}
    expected = {name: build_adapter(root / name, *args) for name, args in specs.items()}
    return {"dirs": {name: str(root / name) for name in specs}, "expected": expected,
            "inputs": {name: args[3] for name, args in specs.items()}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(adapters):
    import uvicorn

    from tunepipe import InferencePipeLine
    from tunepipe.serving.serve import Limits, create_app, uvicorn_config
    pipeline = InferencePipeLine(checkpoint="minilm", adapter_config=adapters["dirs"])
    limits = Limits(max_batch=8, max_input_chars=200, max_body_bytes=4000)
    root = os.path.dirname(adapters["dirs"]["ner"])
    app = create_app(pipeline, limits, allow_adapter_management=True, adapter_roots=[root])
    port = free_port()
    srv = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, limits, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    deadline = time.time() + 30
    while True:
        try:
            if client.get("/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.1)
    yield client, pipeline
    client.close()
    srv.should_exit = True
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_health_and_openapi(server):
    client, _ = server
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["adapters"] == 3
    spec = client.get("/openapi.json").json()
    assert {"/health", "/v1/predict", "/v1/adapters", "/v1/adapters/{name}"} <= set(spec["paths"])
    assert "PredictRequest" in spec["components"]["schemas"]
    listed = client.get("/v1/adapters").json()["adapters"]
    assert listed and all("path" not in a and not str(a.get("base_model")).startswith("/") for a in listed)


def test_alternating_requests_get_their_own_adapter_without_reloading(server, adapters):
    client, pipeline = server
    for i in range(12):
        name = ["ner", "sst", "ner2"][i % 3]
        r = client.post("/v1/predict", json={"inputs": adapters["inputs"][name], "adapter": name})
        assert r.status_code == 200, r.text
        assert r.json()["predictions"] == adapters["expected"][name], name
    assert adapters["expected"]["ner"] != adapters["expected"]["ner2"]
    one = client.post("/v1/predict", json={"inputs": REVIEWS[0], "adapter": "sst"}).json()["predictions"]
    # one input in, one result out (alone, not padded in a batch: floats may differ in the 7th digit)
    assert one["label"] == adapters["expected"]["sst"][0]["label"]
    assert one["score"] == pytest.approx(adapters["expected"]["sst"][0]["score"], abs=1e-5)

    mixed = [("ner", TEXTS[0]), ("sst", REVIEWS[1]), ("ner2", TEXTS[1]), ("ner", TEXTS[2])]
    r = client.post("/v1/predict", json={"inputs": [x for _, x in mixed], "adapters": [n for n, _ in mixed]})
    assert r.status_code == 200, r.text
    want = [adapters["expected"][n][adapters["inputs"][n].index(x)] for n, x in mixed]
    got = r.json()["predictions"]
    assert [p.get("tags", p.get("label")) for p in got] == [p.get("tags", p.get("label")) for p in want]
    assert [p.get("score") for p in got] == pytest.approx([p.get("score") for p in want], abs=1e-5)

    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["adapters"]}
    assert {n: listed[n]["load_count"] for n in ("ner", "ner2", "sst")} == {"ner": 1, "ner2": 1, "sst": 1}
    assert pipeline.adapters.total_loads >= 3 and all(listed[n]["loaded"] for n in ("ner", "ner2", "sst"))


def test_parameters_reach_the_task(server):
    client, _ = server
    r = client.post("/v1/predict", json={"inputs": REVIEWS, "adapter": "sst", "parameters": {"all_scores": True}})
    assert r.status_code == 200
    assert all(set(p["scores"]) == {"negative", "positive"} for p in r.json()["predictions"])


def test_adapters_are_loaded_unloaded_and_removed_over_the_api(server, adapters):
    client, _ = server
    r = client.post("/v1/adapters", json={"name": "ner3", "path": adapters["dirs"]["ner"]})
    assert r.status_code == 201, r.text
    assert r.json()["adapter"]["loaded"] and r.json()["adapter"]["load_count"] == 1
    ask = {"inputs": TEXTS, "adapter": "ner3"}
    assert client.post("/v1/predict", json=ask).json()["predictions"] == adapters["expected"]["ner"]
    assert not client.post("/v1/adapters/ner3/unload").json()["adapter"]["loaded"]
    assert client.post("/v1/predict", json=ask).json()["predictions"] == adapters["expected"]["ner"]
    assert client.post("/v1/adapters/ner3/load").json()["adapter"]["load_count"] == 2  # reloaded once, on use
    assert client.delete("/v1/adapters/ner3").status_code == 200
    assert client.post("/v1/predict", json=ask).status_code == 404
    assert "ner3" not in [a["name"] for a in client.get("/v1/adapters").json()["adapters"]]
    # an adapter named at start is always served: removing it is refused, and it keeps answering
    r = client.delete("/v1/adapters/ner")
    assert r.status_code == 400 and "always served" in r.json()["error"]["message"], r.text
    assert client.post("/v1/predict", json={"inputs": TEXTS, "adapter": "ner"}).status_code == 200


@pytest.mark.parametrize("body,status,needle", [
    ({}, 422, "inputs"),
    ({"inputs": "x", "adaptr": "sst"}, 422, "adaptr"),
    ({"inputs": "x", "adapter": "nope"}, 404, "No adapter named 'nope'"),
    ({"inputs": ["a film"] * 9, "adapter": "sst"}, 400, "limit is 8"),
    ({"inputs": "x" * 201, "adapter": "sst"}, 400, "201 characters"),
    ({"inputs": 5, "adapter": "sst"}, 400, "not a text"),
    ({"inputs": [None], "adapter": "sst"}, 400, "not a text"),
    ({"inputs": [], "adapter": "sst"}, 400, "empty list"),
    ({"inputs": "a film", "adapter": "sst", "parameters": {"top_k": 3}}, 400, "Unknown prediction setting"),
    ({"inputs": "a film", "adapter": "sst", "parameters": {"all_scores": "yes"}}, 400, "true or false"),
    ({"inputs": "a film", "adapter": "sst", "parameters": {"adapter": "ner"}}, 400, "cannot set adapter"),
    ({"inputs": "a film"}, 400, "no task of its own"),
    ({"inputs": ["a", "b"], "adapters": ["sst"]}, 400, "adapter names"),
    ({"inputs": [["a", "b", "c"]], "adapter": "sst"}, 400, "two texts"),
    ({"inputs": [{"tokens": 3}], "adapter": "ner"}, 400, "list of words"),
])
def test_bad_requests_get_a_clear_4xx(server, body, status, needle):
    client, _ = server
    r = client.post("/v1/predict", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["code"]


def test_malformed_oversized_and_adapter_mistakes(server, adapters, tmp_path):
    client, _ = server
    for body in (b"{not json", b'{"inputs": ['):
        r = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
        error = r.json()["error"]
        assert r.status_code == 422 and error["code"] == "VALIDATION_ERROR", r.text
        assert "not valid JSON" in error["message"] and error.get("field") is None, error  # an offset is no field
    r = client.post("/v1/predict", json={"inputs": ["word " * 30] * 40, "adapter": "sst"})
    assert r.status_code == 413 and "bytes" in r.json()["error"]["message"]
    r = client.post("/v1/adapters", json={"name": "ghost", "path": str(tmp_path / "missing")})
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "ADAPTER_PATH_REFUSED" and error["suggestions"]
    assert "ghost" not in [a["name"] for a in client.get("/v1/adapters").json()["adapters"]]
    ner_dir = adapters["dirs"]["ner"]
    r = client.post("/v1/adapters", json={"name": "has space", "path": ner_dir})
    assert r.status_code == 400 and "Invalid adapter name" in r.json()["error"]["message"]
    r = client.post("/v1/adapters", json={"name": "ner", "path": ner_dir})
    assert r.status_code == 400 and "already registered" in r.json()["error"]["message"]
    assert client.delete("/v1/adapters/nope").status_code == 404
    assert client.post("/v1/adapters/nope/load").status_code == 404


def test_cli_serve_binds_localhost_by_default(monkeypatch, adapters, capsys):
    import tunepipe.serving.serve
    from tunepipe.cli import main
    seen = {}
    monkeypatch.delenv("TUNEPIPE_API_KEY", raising=False)
    monkeypatch.setattr(tunepipe.serving.serve, "serve", lambda pipeline, host, port, limits, **kw: seen.update(
        host=host, port=port, limits=limits, adapters=pipeline.adapters.list_adapters(), **kw))
    assert main(["serve", "--model", "minilm", "--adapter", f"sst={adapters['dirs']['sst']}", "--max-batch", "4"]) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8000 and seen["limits"].max_batch == 4
    assert [a["name"] for a in seen["adapters"]] == ["sst"]
    assert seen["allow_adapter_management"] is False and seen["api_key"] is None and seen["scheduling"] == "fair"
    assert "loopback" in capsys.readouterr().err


def test_cli_serve_takes_the_key_from_the_environment(monkeypatch, adapters, tmp_path, capsys):
    import tunepipe.serving.serve
    from tunepipe.cli import main
    seen = {}
    monkeypatch.setattr(tunepipe.serving.serve, "serve", lambda pipeline, host, port, limits, **kw: seen.update(
        host=host, limits=limits, **kw))
    monkeypatch.setenv("TUNEPIPE_API_KEY", "k" * 32)
    root = os.path.dirname(adapters["dirs"]["sst"])
    assert main(["serve", "--model", "minilm", "--adapter", f"sst={adapters['dirs']['sst']}", "--host", "0.0.0.0",
                 "--allow-adapter-management", "--adapter-root", root, "--max-body-bytes", "1000",
                 "--header-timeout", "3"]) == 0
    assert seen["host"] == "0.0.0.0" and seen["api_key"] == "k" * 32 and seen["allow_adapter_management"] is True
    assert seen["adapter_roots"] == [root] and seen["limits"].max_body_bytes == 1000
    assert seen["limits"].header_timeout == 3
    capsys.readouterr()
    # management without a root, and a limit that could never admit a full request, are refused at start
    assert main(["serve", "--model", "minilm", "--allow-adapter-management"]) == 2
    assert "--adapter-root" in capsys.readouterr().err
    assert main(["serve", "--model", "minilm", "--max-batch", "5000"]) == 2
    assert "--max-queued-inputs" in capsys.readouterr().err
