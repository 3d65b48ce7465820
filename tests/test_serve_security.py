"""`tunepipe serve` fit to be exposed, checked against real server processes (`python -m tunepipe serve` on
127.0.0.1, one torch thread) with a tiny text classifier: the API key, a refused non-loopback bind without one,
adapter management off by default and confined to its roots, bodies counted while they are read, text that is
not text, deadlines for half-sent requests, bounds on requests in progress and queued inputs, and a one-text
request served while a 3,000-text one runs (and, with --scheduling fifo, served only after it: the measurement
tells the two apart)."""
from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import NEGATIVE, POSITIVE, TINY_BERT, close_to

KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
SLOTS = 24  # requests in progress at once
BIG = 3000  # inputs in the huge request: ~1-3 s of work for the tiny model at micro-batches of 4
GUARDED = ["--batch-size", "4", "--max-batch", str(BIG), "--max-queued-inputs", str(BIG + 100),
           "--max-body-bytes", "200000", "--max-input-chars", "500", "--max-concurrent-requests", str(SLOTS),
           "--header-timeout", "1", "--body-timeout", "2", "--keep-alive-timeout", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TUNEPIPE_API_KEY"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(Path(__file__).resolve().parents[1]), **extra)
    return env


class Server:
    """`python -m tunepipe serve ...` on a free port of 127.0.0.1, ready once /health answers."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "tunepipe", "serve", *args, "--port", str(self.port)],
                                         stdout=out, stderr=subprocess.STDOUT, env=env or server_env())
        deadline = time.monotonic() + 90
        while True:
            assert self.proc.poll() is None, f"the server exited:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"the server did not start:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random tiny BERT text classifier with a WordPiece tokenizer trained here, saved as a model directory."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from tunepipe.tiny import train_wordpiece_tokenizer
    out = tmp_path_factory.mktemp("tiny_classifier")
    tokenizer = train_wordpiece_tokenizer((POSITIVE + NEGATIVE) * 5, out, vocab_size=120)
    torch.manual_seed(0)
    config = BertConfig(**TINY_BERT, vocab_size=len(tokenizer), num_labels=2, id2label={0: "neg", 1: "pos"},
                        label2id={"neg": 0, "pos": 1}, initializer_range=1.0)  # texts get clearly different scores
    BertForSequenceClassification(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, Path]:
    """An adapter root and things in and around it: a directory that looks like an adapter inside and one
    outside, a plain directory, a file, and a link from inside the root to the outside one."""
    base = tmp_path_factory.mktemp("places")
    root, outside = base / "root", base / "outside"
    for d in (root / "good", root / "plain", outside / "adapter_like"):
        d.mkdir(parents=True)
    for d in (root / "good", outside / "adapter_like"):
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "SEQ_CLS"}))
    (root / "file.txt").write_text("not a directory")
    (root / "link_out").symlink_to(outside / "adapter_like")
    (root / "linked_files").mkdir()  # an adapter folder whose files are links out of the root
    (root / "linked_files" / "adapter_config.json").symlink_to(outside / "adapter_like" / "adapter_config.json")
    (outside / "adapter_like" / "adapter_model.safetensors").write_bytes(b"weights from elsewhere")
    (root / "linked_weights").mkdir()
    (root / "linked_weights" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (root / "linked_weights" / "adapter_model.safetensors").symlink_to(
        outside / "adapter_like" / "adapter_model.safetensors")
    key_file = base / "key.txt"
    key_file.write_text(KEY + "\n")
    return {"root": root, "outside": outside, "key_file": key_file}


@pytest.fixture(scope="module")
def guarded(model_dir, places, tmp_path_factory):
    """A server as exposed: key (from a file), adapter management on under one root, small limits and timeouts."""
    server = Server(["--model", str(model_dir), "--task", "text_classification", *GUARDED,
                     "--api-key-file", str(places["key_file"]), "--allow-adapter-management",
                     "--adapter-root", str(places["root"])], tmp_path_factory.mktemp("logs") / "guarded.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def plain(model_dir, tmp_path_factory):
    """Defaults (no key: loopback only, adapter management off), with the former whole-request scheduling."""
    server = Server(["--model", str(model_dir), "--task", "text_classification", "--batch-size", "4",
                     "--max-batch", str(BIG), "--max-queued-inputs", str(BIG + 100), "--scheduling", "fifo"],
                    tmp_path_factory.mktemp("logs") / "plain.log")
    yield server
    server.stop()


# ---- the key -------------------------------------------------------------------------------------------------
def test_every_route_but_health_needs_the_key(guarded):
    with guarded.client() as c:
        ask = {"inputs": ["a warm and funny film"]}
        for method, path in [("GET", "/v1/adapters"), ("POST", "/v1/predict"), ("GET", "/docs"),
                             ("GET", "/openapi.json"), ("DELETE", "/v1/adapters/x"), ("GET", "/nowhere")]:
            r = c.request(method, path, json=ask if method == "POST" else None)
            assert r.status_code == 401, (path, r.text)
            assert r.json()["error"]["code"] == "UNAUTHORIZED" and r.headers["www-authenticate"] == "Bearer"
        for wrong in [{"Authorization": "Bearer wrong-key-0123456789abcdef"}, {"Authorization": f"Basic {KEY}"},
                      {"Authorization": KEY}, {"X-API-Key": KEY[:-1]}, {"Authorization": "Bearer"}]:
            assert c.post("/v1/predict", json=ask, headers=wrong).status_code == 401, wrong
        assert c.post("/v1/predict", json=ask, headers=AUTH).status_code == 200
        assert c.post("/v1/predict", json=ask, headers={"X-API-Key": KEY}).status_code == 200
        health = c.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"


def test_health_reveals_no_paths(guarded, model_dir, places):
    with guarded.client() as c:
        text = c.get("/health").text
    health = json.loads(text)
    assert health["task"] == "text_classification" and health["model"] == model_dir.name
    assert str(model_dir) not in text and str(places["root"]) not in text and "/tmp" not in text
    strings = [v for v in health.values() if isinstance(v, str)]
    assert not any(s.startswith("/") for s in strings)


def test_no_key_means_loopback_only(model_dir):
    """Refused before any model is loaded; a weak key is refused too."""
    base = [sys.executable, "-m", "tunepipe", "serve", "--model", str(model_dir), "--task", "text_classification"]
    for host in ("0.0.0.0", "::", "192.168.1.10"):
        r = subprocess.run(base + ["--host", host, "--port", str(free_port())], env=server_env(),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert f"--host {host}" in r.stderr and "TUNEPIPE_API_KEY" in r.stderr and "Uvicorn running" not in r.stderr
    r = subprocess.run(base + ["--host", "0.0.0.0", "--port", str(free_port())],
                       env=server_env(TUNEPIPE_API_KEY="short"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "at least 16" in r.stderr


def test_an_empty_key_is_refused_not_taken_as_no_key(tmp_path, monkeypatch):
    """A key asked for and empty (a blank key file, --api-key "", an empty variable) must not turn
    authentication off, and an empty file must not hide the variable's key either."""
    from tunepipe.errors import ConfigError
    from tunepipe.serving.serve_access import read_api_key
    blank = tmp_path / "blank.key"
    for content in ("", "  \n"):
        blank.write_text(content)
        monkeypatch.setenv("TUNEPIPE_API_KEY", KEY)
        with pytest.raises(ConfigError, match="empty API key"):
            read_api_key(key_file=str(blank))
    with pytest.raises(ConfigError, match="empty API key"):
        read_api_key(key="  ")
    monkeypatch.setenv("TUNEPIPE_API_KEY", "")
    with pytest.raises(ConfigError, match="empty API key"):
        read_api_key()
    monkeypatch.delenv("TUNEPIPE_API_KEY")
    assert read_api_key() is None
    assert read_api_key(key=KEY) == KEY


# ---- adapter management ----------------------------------------------------------------------------------------
def test_adapter_management_is_off_by_default(plain):
    with plain.client() as c:
        for method, path, body in [("POST", "/v1/adapters", {"name": "x", "path": "/tmp"}),
                                   ("DELETE", "/v1/adapters/x", None), ("POST", "/v1/adapters/x/load", None),
                                   ("POST", "/v1/adapters/x/unload", None)]:
            r = c.request(method, path, json=body)
            assert r.status_code == 403, (path, r.text)
            assert "--allow-adapter-management" in " ".join(r.json()["error"]["suggestions"])
        assert c.get("/v1/adapters").status_code == 200  # reading the list stays open


def test_adapter_paths_outside_the_roots_or_missing_get_one_answer(guarded, places):
    root, outside = places["root"], places["outside"]
    refused = [str(outside / "adapter_like"), str(root / "missing"), "missing", "/no/such/dir",
               "../outside/adapter_like", str(root / ".." / "outside" / "adapter_like"), "link_out",
               "linked_files", "linked_weights", str(root / "linked_weights"),
               str(root / "plain"), "file.txt", "someone/some-adapter", "", "a\x00b", "/etc"]
    answers = set()
    with guarded.client(headers=AUTH) as c:
        for path in refused:
            r = c.post("/v1/adapters", json={"name": "probe", "path": path})
            error = r.json()["error"]
            answers.add((r.status_code, error["code"], error["message"].replace(f"'{path}'", "'P'"),
                         tuple(error["suggestions"])))
        assert len(answers) == 1, answers
        assert answers.pop()[:2] == (400, "ADAPTER_PATH_REFUSED")
        # a directory under the root that holds an adapter passes the path check; this server has no adapter base,
        # so the next check answers (other code, other message)
        for path in ("good", str(root / "good")):
            r = c.post("/v1/adapters", json={"name": "probe", "path": path})
            assert r.status_code == 400 and r.json()["error"]["code"] == "CONFIG_ERROR", r.text
            assert "without adapters" in r.json()["error"]["message"]


# ---- bodies and text -------------------------------------------------------------------------------------------
def raw_request(port: int, head: bytes, body_parts=(), timeout: float = 10.0) -> tuple[int, bytes, float]:
    """Send ``head`` and ``body_parts`` on a fresh socket, then read until the server closes: (status, whole
    response, seconds from the last byte sent to the close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        for part in body_parts:
            s.sendall(part)
        sent = time.monotonic()
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1") else 0
        return status, data, time.monotonic() - sent


def test_chunked_body_over_the_limit_gets_413_while_it_is_read(guarded):
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    piece = b"2000\r\n" + b" " * 0x2000 + b"\r\n"  # 8 KiB of JSON whitespace per chunk
    # 25 chunks pass 200,000 bytes; the last chunk (0) never comes, so only a count while reading can answer
    status, data, _ = raw_request(guarded.port, head, [piece] * 25)
    assert status == 413 and b"REQUEST_TOO_LARGE" in data
    # the same way under the limit is served
    small = json.dumps({"inputs": ["a warm and funny film"]}).encode()
    status, data, _ = raw_request(guarded.port, head.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"),
                                  [b"%x\r\n%s\r\n0\r\n\r\n" % (len(small), small)])
    assert status == 200 and b'"label"' in data
    # a declared length over the limit is refused before any body is sent
    status, data, _ = raw_request(guarded.port, head.replace(b"Transfer-Encoding: chunked", b"Content-Length: 200001"))
    assert status == 413


@pytest.mark.parametrize("body", [
    b'{"inputs": "\\ud800"}',                       # a lone high surrogate escape
    b'{"inputs": ["fine", "a\\udfffb"]}',           # a lone low one, in a list
    b'{"inputs": "x", "adapter": "\\uDBFF"}',       # in another field
    b'{"inputs": "\\ude00\\ud83d"}',                # a pair in the wrong order
    b'{"inputs": "\xff\xfe"}',                     # not UTF-8
    b'{"inputs": "\xc0\xaf"}',                     # an overlong encoding
    b'{"inputs": "\xed\xa0\x80"}',                 # a surrogate encoded as UTF-8 bytes
])
def test_text_that_is_not_text_gets_400(guarded, body):
    with guarded.client(headers=AUTH) as c:
        r = c.post("/v1/predict", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "INVALID_TEXT"
        r = c.post("/v1/adapters", content=body.replace(b'"inputs"', b'"path"').replace(b'"adapter"', b'"name"'),
                   headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text


def test_escaped_astral_characters_are_text(guarded):
    with guarded.client(headers=AUTH) as c:
        r = c.post("/v1/predict", content=b'{"inputs": ["a warm film \\ud83d\\ude00", "\\u00e9t\\u00e9"]}',
                   headers={"content-type": "application/json"})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 2


# ---- connections -----------------------------------------------------------------------------------------------
def wait_closed(sockets: list[socket.socket], timeout: float) -> list[float | None]:
    """time.monotonic() when each socket saw the server close it (None: still open after ``timeout``)."""
    start = time.monotonic()
    closed: list[float | None] = [None] * len(sockets)
    sel = selectors.DefaultSelector()
    for i, s in enumerate(sockets):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
    while any(c is None for c in closed) and time.monotonic() - start < timeout:
        for key, _ in sel.select(timeout=0.1):
            try:
                data = key.fileobj.recv(65536)
            except (ConnectionResetError, BlockingIOError):
                data = b""
            if not data:
                closed[key.data] = time.monotonic()
                sel.unregister(key.fileobj)
    sel.close()
    return closed


def test_half_open_connections_are_closed_after_the_header_timeout(guarded):
    """200 connections (half silent, half with part of a head) and a slowloris: all closed about 1 s (the header
    timeout) after they began; an idle keep-alive connection after 1 s; a half-sent body after 2 s; the server
    answers others meanwhile."""
    opened = time.monotonic()
    sockets = [socket.create_connection(("127.0.0.1", guarded.port)) for _ in range(200)]
    for s in sockets[100:]:
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
    slow = socket.create_connection(("127.0.0.1", guarded.port))
    started = {"slow": time.monotonic()}
    drip_stop = threading.Event()

    def drip():  # one byte of a never-ending header every 0.2 s
        slow.sendall(b"GET /health HTTP/1.1\r\nX-Slow: ")
        while not drip_stop.wait(0.2):
            try:
                slow.sendall(b"a")
            except OSError:
                return

    threading.Thread(target=drip, daemon=True).start()
    keep = socket.create_connection(("127.0.0.1", guarded.port))
    keep.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert keep.recv(65536).startswith(b"HTTP/1.1 200")  # answered; now idle on a keep-alive connection
    started["keep"] = time.monotonic()
    body = socket.create_connection(("127.0.0.1", guarded.port))
    body.sendall(f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                 "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"inputs\": ".encode())
    started["body"] = time.monotonic()
    try:
        with guarded.client(headers=AUTH) as c:  # served while all of them hang on
            assert c.post("/v1/predict", json={"inputs": "a warm and funny film"}).status_code == 200
        closed = wait_closed(sockets + [slow, keep, body], timeout=8)
    finally:
        drip_stop.set()
        for s in sockets + [slow, keep, body]:
            s.close()
    still_open = sum(c is None for c in closed)
    assert still_open == 0, f"{still_open} connections still open after 8 s"
    heads = [t - opened for t in closed[:200]]
    slow_t, keep_t, body_t = (t - started[k] for t, k in zip(closed[200:], ("slow", "keep", "body")))
    assert 0.8 < min(heads) and max(heads) < 4.0, (min(heads), max(heads))
    assert 0.8 < slow_t < 4.0 and 0.8 < keep_t < 4.0 and 1.8 < body_t < 5.0, (slow_t, keep_t, body_t)


def test_requests_in_progress_are_bounded(guarded):
    """Requests that never finish their body hold all the server's request slots: one more gets 503 with
    Retry-After; once they go, requests are served again."""
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 50\r\n\r\n").encode()
    holders = [socket.create_connection(("127.0.0.1", guarded.port)) for _ in range(SLOTS)]
    with guarded.client(headers=AUTH) as c:
        try:
            for s in holders:
                s.sendall(head)
            deadline = time.monotonic() + 1.5  # within the 2 s body timeout
            while c.get("/health").json()["queue"]["requests_in_progress"] < SLOTS:
                assert time.monotonic() < deadline, "the held requests did not reach the server"
                time.sleep(0.01)
            r = c.post("/v1/predict", json={"inputs": "a warm and funny film"})
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "SERVER_BUSY" and r.headers["retry-after"] == "1"
        finally:
            for s in holders:
                s.close()
        deadline = time.monotonic() + 5
        while c.get("/health").json()["queue"]["requests_in_progress"]:
            assert time.monotonic() < deadline, "slots were not released when the clients left"
            time.sleep(0.01)
        assert c.post("/v1/predict", json={"inputs": "a warm and funny film"}).status_code == 200


# ---- the queue and fairness --------------------------------------------------------------------------------------
def big_request_in_background(server: Server, headers: dict[str, str]):
    """Start a BIG-input request in a thread; return once the server holds it; the thread's result holds
    (start, end, status)."""
    texts = [f"{POSITIVE[i % len(POSITIVE)]} and {NEGATIVE[i % len(NEGATIVE)]} , take {i}" for i in range(BIG)]
    result: dict[str, tuple] = {}

    def run():
        with server.client(headers=headers) as c:
            start = time.monotonic()
            r = c.post("/v1/predict", json={"inputs": texts})
            result["big"] = (start, time.monotonic(), r.status_code, len(r.json().get("predictions", [])))

    thread = threading.Thread(target=run)
    thread.start()
    with server.client() as c:
        deadline = time.monotonic() + 20
        while c.get("/health").json()["queue"]["inputs"] < BIG:
            assert time.monotonic() < deadline and thread.is_alive(), "the big request never reached the queue"
            time.sleep(0.005)
    return thread, result


def test_queued_inputs_are_bounded(guarded):
    """3,000 inputs are waiting; the limit is 3,100: 200 more get 503 with Retry-After, one more is taken."""
    thread, result = big_request_in_background(guarded, AUTH)
    with guarded.client(headers=AUTH) as c:
        r = c.post("/v1/predict", json={"inputs": ["a warm and funny film"] * 200})
        one = c.post("/v1/predict", json={"inputs": "a warm and funny film"})
    thread.join(timeout=60)
    assert result["big"][2:] == (200, BIG), "the big request was not served whole"
    assert result["big"][1] > time.monotonic() - 60
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert r.json()["error"]["code"] == "SERVER_BUSY" and "3100" in r.json()["error"]["message"]
    assert one.status_code == 200


def one_text_during_a_big_request(server: Server, headers: dict[str, str]) -> dict[str, float]:
    thread, result = big_request_in_background(server, headers)
    with server.client(headers=headers) as c:
        start = time.monotonic()
        r = c.post("/v1/predict", json={"inputs": "a warm and funny film"})
        end = time.monotonic()
    thread.join(timeout=60)
    assert r.status_code == 200 and result["big"][2:] == (200, BIG)
    big_start, big_end = result["big"][:2]
    return {"small_s": end - start, "big_s": big_end - big_start, "small_done_first": end < big_end}


def test_a_one_text_request_is_not_stuck_behind_a_huge_one(guarded):
    seen = one_text_during_a_big_request(guarded, AUTH)
    assert seen["small_done_first"], seen
    assert seen["small_s"] < 0.2 * seen["big_s"], seen


def test_fifo_scheduling_makes_it_wait(plain):
    """The same measurement on the former scheduling: the one text waits for the whole big request (its answer
    may still reach the client first: the big answer is 3,000 predictions to serialise and send)."""
    seen = one_text_during_a_big_request(plain, {})
    assert seen["small_s"] > 0.5 * seen["big_s"], seen


def test_requests_batched_together_each_get_their_own_results_in_order(guarded):
    """Twenty clients at once, 1-7 texts each, queued behind a big request: the worker tops micro-batches up
    across requests; every client gets the results it gets alone, in its own input order."""
    texts = POSITIVE + NEGATIVE
    asks = [[texts[(i * 3 + j) % len(texts)] for j in range(1 + i % 7)] for i in range(20)]
    with guarded.client(headers=AUTH) as c:
        alone = [c.post("/v1/predict", json={"inputs": ask}).json()["predictions"] for ask in asks]
    scores = [p["score"] for ps in alone for p in ps]
    assert max(scores) - min(scores) > 0.05  # a mix-up between requests would show
    together: list = [None] * len(asks)
    big, _ = big_request_in_background(guarded, AUTH)  # keeps the worker busy while the small ones queue up

    def send(i):
        with guarded.client(headers=AUTH) as c:
            together[i] = c.post("/v1/predict", json={"inputs": asks[i]}).json()["predictions"]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads + [big]:
        t.join(timeout=60)
    assert together == close_to(alone)
    assert len({json.dumps(a) for a in alone}) > 1  # the answers differ between requests: order matters
