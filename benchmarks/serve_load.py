"""`tunepipe serve` under load: many clients, one huge request among small ones, and 800 half-open connections.

The server is a real `python -m tunepipe serve` process (MiniLM with a text-classification head, API key, 127.0.0.1,
one torch thread), one per scheduling, both up at once and measured phase by phase in turn:

    fair   micro-batches of --batch-size inputs taken from each request in turn, small requests batched together
    fifo   the former behaviour: each request whole, in arrival order (one model at a time)

Measured per scheduling:

1. load: --clients clients (asyncio + httpx) each send --requests requests of one SST-2 sentence, back to back;
   latency p50/p90/p99/max and requests per second.
2. huge vs small: one client sends --big sentences in one request; meanwhile another sends one-sentence requests,
   one after the other, until the big one is answered; each small request's latency, and the big request's time.

And once, on the fair server: --half-open connections (half silent, half with part of a request head) opened at
once; a keyed request's latency while they are open, and how long until the server has closed every one
(--header-timeout decides).

    python benchmarks/serve_load.py [--clients 50 --requests 20 --big 1000 --half-open 800 --threads 1]

Writes benchmarks/results/serve_load.json. Server and clients share this machine's cores: the client's own CPU time
is in every latency.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).resolve().parent / "results"
SST2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2" / "validation.jsonl"
KEY = "benchmark-key-" + "0" * 24


def sentences() -> list[str]:
    if SST2.is_file():
        return [json.loads(line)["text"] for line in SST2.read_text().splitlines() if line.strip()]
    rng = random.Random(0)
    words = "a warm funny dull film plot acting story music clever slow sharp kind cruel moving boring".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) for _ in range(800)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, scheduling: str, log: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TUNEPIPE_API_KEY": KEY,
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "tunepipe", "serve", "--model", args.model, "--task", "text_classification",
           "--port", str(port), "--batch-size", str(args.batch_size), "--max-batch", str(args.big),
           "--max-queued-inputs", str(max(2048, 2 * args.big)), "--max-concurrent-requests", str(args.clients + 16),
           "--header-timeout", str(args.header_timeout), "--scheduling", scheduling]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    import httpx
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, port
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def percentiles(values: list[float]) -> dict[str, float]:
    v = sorted(values)

    def pct(p):
        return v[min(len(v) - 1, max(0, round(p / 100 * len(v)) - 1))]

    return {"n": len(v), "p50_ms": round(1000 * pct(50), 1), "p90_ms": round(1000 * pct(90), 1),
            "p99_ms": round(1000 * pct(99), 1), "max_ms": round(1000 * v[-1], 1),
            "mean_ms": round(1000 * statistics.fmean(v), 1)}


async def load(port: int, texts: list[str], clients: int, requests: int) -> dict:
    import httpx
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {KEY}"},
                                 timeout=300, limits=limits) as client:
        async def one_client(c: int):
            rng = random.Random(c)
            for _ in range(requests):
                start = time.perf_counter()
                r = await client.post("/v1/predict", json={"inputs": [rng.choice(texts)]})
                latencies.append(time.perf_counter() - start)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*(one_client(c) for c in range(clients)))
        wall = time.perf_counter() - start
    return {"clients": clients, "requests_per_client": requests, "statuses": statuses,
            "wall_s": round(wall, 2), "requests_per_s": round(clients * requests / wall, 1), **percentiles(latencies)}


async def huge_vs_small(port: int, texts: list[str], big: int) -> dict:
    import httpx
    rng = random.Random(1)
    big_texts = [rng.choice(texts) for _ in range(big)]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {KEY}"},
                                 timeout=600) as client:
        async def send_big():
            start = time.perf_counter()
            r = await client.post("/v1/predict", json={"inputs": big_texts})
            assert r.status_code == 200 and len(r.json()["predictions"]) == big, r.text[:300]
            return time.perf_counter() - start

        task = asyncio.create_task(send_big())
        while (await client.get("/health")).json()["queue"]["inputs"] < big:  # the big request is in
            await asyncio.sleep(0.002)
        small: list[float] = []
        while not task.done():
            start = time.perf_counter()
            r = await client.post("/v1/predict", json={"inputs": rng.choice(texts)})
            assert r.status_code == 200, r.text[:300]
            small.append(time.perf_counter() - start)
        big_s = await task
    return {"big_inputs": big, "big_s": round(big_s, 2), "small_requests_during_big": len(small),
            "small": percentiles(small), "first_small_ms": round(1000 * small[0], 1) if small else None}


def half_open(port: int, n: int, header_timeout: float) -> dict:
    import httpx
    import selectors
    socks, opened = [], time.monotonic()
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        if i % 2:
            s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: bench\r\nContent-Type: appl")
        socks.append(s)
    open_s = time.monotonic() - opened
    start = time.perf_counter()
    r = httpx.post(f"http://127.0.0.1:{port}/v1/predict", json={"inputs": "a warm and funny film"},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    during_ms = round(1000 * (time.perf_counter() - start), 1)
    sel = selectors.DefaultSelector()
    for i, s in enumerate(socks):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
    closed_at: dict[int, float] = {}
    limit = header_timeout + 10
    while len(closed_at) < n and time.monotonic() - opened < limit:
        for key, _ in sel.select(timeout=0.1):
            try:
                data = key.fileobj.recv(4096)
            except (ConnectionResetError, BlockingIOError):
                data = b""
            if not data:
                closed_at[key.data] = time.monotonic() - opened
                sel.unregister(key.fileobj)
    sel.close()
    for s in socks:
        s.close()
    times = sorted(closed_at.values())
    return {"connections": n, "seconds_to_open_all": round(open_s, 2), "header_timeout_s": header_timeout,
            "request_while_open_status": r.status_code, "request_while_open_ms": during_ms,
            "closed_by_server": len(times), "still_open_after_s": {str(limit): n - len(times)},
            "first_closed_s": round(times[0], 2) if times else None,
            "last_closed_s": round(times[-1], 2) if times else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--big", type=int, default=1000)
    parser.add_argument("--half-open", type=int, default=800)
    parser.add_argument("--header-timeout", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per server (1: the clients run on the same cores)")
    parser.add_argument("--schedulings", nargs="+", default=["fair", "fifo"])
    parser.add_argument("--output", default=str(RESULTS / "serve_load.json"))
    args = parser.parse_args()
    texts = sentences()
    out: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                             "load_avg_before": os.getloadavg()},
                 "settings": {k: v for k, v in vars(args).items() if k != "output"},
                 "texts": "SST-2 validation sentences" if SST2.is_file() else "generated sentences", "runs": {}}
    logs = Path(tempfile.mkdtemp(prefix="serve_load_"))
    servers = {}
    try:
        for scheduling in args.schedulings:  # all up at once, phases interleaved: other load hits each alike
            servers[scheduling] = start_server(args, scheduling, logs / f"{scheduling}.log")
        for scheduling, (_, port) in servers.items():
            asyncio.run(load(port, texts, 4, 5))  # warm-up: first forwards, allocator
            out["runs"][scheduling] = {}
        for scheduling, (_, port) in servers.items():
            run = out["runs"][scheduling]
            run["load"] = asyncio.run(load(port, texts, args.clients, args.requests))
            out["machine"][f"load_avg_after_{scheduling}_load"] = os.getloadavg()
            print(f"{scheduling}: {args.clients} clients x {args.requests} requests: p50 {run['load']['p50_ms']} ms, "
                  f"p99 {run['load']['p99_ms']} ms, {run['load']['requests_per_s']} req/s", flush=True)
        for scheduling, (_, port) in servers.items():
            run = out["runs"][scheduling]
            run["huge_vs_small"] = h = asyncio.run(huge_vs_small(port, texts, args.big))
            print(f"{scheduling}: one text during {args.big}: p50 {h['small']['p50_ms']} ms, max "
                  f"{h['small']['max_ms']} ms over {h['small_requests_during_big']} requests (big request "
                  f"{h['big_s']} s)", flush=True)
        if "fair" in servers and args.half_open:
            out["runs"]["fair"]["half_open"] = h = half_open(servers["fair"][1], args.half_open, args.header_timeout)
            print(f"half-open: {h['closed_by_server']}/{h['connections']} closed by the server between "
                  f"{h['first_closed_s']} s and {h['last_closed_s']} s (header timeout {h['header_timeout_s']} s); "
                  f"a request meanwhile: {h['request_while_open_status']} in {h['request_while_open_ms']} ms",
                  flush=True)
    finally:
        for proc, _ in servers.values():
            stop(proc)
    if {"fair", "fifo"} <= set(out["runs"]):
        fair, fifo = out["runs"]["fair"], out["runs"]["fifo"]
        out["fifo_over_fair"] = {
            "load_p50": round(fifo["load"]["p50_ms"] / fair["load"]["p50_ms"], 2),
            "load_p99": round(fifo["load"]["p99_ms"] / fair["load"]["p99_ms"], 2),
            "load_requests_per_s": round(fifo["load"]["requests_per_s"] / fair["load"]["requests_per_s"], 2),
            "small_during_big_p50": round(fifo["huge_vs_small"]["small"]["p50_ms"]
                                          / fair["huge_vs_small"]["small"]["p50_ms"], 2)}
        print("fifo / fair:", out["fifo_over_fair"])
    out["machine"]["load_avg_after"] = os.getloadavg()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
