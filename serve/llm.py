"""`ServingLLM`: a model + the engine + the scheduler, as one object.

    from jaxsys.serve import ServingLLM
    llm = ServingLLM("smollm2-135m-instruct")
    outs = llm.generate(["Hello"] * 8, SamplingParams(max_tokens=32))

`generate` drives the scheduler on the calling thread and returns `jaxsys.GenerationResult`s, the
type `jaxsys.generate` (the reference loop) returns; `start()` runs the scheduler on a background
thread for the HTTP server, which then uses `submit`/`cancel` and gets `RequestOutput` events.

Speculative decoding: `ServingLLM(model, speculate="ngram", gamma=4)` (prompt lookup),
`speculate="self"` (early exit: the model's first layers draft for it) or `speculate="model"` with
`draft_model=` (any model with the same vocabulary); a `SpeculativeConfig` sets the rest (compiled
gamma set, draft depth, n-gram sizes). Greedy outputs are the same tokens as without speculation,
sampled ones follow the same distribution (exact acceptance). `llm.set_gamma(n)` switches gamma
within the compiled set; `llm.scheduler.stats` counts proposals and acceptances.
`gamma="auto"` (or an `AutoTune` naming the hardware and routing statistics) lets the roofline
tuner pick, per number of running requests, the gamma of the compiled set (or none) predicted
fastest, from the acceptance measured while serving, and size the expert cache and prefetch
(`jaxsys.serve.moe_offload.autotune`; `llm.autotune` holds its choice).

Expert offloading (an MoE model): `ServingLLM(model, offload_experts=True, expert_cache=N)` keeps
the routed experts in host memory behind N device slots per layer
(`jaxsys.serve.moe_offload.serving.OffloadEngine`); it speculates with the n-gram draft.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax

from jaxsys.generation import GenerationResult, encode_prompt
from jaxsys.models import LoadedModel, load_model
from jaxsys.sampling import SamplingParams
from jaxsys.serve.engine.engine import Engine, EngineConfig
from jaxsys.serve.engine.shared_decode import make_shared_decode
from jaxsys.serve.engine.verify import Verifier
from jaxsys.serve.moe_offload.autotune import AutoTune
from jaxsys.serve.scheduler.radix import EvictionPolicy
from jaxsys.serve.scheduler.request import Request, RequestOutput
from jaxsys.serve.scheduler.scheduler import Scheduler, new_request
from jaxsys.serve.speculative.config import SpeculativeConfig
from jaxsys.serve.speculative.drafts import DraftError


class ServingLLM:
    def __init__(self, model: str | LoadedModel = "smollm2-135m-instruct", *,
                 config: EngineConfig = EngineConfig(), mesh: jax.sharding.Mesh | None = None,
                 eviction_policy: EvictionPolicy | None = None, dtype: str = "float32",
                 speculate: str | SpeculativeConfig | None = None, gamma: int | str | AutoTune | None = None,
                 draft_model: str | LoadedModel | None = None, offload_experts: bool = False,
                 expert_cache: int | None = None):
        speculation, auto = _speculation(speculate, gamma, draft_model)
        if expert_cache is not None and not offload_experts:
            raise ValueError("expert_cache needs offload_experts=True")
        if offload_experts and mesh is not None:
            raise ValueError("expert offloading runs on one device; leave mesh out")
        self.model = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype)
        self.name = self.model.name
        attention, builder = None, None  # the engine's default: plain split-KV paged decode
        self.autotune = None
        if auto is not None:
            from jaxsys.serve.moe_offload.autotune import choose_engine

            cfg = self.model.config
            self.autotune = choose_engine(auto, cfg, draft=speculation.draft,
                                          draft_layers=speculation.draft_layers or max(1, cfg.num_layers // 2),
                                          gammas=speculation.gammas, max_batch=config.max_decode_batch,
                                          offload=offload_experts, expert_cache=expert_cache)
        if offload_experts:
            from jaxsys.serve.moe_offload.serving import OffloadEngine

            if self.autotune is not None:
                expert_cache = self.autotune.expert_cache
            self.engine = OffloadEngine(self.model.config, self.model.params, config, expert_cache=expert_cache,
                                        prefetch=True if self.autotune is None else self.autotune.prefetch)
        else:
            if config.shared_attention:
                attention, builder = make_shared_decode(self.model.config, config)
            self.engine = Engine(self.model.config, self.model.params, config, mesh=mesh, decode_attention=attention)
        self.verifier = None
        if speculation is not None:
            draft = None
            if draft_model is not None:
                loaded = draft_model if isinstance(draft_model, LoadedModel) else load_model(draft_model, dtype=dtype)
                draft = (loaded.config, loaded.params)
            self.verifier = Verifier(self.engine, speculation, draft,
                                     schedule=None if self.autotune is None else self.autotune.schedule)
        self.scheduler = Scheduler(self.engine, self.model.tokenizer, eviction_policy=eviction_policy,
                                   shared_step_builder=builder, verifier=self.verifier)
        self.tokenizer = self.model.tokenizer

    def set_gamma(self, gamma: int) -> None:
        """Draft length of the next verify steps, from the compiled set (call between steps)."""
        if self.verifier is None:
            raise DraftError("this ServingLLM does not speculate (pass speculate=...)")
        self.verifier.set_gamma(gamma)

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


def _speculation(speculate: str | SpeculativeConfig | None, gamma: int | str | AutoTune | None,
                 draft_model: str | LoadedModel | None) -> tuple[SpeculativeConfig | None, AutoTune | None]:
    """The speculative configuration and the automatic tuning from ServingLLM's arguments (checked
    before any model loads)."""
    if speculate is None:
        if gamma is not None or draft_model is not None:
            raise DraftError("gamma and draft_model need speculate='ngram', 'self' or 'model'")
        return None, None
    auto = None
    if isinstance(gamma, str):
        if gamma != "auto":
            raise DraftError(f"gamma is a number of draft tokens or 'auto', got {gamma!r}")
        auto, gamma = AutoTune(), None
    elif isinstance(gamma, AutoTune):
        auto, gamma = gamma, None
    if isinstance(speculate, SpeculativeConfig):
        if gamma is not None:
            raise DraftError("give gamma in the SpeculativeConfig, not beside it")
        spec = speculate
    else:
        spec = SpeculativeConfig(draft=speculate)
        if gamma is not None:  # the default compiled set, and this gamma
            spec = SpeculativeConfig(draft=speculate, gamma=gamma, gammas=(*spec.gammas, gamma))
    if (draft_model is not None) != (spec.draft == "model"):
        raise DraftError("speculate='model' needs draft_model=..., and only it takes one")
    if auto is not None and spec.draft == "model":
        raise DraftError("gamma='auto' prices the 'ngram' and 'self' drafts (the roofline does not model a separate "
                         "draft model's cost); give gamma as a number")
    return spec, auto
