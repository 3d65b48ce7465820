"""What stands between `tunepipe serve` and a network: the API key, limits on bodies and concurrent requests, and
read timeouts on every connection.

Two layers, because each sees what the other cannot:

- ``GuardMiddleware`` (pure ASGI, outside FastAPI's routing): checks the key on every path but ``/health``, bounds
  requests in flight, and reads the body itself, counting bytes as they arrive (Content-Length or chunked), so a
  body over the limit gets 413 before it is buffered. A body that is not UTF-8, or whose JSON holds a lone surrogate
  (``"\\ud800"``: valid JSON, but no tokenizer or encoder takes it), gets 400 here instead of a 500 later.
- ``GuardedH11Protocol`` (uvicorn's h11 protocol with timers): uvicorn closes idle keep-alive connections but puts
  no deadline on a client that connects and sends half a request head, or a body a byte at a time; each such
  connection would stay open for good (slowloris). Here a request head must be complete within ``header_timeout``
  and its body within ``body_timeout``; otherwise the connection is closed. A connection that is closing but whose
  peer never reads what is left to send is aborted after a grace period.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import re
from typing import Iterable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

OPEN_PATHS = frozenset({"/health"})
_SURROGATE = re.compile("[\ud800-\udfff]")


async def reply(send, status: int, code: str, message: str, suggestions: Iterable[str] = (),
                headers: Iterable[tuple[bytes, bytes]] = (), close: bool = False) -> None:
    """A JSON error in serve.py's shape, sent straight to the ASGI server; ``close`` when the body was not read."""
    body = json.dumps({"error": {"code": code, "message": message, "field": None,
                                 "suggestions": list(suggestions)}}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    if close:
        head.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def text_problem(body: bytes) -> str | None:
    """Why ``body`` cannot be read as text, or None: invalid UTF-8, or a JSON string holding a lone surrogate."""
    try:
        text = body.decode("utf-8")  # strict: also refuses surrogates encoded as UTF-8 bytes
    except UnicodeDecodeError as e:
        return f"The request body is not valid UTF-8 (byte {e.start})"
    if "\\ud" not in text and "\\uD" not in text:  # a surrogate can only come from a JSON escape now
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None  # not JSON: the route answers that
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return "The request holds a lone UTF-16 surrogate escape (e.g. \\ud800), which is not text"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


class InFlight:
    """Requests past the key check and not yet answered (shared with /health)."""
    count: int = 0


class GuardMiddleware:
    """API key, requests in flight, body size and encoding, before FastAPI sees the request."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, max_concurrent_requests: int,
                 in_flight: InFlight | None = None, retry_after_s: int = 1):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.max_concurrent = max_concurrent_requests
        self.retry_after = str(retry_after_s).encode()
        self.in_flight = in_flight or InFlight()

    def authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        ok = False
        for name, value in headers:
            if name == b"authorization":
                scheme, _, token = value.strip().partition(b" ")
                if scheme.lower() == b"bearer":
                    ok |= hmac.compare_digest(token.strip(), self.key)
            elif name == b"x-api-key":
                ok |= hmac.compare_digest(value.strip(), self.key)
        return ok

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "websocket":  # the API has none; refuse before any route sees it
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        open_path = scope["path"] in OPEN_PATHS
        if self.key is not None and not open_path and not self.authorized(scope["headers"]):
            await reply(send, 401, "UNAUTHORIZED", "Missing or wrong API key",
                        ["send the key as 'Authorization: Bearer <key>' (or an 'X-API-Key' header)"],
                        headers=[(b"www-authenticate", b"Bearer")], close=True)
            return
        if open_path:
            await self.app(scope, receive, send)
            return
        if self.in_flight.count >= self.max_concurrent:
            await reply(send, 503, "SERVER_BUSY", f"{self.in_flight.count} requests are in progress, the most "
                        "this server takes at once", ["retry after the time in the Retry-After header"],
                        headers=[(b"retry-after", self.retry_after)], close=True)
            return
        self.in_flight.count += 1
        try:
            body = await self._read_body(scope, receive, send)
            if body is None:
                return
            problem = text_problem(body) if body else None
            if problem:
                await reply(send, 400, "INVALID_TEXT", problem, ["send JSON encoded as UTF-8, with whole characters"])
                return
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: the server's disconnect notice

            await self.app(scope, replay, send)
        finally:
            self.in_flight.count -= 1

    async def _read_body(self, scope, receive, send) -> bytes | None:
        """The whole body, or None once answered (413) or the client left. Counted as it arrives: a chunked body
        has no Content-Length to check first."""
        limit = self.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await self._too_large(send)
                return None
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > limit:
                await self._too_large(send)
                return None
            if not message.get("more_body", False):
                return bytes(body)

    async def _too_large(self, send) -> None:
        await reply(send, 413, "REQUEST_TOO_LARGE", f"Request body over {self.max_body_bytes} bytes",
                    ["send fewer or shorter inputs per request"], close=True)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with deadlines on what the client sends: the request head within ``header_timeout``
    (from the connection's start, or from the first byte after a keep-alive pause), the body within
    ``body_timeout`` of the head. Set the class attributes with ``guarded_protocol``."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    close_grace: float = 5.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._timer: asyncio.TimerHandle | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        self._phase: str | None = None
        super().connection_made(transport)
        self._set_phase("head")

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            self._abort_later()
            return
        # the keep-alive timer now owns the idle connection; a pipelined request already read moves us on
        self._set_phase(None if self.conn.their_state is h11.IDLE else self._phase_of_state())

    def timeout_keep_alive_handler(self) -> None:
        super().timeout_keep_alive_handler()
        self._abort_later()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None
        super().connection_lost(exc)

    # ---- timers ----------------------------------------------------------------------------------------------
    def _phase_of_state(self) -> str | None:
        state = self.conn.their_state
        if state is h11.IDLE:
            return "head"
        if state is h11.SEND_BODY:
            return "body"
        return None  # request complete (the app works), closed, or an error uvicorn answers itself

    def _watch(self) -> None:
        if self.transport.is_closing():
            self._cancel()
            return
        phase = self._phase_of_state()
        if phase == "head" and self._phase is None and not self.conn.trailing_data[0]:
            return  # idle between requests, nothing buffered: keep-alive's business
        self._set_phase(phase)

    def _set_phase(self, phase: str | None) -> None:
        if phase == self._phase:
            return  # keep the deadline already running
        self._cancel()
        self._phase = phase
        if phase is not None:
            delay = self.header_timeout if phase == "head" else self.body_timeout
            self._timer = self.loop.call_later(delay, self._expired)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        self.logger.debug("closing a connection from %s: request %s not received within %ss",
                         "%s:%d" % self.client if self.client else "?", self._phase,
                         self.header_timeout if self._phase == "head" else self.body_timeout)
        self.transport.close()
        self._abort_later()

    def _abort_later(self) -> None:
        """transport.close() waits until the peer has read what is buffered; a peer that never reads would keep
        the connection for good."""
        if self._abort_timer is None and self.transport is not None:
            self._abort_timer = self.loop.call_later(self.close_grace, self.transport.abort)


def guarded_protocol(header_timeout: float, body_timeout: float, close_grace: float = 5.0) -> type:
    """A ``GuardedH11Protocol`` subclass with these deadlines (uvicorn builds protocols from a class)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"header_timeout": header_timeout, "body_timeout": body_timeout, "close_grace": close_grace})


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False

