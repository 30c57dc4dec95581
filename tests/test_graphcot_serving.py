"""GLM and Graph-CoT on the real serving engine (a tiny random model over SmolLM2's vocabulary and
tokenizer: its text is noise, so the agents' outputs are malformed and every parser path runs) and
over our own OpenAI-compatible server on loopback; the priority eviction policy on a real radix
tree; the phase gate of the pipelining ablation; the vertex layout's token sharing."""

from __future__ import annotations

import socket
import threading
import time

import pytest

pytest.importorskip("bm25s")
pytest.importorskip("RestrictedPython")

from graphcot_helpers import small_graph, tiny_text_model  # noqa: E402
from serve_helpers import check_idle  # noqa: E402

from jaxsys.serve.graphcot import prompts  # noqa: E402
from jaxsys.serve.graphcot.backends import BackendUnreachable, EngineBackend, OpenAIBackend  # noqa: E402
from jaxsys.serve.graphcot.cache_policy import Span, VertexPriorityPolicy  # noqa: E402
from jaxsys.serve.graphcot.graph import render_vertex  # noqa: E402
from jaxsys.serve.graphcot.questions import generate_questions  # noqa: E402
from jaxsys.serve.graphcot.runner import GraphQA, Interval, PhaseGate, RunConfig, summarize, tool_overlap  # noqa: E402

SMALL = dict(graphcot_max_tokens=12, max_steps=2, c_tokens=4, r_tokens=12, a_tokens=24, max_iters=1)


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    return small_graph(tmp_path_factory.mktemp("g"))


@pytest.fixture(scope="module")
def questions(graph):
    qs = generate_questions(graph, per_template=1, seed=0)
    return [qs[0], qs[5], qs[-1]]  # easy, medium, hard


@pytest.fixture(scope="module")
def engine():
    from jaxsys.serve import EngineConfig, ServingLLM

    policy = VertexPriorityPolicy(16)
    llm = ServingLLM(tiny_text_model(), eviction_policy=policy,
                     config=EngineConfig(num_pages=384, max_decode_batch=4, max_prefill_batch=4, prefill_chunk=128,
                                         shared_attention=False))
    backend = EngineBackend(llm, policy=policy)
    yield llm, backend, policy
    backend.close()


def wait_idle(sched, timeout=60.0):
    deadline = time.monotonic() + timeout
    while sched.has_work():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.05)


@pytest.mark.parametrize("system", ["glm", "graphcot"])
def test_end_to_end_on_the_engine(engine, graph, questions, system):
    llm, backend, policy = engine
    radix = llm.scheduler.radix
    hits, lookups = radix.hit_tokens, radix.lookup_tokens
    with GraphQA(graph, backend, RunConfig(system=system, concurrency=3, **SMALL), policy=policy) as qa:
        records = qa.run(questions)
    assert [r.qid for r in records] == [q["qid"] for q in questions]
    for r in records:
        assert r.error is None and r.llm_calls >= (3 if system == "glm" else 2)
        assert 0 <= r.cached_tokens <= r.prompt_tokens and 0 < r.generated_tokens
        assert r.seconds >= r.llm_seconds > 0 and r.gold
    # per-request cached tokens are exactly what the radix cache served
    assert sum(r.cached_tokens for r in records) == radix.hit_tokens - hits
    assert sum(r.prompt_tokens for r in records) == radix.lookup_tokens - lookups
    assert sum(r.cached_tokens for r in records) > 0  # the system prompt, at least, is shared
    stats = summarize(records)
    assert stats["questions"] == 3 and 0.0 <= stats["accuracy"] <= 1.0
    wait_idle(llm.scheduler)
    check_idle(llm.scheduler)
    assert not policy._active  # every question told the policy it finished
    tags = set().union(*(page for n in radix.nodes() for page in n.page_tags))
    assert {("system",), ("template",)} <= tags  # the requests' page tags reached the tree


def test_pipelining_off_gives_the_same_records_shape(engine, graph, questions):
    llm, backend, policy = engine
    with GraphQA(graph, backend, RunConfig(system="glm", concurrency=3, pipelining=False, **SMALL),
                 policy=policy) as qa:
        records = qa.run(questions)
    assert len(records) == 3 and all(r.error is None and r.llm_calls >= 3 for r in records)


def _token_times(request) -> list[float]:
    """When the engine produced each of a request's tokens (perf_counter seconds)."""
    times = [request.first_token_time] if request.first_token_time is not None else []
    for dt in request.token_intervals:
        times.append(times[-1] + dt)
    return times


@pytest.mark.parametrize("pipelining", [True, False])
def test_tool_work_overlaps_other_questions_decoding_only_when_pipelined(engine, graph, monkeypatch, pipelining):
    """Measured on the engine's own token timestamps: while one question's code runs in the sandbox,
    the engine keeps producing other questions' tokens (pipelining on), and produces none of them
    with the stage-synchronous gate (pipelining off)."""
    llm, backend, policy = engine
    requests = []
    submit = llm.scheduler.submit

    def recording_submit(request):
        requests.append(request)
        return submit(request)

    monkeypatch.setattr(llm.scheduler, "submit", recording_submit)
    # more questions than decode slots (4): the ones queued behind start later, so the questions'
    # stages drift apart as they would with questions of different difficulty
    qs = generate_questions(graph, per_template=1, seed=0)[:6]
    with GraphQA(graph, backend, RunConfig(system="glm", concurrency=6, pipelining=pipelining, **SMALL),
                 policy=policy) as qa:
        records = qa.run(qs)
    assert all(r.error is None for r in records)
    tools = [iv for iv in qa.timeline if iv.kind == "tool"]
    assert len(tools) >= len(qs)  # every question ran its A-Agent's code at least once
    qid_of = {id(r): r.request_id.split("-", 1)[1].rsplit("-", 1)[0] for r in requests}  # "{agent}-{qid}-{n}"
    assert set(qid_of.values()) == {q["qid"] for q in qs}
    during = sum(1 for iv in tools for r in requests if qid_of[id(r)] != iv.qid
                 for t in _token_times(r) if iv.start < t < iv.end)
    if pipelining:
        assert during > 0 and tool_overlap(qa.timeline) > 0
    else:
        assert during == 0 and tool_overlap(qa.timeline) == 0.0


def test_tool_overlap_measures_the_union_of_other_questions_llm_time():
    timeline = [Interval("a", "tool", 0.0, 10.0), Interval("b", "llm", 2.0, 5.0), Interval("c", "llm", 4.0, 6.0),
                Interval("a", "llm", 6.0, 9.0),  # the question's own LLM call does not count
                Interval("b", "llm", 9.0, 12.0), Interval("b", "tool", 20.0, 30.0)]
    assert tool_overlap(timeline) == pytest.approx((4.0 + 1.0) / 20.0)
    assert tool_overlap([Interval("a", "llm", 0.0, 1.0)]) == 0.0


def test_vertex_layout_shares_tokens(engine, graph):
    _, backend, _ = engine
    system = prompts.glm_system(graph.definition())
    facts = {v: render_vertex(graph, v) for v in ("book-1", "author-0", "series-0")}

    def common(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    shared = {}
    for sharing in (True, False):
        ids1, spans = backend.encode(prompts.r_prompt(system, "Who wrote it?", facts, [], sharing=sharing))
        ids2, _ = backend.encode(prompts.r_prompt(system, "When was it out?", dict(reversed(facts.items())), [],
                                                  sharing=sharing))
        shared[sharing] = common(ids1, ids2)
        if sharing:
            last_vertex = max(s.end for s in spans if s.kind == "vertex")
            assert shared[True] >= last_vertex  # everything up to the question is the same tokens
            assert [s.kind for s in spans][:3] == ["system", "system", "template"]
    assert shared[True] > shared[False] + 3 * 20


def test_priority_policy_evicts_finished_questions_first():
    from jaxsys.serve.scheduler.radix import RadixCache

    ps = 4
    freed: list[int] = []
    policy = VertexPriorityPolicy(ps, horizon_s=100.0)
    cache = RadixCache(ps, policy, free_pages=freed.extend)
    system = list(range(100, 108))  # 2 pages
    prompt = {"q1": system + list(range(200, 208)), "q2": system + list(range(300, 308))}
    pages = {"q1": [1, 2, 3, 4], "q2": [1, 2, 5, 6]}
    for qid in ("q2", "q1"):  # q2 first: older
        tags = policy.register(prompt[qid], [Span(0, 8, "system"), Span(8, 16, "private")], qid)
        assert tags == [{("system",)}] * 2 + [{("private", qid)}] * 2
        cache.insert(prompt[qid], pages[qid], tags=tags)
    for n in cache.nodes():
        n.last_access = {1: 0.0, 3: 5.0, 5: 1.0}.get(n.pages[0], 0.0)  # q2 older than q1
    policy.question_done("q1")
    assert cache.evict(2) == 2 and sorted(freed) == [3, 4]  # q1 finished: its private pages go first
    lru = RadixCache(ps, None, free_pages=(lru_freed := []).extend)
    for qid in ("q2", "q1"):
        lru.insert(prompt[qid], pages[qid])
    for n in lru.nodes():
        n.last_access = {1: 0.0, 3: 5.0, 5: 1.0}.get(n.pages[0], 0.0)
    assert lru.evict(2) == 2 and sorted(lru_freed) == [5, 6]  # LRU drops the in-flight question's pages
    # then the in-flight question's pages, and the shared system prompt last
    freed.clear()
    assert cache.evict(2) == 2 and sorted(freed) == [5, 6]
    assert policy.priority(next(iter(cache.nodes()))) == 4.0


def test_vertex_priority_grows_with_reuse():
    from jaxsys.serve.scheduler.radix import RadixCache

    policy = VertexPriorityPolicy(4)
    cache = RadixCache(4, policy)
    tokens = [7, 7, 7, 7, 8, 8, 8, 8]
    spans = [Span(0, 3, "template"), Span(3, 6, "vertex", "book-1"), Span(6, 8, "question")]
    tags = policy.register(tokens, spans, "q1")
    assert tags == [{("template",), ("vertex", "book-1")}, {("vertex", "book-1"), ("question", "q1")}]
    [node], _ = cache.insert(tokens, [1, 2], tags=tags)
    upper = cache.match(tokens[:4])[0][0]  # split after the first page: the tags follow their pages
    assert upper.page_tags == tags[:1] and node.page_tags == tags[1:] and node.parent is upper
    assert policy.priority(upper) == 3.0 and policy.priority(node) == 2.5  # template; question in flight
    policy.question_done("q1")
    assert policy.priority(node) == 2.0  # the vertex, used by one question: 1 + log2(2)
    for q in ("q2", "q3", "q4"):  # other questions share the vertex page: their tags merge into it
        cache.insert(tokens, [1, 2], tags=policy.register(tokens, spans, q))
    assert node.page_tags[0] >= {("question", "q2"), ("question", "q4")}
    assert policy.priority(node) == 3.0  # 1 + log2(1 + 4) capped at 3
    assert policy.priority(cache.insert([9, 9, 9, 9], [3])[0][0]) == 0.0  # untagged: plain LRU


def test_phase_gate_never_overlaps_llm_and_tool_work():
    gate = PhaseGate(overlap=False)
    active = {"llm": 0, "tool": 0}
    lock = threading.Lock()
    errors = []

    def work(kind):
        for _ in range(20):
            with gate(kind):
                with lock:
                    active[kind] += 1
                    if active["llm"] and active["tool"]:
                        errors.append("overlap")
                time.sleep(0.001)
                with lock:
                    active[kind] -= 1

    threads = [threading.Thread(target=work, args=(k,)) for k in ("llm", "tool") * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)


# ------------------------------------------------------------------------------ over HTTP

def test_openai_backend_against_our_server(engine, graph, questions):
    uvicorn = pytest.importorskip("uvicorn")
    from jaxsys.serve.api.server import create_app

    llm, _, _ = engine
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(llm, model_name="tiny"), log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.05)
        backend = OpenAIBackend(f"http://127.0.0.1:{port}")
        assert backend.model == "tiny"
        radix = llm.scheduler.radix
        for system in ("glm", "graphcot"):
            hits, lookups = radix.hit_tokens, radix.lookup_tokens
            with GraphQA(graph, backend, RunConfig(system=system, concurrency=2, **SMALL)) as qa:
                records = qa.run(questions[:2])
            assert all(r.error is None and r.llm_calls >= 2 and r.prompt_tokens > 0 for r in records)
            # usage.prompt_tokens_details.cached_tokens: exactly what the radix cache served
            assert sum(r.cached_tokens for r in records) == radix.hit_tokens - hits
            assert sum(r.prompt_tokens for r in records) == radix.lookup_tokens - lookups
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        llm.start()  # the server's shutdown stopped the scheduler thread the engine fixture shares


def test_unreachable_backend_says_so():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with pytest.raises(BackendUnreachable, match=f"cannot reach an OpenAI-compatible server at "
                                                 f"http://127.0.0.1:{port}/v1"):
        OpenAIBackend(f"http://127.0.0.1:{port}")


def test_horizon_follows_the_time_between_a_questions_calls():
    policy = VertexPriorityPolicy(4)
    assert policy.horizon_s == 10.0
    policy.register([1, 2, 3, 4], [Span(0, 4, "private")], "q1")
    time.sleep(0.2)
    policy.register([1, 2, 3, 4], [Span(0, 4, "private")], "q1")
    assert 2 * (5.0 + 0.1 * (0.2 - 5.0)) <= policy.horizon_s < 9.1  # pulled towards 2 x 0.2 s
    assert VertexPriorityPolicy(4, horizon_s=3.0).horizon_s == 3.0
