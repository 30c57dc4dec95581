"""The Graph-CoT trace replay: prompts that add up to the recorded tokens, grow append-only, share
one prefix; the working-set count equals the size of a real radix tree holding every prompt."""

from __future__ import annotations

from jaxsys.serve.graphcot.replay import ReplayShape, build_replay, load_profile, trace_path, working_set_pages


def test_replay_prompts_follow_the_profile():
    shape = ReplayShape(shared_tokens=64, question_tokens=8, generated_tokens=4, max_prompt_tokens=4000)
    profile = [{"calls": 2, "tokens": 400}, {"calls": 5, "tokens": 2000}, {"calls": 1, "tokens": 50},
               {"calls": 3, "tokens": 100}]
    qs = build_replay(profile, vocab_size=1000, shape=shape, seed=1)
    assert [len(q.calls) for q in qs] == [2, 5, 1, 3]
    for q, p in zip(qs, profile):
        total = sum(len(ids) + shape.generated_tokens for ids in q.calls)
        fixed = len(q.calls) * (64 + 8 + 4)
        assert total == fixed if p["tokens"] <= fixed else abs(total - p["tokens"]) < len(q.calls) ** 2
        for a, b in zip(q.calls, q.calls[1:]):
            assert b[:len(a)] == a  # the scratchpad only grows
        assert q.calls[0][:64] == qs[0].calls[0][:64]  # one shared instruction prefix
        assert q.spans[-1][0].kind == "template" and q.spans[-1][1].kind == "private"
    assert build_replay(profile, vocab_size=1000, shape=shape, seed=1)[1].calls == qs[1].calls


def test_working_set_is_the_radix_tree_size():
    from jaxsys.serve.scheduler.radix import RadixCache

    shape = ReplayShape(shared_tokens=40, question_tokens=8, generated_tokens=4)
    qs = build_replay([{"calls": 3, "tokens": 600}, {"calls": 4, "tokens": 900}], vocab_size=500, shape=shape)
    ps = 4
    cache = RadixCache(ps)
    next_page = iter(range(1, 10**6))
    for q in qs:
        for ids in q.calls:
            n = len(ids) // ps
            cache.insert(ids, [next(next_page) for _ in range(n)])
    assert working_set_pages(qs, ps) == cache.num_cached_pages


def test_real_profile_loads(shared_data):
    rows = load_profile(trace_path(shared_data, "goodreads"), 50)
    assert len(rows) == 50 and all(r["calls"] >= 1 and r["tokens"] > 0 for r in rows)
    everything = load_profile(trace_path(shared_data, "goodreads"))
    types = {r["type"] for r in everything}
    assert len(types) == 5 and {r["type"] for r in rows[:5]} == types  # question types in turn
    assert sorted(map(str, rows)) == sorted(map(str, [r for t in types for r in
                                                      [x for x in everything if x["type"] == t][:10]]))
    qs = build_replay(rows, vocab_size=49152)
    assert max(len(ids) for q in qs for ids in q.calls) <= ReplayShape().max_prompt_tokens
