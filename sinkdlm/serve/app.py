"""The HTTP side: FastAPI routes speaking OpenAI's API, and `serve` (uvicorn).

POST /v1/completions and /v1/chat/completions answer OpenAI's response objects, or with `stream`
server-sent events of OpenAI's chunks: one per committed block with the text it adds, and with the
body field `stream_steps` also one per denoising step whose choice carries `canvas` (the generated
region, masked positions as the mask token) and `step`. GET /v1/models, GET /health. Every error
is OpenAI's error object. A request whose client leaves is cancelled (sinkdlm.serve.batcher).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from sinkdlm.errors import UserError
from sinkdlm.serve import schema
from sinkdlm.serve.batcher import Event, Job
from sinkdlm.serve.engine import Engine, ServeConfig
from sinkdlm.serve.schema import RequestError
from sinkdlm.serve.text import Choice

SSE_DONE = "data: [DONE]\n\n"
MAX_BODY_BYTES = 16 * 2**20  # far above any context's prompt, as text or as token ids
LISTEN_BACKLOG = 2048  # connections the kernel holds until the server accepts them (uvicorn's default)


class APIKey:
    """ASGI middleware: every HTTP request needs `Authorization: Bearer KEY` (OpenAI's scheme)."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                error = RequestError("a valid API key is required: send `Authorization: Bearer KEY`", status=401,
                                     code="invalid_api_key")
                await JSONResponse(error.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: Engine, api_key: str | None = None) -> Any:
    app = FastAPI(title="sinkdlm", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(RequestError)
    async def refused(_: Request, e: RequestError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(RequestError(str(e.detail), status=e.status_code, kind=kind).body(),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def failed(_: Request, e: Exception) -> JSONResponse:  # a bug: OpenAI's object, and uvicorn logs it
        error = RequestError(f"the server failed: {type(e).__name__}: {e}", status=500, kind="server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": engine.limits.model_name, "queued": engine.batcher.queued(),
                **engine.batcher.counts}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": engine.limits.model_name, "object": "model", "created": created,
                                            "owned_by": "sinkdlm"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = schema.check_fields(await _json(request), schema.COMPLETION_FIELDS)
        if "prompt" not in body:
            raise RequestError("prompt is required", "prompt")
        prompts = schema.completion_prompts(body["prompt"], engine.decoder.encode, engine.limits.vocab_size)
        gen = schema.generation(body, prompts, "prompt", engine.defaults, engine.limits)
        return await _answer(engine, request, gen, Completion("cmpl", engine.limits.model_name, chat=False))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = schema.check_fields(await _json(request), schema.CHAT_FIELDS)
        messages = schema.chat_messages(body.get("messages"))
        if engine.template is None:
            raise RequestError(f"model {engine.limits.model_name!r} has no chat template (its checkpoint has no "
                               f"tokenizer_config.json with one); use /v1/completions, or restart the server with "
                               f"--chat-template FILE", "messages", code="no_chat_template")
        prompt = engine.decoder.encode(engine.template.render(messages))
        gen = schema.generation(body, [prompt], "messages", engine.defaults, engine.limits)
        return await _answer(engine, request, gen, Completion("chatcmpl", engine.limits.model_name, chat=True))

    return APIKey(app, api_key) if api_key else app


async def _json(request: Request) -> Any:
    """The body as JSON, read only up to MAX_BODY_BYTES (a huge body is refused, not held in memory)."""
    declared = request.headers.get("content-length", "")
    too_large = RequestError(f"the request body is larger than {MAX_BODY_BYTES // 2**20} MiB; send a shorter prompt",
                             status=413, code="body_too_large")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_large
    try:
        return json.loads(bytes(body))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON ({e}); send a JSON object") from None


class Completion:
    """OpenAI's response objects and stream chunks of one request."""

    def __init__(self, prefix: str, model: str, chat: bool) -> None:
        self.id, self.model, self.chat = f"{prefix}-{uuid.uuid4().hex}", model, chat
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def response(self, gen: schema.Generation, choices: list[Choice]) -> dict:
        if self.chat:
            items = [{"index": k, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason}
                     for k, c in enumerate(choices)]
        else:
            items = [{"index": k, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                     for k, c in enumerate(choices)]
        return {**self._head(self.object), "choices": items, "usage": usage(gen, choices)}

    def chunk(self, k: int, text: str | None, finish: str | None = None, **extra: Any) -> str:
        if self.chat:
            delta = {} if text is None else {"content": text}
            choice = {"index": k, "delta": delta, "finish_reason": finish, **extra}
        else:
            choice = {"index": k, "text": text or "", "logprobs": None, "finish_reason": finish, **extra}
        return sse({**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]})

    def role_chunk(self, k: int) -> str:
        """A chat stream's first chunk of choice k."""
        return sse({**self._head("chat.completion.chunk"),
                    "choices": [{"index": k, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})

    def usage_chunk(self, gen: schema.Generation, choices: list[Choice]) -> str:
        return sse({**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                    "usage": usage(gen, choices)})


def usage(gen: schema.Generation, choices: list[Choice]) -> dict:
    prompt = sum(len(p) for p in gen.prompts)
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _answer(engine: Engine, request: Request, gen: schema.Generation, out: Completion) -> Any:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def deliver(event: Event) -> None:  # on the batcher's thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop has closed: the server is stopping
            pass

    job = Job(gen, deliver)
    engine.batcher.submit(job)
    if gen.stream:
        return StreamingResponse(_stream(engine, request, job, events, out), media_type="text/event-stream")
    left = asyncio.ensure_future(_disconnected(request))
    done = asyncio.ensure_future(events.get())
    try:
        await asyncio.wait({left, done}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        left.cancel()
        if not done.done():
            done.cancel()
            engine.batcher.cancel(job)
    if not done.done():
        return JSONResponse({}, status_code=499)  # nobody reads it
    kind, payload = done.result()
    if kind == "error":
        return JSONResponse(RequestError(payload, status=500, kind="server_error").body(), status_code=500)
    return out.response(gen, payload["choices"])


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(engine: Engine, request: Request, job: Job, events: asyncio.Queue, out: Completion) \
        -> AsyncIterator[str]:
    gen, finished = job.generation, False
    left = asyncio.ensure_future(_disconnected(request))
    try:
        if out.chat:
            for k in range(len(gen.rows)):
                yield out.role_chunk(k)
        while True:
            nxt = asyncio.ensure_future(events.get())
            await asyncio.wait({left, nxt}, return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():
                nxt.cancel()
                return  # the client left; `finally` cancels the work
            kind, payload = nxt.result()
            if kind == "step":
                for k, canvas in payload["canvas"].items():
                    yield out.chunk(k, None if out.chat else "", canvas=canvas, step=payload["step"])
                for k, delta in payload["text"].items():
                    yield out.chunk(k, delta)
                continue
            finished = True
            if kind == "error":
                yield sse(RequestError(payload, status=500, kind="server_error").body())
            else:
                for k, (choice, rest) in enumerate(zip(payload["choices"], payload["rest"])):
                    if rest:
                        yield out.chunk(k, rest)
                    yield out.chunk(k, None, choice.finish_reason)
                if gen.include_usage:
                    yield out.usage_chunk(gen, payload["choices"])
            yield SSE_DONE
            return
    finally:
        left.cancel()
        if not finished:
            engine.batcher.cancel(job)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a port in use is one line, not a traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None
    return sock


def serve(engine: Engine, cfg: ServeConfig, sock: socket.socket) -> None:
    """Run until Ctrl-C / SIGTERM; prints one line with the address once it listens."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, cfg.api_key), log_level="warning",
                                           timeout_graceful_shutdown=1))
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/v1"
    print(f"sinkdlm serve: {engine.limits.model_name!r} at {url} (max batch {cfg.max_batch}, window "
          f"{cfg.batch_window_ms:g} ms{', API key required' if cfg.api_key else ''})", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
