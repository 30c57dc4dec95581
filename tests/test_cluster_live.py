"""Issue 18 D and G on real engine instances: sub-meshes of the 8 virtual CPU devices, a router
with the simulator's policies, live KV-page migration between instances, recompute after an
instance stops, and a clear refusal for a request that fits no instance.

The tiny model is drawn at unit scale, so greedy choices have clear margins (`serve_helpers`):
a migrated or recomputed request must produce exactly the tokens of an unmigrated run."""

from __future__ import annotations

import numpy as np
import pytest

from jaxsys.sampling import SamplingParams

from length_helpers import fixed_head
from serve_helpers import check_accounting, check_idle, greedy_reference, tiny_model

# Compile-heavy (several minutes on 2 cores), over the CI budget; run with `make test-all`.
pytestmark = pytest.mark.slow

ENGINE = dict(page_size=4, num_pages=64, max_decode_batch=4, max_prefill_batch=4, prefill_chunk=16)
PROMPTS = [[5, 17, 3, 99, 42], [7, 1, 2, 3, 4, 5, 6, 8, 9], [100, 101, 3], [11, 12, 13, 14, 15, 16, 17]]
GREEDY = SamplingParams(max_tokens=14)
SAMPLED = SamplingParams(max_tokens=14, temperature=0.9, seed=1234)


def _cluster(num_instances: int, policy: str, shared_attention: bool = False, predictor=None, **kw):
    from jaxsys.serve.cluster.instances import make_instances
    from jaxsys.serve.cluster.router import Cluster
    from jaxsys.serve.engine.engine import EngineConfig

    model = tiny_model(2)
    instances = make_instances(model, num_instances, devices_per_instance=2,
                               config=EngineConfig(shared_attention=shared_attention, **ENGINE),
                               predictor=predictor, predict_every=2)
    return model, Cluster(instances, policy, **kw)


def _check(cluster) -> None:
    for inst in cluster.alive:
        check_accounting(inst.scheduler)


def _pages(engine, pages):
    k = np.asarray(engine.cache.k)[:, :, pages]
    v = np.asarray(engine.cache.v)[:, :, pages]
    return k, v


@pytest.mark.parametrize("shared_attention", [False, True], ids=["plain", "shared"])
def test_migrated_requests_decode_the_same_tokens(shared_attention):
    """Two instances on devices {0, 1} and {2, 3}. Requests move back and forth mid-decode; their KV
    pages arrive bit for bit on the other instance's devices, and every request, greedy or
    sampled, produces the same tokens as in a run without migration."""
    model, cluster = _cluster(2, "round_robin", shared_attention)
    inst0, inst1 = cluster.instances
    assert {d.id for d in inst0.devices} == {0, 1} and {d.id for d in inst1.devices} == {2, 3}
    assert inst0.engine.cache.k.sharding.device_set == set(inst0.devices)
    sampling = [GREEDY, SAMPLED, GREEDY, SAMPLED]
    plain = cluster.generate(PROMPTS, sampling)
    assert not cluster.migrations
    assert [plain[0].token_ids, plain[2].token_ids] == greedy_reference(model, [PROMPTS[0], PROMPTS[2]], 14)

    def migrated_run():
        reqs = [cluster.submit(p, sp) for p, sp in zip(PROMPTS, sampling)]
        first = len(cluster.migrations)

        def move(r, dst):
            src = cluster.instances[cluster._home[r.request_id]]
            n = -(-r.num_computed // ENGINE["page_size"])
            before = _pages(src.engine, r.pages[:n])
            rec = cluster.migrate(r.request_id, dst)
            assert rec is not None and rec.src == src.index and rec.dst == dst and rec.pages == n
            after = _pages(cluster.instances[dst].engine, r.pages[:n])
            np.testing.assert_array_equal(after[0], before[0])
            np.testing.assert_array_equal(after[1], before[1])

        for k in range(60):
            if not cluster.has_work():
                break
            cluster.step()
            _check(cluster)
            if k == 3:  # everything is decoding by now: move two requests to the other instance
                for r in reqs[:2]:
                    move(r, 1 - cluster._home[r.request_id])
            if k == 7:  # and one of them back
                move(reqs[0], 1 - cluster._home[reqs[0].request_id])
        assert len(cluster.migrations) - first == 3 and all(m.bytes > 0 for m in cluster.migrations)
        for a, b in zip(plain, reqs):
            assert b.out_tokens == a.token_ids
            assert b.finish_reason == a.finish_reason
        for inst in cluster.instances:
            check_idle(inst.scheduler)

    migrated_run()
    compiled = [i.engine.compile_count for i in cluster.instances]
    migrated_run()  # steady state: the same migrations compile nothing
    assert [i.engine.compile_count for i in cluster.instances] == compiled


def test_stopped_instance_requests_are_recomputed_elsewhere():
    """Instance 0 stops mid-run: its requests continue on the others from their prompt and the
    tokens generated so far; nothing is lost and every output is the unmigrated run's."""
    model, cluster = _cluster(3, "round_robin")
    prompts = PROMPTS + [[3, 1, 4, 1, 5, 9, 2, 6]]
    want = greedy_reference(model, prompts, 14)
    events: dict[str, list] = {}
    reqs = [cluster.submit(p, GREEDY, on_output=lambda out: events.setdefault(out.request_id, []).append(out))
            for p in prompts]
    for _ in range(4):
        cluster.step()
    on0 = [r for r in reqs if cluster._home.get(r.request_id) == 0]
    so_far = {r.request_id: list(r.out_tokens) for r in on0}
    assert on0 and all(so_far.values())
    assert cluster.stop_instance(0) == len(on0)
    assert not cluster.instances[0].alive and cluster.recomputed == len(on0)
    cluster.run_until_idle()
    for r, w in zip(reqs, want):
        assert r.out_tokens == w and r.finish_reason == "length"
        if r.request_id in so_far:
            assert r.out_tokens[:len(so_far[r.request_id])] == so_far[r.request_id]
        evs = events[r.request_id]
        assert [t for e in evs for t in e.token_ids] == w  # the stream has every token once
        assert evs[-1].finished and evs[-1].completion_tokens == len(w) and evs[-1].prompt_tokens == r.prompt_len
    for inst in cluster.alive:
        check_idle(inst.scheduler)
    from jaxsys.serve.scheduler.scheduler import RequestError

    with pytest.raises(RequestError, match="fits no instance .*needs 64 KV pages; the cache holds 63"):
        cluster.submit(PROMPTS[0], SamplingParams(max_tokens=250))


@pytest.mark.parametrize("policy", ["round_robin", "least_kv", "llumnix", "ours"])
def test_policies_on_four_instances(policy, tmp_path):
    """4 instances x 2 devices. Dispatch spreads the requests; the migrating policies move requests
    when loads differ (threshold 0), ours with a length head in every instance; outputs are the
    greedy reference's whatever moved."""
    predictor = fixed_head(tiny_model(2), tmp_path, "hidden_layer", 1, max_new_tokens=24) if policy == "ours" else None
    kw = {"threshold": 0.0} if policy in ("llumnix", "ours") else {}
    if policy == "ours":
        kw["min_remaining_steps"] = 0
    model, cluster = _cluster(4, policy, predictor=predictor, rebalance_every=2, **kw)
    prompts = PROMPTS + [[9, 8, 7, 6, 5, 4], [1, 2], [50, 60, 70], [33] * 12]
    budgets = [4, 20, 6, 24, 3, 18, 5, 22]
    outs = cluster.generate(prompts, [SamplingParams(max_tokens=b) for b in budgets], on_round=lambda _: _check(cluster))
    assert [o.token_ids for o in outs] == greedy_reference(model, prompts, budgets)
    m = cluster.metrics()
    assert m["policy"] == policy and len(m["instances"]) == 4
    assert all(load["generated_tokens"] > 0 for load in m["instances"])  # every instance served
    if policy in ("llumnix", "ours"):
        assert m["migrations"] > 0 and m["migrated_bytes"] > 0
    else:
        assert m["migrations"] == 0
    if policy == "ours":
        assert cluster.predicting
        assert sum(load["length_predictor"]["predictions"] for load in m["instances"]) > 0


def test_ours_without_a_predictor_balances_on_load_with_a_warning():
    with pytest.warns(RuntimeWarning, match="balancing on current load"):
        _, cluster = _cluster(2, "ours")
    assert not cluster.predicting and cluster.policy._fallback


def test_threaded_replay_and_the_cluster_fitted_simulator():
    """The instances step on their own threads (the server's mode) with a rebalancer migrating
    between them: a trace replays with every request generating exactly its length and the greedy
    tokens; the instances' step records fit the simulator's step model, and the simulated run of
    the same trace lines up request by request with the measured one."""
    from jaxsys.models.kv_cache import cache_bytes
    from jaxsys.serve.cluster.policies import make_policy
    from jaxsys.serve.cluster.sim import SimConfig, simulate
    from jaxsys.serve.cluster.validation import ReplayRequest, compare_with_real_run, fit_cluster_hardware, replay
    from jaxsys.serve.cluster.workload import Trace, Workload

    model, cluster = _cluster(2, "llumnix", threshold=0.0, rebalance_interval_s=0.005)
    lens = (12, 20, 6, 16)
    pool = [ReplayRequest(tuple(p), n) for p, n in zip(PROMPTS, lens)]
    trace = Trace(np.linspace(0.0, 0.05, 8), np.arange(8) % 4)
    replay(cluster, pool, trace, temperature=0.0)  # compiles the shapes (steps that compile are not fitted)
    cluster.record_steps = True
    run = replay(cluster, pool, trace, temperature=0.0)
    assert run.finished.all() and not np.isnan(run.tpot_s).any()
    want = greedy_reference(model, PROMPTS, list(lens))
    for i, r in enumerate(run.requests):
        assert r.out_tokens == want[i % 4]
    for inst in cluster.instances:
        check_idle(inst.scheduler)
    records = cluster.step_records
    assert all(r.step_s > 0 and (r.cycle_s is None or r.cycle_s >= r.step_s) for r in records)
    assert any(r.cycle_s is not None for r in records)  # back-to-back steps while requests run
    hw = fit_cluster_hardware(records, cluster.instances[0],
                              kv_bytes_per_token=cache_bytes(model.config, 1, 1), migrations=cluster.migrations)
    assert hw.step_fit["n"] >= 3 and hw.max_batch == ENGINE["max_decode_batch"]
    workload = Workload(prompt_len=np.array([len(p) for p in PROMPTS]), output_len=np.array(lens),
                        source=np.zeros(4, np.int64), tables={}, max_new_tokens=20)
    sim = simulate(workload, trace, hw, make_policy("least_kv"), SimConfig(2, prefill="colocated"))
    cmp = compare_with_real_run(sim, run.tpot_s)
    assert cmp["requests"] == 8 and np.isfinite(cmp["p50_rel_error"])


def test_warm_up_leaves_nothing_to_compile_and_host_sharing_is_measured(tmp_path):
    """After `warm_up` over the pool's lengths, a threaded replay with migrations and a length head
    compiles nothing, in any thread (engine buckets, the head's row buckets, the migration
    programs); the decode-step slowdown with 1..N instances stepping at once is measured."""
    from jaxsys.serve.cluster.validation import ReplayRequest, measure_host_sharing, replay, warm_up
    from jaxsys.serve.cluster.workload import Trace

    predictor = fixed_head(tiny_model(2), tmp_path, "hidden_layer", 1, max_new_tokens=24)
    _, cluster = _cluster(2, "llumnix", predictor=predictor, threshold=0.0, rebalance_interval_s=0.005)
    lens = (12, 20, 6, 16)
    pool = [ReplayRequest(tuple(p), n) for p, n in zip(PROMPTS, lens)]
    warm = warm_up(cluster.instances, max_prompt_tokens=max(len(p) for p in PROMPTS),
                   max_context_tokens=max(len(p) + n for p, n in zip(PROMPTS, lens)))
    assert warm["compiles"] > 0 and warm["decode_buckets"] == 6  # B in 1, 2, 4 x P in 4, 8
    sharing = measure_host_sharing(cluster.instances, PROMPTS[1], batch=2, steps=6)
    assert sharing["slowdown"][0] == 1.0 and len(sharing["slowdown"]) == 2 and min(sharing["step_s"]) > 0
    run = replay(cluster, pool, Trace(np.linspace(0.0, 0.05, 8), np.arange(8) % 4), temperature=0.0)
    assert run.finished.all() and run.migrations > 0
    assert run.compiles == 0, run.compile_spans
