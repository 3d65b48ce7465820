"""`tunepipe serve`: an HTTP JSON API over an InferencePipeLine (FastAPI + uvicorn), fit to be exposed.

``create_app(pipeline, limits, api_key=...)`` builds the app without starting a server (tests and ASGI hosts use
it directly); ``serve(...)`` runs it with uvicorn and refuses a non-loopback address without an API key. Every
user mistake is a 4xx with ``{"error": {"code", "message", "field", "suggestions"}}``; only a fault of the server
itself is a 500. Who may use it (the API key, binding without one, adapter paths) is in serve_access.py; what
guards the server is in serve_guard.py (key, body size and encoding, requests in flight, connection timeouts); who
gets the model when is in serve_scheduler.py (one model thread, micro-batches served round robin between requests).
docs/serving.md is the operator's guide.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..errors import ConfigError, DependencyError, TunepipeError, ValidationError
from .adapters import AdapterNotFoundError
from .model_loading import is_single_input
from .serve_access import (API_KEY_ENV, MIN_KEY_CHARS, AdapterPathError,  # noqa: F401 - importable from here as before
                           adapter_dir_under, check_bind, read_api_key, real_roots)
from .serve_scheduler import ModelWorker

log = logging.getLogger("tunepipe.serve")


@dataclass
class Limits:
    """What the server takes: per request, in total, and per connection (each has a `tunepipe serve` flag)."""
    max_batch: int = 64                  # inputs in one request
    max_input_chars: int = 20_000        # characters in one input
    max_body_bytes: int = 2_000_000      # bytes in one request body, counted while it is read
    max_concurrent_requests: int = 64    # requests in progress at once (reading, waiting, predicting)
    max_queued_inputs: int = 2048        # inputs admitted and not yet answered, all requests together
    max_connections: int = 1000          # open connections; a request on one beyond this gets 503
    header_timeout: float = 10.0         # seconds for a request head to arrive
    body_timeout: float = 30.0           # seconds for a request body to arrive, after its head
    keep_alive_timeout: float = 5.0      # seconds an idle connection stays open between requests
    max_header_bytes: int = 16_384       # bytes in a request head

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"Server limit {f.name} must be a positive number, got {value!r}", field=f.name,
                                  suggestions=[f"e.g. --{f.name.replace('_', '-')} {f.default}"])
        if self.max_batch > self.max_queued_inputs:
            raise ConfigError(f"max_batch ({self.max_batch}) is over max_queued_inputs ({self.max_queued_inputs}): "
                              "a full request could never be admitted", field="max_queued_inputs",
                              suggestions=[f"raise --max-queued-inputs to at least {self.max_batch}"])


class PredictRequest(BaseModel):
    """Body of POST /v1/predict."""
    model_config = ConfigDict(extra="forbid")
    inputs: Any = Field(..., description="One input (a text, a record such as {question, context}, or a pair "
                                         "[text, text_pair]) or a list of inputs",
                        examples=["Ada Lovelace lived in London", ["first text", "second text"]])
    adapter: str | None = Field(None, description="adapter for every input (default: the pipeline's default "
                                                  "adapter, else the base model)")
    adapters: list[str | None] | None = Field(None, description="one adapter name per input (a list of inputs):"
                                                                " the batch is grouped by adapter")
    parameters: dict[str, Any] = Field(default_factory=dict,
                                       description="prediction settings of the task: all_scores, top_k, "
                                                   "n_best_size, generation settings such as num_beams")


class PredictResponse(BaseModel):
    predictions: Any = Field(..., description="one result per input, in input order (one object for one input)")
    task: str | None = Field(None, description="the task that answered (unset for a batch naming several adapters)")


class AdapterRequest(BaseModel):
    """Body of POST /v1/adapters."""
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., description="name to use in requests")
    path: str = Field(..., description="adapter directory (or a run's output_dir) under one of the server's "
                                       "adapter roots: absolute, or relative to a root")
    task: str | None = Field(None, description="task, when the adapter does not record it")
    load: bool = Field(True, description="load it now (else at its first request)")


class ForbiddenError(TunepipeError):
    code = "FORBIDDEN"


def _require_fastapi():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise DependencyError("Serving needs fastapi and uvicorn",
                              suggestions=["pip install 'tunepipe[serving]'"]) from None


def _error(status: int, code: str, message: str, field: str | None = None, suggestions=(), headers=None):
    from fastapi.responses import JSONResponse
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"code": code, "message": message, "field": field,
                                           "suggestions": list(suggestions)}})


def _status_of(e: TunepipeError) -> int:
    if isinstance(e, AdapterNotFoundError):
        return 404
    if isinstance(e, ForbiddenError):
        return 403
    if e.code == "ADAPTER_SWITCH_ERROR":
        return 500
    return 503 if e.code in ("MEMORY_ERROR", "SERVER_BUSY") else 400


def _size(value: Any) -> int:
    """Characters of text in one input (strings, lists of words, records)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_size(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_size(v) for v in value)
    return 0


# ---- the app ----------------------------------------------------------------------------------------------
def create_app(pipeline, limits: Limits | None = None, *, api_key: str | None = None,
               allow_adapter_management: bool = False, adapter_roots: Sequence[str | Path] = (),
               scheduling: str = "fair"):
    """The FastAPI app for ``pipeline`` (an InferencePipeLine). Adapter registration, loading and removal over the
    API need ``allow_adapter_management`` and at least one adapter root."""
    _require_fastapi()

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    from .serve_guard import GuardMiddleware, InFlight
    limits = limits or Limits()
    if scheduling not in ("fair", "fifo"):
        raise ConfigError(f"Unknown scheduling {scheduling!r}", field="scheduling", suggestions=["fair or fifo"])
    roots = real_roots(adapter_roots)
    if allow_adapter_management and not roots:
        raise ConfigError("Adapter management needs at least one adapter root", field="adapter_root",
                          suggestions=["add --adapter-root DIR: only adapters under it can be registered"])
    # adapters named at start (--adapter NAME=DIR) are always served: the API cannot remove them
    fixed = {a["name"] for a in pipeline.adapters.list_adapters()} if pipeline.adapters is not None else set()
    worker = ModelWorker(pipeline, micro_batch=pipeline.batch_size, max_queued_inputs=limits.max_queued_inputs,
                         scheduling=scheduling)

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        await asyncio.to_thread(worker.stop)  # lets the micro-batch in progress finish

    app = FastAPI(title="tunepipe", version=__version__, lifespan=lifespan,
                  description="Predictions from a fine-tuned model: entities, labels, answers, generated text; "
                              "PEFT adapters chosen per request. Every route but /health needs the API key "
                              "(Authorization: Bearer <key>) when the server has one.")
    app.state.pipeline = pipeline
    app.state.limits = limits
    app.state.worker = worker
    in_flight = InFlight()
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=limits.max_body_bytes,
                       max_concurrent_requests=limits.max_concurrent_requests, in_flight=in_flight)

    @app.exception_handler(TunepipeError)
    async def tunepipe_error(request: Request, e: TunepipeError):
        status = _status_of(e)
        return _error(status, e.code, e.message, e.field, e.suggestions,
                      headers={"Retry-After": "1"} if status == 503 else None)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":  # its loc holds the character offset, not a field
            at = [p for p in first.get("loc", ()) if p != "body"]
            return _error(422, "VALIDATION_ERROR", "The request body is not valid JSON"
                          + (f" (at character {at[0]})" if at else ""), None,
                          ['send a JSON object, e.g. {"inputs": ["a text"]}'])
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body') or 'body'}: "
                            f"{err.get('msg')}" for err in errors[:5])
        return _error(422, "VALIDATION_ERROR", f"Invalid request: {message}", where,
                      ["see /docs or /openapi.json for the request schema"])

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return _error(e.status_code, "HTTP_ERROR", str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        return _error(500, "INTERNAL_ERROR", f"Internal error ({type(e).__name__})",
                      suggestions=["this is a server fault, not a problem with the request: see the server log"])

    described = pipeline.describe()  # now: later it would wait for the model thread's lock
    ck = pipeline.checkpoint
    about = {"model": (ck.run_dir or Path(ck.path)).name, "kind": described["kind"], "task": described["task"],
             "device": described["device"], "dtype": described["dtype"], "batch_size": described["batch_size"],
             "default_adapter": described["default_adapter"]}
    counts = {"adapters": described["adapters"]}

    def count_adapters():  # on the model thread, after a change
        counts["adapters"] = len(pipeline.adapters.list_adapters())

    @app.get("/health", summary="Liveness, what is served and the queue (no key needed; no paths)")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **about, "adapters": counts["adapters"],
                "queue": {"requests_in_progress": in_flight.count, **worker.stats()}}

    @app.post("/v1/predict", response_model=PredictResponse, summary="Predict for one input or a batch",
              responses={400: {"description": "bad input or setting"}, 401: {"description": "missing or wrong key"},
                         404: {"description": "unknown adapter"}, 413: {"description": "request too large"},
                         422: {"description": "malformed request"}, 503: {"description": "busy: retry later"}})
    async def predict(body: PredictRequest) -> PredictResponse:
        single = is_single_input(body.inputs)
        items = [body.inputs] if single else body.inputs
        if not isinstance(items, list):
            raise ValidationError(f"inputs is {body.inputs!r:.40}, not a text, a record or a list of inputs",
                                  field="inputs", suggestions=['{"inputs": ["a text", "another text"]}'])
        if not items:
            raise ValidationError("inputs is an empty list: nothing to predict", field="inputs",
                                  suggestions=['{"inputs": ["a text", "another text"]}'])
        if len(items) > limits.max_batch:
            raise ValidationError(f"{len(items)} inputs in one request; the limit is {limits.max_batch}",
                                  field="inputs", suggestions=[f"split the batch into requests of at most "
                                                               f"{limits.max_batch} inputs"])
        for n, item in enumerate(items):
            if item is None or isinstance(item, (int, float, bool)):
                raise ValidationError(f"Input {n + 1} is {item!r}, not a text or a record", field="inputs",
                                      suggestions=['send texts, e.g. {"inputs": ["a text"]}'])
            if _size(item) > limits.max_input_chars:
                raise ValidationError(f"Input {n + 1} has {_size(item)} characters; the limit is "
                                      f"{limits.max_input_chars}", field="inputs",
                                      suggestions=["shorten or split the text"])
        reserved = sorted(set(body.parameters) & {"inputs", "adapter", "adapters", "adapter_id", "batch_size"})
        if reserved:
            raise ValidationError(f"parameters cannot set {', '.join(reserved)}", field="parameters",
                                  suggestions=["adapter and adapters are fields of the request itself"])
        if body.adapters is not None and (single or body.adapter is not None):
            raise ValidationError("Give either adapter (one for all inputs) or adapters (one per input in a list)",
                                  field="adapters", suggestions=["drop one of the two fields"])
        if body.adapters is not None and len(body.adapters) != len(items):
            raise ValidationError(f"{len(items)} inputs but {len(body.adapters)} adapter names", field="adapters",
                                  suggestions=["give one adapter name per input"])
        results, task = await worker.predict(items, body.adapter, body.adapters, body.parameters)
        return PredictResponse(predictions=results[0] if single else results, task=task)

    def _require_management():
        if not allow_adapter_management:
            raise ForbiddenError("Adapter management over the API is off on this server", field="adapter",
                                 suggestions=["the operator can turn it on: --allow-adapter-management "
                                              "--adapter-root DIR", "or serve the adapter from the start: "
                                                                    "--adapter NAME=DIR"])

    def _manager():
        _require_management()
        if pipeline.adapters is None:
            raise ConfigError("This server runs one model without adapters", field="adapter",
                              suggestions=["start it with --adapter NAME=DIR to serve adapters"])
        return pipeline.adapters

    @app.get("/v1/adapters", summary="Registered adapters, loaded or not, with their last use")
    def list_adapters() -> dict[str, Any]:
        if pipeline.adapters is None:
            return {"adapters": [], "max_adapters_in_memory": 0}
        manager = pipeline.adapters
        return {"adapters": [_public(a) for a in manager.list_adapters()],
                "max_adapters_in_memory": manager.max_adapters_in_memory, "default_adapter": pipeline.default_adapter}

    @app.post("/v1/adapters", status_code=201, summary="Register (and load) an adapter from under an adapter root",
              responses={403: {"description": "adapter management is off"}})
    async def add_adapter(body: AdapterRequest) -> dict[str, Any]:
        _require_management()
        directory = adapter_dir_under(body.path, roots)  # first: nothing else may see an unchecked path
        manager = _manager()

        def register():
            manager.register_adapter(body.name, directory, task=body.task)
            if body.load:
                try:
                    manager.load_adapter(body.name)
                except Exception:
                    manager.unregister_adapter(body.name)
                    raise
            count_adapters()
            return _find(manager, body.name)

        return {"adapter": await worker.call(register)}

    @app.post("/v1/adapters/{name}/load", summary="Load a registered adapter into memory",
              responses={403: {"description": "adapter management is off"}})
    async def load_adapter(name: str) -> dict[str, Any]:
        manager = _manager()

        def load():
            manager.load_adapter(name)
            return _find(manager, name)

        return {"adapter": await worker.call(load)}

    @app.post("/v1/adapters/{name}/unload", summary="Free an adapter's memory (it stays registered)",
              responses={403: {"description": "adapter management is off"}})
    async def unload_adapter(name: str) -> dict[str, Any]:
        manager = _manager()

        def unload():
            manager.unload_adapter(name)
            return _find(manager, name)

        return {"adapter": await worker.call(unload)}

    @app.delete("/v1/adapters/{name}", summary="Unload and unregister an adapter",
                responses={403: {"description": "adapter management is off"}})
    async def delete_adapter(name: str) -> dict[str, Any]:
        manager = _manager()
        if name in fixed:
            raise ConfigError(f"Adapter '{name}' was named at the server's start and is always served",
                              field="name", suggestions=["free its memory instead: POST /v1/adapters/NAME/unload",
                                                         "or restart the server without --adapter " + name])

        def delete():
            manager.unregister_adapter(name)
            count_adapters()

        await worker.call(delete)
        return {"deleted": name}

    return app


def _public(adapter: dict[str, Any]) -> dict[str, Any]:
    """An adapter's record without server paths."""
    out = {k: v for k, v in adapter.items() if k != "path"}
    if out.get("base_model"):
        out["base_model"] = Path(str(out["base_model"])).name
    return out


def _find(manager, name: str) -> dict[str, Any]:
    return _public(next(a for a in manager.list_adapters() if a["name"] == name))


def uvicorn_config(app, host: str, port: int, limits: Limits, log_level: str = "info"):
    """uvicorn settings from ``limits``: the guarded h11 protocol (head and body deadlines), keep-alive, open
    connections, head size."""
    import uvicorn

    from .serve_guard import guarded_protocol
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", ws="none",
                          http=guarded_protocol(limits.header_timeout, limits.body_timeout),
                          timeout_keep_alive=limits.keep_alive_timeout,  # type: ignore[arg-type]
                          limit_concurrency=limits.max_connections,
                          h11_max_incomplete_event_size=limits.max_header_bytes, server_header=False)


def serve(pipeline, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None, *,
          api_key: str | None = None, allow_adapter_management: bool = False,
          adapter_roots: Sequence[str | Path] = (), scheduling: str = "fair", log_level: str = "info") -> None:
    """Run the API with uvicorn until interrupted. Without ``api_key`` only a loopback address is allowed."""
    check_bind(host, api_key)
    limits = limits or Limits()
    app = create_app(pipeline, limits, api_key=api_key, allow_adapter_management=allow_adapter_management,
                     adapter_roots=adapter_roots, scheduling=scheduling)
    import uvicorn
    uvicorn.Server(uvicorn_config(app, host, port, limits, log_level)).run()
