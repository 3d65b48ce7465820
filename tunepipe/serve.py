"""`tunepipe serve`: an HTTP JSON API over an InferencePipeLine (FastAPI + uvicorn).

``create_app(pipeline)`` builds the app without starting a server (tests and ASGI hosts use it directly);
``serve(pipeline, host, port)`` runs it with uvicorn, on 127.0.0.1 unless told otherwise. Every user mistake is a
4xx with ``{"error": {"code", "message", "field", "suggestions"}}``; only a fault of the server itself is a 500.
Requests are served one at a time by the model (a lock): adapters are switched per request, and torch already
uses every core for one batch.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .errors import ConfigError, DependencyError, TunepipeError, ValidationError

log = logging.getLogger("tunepipe.serve")


@dataclass
class Limits:
    """Request limits: inputs per request, characters per input, and bytes per request body."""
    max_batch: int = 64
    max_input_chars: int = 20_000
    max_body_bytes: int = 2_000_000


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
    path: str = Field(..., description="adapter directory on the server (or a run's output_dir)")
    task: str | None = Field(None, description="task, when the adapter does not record it")
    load: bool = Field(True, description="load it now (else at its first request)")


def _require_fastapi():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise DependencyError("Serving needs fastapi and uvicorn",
                              suggestions=["pip install 'tunepipe[serving]'"]) from None


def _error(status: int, code: str, message: str, field: str | None = None, suggestions=()):
    from fastapi.responses import JSONResponse
    return JSONResponse(status_code=status, content={"error": {"code": code, "message": message, "field": field,
                                                               "suggestions": list(suggestions)}})


def _status_of(e: TunepipeError) -> int:
    from .adapters import AdapterNotFoundError
    if isinstance(e, AdapterNotFoundError):
        return 404
    if e.code == "ADAPTER_SWITCH_ERROR":
        return 500
    return 400 if e.code != "MEMORY_ERROR" else 503


def _size(value: Any) -> int:
    """Characters of text in one input (strings, lists of words, records)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_size(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_size(v) for v in value)
    return 0


def create_app(pipeline, limits: Limits | None = None, allow_adapter_loading: bool = True):
    """The FastAPI app for ``pipeline`` (an InferencePipeLine)."""
    _require_fastapi()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError

    from . import __version__
    limits = limits or Limits()
    lock = threading.Lock()

    app = FastAPI(title="tunepipe", version=__version__,
                  description="Predictions from a fine-tuned model: entities, labels, answers, generated text; "
                              "PEFT adapters chosen per request.")
    app.state.pipeline = pipeline
    app.state.limits = limits

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
            return _error(413, "REQUEST_TOO_LARGE", f"Request body over {limits.max_body_bytes} bytes",
                          suggestions=["send fewer or shorter inputs per request"])
        if length is None and request.method in ("POST", "PUT", "PATCH"):
            if len(await request.body()) > limits.max_body_bytes:
                return _error(413, "REQUEST_TOO_LARGE", f"Request body over {limits.max_body_bytes} bytes",
                              suggestions=["send fewer or shorter inputs per request"])
        return await call_next(request)

    @app.exception_handler(TunepipeError)
    async def tunepipe_error(request: Request, e: TunepipeError):
        return _error(_status_of(e), e.code, e.message, e.field, e.suggestions)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body') or 'body'}: "
                            f"{err.get('msg')}" for err in errors[:5])
        return _error(422, "VALIDATION_ERROR", f"Invalid request: {message}", where,
                      ["see /docs or /openapi.json for the request schema"])

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        return _error(500, "INTERNAL_ERROR", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                      suggestions=["this is a server fault, not a problem with the request: see the server log"])

    @app.get("/health", summary="Liveness and what is loaded")
    def health() -> dict[str, Any]:
        return {"status": "ok", **pipeline.describe()}

    @app.post("/v1/predict", response_model=PredictResponse, summary="Predict for one input or a batch",
              responses={400: {"description": "bad input or setting"}, 404: {"description": "unknown adapter"},
                         413: {"description": "request too large"}, 422: {"description": "malformed request"}})
    def predict(body: PredictRequest) -> PredictResponse:
        from .inference import is_single_input
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
        with lock:
            if body.adapters is not None:
                results = pipeline.predict_grouped(items, body.adapters, **body.parameters)
            else:
                results = pipeline.predict(items, adapter=body.adapter, **body.parameters)
            task = pipeline.task_for(body.adapter).name if body.adapters is None else None
        return PredictResponse(predictions=results[0] if single else results, task=task)

    def _manager():
        if pipeline.adapters is None:
            raise ConfigError("This server runs one model without adapters", field="adapter",
                              suggestions=["start it with --adapter NAME=DIR to serve adapters"])
        return pipeline.adapters

    @app.get("/v1/adapters", summary="Registered adapters, loaded or not, with their last use")
    def list_adapters() -> dict[str, Any]:
        if pipeline.adapters is None:
            return {"adapters": [], "max_adapters_in_memory": 0}
        manager = pipeline.adapters
        return {"adapters": manager.list_adapters(), "max_adapters_in_memory": manager.max_adapters_in_memory,
                "default_adapter": pipeline.default_adapter}

    @app.post("/v1/adapters", status_code=201, summary="Register (and load) an adapter from a server directory")
    def add_adapter(body: AdapterRequest) -> dict[str, Any]:
        if not allow_adapter_loading:
            raise ConfigError("Loading adapters over the API is turned off on this server", field="path",
                              suggestions=["restart the server with the adapter: --adapter NAME=DIR"])
        manager = _manager()
        with lock:
            manager.register_adapter(body.name, body.path, task=body.task)
            if body.load:
                try:
                    manager.load_adapter(body.name)
                except Exception:
                    manager.unregister_adapter(body.name)
                    raise
        return {"adapter": _find(manager, body.name)}

    @app.post("/v1/adapters/{name}/load", summary="Load a registered adapter into memory")
    def load_adapter(name: str) -> dict[str, Any]:
        manager = _manager()
        with lock:
            manager.load_adapter(name)
        return {"adapter": _find(manager, name)}

    @app.post("/v1/adapters/{name}/unload", summary="Free an adapter's memory (it stays registered)")
    def unload_adapter(name: str) -> dict[str, Any]:
        manager = _manager()
        with lock:
            manager.unload_adapter(name)
        return {"adapter": _find(manager, name)}

    @app.delete("/v1/adapters/{name}", summary="Unload and unregister an adapter")
    def delete_adapter(name: str) -> dict[str, Any]:
        manager = _manager()
        with lock:
            manager.unregister_adapter(name)
        return {"deleted": name}

    return app


def _find(manager, name: str) -> dict[str, Any]:
    return next(a for a in manager.list_adapters() if a["name"] == name)


def serve(pipeline, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
          allow_adapter_loading: bool = True, log_level: str = "info") -> None:
    """Run the API with uvicorn until interrupted."""
    app = create_app(pipeline, limits, allow_adapter_loading)
    import uvicorn
    uvicorn.run(app, host=host, port=port, log_level=log_level)
