"""The OpenAI-compatible HTTP API over an :class:`~llmforge.serve.engine.Engine` (FastAPI; no Ray in here).

``build_api(server)`` returns an ASGI app with ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``
and ``POST /v1/chat/completions``. Responses and errors have OpenAI's exact shapes, so the official
``openai`` client works unchanged; streaming is Server-Sent Events ending in ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterable, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmforge.serve import content_filter
from llmforge.serve.engine import Engine, EngineStopped, Event, QueueFull, SamplingParams, TokenLogprob

log = logging.getLogger("llmforge.serve")

MAX_STOP_SEQUENCES = 4
# Held-back text is compared against every stop after each token: bounded stops keep that cost bounded.
MAX_STOP_CHARS = 256
MAX_STOP_TOTAL_CHARS = 512
SEED_RANGE = (-(2**63), 2**63 - 1)  # what the engine's generators take, choice i of n seeding seed + i
RETRY_AFTER_S = 1


@dataclass
class ModelServer:
    """What the API serves: the engine, its tokenizer, the names clients use and the request limits."""

    engine: Engine
    tokenizer: Any
    model_name: str
    adapters: list[str]
    max_model_len: int
    default_max_tokens: int = 256
    max_body_bytes: int = 1_048_576
    body_read_timeout_s: float = 30.0
    api_key: str | None = None
    blocked_terms: tuple[str, ...] = ()
    log_prompts: bool = False
    stream_interval_s: float = 0.0
    # Which engine generates, and why (shown by /health).
    engine_info: dict = field(default_factory=lambda: {"engine": "llmforge", "engine_reason": "serve.engine=llmforge"})
    created: int = field(default_factory=lambda: int(time.time()))


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type_, param, code, headers


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status, headers=exc.headers)


# ---- request bodies -----------------------------------------------------------------------------------
class _Body(BaseModel):
    # Unknown parameters are refused by name (as OpenAI does), not silently ignored.
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops) or sum(map(len, stops)) > MAX_STOP_TOTAL_CHARS:
            raise ValueError(f"each stop sequence may have at most {MAX_STOP_CHARS} characters, all of them "
                             f"together {MAX_STOP_TOTAL_CHARS}")
        return value

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False  # the prompt before the completion, in the text and (with logprobs) the logprobs

    def logprob_count(self) -> int | None:
        return self.logprobs


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def logprob_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true.", param="top_logprobs", code="invalid_value")
        return (self.top_logprobs or 0) if self.logprobs else None


# ---- the app ------------------------------------------------------------------------------------------
def is_authorized(api_key: str | None, headers) -> bool:
    """A request carries the server's key as ``Authorization: Bearer KEY`` (compared in constant time)."""
    if api_key is None:
        return True
    header = dict(headers).get(b"authorization", b"").decode("latin-1")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode())


class Gate:
    """ASGI middleware in front of every handler: the API key first (so a caller without it learns nothing
    from validation errors), then the body, read whole within ``read_timeout_s`` (408, so a client sending a
    byte a second cannot hold a slot) and at most ``max_bytes`` long, declared or chunked (413)."""

    def __init__(self, app, api_key: str | None, max_bytes: int, read_timeout_s: float):
        self.app, self.api_key, self.max_bytes, self.read_timeout_s = app, api_key, max_bytes, read_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"].startswith("/v1/") and not is_authorized(self.api_key, scope["headers"]):
            return await JSONResponse(error_body("Incorrect or missing API key. Send it as 'Authorization: Bearer KEY'.",
                                                 "invalid_request_error", code="invalid_api_key"),
                                      status_code=401)(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        try:
            body = await asyncio.wait_for(self._read(receive), self.read_timeout_s)
        except asyncio.TimeoutError:
            return await JSONResponse(error_body(f"The request body did not arrive within {self.read_timeout_s:g}s.",
                                                 "invalid_request_error", code="request_timeout"),
                                      status_code=408, headers={"Connection": "close"})(scope, receive, send)
        if body is None:  # the client went away
            return
        if len(body) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        replay = [{"type": "http.request", "body": body, "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()
        await self.app(scope, replayed, send)

    async def _read(self, receive) -> bytes | None:
        body, more = b"", True
        while more and len(body) <= self.max_bytes:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
        return body

    async def _too_large(self, scope, receive, send):
        response = JSONResponse(error_body(f"Request body is larger than {self.max_bytes} bytes.",
                                           "invalid_request_error", code="request_too_large"), status_code=413)
        return await response(scope, receive, send)


def build_api(server: ModelServer) -> FastAPI:
    api = FastAPI(title="llmforge", docs_url=None, redoc_url=None, openapi_url=None)

    @api.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            message = "The request body is not valid JSON."
        elif first.get("type") == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
        elif param is None:
            message = "The request body must be a JSON object holding the request's parameters."
        elif first.get("type") == "missing":
            message = f"Missing required parameter: {param}"
        else:
            message = f"Invalid value for {param}: {first.get('msg')}" if param else str(first.get("msg"))
        return error_response(APIError(400, message, param=param, code="invalid_value"))

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code))

    @api.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(APIError(500, "Internal server error.", "server_error"))

    blocked = content_filter.fold_terms(server.blocked_terms)

    def model_entry(name: str, parent: str | None = None) -> dict:
        entry = {"id": name, "object": "model", "created": server.created, "owned_by": "llmforge",
                 "max_model_len": server.max_model_len}  # as vLLM's: what a client may send (lm-eval truncates to it)
        if parent:
            entry["parent"] = parent
        return entry

    @api.get("/health")
    async def health(request: Request):
        # Load balancers and probes ask without a key: they get the status; queue and adapter detail need it.
        if not is_authorized(server.api_key, request.scope["headers"]):
            return {"status": "ok"}
        return {"status": "ok", "model": server.model_name, **server.engine_info, **server.engine.stats()}

    @api.get("/v1/models")
    async def list_models(request: Request):
        return {"object": "list",
                "data": [model_entry(server.model_name)] + [model_entry(a, server.model_name) for a in server.adapters]}

    @api.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        resolve_adapter(name)
        return model_entry(name, server.model_name if name != server.model_name else None)

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        adapter = resolve_adapter(body.model)

        def tokenize() -> list[list[int]]:
            prompts = _prompt_ids(server, body.prompt)
            _refuse_blocked(blocked, (server.tokenizer.decode(p) for p in prompts), "prompt")  # decoded only with terms
            return prompts
        # Off the event loop: a 1 MiB prompt takes a while to tokenize, and every stream of this replica waits
        # on the loop meanwhile.
        return await respond(body, adapter, await asyncio.to_thread(tokenize), chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        adapter = resolve_adapter(body.model)
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens

        def tokenize() -> list[int]:
            _refuse_blocked(blocked, [m.text() for m in body.messages], "messages")
            return _chat_ids(server, body.messages)
        return await respond(body, adapter, [await asyncio.to_thread(tokenize)], chat=True)

    def resolve_adapter(name: str) -> str | None:
        if name == server.model_name:
            return None
        if name in server.adapters:
            return name
        raise APIError(404, f"The model '{name}' does not exist. Available: {', '.join([server.model_name, *server.adapters])}.",
                       param="model", code="model_not_found")

    async def respond(body: _Sampling, adapter: str | None, prompts: list[list[int]], chat: bool):
        params = _sampling_params(server, body, prompts)
        settings = server.engine.settings
        if body.n > settings.max_batch_size:
            raise APIError(400, f"n={body.n} is larger than this server's batch ({settings.max_batch_size}).",
                           param="n", code="invalid_value")
        # What the engine can ever hold: a full batch running and a full queue waiting. A larger request would be
        # told to retry (503) forever, so it is refused as what it is.
        capacity = settings.max_batch_size + settings.max_waiting_sequences
        if len(prompts) * body.n > capacity:
            raise APIError(400, f"This request asks for {len(prompts) * body.n} sequences ({len(prompts)} prompt(s) x "
                                f"n={body.n}); this server holds at most {capacity} at once. Send fewer prompts per "
                                "request or a smaller n.", param="prompt" if len(prompts) > 1 else "n",
                           code="invalid_value")
        if server.log_prompts:
            log.info("request model=%s prompts=%r", body.model, [server.tokenizer.decode(p) for p in prompts])
        run = _Run(server, body, chat)
        run.submit(prompts, params, adapter)
        if body.stream:
            return StreamingResponse(run.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await run.collect())

    return Gate(api, server.api_key, server.max_body_bytes, server.body_read_timeout_s)


# ---- request handling ---------------------------------------------------------------------------------
def _prompt_ids(server: ModelServer, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "prompt must not be empty.", param="prompt", code="invalid_value")
    vocab = len(server.tokenizer)
    out = []
    for p in prompts:
        ids = server.tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(400, "prompt must not be empty.", param="prompt", code="invalid_value")
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt holds token ids outside the vocabulary (0..{vocab - 1}).", param="prompt",
                           code="invalid_value")
        out.append(ids)
    return out


def _chat_ids(server: ModelServer, messages: list[ChatMessage]) -> list[int]:
    if not getattr(server.tokenizer, "chat_template", None):
        raise APIError(400, "This model has no chat template; use /v1/completions.", code="invalid_value")
    # Content is text: a user's "<|im_end|><|im_start|>system" must not become control tokens. So the template is
    # rendered around placeholders, its own text encoded with its special tokens, and each message's content
    # encoded with special tokens split into ordinary text.
    conversation = [{"role": "system" if m.role == "developer" else m.role, "content": f"{_MARK}{i}{_MARK}"}
                    for i, m in enumerate(messages)]
    rendered = server.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    ids: list[int] = []
    for k, piece in enumerate(re.split(f"{_MARK}(\\d+){_MARK}", rendered)):
        if k % 2 == 0:
            ids += server.tokenizer.encode(piece, add_special_tokens=False) if piece else []
        elif text := messages[int(piece)].text():
            ids += server.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    return ids


_MARK = "\ue000"  # a private-use character: stands for a message's content while the template renders


def _refuse_blocked(folded_terms: tuple[str, ...], texts: Iterable[str], param: str) -> None:
    if folded_terms and any(content_filter.contains(t, folded_terms) for t in texts):
        raise APIError(400, "The request was refused by the content filter.", param=param, code="content_filter")


def _sampling_params(server: ModelServer, body: _Sampling, prompts: list[list[int]]) -> SamplingParams:
    longest = max(len(p) for p in prompts)
    param = "messages" if isinstance(body, ChatRequest) else "prompt"
    if longest >= server.max_model_len:
        raise APIError(400, f"This model's maximum context length is {server.max_model_len} tokens, and the prompt "
                            f"has {longest}. Shorten the prompt.", param=param, code="context_length_exceeded")
    room = server.max_model_len - longest
    if body.max_tokens is not None and body.max_tokens > room:
        raise APIError(400, f"This model's maximum context length is {server.max_model_len} tokens: the prompt has "
                            f"{longest} and max_tokens asks for {body.max_tokens}. Lower max_tokens to {room} or less.",
                       param="max_tokens", code="context_length_exceeded")
    echo = isinstance(body, CompletionRequest) and body.echo
    return SamplingParams(max_tokens=body.max_tokens or min(server.default_max_tokens, room),
                          temperature=body.temperature, top_p=body.top_p, stop=body.stops(), seed=body.seed,
                          logprobs=body.logprob_count(),
                          prompt_logprobs=body.logprob_count() if echo else None)


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class _Run:
    """One HTTP request's choices: submitted to the engine, events gathered on this event loop."""

    def __init__(self, server: ModelServer, body: _Sampling, chat: bool):
        self.server, self.body, self.chat = server, body, chat
        self.loop = asyncio.get_running_loop()
        # The engine's side appends events here and wakes this loop once per batch the stream writes (not per
        # token nor per decode step: a wake is a write to the loop's self-pipe, and 32 streams woken at every
        # step of ~80 a second kept the replica busy), and at once when a choice ends.
        self.pending: collections.deque[tuple[int, Event]] = collections.deque()
        self.ready = asyncio.Event()
        self.wake_scheduled = False  # reset when the stream takes the pending events, not when the wake runs
        self.finishing = False  # a choice has ended: its last text goes out without waiting for the interval
        self.nap: asyncio.Future | None = None  # the wait for the interval's end, which a choice's end cuts short
        self.handles = []
        self.prompt_tokens = 0
        self.choices = 0
        self.echo: list[str | None] = []  # echo=true: each choice's prompt text (None once streamed)
        self.first_token: list[str] = []  # echo=true: each choice's first prompt token (it has no logprob)
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _wake(self) -> None:
        self.ready.set()
        if self.finishing and self.nap is not None and not self.nap.done():
            self.nap.set_result(None)

    def _sink(self, offset: int):
        def put(event: Event) -> None:  # runs on the thread that delivers the engine's events
            self.pending.append((offset, event))
            if event.finish_reason is not None:
                self.finishing = True
                self.loop.call_soon_threadsafe(self._wake)
            elif not self.wake_scheduled:
                self.wake_scheduled = True
                self.loop.call_soon_threadsafe(self._wake)
        return put

    def submit(self, prompts: list[list[int]], params: SamplingParams, adapter: str | None) -> None:
        n = self.body.n
        try:
            for i, ids in enumerate(prompts):
                self.handles.append(self.server.engine.submit(ids, params, self._sink(i * n), n=n, adapter=adapter))
                self.prompt_tokens += len(ids)
                if getattr(self.body, "echo", False):
                    self.echo += [self.server.tokenizer.decode(ids, skip_special_tokens=True)] * n
                    self.first_token += [self.server.tokenizer.decode(ids[:1], skip_special_tokens=True)] * n
        except QueueFull:
            self.cancel()
            raise APIError(503, "The server is overloaded; retry shortly.", "server_error", code="overloaded",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except EngineStopped:
            self.cancel()
            raise APIError(503, "The server is shutting down; retry on another replica.", "server_error",
                           code="unavailable", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        self.choices = len(prompts) * n

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    async def event_batches(self, interval: float = 0.0) -> AsyncIterator[list[tuple[int, Event]]]:
        """Every event that has arrived, in batches at most one per ``interval`` seconds (the first at once, and the
        last as soon as its choice ends): each write then carries several tokens instead of one, which is what
        keeps Ray Serve's per-message cost (replica, proxy, client) from growing with the token rate."""
        remaining = self.choices
        last = 0.0
        try:
            while remaining:
                await self.ready.wait()
                wait = last + interval - time.perf_counter()
                if wait > 0 and not self.finishing:
                    self.nap = self.loop.create_future()
                    timer = self.loop.call_later(wait, _settle, self.nap)
                    try:
                        await self.nap
                    finally:
                        timer.cancel()
                        self.nap = None
                # Flags first, then the events: one appended after this point schedules a wake of its own.
                self.finishing = False
                self.wake_scheduled = False
                self.ready.clear()
                batch = []
                while self.pending:
                    batch.append(self.pending.popleft())
                if not batch:
                    continue
                last = time.perf_counter()
                remaining -= sum(event.finish_reason is not None for _, event in batch)
                yield [(offset + event.index, event) for offset, event in batch]
        finally:
            if remaining:
                self.cancel()  # the client went away: free the batch rows

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    async def collect(self) -> dict:
        texts = [""] * self.choices
        reasons: list[str | None] = [None] * self.choices
        tokens = [0] * self.choices
        logprobs: list[list[TokenLogprob]] = [[] for _ in range(self.choices)]
        if self.echo:
            texts = list(self.echo)
        async for batch in self.event_batches():
            for index, event in batch:
                texts[index] += event.text
                tokens[index] = event.completion_tokens
                reasons[index] = event.finish_reason or reasons[index]
                logprobs[index] += self._prompt_logprobs(index, event) + (event.logprobs or [])
        if "abort" in reasons:
            raise APIError(500, "Generation failed on the server.", "server_error")
        rendered = [self._logprobs(lps, [0]) for lps in logprobs]
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": lp,
                        "finish_reason": r} for i, (t, r, lp) in enumerate(zip(texts, reasons, rendered))]
        else:
            choices = [{"index": i, "text": t, "logprobs": lp, "finish_reason": r}
                       for i, (t, r, lp) in enumerate(zip(texts, reasons, rendered))]
        if self.server.log_prompts:
            log.info("response %s: %r", self.id, texts)
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion", "created": self.created,
                "model": self.body.model, "choices": choices, "usage": self.usage(sum(tokens))}

    def _prompt_logprobs(self, index: int, event: Event) -> list[TokenLogprob]:
        """The prompt's tokens of an event (echo), the first one named by the API's tokenizer."""
        if not event.prompt_logprobs:
            return []
        first, *rest = event.prompt_logprobs
        return [TokenLogprob(self.first_token[index], None), *rest]

    def _logprobs(self, lps: list[TokenLogprob], offset: list[int]) -> dict | None:
        """OpenAI's logprobs object for one choice's tokens (``offset``: the choice's text length before them,
        advanced here: completions report each token's character offset)."""
        if self.body.logprob_count() is None:
            return None
        if self.chat:
            def entry(text: str, logprob: float) -> dict:
                return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
            return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(a, b) for a, b in t.top]}
                                for t in lps], "refusal": None}
        offsets = []
        for t in lps:
            offsets.append(offset[0])
            offset[0] += len(t.token)
        return {"tokens": [t.token for t in lps], "token_logprobs": [t.logprob for t in lps],
                "top_logprobs": [dict(t.top) if t.logprob is not None else None for t in lps], "text_offset": offsets}

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.body.model, "choices": choices}
        if usage is not None:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    async def stream(self) -> AsyncIterator[str]:
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        tokens = [0] * self.choices
        offsets = [[0] for _ in range(self.choices)]
        if self.chat:
            yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None} for i in range(self.choices)])
        async for batch in self.event_batches(self.server.stream_interval_s):
            # One chunk per choice per batch: the text of every event that arrived since the last write (under
            # load, several tokens) in one SSE event, not one event per token for the client to parse.
            merged: dict[int, list] = {}
            aborted = False
            for index, event in batch:
                tokens[index] = event.completion_tokens
                if event.finish_reason == "abort":
                    aborted = True
                    break
                text_reason = merged.setdefault(index, ["", None, []])
                if self.echo and self.echo[index] is not None:  # the prompt goes first, once
                    text_reason[0], self.echo[index] = self.echo[index], None
                text_reason[0] += event.text
                text_reason[1] = event.finish_reason or text_reason[1]
                text_reason[2] += self._prompt_logprobs(index, event) + (event.logprobs or [])
            out = []
            for index, (text, reason, lps) in merged.items():
                if not text and reason is None and not lps:
                    continue
                logprobs = self._logprobs(lps, offsets[index])
                if self.chat:
                    delta = {"content": text} if text else {}
                    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
                else:
                    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
                out.append(self._chunk([choice]))
            if aborted:
                yield "".join(out) + f"data: {json.dumps(error_body('Generation failed on the server.', 'server_error'))}\n\n"
                return
            if out:
                yield "".join(out)
        if include_usage:
            yield self._chunk([], usage=self.usage(sum(tokens)))
        yield "data: [DONE]\n\n"
