"""The model worker of `tunepipe serve`: one thread owns the model; requests reach it through a bounded queue.

Why one thread: adapters are switched per batch and torch already spreads one batch over every core, so two
batches at once only contend. Why micro-batches: with the model held by one request at a time, a one-text request
waited behind a 1,000-text one for the whole of it. Here every request is cut into micro-batches of at most
``micro_batch`` inputs (a request's inputs sorted by length first, to pad little), and the worker takes one
micro-batch per request in turn (round robin), topping it up with the next micro-batches of other requests that
use the same adapter and settings. A small request therefore waits for about one micro-batch, and many small
requests from different clients share forward passes. Results go back in input order.

``scheduling="fifo"`` keeps the former behaviour (each request whole, in arrival order), for comparison.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

from ..errors import TunepipeError
from .model_loading import check_predict_kwargs, refuse_empty

log = logging.getLogger("tunepipe.serve")


class ServerBusyError(TunepipeError):
    code = "SERVER_BUSY"


@dataclass
class _Part:
    adapter: str | None
    items: list[Any]
    positions: list[int]


@dataclass
class _Job:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    size: int
    params: dict[str, Any] = field(default_factory=dict)
    groups: dict[str | None, list[int]] = field(default_factory=dict)
    items: list[Any] = field(default_factory=list)
    parts: deque = field(default_factory=deque)
    call: Callable[[], Any] | None = None
    task_adapter: str | None = None  # the adapter whose task names the response (None: several adapters)
    named_task: bool = True
    checked: bool = False
    results: list[Any] = field(default_factory=list)
    task_name: str | None = None
    finished: bool = False

    @cached_property
    def key(self) -> str:
        """Micro-batches of requests with the same key may share a forward pass."""
        return json.dumps(self.params, sort_keys=True, default=str)


def _length(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_length(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_length(v) for v in value)
    return 0


class ModelWorker:
    """Runs predictions and adapter changes on one thread, fairly between requests; refuses work beyond
    ``max_queued_inputs`` (inputs admitted and not yet answered) with ServerBusyError."""

    def __init__(self, pipeline, micro_batch: int, max_queued_inputs: int, scheduling: str = "fair"):
        self.pipeline = pipeline
        self.micro_batch = micro_batch
        self.max_queued_inputs = max_queued_inputs
        self.fair = scheduling == "fair"
        self._queue: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._queued_inputs = 0
        self._jobs = 0
        self._stop = False
        self._thread: threading.Thread | None = None

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="tunepipe-model", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            pending, self._queue = list(self._queue), deque()
        for job in pending:
            self._finish(job, ServerBusyError("The server is shutting down", suggestions=["retry in a moment"]))

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"requests": self._jobs, "inputs": self._queued_inputs, "max_inputs": self.max_queued_inputs}

    # ---- submitting (event loop) ---------------------------------------------------------------------------
    async def predict(self, items: list[Any], adapter: str | None, adapters: list[str | None] | None,
                      params: dict[str, Any]) -> tuple[list[Any], str | None]:
        """Results in input order and the task's name (None when ``adapters`` names one adapter per input)."""
        loop = asyncio.get_running_loop()
        names = adapters if adapters is not None else [adapter] * len(items)
        groups: dict[str | None, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name, []).append(i)
        job = _Job(loop, loop.create_future(), len(items), params=dict(params), groups=groups, items=items,
                   task_adapter=adapter, named_task=adapters is None, results=[None] * len(items))
        for name, positions in groups.items():
            if not self.fair:
                job.parts.append(_Part(name, [items[i] for i in positions], positions))
                continue
            positions = sorted(positions, key=lambda i: _length(items[i]))
            for start in range(0, len(positions), self.micro_batch):
                chunk = positions[start:start + self.micro_batch]
                job.parts.append(_Part(name, [items[i] for i in chunk], chunk))
        self._admit(job)
        return await job.future

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the model thread between micro-batches (adapter loading, unloading, registering)."""
        loop = asyncio.get_running_loop()
        job = _Job(loop, loop.create_future(), 1, call=fn, checked=True)
        self._admit(job)
        return await job.future

    def _admit(self, job: _Job) -> None:
        with self._cond:
            if self._stop:
                raise ServerBusyError("The server is shutting down", suggestions=["retry in a moment"])
            if self._queued_inputs + job.size > self.max_queued_inputs:
                raise ServerBusyError(
                    f"The server has {self._queued_inputs} inputs waiting; {job.size} more would pass its limit "
                    f"of {self.max_queued_inputs}", suggestions=["retry after the time in the Retry-After header",
                                                                 "or send fewer inputs per request"])
            self._queued_inputs += job.size
            self._jobs += 1
            self._queue.append(job)
            self._cond.notify()
            self.start()  # an app run without lifespan events (some ASGI test clients) still gets its worker

    # ---- the model thread ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                unchecked = [j for j in self._queue if not j.checked]
            for job in unchecked:
                self._check(job)
            with self._cond:
                if not self._queue:
                    continue
                job = self._queue.popleft()
                if not job.checked:  # arrived after the checks above: check it first
                    self._queue.appendleft(job)
                    continue
                batch = [] if job.call is not None else [(job, job.parts.popleft())]
                if batch and self.fair:
                    self._top_up(batch)
            try:
                if job.call is not None:
                    self._finish(job, value=job.call())
                    continue
                self._run(batch)
            except BaseException as e:  # noqa: BLE001 - a fault must reach its client, not kill the thread
                if not isinstance(e, TunepipeError):
                    log.exception("model worker error")
                for j in ([j for j, _ in batch] if batch else [job]):
                    self._finish(j, e)
                continue
            with self._cond:
                for j in {id(j): j for j, _ in batch}.values():
                    if j.finished:  # failed alone after a shared batch failed
                        continue
                    if j.future.cancelled():  # its client is gone: drop the rest
                        self._finish(j)
                    elif not j.parts:
                        self._finish(j, value=(j.results, j.task_name))
                    elif self.fair:
                        self._queue.append(j)  # round robin: the others go first
                    else:
                        self._queue.appendleft(j)  # fifo: the same request goes on

    def _top_up(self, batch: list[tuple[_Job, _Part]]) -> None:
        """Add the next micro-batch of other requests with the same adapter and settings (one per request)."""
        first_job, first = batch[0]
        size = len(first.items)
        for other in list(self._queue):
            if size >= self.micro_batch:
                break
            if other.call is not None or not other.checked or not other.parts or other.key != first_job.key:
                continue
            part = other.parts[0]
            if part.adapter != first.adapter or size + len(part.items) > self.micro_batch:
                continue
            batch.append((other, other.parts.popleft()))
            self._queue.remove(other)
            size += len(part.items)

    def _check(self, job: _Job) -> None:
        """Refuse a bad request before any of it runs, with input numbers of the request (not of a micro-batch)."""
        try:
            for name, positions in job.groups.items():
                task = self.pipeline.task_for(name)
                check_predict_kwargs(task, job.params)
                task.prepare_inputs([job.items[i] for i in positions])
                refuse_empty(task, [job.items[i] for i in positions], where=lambda n, p=positions: f"Input {p[n] + 1}")
            if job.named_task:
                job.task_name = self.pipeline.task_for(job.task_adapter).name
        except BaseException as e:  # noqa: BLE001
            with self._cond:
                if job in self._queue:
                    self._queue.remove(job)
            self._finish(job, e)
            return
        job.checked = True

    def _run(self, batch: list[tuple[_Job, _Part]]) -> None:
        job, part = batch[0]
        items = [x for _, p in batch for x in p.items]
        try:
            results = self.pipeline.predict(items, adapter=part.adapter, **job.params)
        except Exception:
            if len(batch) == 1:
                raise
            for one in batch:  # a failure in a shared batch belongs to one request: find which
                try:
                    self._run([one])
                except Exception as e:  # noqa: BLE001
                    one[0].parts.clear()
                    self._finish(one[0], e)
            return
        offset = 0
        for j, p in batch:
            for pos, result in zip(p.positions, results[offset:offset + len(p.items)]):
                j.results[pos] = result
            offset += len(p.items)

    def _finish(self, job: _Job, error: BaseException | None = None, value: Any = None) -> None:
        with self._cond:
            if job.finished:
                return
            job.finished = True
            self._queued_inputs -= job.size
            self._jobs -= 1

        def deliver():
            if job.future.done():
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(value)

        try:
            job.loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # the event loop is closed: nobody waits any more
            pass
