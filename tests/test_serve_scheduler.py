"""The scheduler + engine with a tiny random model (token ids in, token ids out).

Everything the scheduler does is checked against a plain causal forward without a KV cache
(`serve_helpers.greedy_reference`): chunked prefill, shared system prompts served from the radix
cache, continuous batching, arrival order, max_tokens, EOS, cancellation mid-prefill and
mid-decode (pages back, waiting requests unaffected), admission that waits for pages, zero
recompiles once warm, and seeded sampling that does not depend on the batch. After every step of
every hand-driven run, each KV page is in exactly one place (free, tree, or one request's own).

The shapes: page_size 4, prefill_chunk 8, prompts <= 24 tokens, max_tokens <= 8, so every decode
page table fits 8 pages and the bucket family is small (prefill B in {1, 2, 4} x P in {4, 8}, decode
B in {1, 2, 4, 8} x P in {4, 8}).
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxsys.sampling import SamplingParams
from jaxsys.serve.scheduler.request import State
from jaxsys.serve.scheduler.scheduler import RequestError, new_request

from serve_helpers import check_idle, drive, greedy_reference, reset, serving_llm, step, tiny_model

MAIN = dict(page_size=4, num_pages=128, max_decode_batch=8, max_prefill_batch=4, prefill_chunk=8)
PS = MAIN["page_size"]

# One system prompt, shared by several requests (10 tokens: 2 whole pages + 2 tokens).
SYS = [7, 3, 99, 12, 5, 64, 21, 8, 120, 33]


def rand_prompt(rng: np.random.Generator, n: int) -> list[int]:
    return [int(t) for t in rng.integers(0, 128, n)]


@pytest.fixture(scope="module")
def model():
    return tiny_model(0)


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "shared"])
def llm(request, model):
    llm = serving_llm(model, request.param, **MAIN)
    yield llm
    llm.shutdown()


def _checked(scheduler):
    """A module-scoped scheduler, checked idle and consistent before and after each test (and reset
    after a failure, so that one failure does not cascade into the next tests)."""
    check_idle(scheduler)
    yield scheduler
    try:
        check_idle(scheduler)
    except AssertionError:
        reset(scheduler)
        raise


@pytest.fixture
def sched(llm):
    yield from _checked(llm.scheduler)


def submit(sched, prompt, max_tokens=8, outputs=None, **kw):
    cb = None
    if outputs is not None:
        cb = outputs.append
    return sched.submit(new_request(prompt, SamplingParams(max_tokens=max_tokens, **kw), cb))


def mixed_prompts(seed: int) -> tuple[list[list[int]], list[int]]:
    """System-prompt requests of several lengths, unrelated ones, and varied max_tokens."""
    rng = np.random.default_rng(seed)
    prompts = [SYS + rand_prompt(rng, n) for n in (1, 5, 9, 14)]  # 11..24 tokens: 2..3 chunks
    prompts += [rand_prompt(rng, 3), rand_prompt(rng, 21), rand_prompt(rng, 8)]
    max_tokens = [8, 3, 8, 1, 8, 6, 2]
    return prompts, max_tokens


# ------------------------------------------------------------------------------ outputs

def test_greedy_batch_matches_reference(llm, sched, model):
    prompts, max_tokens = mixed_prompts(0)
    ref = greedy_reference(model, prompts, max_tokens)
    steps0 = sched.stats.prefill_steps
    outs = llm.generate(prompts, [SamplingParams(max_tokens=m) for m in max_tokens])
    for o, r, m in zip(outs, ref, max_tokens):
        assert o.token_ids == r
        assert len(o.token_ids) == m and o.finish_reason == "length"
        assert o.text == ""  # no tokenizer: token ids only
    # the 24-token prompt needs 3 chunks of 8: prefill really was chunked
    assert sched.stats.prefill_steps - steps0 >= 3


def test_arrival_order_and_timing_do_not_change_tokens(llm, sched, model):
    prompts, max_tokens = mixed_prompts(1)
    ref = greedy_reference(model, prompts, max_tokens)
    # all at once in reverse; then one by one with 2 steps between arrivals, shuffled
    for order, gap in (([6, 5, 4, 3, 2, 1, 0], 0), ([3, 0, 6, 1, 5, 2, 4], 2)):
        reqs = {}
        for i in order:
            reqs[i] = submit(sched, prompts[i], max_tokens[i])
            step(sched, gap)
        drive(sched)
        for i, r in reqs.items():
            assert r.out_tokens == ref[i], f"request {i} (order {order}, gap {gap})"
            assert r.finish_reason == "length"


def test_continuous_batching_admits_while_others_decode(llm, sched, model):
    rng = np.random.default_rng(2)
    first = [rand_prompt(rng, n) for n in (6, 13)]
    later = [rand_prompt(rng, n) for n in (4, 17, 9)]
    ref = greedy_reference(model, first + later, 8)
    a = [submit(sched, p) for p in first]
    while not all(r.state is State.RUNNING for r in a):
        step(sched)
    assert all(0 < len(r.out_tokens) < 8 for r in a)
    b = [submit(sched, p) for p in later]
    overlap = []

    def watch(_):
        running = set(map(id, sched.running))
        overlap.append(any(id(r) in running for r in a) and any(id(r) in running for r in b))

    drive(sched, on_step=watch)
    assert any(overlap), "new requests never decoded alongside the running ones"
    assert [r.out_tokens for r in a + b] == ref


def test_max_tokens_one_finishes_at_prefill(llm, sched, model):
    rng = np.random.default_rng(3)
    p = rand_prompt(rng, 5)
    events = []
    r = submit(sched, p, max_tokens=1, outputs=events)
    drive(sched)
    assert r.out_tokens == greedy_reference(model, [p], 1)[0]
    assert r.finish_reason == "length"
    assert [e.token_ids for e in events if e.token_ids] == [r.out_tokens]
    assert events[-1].finished and events[-1].finish_reason == "length"
    assert events[-1].prompt_tokens == 5 and events[-1].completion_tokens == 1


def test_streamed_events_carry_each_token_once(llm, sched, model):
    rng = np.random.default_rng(4)
    p = rand_prompt(rng, 9)
    events = []
    r = submit(sched, p, max_tokens=6, outputs=events)
    drive(sched)
    assert [t for e in events for t in e.token_ids] == r.out_tokens == greedy_reference(model, [p], 6)[0]
    assert sum(e.finished for e in events) == 1 and events[-1].finished


# ------------------------------------------------------------------------------ the prefix cache

def test_shared_system_prompt_is_computed_once_and_shared(llm, sched, model):
    rng = np.random.default_rng(5)
    system = rand_prompt(rng, 13)  # 3 whole pages + 1 token
    prompts = [system + rand_prompt(rng, n) for n in (2, 6, 9, 4)]
    ref = greedy_reference(model, prompts, 5)
    lookups, hits = sched.radix.lookup_tokens, sched.radix.hit_tokens
    reqs = [submit(sched, p, 5) for p in prompts]
    step(sched)
    # the first request computes the system prompt; the rest wait for it instead of recomputing it
    assert reqs[0].state is State.PREFILL and all(r.state is State.WAITING for r in reqs[1:])
    drive(sched)
    assert [r.out_tokens for r in reqs] == ref
    shared = {tuple(r.pages[:3]) for r in reqs}
    assert len(shared) == 1, "the system prompt's pages are not shared"
    new_lookups, new_hits = sched.radix.lookup_tokens - lookups, sched.radix.hit_tokens - hits
    assert new_hits == 3 * 12  # three later requests, each served 3 whole pages
    assert new_lookups == sum(map(len, prompts))
    assert sched.radix.hit_rate > 0
    # the second time, every request hits (its whole prompt pages but the last token's)
    again = [submit(sched, p, 5) for p in prompts]
    drive(sched)
    assert [r.out_tokens for r in again] == ref
    assert sched.radix.hit_tokens - hits - new_hits == sum(((len(p) - 1) // PS) * PS for p in prompts)


def test_prompt_of_whole_pages_reuses_all_but_last_page(llm, sched, model):
    rng = np.random.default_rng(6)
    p = rand_prompt(rng, 16)  # 4 whole pages: the last token must be recomputed for its logits
    ref = greedy_reference(model, [p], 4)[0]
    r1 = submit(sched, p, 4)
    drive(sched)
    hits = sched.radix.hit_tokens
    r2 = submit(sched, p, 4)
    drive(sched)
    assert sched.radix.hit_tokens - hits == 12
    assert r2.pages[:3] == r1.pages[:3] and r2.pages[3] != r1.pages[3]
    assert r1.out_tokens == r2.out_tokens == ref


# ------------------------------------------------------------------------------ cancellation

def _totals(sched):
    return sched.pages.num_free, sched.radix.num_cached_pages


def test_cancel_mid_prefill_frees_every_page(llm, sched):
    rng = np.random.default_rng(7)
    p = rand_prompt(rng, 24)  # 3 chunks
    before = _totals(sched)
    events = []
    r = submit(sched, p, 8, outputs=events)
    step(sched)
    assert r.state is State.PREFILL and 0 < r.num_computed < len(p)
    assert sched.pages.num_free < before[0]
    sched.cancel(r.request_id)
    step(sched)
    assert r.state is State.FINISHED and r.finish_reason == "cancelled"
    assert events and events[-1].finished and events[-1].finish_reason == "cancelled"
    assert _totals(sched) == before  # its pending prompt pages left the tree: nothing cached
    assert sched.radix.match(p, count=False)[1] == []


def test_cancel_mid_decode_frees_private_pages(llm, sched, model):
    rng = np.random.default_rng(8)
    p = rand_prompt(rng, 10)
    before = _totals(sched)
    r = submit(sched, p, 8)
    while len(r.out_tokens) < 3:
        step(sched)
    assert r.state is State.RUNNING
    sched.cancel(r.request_id)
    drive(sched)
    assert r.finish_reason == "cancelled" and r.out_tokens == greedy_reference(model, [p], 8)[0][:3]
    free, cached = _totals(sched)
    assert cached - before[1] == 2  # the prompt's two whole pages stay cached (ready, unreferenced)
    assert free + cached == sum(before)


def test_cancel_waiting_and_unknown_requests(llm, sched):
    rng = np.random.default_rng(9)
    before = _totals(sched)
    r = submit(sched, rand_prompt(rng, 5), 4)
    sched.cancel(r.request_id)
    sched.cancel("no-such-request")
    drive(sched)
    assert r.finish_reason == "cancelled" and r.out_tokens == []
    assert _totals(sched) == before


def test_request_blocked_on_cancelled_pending_prefix_completes(llm, sched, model):
    rng = np.random.default_rng(10)
    system = rand_prompt(rng, 16)
    a = system + rand_prompt(rng, 8)  # 24 tokens: 3 prefill chunks
    b = system + rand_prompt(rng, 3)
    ref_b = greedy_reference(model, [b], 8)[0]
    before = _totals(sched)
    ra, rb = submit(sched, a, 8), submit(sched, b, 8)
    step(sched)
    assert ra.state is State.PREFILL and rb.state is State.WAITING  # b waits for a's system prompt
    sched.cancel(ra.request_id)
    drive(sched)
    assert ra.finish_reason == "cancelled"
    assert rb.out_tokens == ref_b and rb.finish_reason == "length"
    free, cached = _totals(sched)
    assert free + cached == sum(before)
    assert cached - before[1] == len(b) // PS  # only b's prompt pages are cached now


def test_request_blocked_on_pending_prefix_completes_after_cancel_in_decode(llm, sched, model):
    rng = np.random.default_rng(11)
    system = rand_prompt(rng, 12)
    a, b = system + rand_prompt(rng, 2), system + rand_prompt(rng, 5)
    ref = greedy_reference(model, [a, b], 8)
    ra, rb = submit(sched, a, 8), submit(sched, b, 8)
    while ra.state is not State.RUNNING:
        step(sched)
    sched.cancel(ra.request_id)
    drive(sched)
    assert ra.out_tokens == ref[0][:len(ra.out_tokens)] and ra.finish_reason == "cancelled"
    assert rb.out_tokens == ref[1]
    assert rb.pages[:3] == ra.pages[:3]  # b still shared the prefix a computed


# ------------------------------------------------------------------------------ validation

def test_submit_rejects_unservable_requests(llm, sched):
    ctx = llm.engine.cfg.max_position_embeddings
    with pytest.raises(RequestError, match="empty"):
        submit(sched, [], 4)
    with pytest.raises(RequestError, match="context"):
        submit(sched, [1] * ctx, 4)
    with pytest.raises(RequestError, match="out of range"):
        submit(sched, [1, 128], 4)
    assert sched.queue_length == 0


# ------------------------------------------------------------------------------ recompiles

def _run_workload(llm, model, seed: int, *, check: bool = True):
    rng = np.random.default_rng(seed)
    sched = llm.scheduler
    prompts, max_tokens = [], []
    for _ in range(int(rng.integers(5, 12))):
        n = int(rng.integers(1, 25))
        prompts.append(SYS[:int(rng.integers(0, len(SYS) + 1))] + rand_prompt(rng, n) if rng.random() < 0.5
                       else rand_prompt(rng, n))
        prompts[-1] = prompts[-1][:24]
        max_tokens.append(int(rng.integers(1, 9)))
    reqs, order = [], rng.permutation(len(prompts))
    for k, i in enumerate(order):
        reqs.append((i, submit(sched, prompts[i], max_tokens[i])))
        if rng.random() < 0.4:
            for _ in range(int(rng.integers(1, 4))):
                step(sched)
    drive(sched)
    if check:
        ref = greedy_reference(model, prompts, max_tokens)
        for i, r in reqs:
            assert r.out_tokens == ref[i]


def test_zero_recompiles_after_warmup(llm, sched, model):
    rng = np.random.default_rng(12)
    # warm-up: every bucket of the family (batch sizes 1..8; short and long prompts)
    for n in (1, 2, 3, 5, 8):
        for lo, hi, m in ((3, 8, 4), (20, 24, 8)):
            for _ in range(n):
                submit(sched, rand_prompt(rng, int(rng.integers(lo, hi + 1))), m)
            drive(sched)
    _run_workload(llm, model, 100, check=False)
    compiled = llm.engine.compile_count
    assert compiled == llm.engine.num_executables
    if not llm.engine.config.shared_attention:
        assert compiled <= 3 * 2 + 4 * 2  # the whole family; nothing compiles per request
    for seed in (101, 102, 103):
        _run_workload(llm, model, seed)
    assert llm.engine.compile_count == compiled, "steady-state serving recompiled"


# ------------------------------------------------------------------------------ seeded sampling

def test_seeded_sampling_is_independent_of_the_batch(llm, sched, model):
    rng = np.random.default_rng(13)
    p, q = rand_prompt(rng, 11), rand_prompt(rng, 6)
    hot = dict(temperature=1.5, seed=1234)
    alone = submit(sched, p, 8, **hot)
    drive(sched)
    again = submit(sched, p, 8, **hot)
    drive(sched)
    assert alone.out_tokens == again.out_tokens and len(alone.out_tokens) == 8
    assert alone.out_tokens != greedy_reference(model, [p], 8)[0], "temperature 1.5 sampled greedily"
    other_seed = submit(sched, p, 8, temperature=1.5, seed=4321)
    drive(sched)
    assert other_seed.out_tokens != alone.out_tokens
    # in a batch with greedy and other sampled rows, arriving after them, top-k/top-p rows beside it
    batch = [submit(sched, q, 8), submit(sched, q, 8, temperature=0.7, seed=7, top_k=5),
             submit(sched, p, 8, temperature=1.0, seed=99, top_p=0.8)]
    step(sched, 2)
    mixed = submit(sched, p, 8, **hot)
    drive(sched)
    assert mixed.out_tokens == alone.out_tokens
    assert batch[0].out_tokens == greedy_reference(model, [q], 8)[0]


# ------------------------------------------------------------------------------ small cache: EOS, admission

SMALL = dict(page_size=4, num_pages=10, max_decode_batch=4, max_prefill_batch=2, prefill_chunk=8)


@pytest.fixture(scope="module")
def eos_setup(model):
    """An EOS token the model emits: the 4th greedy token of EOS_PROMPT (not among the first 3)."""
    rng = np.random.default_rng(20)
    prompt = rand_prompt(rng, 8)
    toks = greedy_reference(model, [prompt], 8)[0]
    k = next(i for i in range(2, 8) if toks[i] not in toks[:i])
    return prompt, toks[k], k


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "shared"])
def small_llm(request, eos_setup):
    _, eos, _ = eos_setup
    llm = serving_llm(tiny_model(0, eos_token_ids=(eos,)), request.param, **SMALL)
    yield llm
    llm.shutdown()


@pytest.fixture
def small_sched(small_llm):
    yield from _checked(small_llm.scheduler)


def test_eos_stops_generation(small_llm, small_sched, eos_setup):
    prompt, eos, k = eos_setup
    sched = small_sched
    events = []
    r = submit(sched, prompt, 8, outputs=events)
    drive(sched)
    model = small_llm.model
    assert r.out_tokens == greedy_reference(model, [prompt], 8)[0][:k]
    assert len(r.out_tokens) == k and eos not in r.out_tokens
    assert r.finish_reason == "stop"
    assert events[-1].finished and events[-1].finish_reason == "stop" and events[-1].token_ids == []


def test_ignore_eos_generates_to_max_tokens(small_llm, small_sched, eos_setup):
    prompt, eos, k = eos_setup
    r = submit(small_sched, prompt, 8, ignore_eos=True)
    drive(small_sched)
    assert r.out_tokens == greedy_reference(small_llm.model, [prompt], 8)[0]
    assert r.out_tokens[k] == eos and r.finish_reason == "length"


def test_admission_waits_for_pages_then_completes(small_llm, small_sched, eos_setup):
    _, eos, _ = eos_setup
    sched = small_sched
    sched.radix.evict(sched.pages.capacity)  # start from an empty cache: 9 free pages
    assert sched.pages.num_free == 9
    rng = np.random.default_rng(21)
    prompts = [rand_prompt(rng, 8) for _ in range(3)]  # each reserves 16 tokens = 4 pages
    ref = greedy_reference(small_llm.model, prompts, 8, eos=(eos,))
    reqs = [submit(sched, p, 8) for p in prompts]
    waited = []

    def watch(_):
        waited.append(sched.queue_length > 0 and sched.num_running == 2)
        assert sched.num_running <= 2  # 2 x 4 pages fit, 3 do not

    step(sched)
    assert reqs[2].state is State.WAITING and sched.pages.num_free < 4
    drive(sched, on_step=watch)
    assert any(waited)
    assert [r.out_tokens for r in reqs] == ref


def test_admission_evicts_cached_pages_when_short(small_llm, small_sched, eos_setup):
    _, eos, _ = eos_setup
    sched = small_sched
    sched.radix.evict(sched.pages.capacity)
    rng = np.random.default_rng(22)
    a = rand_prompt(rng, 8)
    ref_a = greedy_reference(small_llm.model, [a], 8, eos=(eos,))[0]
    ra = submit(sched, a, 8)
    drive(sched)
    assert ra.out_tokens == ref_a
    assert sched.radix.num_cached_pages == 2  # a's two prompt pages are cached
    # two fresh requests need 8 of the 9 pages: a's cached pages must be evicted to admit both
    others = [rand_prompt(rng, 8) for _ in range(2)]
    ref = greedy_reference(small_llm.model, others, 8, eos=(eos,))
    rs = [submit(sched, p, 8) for p in others]
    step(sched)
    assert all(r.state is not State.WAITING for r in rs)
    drive(sched)
    assert [r.out_tokens for r in rs] == ref
    assert sched.radix.match(a, count=False)[1] == []  # evicted


def test_submit_rejects_requests_larger_than_the_cache(small_llm, small_sched):
    sched = small_sched
    with pytest.raises(RequestError, match="KV pages"):
        submit(sched, [1] * 10, 40)  # 50 tokens = 13 pages; the cache holds 9
    r = submit(sched, [1] * 10, 26)  # 36 tokens = 9 pages: fits
    sched.cancel(r.request_id)
    drive(sched)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_arrivals_and_cancellations_under_page_pressure(small_llm, small_sched, eos_setup, seed):
    """Random submissions (a few shared first pages) and cancellations at random steps on a 9-page
    cache: after every step each page is in exactly one place; every request that was not
    cancelled produces the reference tokens, and a cancelled one a prefix of them."""
    _, eos, _ = eos_setup
    sched = small_sched
    rng = np.random.default_rng(100 + seed)
    heads = [rand_prompt(rng, 4) for _ in range(2)] + [rand_prompt(rng, 8)]
    reqs = []
    for _ in range(40):
        op = rng.random()
        if op < 0.45:
            head = heads[int(rng.integers(0, len(heads)))] if rng.random() < 0.7 else []
            prompt = (head + rand_prompt(rng, int(rng.integers(1, 5))))[:9]
            reqs.append((prompt, submit(sched, prompt, int(rng.integers(1, 7)))))
        elif op < 0.6 and reqs:
            sched.cancel(reqs[int(rng.integers(0, len(reqs)))][1].request_id)
        else:
            step(sched)
    drive(sched)
    ref = greedy_reference(small_llm.model, [p for p, _ in reqs], [r.sampling.max_tokens for _, r in reqs],
                           eos=(eos,))
    n_cancelled = 0
    for (p, r), want in zip(reqs, ref):
        assert r.state is State.FINISHED
        if r.finish_reason == "cancelled":
            n_cancelled += 1
            assert r.out_tokens == want[:len(r.out_tokens)]
        else:
            assert r.out_tokens == want, (p, r.finish_reason)
    assert 0 < n_cancelled < len(reqs)


@pytest.mark.parametrize("shared_attention", [False, True], ids=["plain", "shared"])
def test_generation_stops_at_the_context_window(model, shared_attention):
    """A 16-token context: a 13-token prompt gets 3 tokens whatever max_tokens says (finish
    "length"), and a prompt that fills the context is refused."""
    llm = serving_llm(tiny_model(0, max_position_embeddings=16), shared_attention,
                      page_size=4, num_pages=8, max_decode_batch=2, max_prefill_batch=2, prefill_chunk=8)
    sched = llm.scheduler
    rng = np.random.default_rng(30)
    p = rand_prompt(rng, 13)
    with pytest.raises(RequestError, match="context"):
        submit(sched, rand_prompt(rng, 16), 1)
    r = submit(sched, p, 8)  # reserves min(13 + 8, 16) tokens = 4 pages
    drive(sched)
    assert r.out_tokens == greedy_reference(model, [p], 3)[0]
    assert r.finish_reason == "length"
    check_idle(sched)
