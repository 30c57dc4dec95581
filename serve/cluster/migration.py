"""Moving requests between live engine instances: KV-page migration, and recompute after a failure.

Live migration (Llumnix-style, issue 18 D). A running request's KV lives in its pages of the
source instance's cache (`[Hkv, L, N, page_size, Dh]`, heads split over the instance's sub-mesh).
`migrate` gathers those pages on the source devices (one jitted gather, the page count padded to
a power of two with the scratch page so a handful of programs cover every request), moves them
with `jax.device_put` onto the destination's sharding (a real device-to-device transfer), and
scatters them into freshly allocated pages of the destination cache (jitted, the cache donated,
the output pinned to the cache's sharding so the engine's compiled steps take it as it is). The
request's page table is rebuilt from the new pages; its decoding state (tokens, detokenizer,
stop matcher, timings) is the same Python object, which leaves the source's running list and
joins the destination's. Both schedulers must be idle for the move (the caller holds both
instances' locks), so no step ever sees a half-moved request. The destination reserves pages
for the request's whole budget, as admission does, so a migrated request never needs preemption.

Recompute (issue 18 G). When an instance stops, each of its unfinished requests is re-dispatched
as a *continuation*: prompt = its prompt + the tokens generated so far, budget = what is left, the
same sampling seed (the random stream is keyed by position, so a sampled request continues as it
would have), the same detokenizer and stop matcher (so text is continuous), and its events are
forwarded to the original request with the original's counts. Nothing generated is lost; the
KV of the prefix is recomputed by the new instance's prefill.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import numpy as np

from jaxsys.serve.scheduler.request import Request, RequestOutput, State
from jaxsys.shapes import pow2_bucket

__all__ = ["MigrationRecord", "budget_pages", "can_host", "continuation", "enqueue", "migrate", "precompile"]


@dataclasses.dataclass(frozen=True)
class MigrationRecord:
    request_id: str
    src: int
    dst: int
    pages: int  # pages moved (holding `tokens` tokens of KV)
    tokens: int
    bytes: int
    seconds: float  # host wall time of the move (gather, transfer, scatter, bookkeeping)


@functools.lru_cache(maxsize=None)
def _gather():
    import jax

    def gather(k, v, idx_N):
        return k[:, :, idx_N], v[:, :, idx_N]

    return jax.jit(gather)


def _scatter_for(instance):
    """The destination's jitted scatter (its cache donated, its sharding kept), built once."""
    fn = instance._kv_scatter
    if fn is None:
        import jax

        from jaxsys.models.kv_cache import KVCache

        s = instance.engine.cache.k.sharding

        def scatter(cache, idx_N, k_pages, v_pages):
            return KVCache(cache.k.at[:, :, idx_N].set(k_pages), cache.v.at[:, :, idx_N].set(v_pages))

        fn = jax.jit(scatter, donate_argnums=0, out_shardings=KVCache(s, s))
        instance._kv_scatter = fn
    return fn


def _copy_pages(src, dst, idx_src: np.ndarray, idx_dst: np.ndarray) -> int:
    """Copy KV pages `idx_src` of `src`'s cache into pages `idx_dst` of `dst`'s (gather on the source
    devices, transfer, scatter on the destination). Returns the bytes moved."""
    import jax

    src_cache = src.engine.cache
    k_src, v_src = _gather()(src_cache.k, src_cache.v, idx_src)
    target = dst.engine.cache.k.sharding
    k_dst, v_dst = jax.device_put(k_src, target), jax.device_put(v_src, target)
    dst.engine.cache = _scatter_for(dst)(dst.engine.cache, idx_dst, k_dst, v_dst)
    dst.engine.cache.k.block_until_ready()  # the move's time is the transfer's, not its dispatch's
    return k_src.nbytes + v_src.nbytes


def precompile(src, dst, max_pages: int) -> None:
    """Compile the programs of a migration from `src` to `dst` for every page-count bucket up to
    `max_pages`, by moving the scratch page (page 0, which holds no request's KV) onto itself.
    Neither instance may be stepping (the caller holds both locks, or neither runs yet)."""
    for n in sorted({pow2_bucket(k) for k in range(1, max_pages + 1)}):
        idx = np.zeros(n, np.int32)
        _copy_pages(src, dst, idx, idx)


def budget_pages(request: Request, page_size: int, max_context: int) -> int:
    """Pages a request holds for its whole budget (what admission reserves)."""
    return math.ceil(min(request.prompt_len + request.sampling.max_tokens, max_context) / page_size)


def can_host(instance, request: Request) -> bool:
    """Whether `instance` has a batch slot and (after evicting cached prefixes) the pages for `request`."""
    sched = instance.scheduler
    if sched.num_running >= instance.engine.config.max_decode_batch:
        return False
    need = budget_pages(request, sched.page_size, sched.max_context)
    return need <= sched.pages.num_free + sched.radix.evictable_pages()


def migrate(request: Request, src, dst) -> MigrationRecord | None:
    """Move a running request from instance `src` to `dst` with its KV (see the module docstring).
    Returns None (and changes nothing) when it is not running on `src` or `dst` cannot host it.
    The caller holds both instances' locks."""
    s_sched, d_sched = src.scheduler, dst.scheduler
    if request.state is not State.RUNNING or request not in s_sched.running or not can_host(dst, request):
        return None
    t0 = time.perf_counter()
    ps = s_sched.page_size
    if d_sched.page_size != ps:
        raise ValueError("instances with different page sizes cannot exchange KV pages")
    tokens = request.num_computed  # the last sampled token's KV is computed by the next step
    n_pages = math.ceil(tokens / ps)
    need = budget_pages(request, ps, d_sched.max_context)
    if need > d_sched.pages.num_free:
        d_sched.radix.evict(need - d_sched.pages.num_free)
    new_pages = d_sched.pages.alloc(need)

    idx_src = np.zeros(pow2_bucket(n_pages), np.int32)  # padding reads/writes the scratch page 0
    idx_src[:n_pages] = request.pages[:n_pages]
    idx_dst = np.zeros_like(idx_src)
    idx_dst[:n_pages] = new_pages[:n_pages]
    moved_bytes = _copy_pages(src, dst, idx_src, idx_dst)

    s_sched.running.remove(request)
    s_sched._by_id.pop(request.request_id, None)
    if request.node is not None:
        s_sched.radix.release(request.node)
    if request.own_pages:
        s_sched.pages.free(request.own_pages)
    request.node = None
    request.pending_node = None
    request.pages = new_pages
    request.own_pages = list(new_pages)
    d_sched.running.append(request)
    d_sched._by_id[request.request_id] = request
    if src.tracker is not None and dst.tracker is not None:
        dst.tracker.adopt(request.request_id, src.tracker.forget(request.request_id))
    return MigrationRecord(request.request_id, src.index, dst.index, n_pages, tokens, moved_bytes,
                           time.perf_counter() - t0)


def enqueue(instance, request: Request) -> None:
    """Queue a continuation on `instance` as it is (its detokenizer and stop matcher kept, which
    `Scheduler.submit` would replace). The caller holds the instance's lock."""
    sched = instance.scheduler
    sched.validate(request.prompt_ids, request.sampling)
    sched.waiting.append(request)
    sched._by_id[request.request_id] = request


def continuation(original: Request) -> Request:
    """A request that finishes `original` elsewhere (recomputing its KV): see the module docstring.
    Its events reach `original.on_output` as if `original` had produced them, and `original`'s
    tokens, text, timings and finish reason are kept up to date."""
    done = len(original.out_tokens)
    sampling = dataclasses.replace(original.sampling, max_tokens=original.sampling.max_tokens - done)
    cont = Request(original.prompt_ids + original.out_tokens, sampling, request_id=original.request_id,
                   arrival=original.arrival)
    cont.decoder, cont.stops, cont.text = original.decoder, original.stops, original.text
    cont.first_token_time = original.first_token_time
    cont.last_token_time = original.last_token_time

    def forward(out: RequestOutput) -> None:
        original.out_tokens.extend(out.token_ids)
        original.text = cont.text
        if original.first_token_time is None:
            original.first_token_time = cont.first_token_time
        if out.finished:
            original.token_intervals.extend(cont.token_intervals)
            original.last_token_time = cont.last_token_time
            original.finish_reason = out.finish_reason
            original.state = State.FINISHED
        if original.on_output is not None:
            original.on_output(dataclasses.replace(out, prompt_tokens=original.prompt_len,
                                                   completion_tokens=len(original.out_tokens)))

    cont.on_output = forward
    return cont
