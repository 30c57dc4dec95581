"""Requests and the events the scheduler streams back for them."""

from __future__ import annotations

import dataclasses
import enum
import itertools
import time
from typing import Callable, Sequence

from jaxsys.models.tokenizer import StreamDecoder
from jaxsys.sampling import SamplingParams, StopMatcher

_ids = itertools.count()


class State(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass
class RequestOutput:
    """One streamed event of a request: the text and token ids new since the last event, and
    whether it finished (then with a reason). `prompt_tokens` / `completion_tokens` / `cached_tokens`
    are counts, as in the OpenAI API's usage (`prompt_tokens_details.cached_tokens`). The finished
    request as a whole is a `jaxsys.GenerationResult`."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    cached_tokens: int | None = None  # prompt tokens the radix cache served (None before admission)


@dataclasses.dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    sampling: SamplingParams
    on_output: Callable[[RequestOutput], None] | None = None
    request_id: str = dataclasses.field(default_factory=lambda: f"req-{next(_ids)}")
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    cache_tags: Sequence[frozenset] | None = None  # per whole prompt page: what it holds (radix page_tags)
    # --- scheduler state (owned by the scheduler thread)
    state: State = State.WAITING
    node: object = None  # deepest radix node this request holds a reference on
    pending_node: object = None  # radix node this request inserted and is still computing
    pages: list[int] = dataclasses.field(default_factory=list)  # full page table
    own_pages: list[int] = dataclasses.field(default_factory=list)  # pages freed when it ends
    num_computed: int = 0  # tokens whose KV is in the cache
    cached_tokens: int | None = None  # prompt tokens the radix cache held when first admitted
    out_tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    token_intervals: list[float] = dataclasses.field(default_factory=list)
    cancelled: bool = False
    decoder: StreamDecoder | None = None
    stops: StopMatcher | None = None
    text: str = ""

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.out_tokens)
