"""Issue 18 D/G behind the OpenAI API: `ClusterLLM` (engine instances on sub-meshes behind the
router) served by the same app as `ServingLLM`. Greedy completions equal a single-instance
server's, migrations or not; `/metrics` reports per-instance load and migrations; a request that
fits no instance gets a 400 that says so; an instance stopped mid-run has its requests finished
elsewhere with nothing lost (the HTTP responses are the single-instance server's)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from graphcot_helpers import tiny_text_model  # noqa: E402

ENGINE = dict(page_size=16, num_pages=64, max_decode_batch=4, max_prefill_batch=4, prefill_chunk=16)
PROMPTS = [[5, 17, 3, 99, 42], [7, 1, 2, 3, 4, 5, 6, 8, 9], [100, 101, 3], [11, 12, 13, 14, 15, 16, 17]]


def _config(**overrides):
    from jaxsys.serve.engine.engine import EngineConfig

    return EngineConfig(shared_attention=False, **{**ENGINE, **overrides})


def _complete(client, prompt, max_tokens: int) -> dict:
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                                             "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def _answers(client, max_tokens: int, threads: int = 1) -> list[tuple]:
    with ThreadPoolExecutor(threads) as pool:
        outs = list(pool.map(lambda p: _complete(client, p, max_tokens), PROMPTS))
    return [(o["choices"][0]["text"], o["choices"][0]["finish_reason"], o["usage"]["completion_tokens"]) for o in outs]


@pytest.fixture(scope="module")
def model():
    return tiny_text_model()


@pytest.fixture(scope="module")
def single_answers(model):
    """What one `ServingLLM` answers over the same API (the reference)."""
    from jaxsys.serve.api.server import create_app
    from jaxsys.serve.llm import ServingLLM

    llm = ServingLLM(model, config=_config())
    with TestClient(create_app(llm, model_name="tiny")) as client:
        return {n: _answers(client, n) for n in (9, 40)}


def _metrics(client) -> dict:
    return {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}


def _per_instance(families, name) -> dict[str, float]:
    return {s.labels["instance"]: s.value for s in families[name].samples}


def test_cluster_answers_like_one_instance_with_cluster_metrics(model, single_answers):
    """Two instances with migration on every load difference: concurrent greedy completions are
    the single-instance server's; a request no instance can hold is a 400 saying so; /metrics has
    every instance's load and the migrations."""
    from jaxsys.serve.api.server import create_app
    from jaxsys.serve.cluster.serving import ClusterLLM

    llm = ClusterLLM(model, instances=2, devices_per_instance=2, config=_config(), policy="llumnix", threshold=0.0)
    with TestClient(create_app(llm, model_name="tiny")) as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert _answers(client, 9, threads=4) == single_answers[9]
        bad = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 1500})
        assert bad.status_code == 400
        assert "fits no instance" in bad.json()["error"]["message"]
        assert _answers(client, 9) == single_answers[9]  # the server still serves
        families = _metrics(client)
    assert _per_instance(families, "jaxsys_instance_alive") == {"0": 1.0, "1": 1.0}
    assert set(_per_instance(families, "jaxsys_instance_running")) == {"0", "1"}
    assert set(_per_instance(families, "jaxsys_instance_kv_tokens")) == {"0", "1"}
    migrations = llm.cluster.migrations
    assert families["jaxsys_migrations"].samples[0].value == len(migrations)
    assert families["jaxsys_migrated_bytes"].samples[0].value == sum(m.bytes for m in migrations)
    assert families["jaxsys_recomputed_requests"].samples[0].value == 0
    assert sum(i.scheduler.stats.generated_tokens for i in llm.instances) == 9 * 2 * len(PROMPTS)


def test_instance_stopped_mid_run_loses_nothing(model, single_answers):
    """Round-robin over two instances; instance 0 stops once it has generated a few tokens: its
    requests are recomputed on instance 1 from their prompt and tokens so far, and every HTTP
    response is the single-instance server's."""
    from jaxsys.serve.api.server import create_app
    from jaxsys.serve.cluster.serving import ClusterLLM

    llm = ClusterLLM(model, instances=2, devices_per_instance=2, config=_config(), policy="round_robin")
    first_tokens = threading.Event()
    counted = []

    def observe(kind: str, _seconds: float) -> None:  # on instance 0's thread
        counted.append(kind)
        if counted.count("tpot") >= 3:
            first_tokens.set()

    llm.instances[0].scheduler.stats.observers.append(observe)
    with TestClient(create_app(llm, model_name="tiny")) as client:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            answers = pool.submit(_answers, client, 40, len(PROMPTS))
            assert first_tokens.wait(120), "instance 0 produced no tokens"
            moved = llm.cluster.stop_instance(0)
            got = answers.result(timeout=300)
        assert client.get("/health").json() == {"status": "ok"}  # instance 1 still serves
        families = _metrics(client)
    assert moved >= 1, "instance 0 had finished its requests before it stopped"
    assert got == single_answers[40]
    assert _per_instance(families, "jaxsys_instance_alive") == {"0": 0.0, "1": 1.0}
    assert families["jaxsys_recomputed_requests"].samples[0].value == moved
    assert not llm.instances[1].scheduler.has_work()


@pytest.mark.parametrize("argv, message", [
    (["--instances", "0"], "--instances must be >= 1"),
    (["--instances", "4", "--tensor-parallel", "4"], "4 instances x 4 devices need 16 devices, this run has 8"),
    (["--instances", "2", "--speculate", "ngram"], "leave out --speculate"),
    (["--instances", "2", "--length-predictor", "/nonexistent/head.npz"], "cannot read the length predictor"),
])
def test_serve_instances_bad_input(argv, message, capsys):
    from jaxsys.serve.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err
