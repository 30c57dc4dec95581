"""Where the agents' LLM calls go: our serving engine in this process, or any OpenAI-compatible
server over HTTP (`jaxsys serve`, vLLM, SGLang, ...).

Both take a prompt as `Segment`s and return the completion with its token accounting. Both are
thread-safe: the runner calls them from many question threads at once, and the engine's
continuous batching runs those calls together.

`EngineBackend` tokenizes the chat prompt piece by piece (each piece starts at a segment), so a
segment's tokens never depend on what follows it and identical prefixes are identical token runs
for the radix cache; when the priority eviction policy is plugged in, it registers each prompt's
segments with it and sends the page tags it returns with the request (they land on the radix
nodes), and it reports how many prompt tokens the radix cache already held.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import urllib.error
import urllib.request
from typing import Sequence

from jaxsys.serve.graphcot.cache_policy import Span, VertexPriorityPolicy
from jaxsys.serve.graphcot.prompts import Segment, messages


class BackendError(RuntimeError):
    """The backend failed a call (or cannot be reached)."""


class BackendUnreachable(BackendError):
    pass


class PromptTooLong(BackendError):
    """The prompt does not fit the model's context (Graph-CoT halts the question there)."""


@dataclasses.dataclass
class Completion:
    text: str
    prompt_tokens: int
    cached_tokens: int | None  # None when the backend does not say
    generated_tokens: int


# ------------------------------------------------------------------------------ in process

def encode_segments(tokenizer, segments: Sequence[Segment]) -> tuple[list[int], list[Span]]:
    """Token ids of the chat prompt (generation prompt included), tokenized piece by piece from
    each segment's start, and the span each segment (with the chat scaffolding that follows it)
    covers. The engine backend sends exactly these ids; fine-tuning data uses them too
    (`jaxsys.serve.graphcot.sft`), so a model is trained on the prompts it is served."""
    rendered = tokenizer.apply_chat_template(messages(segments))
    cuts: list[tuple[int, Segment | None]] = [(0, None)]
    pos = 0
    for seg in segments:
        if not seg.text:
            continue
        text = seg.text
        at = rendered.find(text, pos)
        if at < 0 and text.strip():  # a chat template that trims its messages
            text = text.strip()
            at = rendered.find(text, pos)
        if at < 0:  # not findable: the segment stays inside the piece before it
            continue
        cuts.append((at, seg))
        pos = at + len(text)
    ids: list[int] = []
    spans: list[Span] = []
    for (start, seg), (end, _) in zip(cuts, cuts[1:] + [(len(rendered), None)]):
        piece = tokenizer.encode(rendered[start:end], add_special_tokens=False)
        kind = "system" if seg is None else seg.kind
        spans.append(Span(len(ids), len(ids) + len(piece), kind, None if seg is None else seg.vertex))
        ids += piece
    return ids, spans


class EngineBackend:
    """Calls on a `ServingLLM` in this process (its scheduler runs on its background thread)."""

    def __init__(self, llm, *, policy: VertexPriorityPolicy | None = None):
        if llm.tokenizer is None:
            raise ValueError("the agents speak text: the model needs a tokenizer")
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.policy = policy
        self.context = llm.scheduler.max_context
        self._ids = iter(range(1 << 62))
        self._lock = threading.Lock()
        llm.start()

    def close(self) -> None:
        self.llm.shutdown()

    def encode(self, segments: Sequence[Segment]) -> tuple[list[int], list[Span]]:
        """Token ids of the chat prompt and the span of each segment (`encode_segments`)."""
        return encode_segments(self.tokenizer, segments)

    def complete(self, segments: Sequence[Segment], *, max_tokens: int, stop: Sequence[str] = (), qid: str = "",
                 agent: str = "") -> Completion:
        ids, spans = self.encode(segments)
        return self.complete_tokens(ids, spans, max_tokens=max_tokens, stop=stop, qid=qid, agent=agent)

    def complete_tokens(self, ids: Sequence[int], spans: Sequence[Span], *, max_tokens: int,
                        stop: Sequence[str] = (), qid: str = "", agent: str = "",
                        ignore_eos: bool = False) -> Completion:
        """`complete` on a prompt that is already token ids (`spans` say what each part holds)."""
        from jaxsys.sampling import SamplingParams
        from jaxsys.serve.scheduler.request import Request
        from jaxsys.serve.scheduler.scheduler import RequestError

        ids = list(ids)
        if len(ids) + 1 >= self.context:
            raise PromptTooLong(f"the prompt has {len(ids)} tokens; the model's context is {self.context}")
        max_tokens = max(1, min(max_tokens, self.context - len(ids) - 1))
        tags = self.policy.register(ids, spans, qid) if self.policy is not None else None
        done = threading.Event()
        failure: list[str] = []

        def on_output(out) -> None:
            if out.finished:
                if out.finish_reason == "error":
                    failure.append(out.error or "the request failed")
                done.set()

        with self._lock:
            rid = f"{agent or 'call'}-{qid}-{next(self._ids)}"
        request = Request(ids, SamplingParams(max_tokens=max_tokens, stop=tuple(stop), ignore_eos=ignore_eos),
                          on_output, request_id=rid, cache_tags=tags)
        try:
            self.llm.scheduler.submit(request)
        except RequestError as e:
            raise PromptTooLong(str(e)) if "context" in str(e) else BackendError(str(e)) from None
        done.wait()
        if failure:
            raise BackendError(failure[0])
        return Completion(request.text, len(ids), request.cached_tokens or 0, len(request.out_tokens))


# ------------------------------------------------------------------------------ over HTTP

class OpenAIBackend:
    """Chat completions on an OpenAI-compatible server (greedy, `max_tokens`, `stop`)."""

    def __init__(self, base_url: str, *, model: str | None = None, api_key: str | None = None,
                 timeout: float = 600.0):
        base = base_url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.timeout = timeout
        self.headers = {"content-type": "application/json"}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"
        try:
            listing = self._request("GET", "/models", timeout=min(timeout, 10.0))
        except BackendError as e:
            raise BackendUnreachable(f"cannot reach an OpenAI-compatible server at {self.base}: {e}") from None
        ids = [m.get("id") for m in listing.get("data", []) if isinstance(m, dict)]
        if model is None and not ids:
            raise BackendUnreachable(f"{self.base}/models lists no model")
        self.model = model or ids[0]

    def close(self) -> None:
        pass

    def _request(self, method: str, path: str, body: dict | None = None, *, timeout: float | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=self.headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            try:
                err = json.loads(e.read()).get("error", {})
            except (ValueError, AttributeError):
                err = {}
            message = err.get("message") or f"HTTP {e.code}"
            if err.get("code") == "context_length_exceeded":
                raise PromptTooLong(message) from None
            raise BackendError(f"{self.base}{path}: {message}") from None
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            raise BackendError(str(getattr(e, "reason", e))) from None
        except ValueError as e:
            raise BackendError(f"{self.base}{path}: the answer is not JSON ({e})") from None

    def complete(self, segments: Sequence[Segment], *, max_tokens: int, stop: Sequence[str] = (), qid: str = "",
                 agent: str = "") -> Completion:
        body = {"model": self.model, "messages": messages(segments), "max_tokens": max_tokens, "temperature": 0}
        if stop:
            body["stop"] = list(stop)
        t0 = time.perf_counter()
        resp = self._request("POST", "/chat/completions", body)
        try:
            text = resp["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise BackendError(f"unexpected answer from {self.base} after {time.perf_counter() - t0:.1f}s: "
                               f"{str(resp)[:200]}") from None
        usage = resp.get("usage") or {}
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        return Completion(text, int(usage.get("prompt_tokens", 0)), None if cached is None else int(cached),
                          int(usage.get("completion_tokens", 0)))
