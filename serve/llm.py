"""`ServingLLM`: a model + the engine + the scheduler, as one object.

    from jaxsys.serve import ServingLLM
    llm = ServingLLM("smollm2-135m-instruct")
    outs = llm.generate(["Hello"] * 8, SamplingParams(max_tokens=32))

`generate` drives the scheduler on the calling thread and returns `jaxsys.GenerationResult`s, the
type `jaxsys.generate` (the reference loop) returns; `start()` runs the scheduler on a background
thread for the HTTP server, which then uses `submit`/`cancel` and gets `RequestOutput` events.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax

from jaxsys.generation import GenerationResult, encode_prompt
from jaxsys.models import LoadedModel, load_model
from jaxsys.sampling import SamplingParams
from jaxsys.serve.engine.engine import Engine, EngineConfig
from jaxsys.serve.engine.shared_decode import make_shared_decode
from jaxsys.serve.scheduler.radix import EvictionPolicy
from jaxsys.serve.scheduler.request import Request, RequestOutput
from jaxsys.serve.scheduler.scheduler import Scheduler, new_request


class ServingLLM:
    def __init__(self, model: str | LoadedModel = "smollm2-135m-instruct", *,
                 config: EngineConfig = EngineConfig(), mesh: jax.sharding.Mesh | None = None,
                 eviction_policy: EvictionPolicy | None = None, dtype: str = "float32"):
        self.model = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype)
        self.name = self.model.name
        attention, builder = None, None  # the engine's default: plain split-KV paged decode
        if config.shared_attention:
            attention, builder = make_shared_decode(self.model.config, config)
        self.engine = Engine(self.model.config, self.model.params, config, mesh=mesh, decode_attention=attention)
        self.scheduler = Scheduler(self.engine, self.model.tokenizer, eviction_policy=eviction_policy,
                                   shared_step_builder=builder)
        self.tokenizer = self.model.tokenizer

    # ------------------------------------------------------------------ async use (server)
    def start(self) -> None:
        self.scheduler.start()

    def shutdown(self) -> None:
        self.scheduler.shutdown()

    def submit(self, prompt_ids: Sequence[int], sampling: SamplingParams,
               on_output: Callable[[RequestOutput], None], request_id: str | None = None) -> Request:
        return self.scheduler.submit(new_request(prompt_ids, sampling, on_output, request_id))

    def cancel(self, request_id: str) -> None:
        self.scheduler.cancel(request_id)

    # ------------------------------------------------------------------ sync use
    def encode(self, prompt: str | Sequence[int], *, chat: bool = False) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, chat=chat)

    def generate(self, prompts: Sequence[str | Sequence[int]], sampling: SamplingParams | Sequence[SamplingParams]
                 = SamplingParams(), *, chat: bool = False,
                 on_output: Callable[[int, RequestOutput], None] | None = None) -> list[GenerationResult]:
        """Run a batch to completion on this thread (continuous batching inside).

        prompts: text (tokenized here; `chat` wraps it as a user message in the chat template) or
        token ids. on_output(i, event): called with each event of prompt i as it streams.
        """
        if isinstance(sampling, SamplingParams):
            sampling = [sampling] * len(prompts)
        reqs = []
        for i, (p, sp) in enumerate(zip(prompts, sampling)):
            cb = (lambda out, i=i: on_output(i, out)) if on_output else None
            reqs.append(self.scheduler.submit(new_request(self.encode(p, chat=chat), sp, cb)))
        self.scheduler.run_until_idle()
        return [GenerationResult(request_id=r.request_id, prompt=p if isinstance(p, str) else None,
                                 prompt_ids=r.prompt_ids, token_ids=r.out_tokens, text=r.text,
                                 finish_reason=r.finish_reason or "",
                                 ttft_s=(r.first_token_time or r.arrival) - r.arrival,
                                 tpot_s=list(r.token_intervals))
                for p, r in zip(prompts, reqs)]
