"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over `ServingLLM`.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with SSE streaming),
GET /v1/models, GET /health, GET /metrics (Prometheus text format).

Requests are validated before they reach the scheduler; bad input gets a 4xx with an OpenAI-style
body `{"error": {"message", "type", "param", "code"}}` and never disturbs other requests. The
scheduler runs on its own thread; each request's outputs are forwarded into the asyncio loop
through a queue. A streaming client that disconnects cancels its request (pages are freed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any, AsyncIterator, Literal, Union

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from jaxsys.sampling import MAX_STOP_STRINGS, SamplingParams
from jaxsys.serve.llm import ServingLLM
from jaxsys.serve.scheduler.request import RequestOutput
from jaxsys.serve.scheduler.scheduler import RequestError


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": type_,
                                                               "param": param, "code": code}})


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stop: Union[str, list[str], None] = None
    logprobs: Any = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens even past end-of-sequence

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = 16


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


class Metrics:
    """Prometheus metrics, one registry per server."""

    def __init__(self, llm: ServingLLM):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = reg = CollectorRegistry()
        sch = llm.scheduler
        Gauge("jaxsys_queue_length", "requests waiting for admission", registry=reg).set_function(
            lambda: sch.queue_length)
        Gauge("jaxsys_running_requests", "requests in prefill or decode", registry=reg).set_function(
            lambda: sch.num_running)
        Gauge("jaxsys_prefix_cache_hit_rate", "prompt tokens served from the radix cache / prompt tokens",
              registry=reg).set_function(lambda: sch.radix.hit_rate)
        Gauge("jaxsys_kv_pages_free", "free KV-cache pages", registry=reg).set_function(lambda: sch.pages.num_free)
        Gauge("jaxsys_spec_acceptance_rate", "speculative decoding: accepted / proposed draft tokens",
              registry=reg).set_function(lambda: sch.stats.acceptance_rate)
        Gauge("jaxsys_tokens_per_step", "tokens a request gets per decode step (over 1 with speculative decoding)",
              registry=reg).set_function(lambda: sch.stats.tokens_per_step)
        self.generated = Counter("jaxsys_generated_tokens", "generated tokens", registry=reg)
        self.requests = Counter("jaxsys_requests", "finished requests", ["finish_reason"], registry=reg)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("jaxsys_time_to_first_token_seconds", "time to first token", buckets=buckets,
                              registry=reg)
        self.tpot = Histogram("jaxsys_time_per_output_token_seconds", "time between output tokens",
                              buckets=buckets, registry=reg)
        sch.stats.observers.append(lambda kind, s: (self.ttft if kind == "ttft" else self.tpot).observe(s))
        if hasattr(llm, "register_metrics"):  # a server over several instances adds its own series
            llm.register_metrics(reg)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def create_app(llm: ServingLLM, *, model_name: str | None = None) -> FastAPI:
    name = model_name or llm.name

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        llm.start()
        try:
            yield
        finally:
            llm.shutdown()

    app = FastAPI(title="jaxsys", version="0.1.0", lifespan=lifespan)
    metrics = Metrics(llm)
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return _error(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}")
        loc = ".".join(str(x) for x in first.get("loc", ())[1:])
        return _error(400, f"invalid request: {loc}: {first.get('msg')}", param=loc or None)

    @app.exception_handler(APIError)
    async def _api_error(_req, exc: APIError):
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.get("/health")
    async def health():
        if llm.scheduler.error is not None:
            return JSONResponse(status_code=503, content={"status": "error", "detail": str(llm.scheduler.error)})
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "jaxsys"}]}

    @app.get("/metrics")
    async def prom():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    def sampling_of(body: _Sampling, max_tokens: int | None) -> SamplingParams:
        if body.model != name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {name!r}",
                           param="model", code="model_not_found")
        if body.logprobs not in (None, False, 0):
            raise APIError(400, "logprobs are not supported", param="logprobs")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > MAX_STOP_STRINGS:
            raise APIError(400, f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stop)}",
                           param="stop")
        seed = body.seed if body.seed is not None else 0
        try:
            return SamplingParams(max_tokens=max_tokens if max_tokens is not None else 256,
                                  temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                  seed=seed, stop=stop, ignore_eos=body.ignore_eos)
        except ValueError as e:
            param = str(e).split(" ", 1)[0]
            raise APIError(400, str(e), param=param) from None

    async def run(prompt_ids: list[int], sampling: SamplingParams, param: str) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        try:
            req = llm.submit(prompt_ids, sampling, lambda out: loop.call_soon_threadsafe(queue.put_nowait, out))
        except RequestError as e:
            code = "context_length_exceeded" if "context" in str(e) else None
            raise APIError(400, str(e), param=param, code=code) from None
        finished = False
        try:
            while True:
                out = await queue.get()
                if out.token_ids:
                    metrics.generated.inc(len(out.token_ids))
                yield out
                if out.finished:
                    finished = True
                    metrics.requests.labels(out.finish_reason or "unknown").inc()
                    return
        finally:
            if not finished:
                llm.cancel(req.request_id)

    def encode_prompt(prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            return [llm.tokenizer.encode(prompt)]
        if prompt and isinstance(prompt[0], int):
            return [list(prompt)]
        if prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "batched prompts are not supported; send one request per prompt", param="prompt")
            return [llm.tokenizer.encode(prompt[0])]
        if prompt and isinstance(prompt[0], list):
            if len(prompt) != 1:
                raise APIError(400, "batched prompts are not supported; send one request per prompt", param="prompt")
            return [list(prompt[0])]
        raise APIError(400, "the prompt is empty", param="prompt")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        sampling = sampling_of(body, body.max_tokens)
        ids = encode_prompt(body.prompt)[0]
        rid = f"cmpl-{uuid.uuid4().hex}"
        outs = run(ids, sampling, "prompt")
        if body.stream:
            first = await _first(outs)

            async def sse():
                async for out in _chain(first, outs):
                    chunk = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": name,
                             "choices": [{"index": 0, "text": out.text, "logprobs": None,
                                          "finish_reason": out.finish_reason if out.finished else None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")
        text, last = await _collect(outs)
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}],
                "usage": _usage(last)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: HTTPRequest):
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        sampling = sampling_of(body, max_tokens)
        try:
            ids = llm.tokenizer.encode_chat([m.model_dump() for m in body.messages])
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        outs = run(ids, sampling, "messages")
        if body.stream:
            first = await _first(outs)

            async def sse():
                head = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": name,
                        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "finish_reason": None}]}
                yield f"data: {json.dumps(head)}\n\n"
                async for out in _chain(first, outs):
                    delta = {"content": out.text} if out.text else {}
                    chunk = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                             "model": name, "choices": [{"index": 0, "delta": delta,
                                                         "finish_reason": out.finish_reason if out.finished else None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")
        text, last = await _collect(outs)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": last.finish_reason}],
                "usage": _usage(last)}

    return app


def _usage(out: RequestOutput | None) -> dict[str, Any]:
    p = out.prompt_tokens if out else 0
    c = out.completion_tokens if out else 0
    usage: dict[str, Any] = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
    if out is not None and out.cached_tokens is not None:  # prompt tokens the prefix cache served
        usage["prompt_tokens_details"] = {"cached_tokens": out.cached_tokens}
    return usage


async def _collect(outs: AsyncIterator[RequestOutput]) -> tuple[str, RequestOutput]:
    text, last = "", None
    async for out in outs:
        text += out.text
        last = out
    if last is None or last.finish_reason == "error":
        raise APIError(500, (last.error if last else None) or "the request failed", type_="server_error")
    return text, last


async def _first(gen: AsyncIterator[RequestOutput]) -> RequestOutput | None:
    """Pull the first event before the response starts, so submission errors become a 4xx."""
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return None


async def _chain(first: RequestOutput | None, rest: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    if first is not None:
        yield first
        if first.finished:
            return
    async for out in rest:
        yield out
