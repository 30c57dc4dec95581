"""The OpenAI-compatible server over loopback, with the real SmolLM2 and the official `openai` client.

One server per module (the model loads once): uvicorn in a background thread on a socket bound to
a free port, shut down cleanly at the end (which also stops the scheduler thread). Covered:
/v1/models, /health, chat and completions (plain and streamed, stream == non-stream text), stop
strings, 32 concurrent streamed chats sharing a system prompt (each equal to the same request run
alone), Prometheus /metrics (parsed), every kind of bad input (4xx with an OpenAI-style error body,
and the server still serves afterwards), and a streaming client that disconnects early (its
request is cancelled and its KV pages come back).

The shared-prefix-attention variant of the greedy-equality test starts a second server over the
same loaded model (marked slow: it compiles a second set of SmolLM2 executables).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from helpers import smollm2_path  # noqa: E402
from serve_helpers import check_accounting, serving_llm  # noqa: E402

MODEL = "smollm2-135m-instruct"
ENGINE = dict(page_size=16, num_pages=192, max_decode_batch=16, max_prefill_batch=8, prefill_chunk=256)
SYSTEM = ("You are a terse assistant. Answer every question in one short sentence, without "
          "greetings, lists or follow-up questions.")
TOPICS = ["the moon", "rain", "bread", "chess", "volcanoes", "bees", "glass", "trains", "music", "salt",
          "snow", "paper", "clocks", "whales", "copper", "tea", "maps", "bridges", "owls", "sand",
          "candles", "rivers", "coffee", "kites", "lightning", "wool", "deserts", "mirrors", "honey",
          "comets", "ice", "forests"]


class LiveServer:
    def __init__(self, llm):
        from jaxsys.serve.api.server import create_app

        self.llm = llm
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(llm), log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive(), "the server thread died while starting"
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0, timeout=300)
        self.http = httpx.Client(base_url=self.base, timeout=300)

    def stop(self):
        self.http.close()
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the server did not shut down"
        assert self.llm.scheduler._thread is None, "the scheduler thread outlived the server"
        self.sock.close()

    def wait_idle(self, timeout: float = 30.0) -> None:
        sched = self.llm.scheduler
        deadline = time.monotonic() + timeout
        while sched.has_work():
            assert time.monotonic() < deadline, "the scheduler did not go idle"
            time.sleep(0.02)
        time.sleep(0.05)  # let the scheduler thread finish the step it was in


@pytest.fixture(scope="module")
def smol():
    smollm2_path()  # skips when the wheel is absent
    from jaxsys.models import load_model

    return load_model(MODEL)


@pytest.fixture(scope="module")
def servers(smol):
    started: dict[bool, LiveServer] = {}

    def get(shared: bool) -> LiveServer:
        if shared not in started:
            started[shared] = LiveServer(serving_llm(smol, shared, **ENGINE))
        return started[shared]

    yield get
    for s in started.values():
        s.stop()


@pytest.fixture(scope="module")
def server(servers) -> LiveServer:
    return servers(False)


def good_request(server: LiveServer) -> None:
    r = server.client.completions.create(model=MODEL, prompt="One, two,", max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens >= 1


# ------------------------------------------------------------------------------ basics

def test_models_and_health(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    r = server.http.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_chat_answers_capital_of_france(server):
    r = server.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=16)
    choice = r.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant" and r.object == "chat.completion"
    assert r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_plain_and_streamed_agree(server):
    prompt = "The three primary colors are"
    n_prompt = len(server.llm.tokenizer.encode(prompt))
    r = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    text = r.choices[0].text
    assert text.strip() and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens == 8
    chunks = list(server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                                   stream=True))
    assert len(chunks) >= 2
    assert "".join(c.choices[0].text for c in chunks) == text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    # token ids as the prompt give the same continuation
    ids = server.llm.tokenizer.encode(prompt)
    r2 = server.client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert r2.choices[0].text == text


def test_ignore_eos_generates_max_tokens(server):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    plain = server.client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=40)
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens < 40
    full = server.client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=40,
                                                 extra_body={"ignore_eos": True})
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 40


def test_chat_streamed_equals_plain(server):
    msgs = [{"role": "user", "content": "Name a color."}]
    plain = server.client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=10)
    chunks = list(server.client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=10,
                                                        stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_stop_string_ends_completion_without_leaking(server):
    prompt = "The capital of France is"
    full = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    text = full.choices[0].text
    assert "Paris" in text
    cut = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                           stop=["Paris"])
    assert cut.choices[0].text == text[:text.index("Paris")]
    assert cut.choices[0].finish_reason == "stop"
    streamed = list(server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                                     stop=["Paris"], stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "stop"


# ------------------------------------------------------------------------------ concurrency

def _messages(topic: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Tell me one fact about {topic}."}]


# The shared-attention variant starts a second server (a second set of SmolLM2 executables, the
# most expensive test here), so it runs with the slow tests; the scheduler tests check the same
# engine path against the no-cache reference on every run.
@pytest.mark.parametrize("shared_attention", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["plain", "shared"])
def test_32_concurrent_streams_equal_requests_run_alone(servers, shared_attention):
    srv = servers(shared_attention)
    max_tokens = 16
    metric_samples: list[tuple[float, float]] = []
    done = threading.Event()

    def scrape():
        while not done.is_set():
            fam = _metrics(srv)
            metric_samples.append((fam["jaxsys_running_requests"], fam["jaxsys_queue_length"]))
            time.sleep(0.05)

    async def one(client, topic):
        stream = await client.chat.completions.create(model=MODEL, messages=_messages(topic), temperature=0,
                                                      max_tokens=max_tokens, stream=True)
        text, reason = "", None
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
            reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def all_at_once():
        client = openai.AsyncOpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0, timeout=300)
        try:
            return await asyncio.gather(*(one(client, t) for t in TOPICS))
        finally:
            await client.close()

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    try:
        together = asyncio.run(all_at_once())
    finally:
        done.set()
        scraper.join()
    assert len(together) == 32
    assert all(reason in ("length", "stop") and text for text, reason in together)
    assert max(r for r, _ in metric_samples) > 1, "requests never ran together"
    srv.wait_idle()
    check_accounting(srv.llm.scheduler)

    alone = []
    for t in TOPICS:
        r = srv.client.chat.completions.create(model=MODEL, messages=_messages(t), temperature=0,
                                               max_tokens=max_tokens)
        alone.append((r.choices[0].message.content, r.choices[0].finish_reason))
    mismatched = [(t, a, b) for t, a, b in zip(TOPICS, together, alone) if a != b]
    assert not mismatched, f"{len(mismatched)} of 32 differ from the same request alone: {mismatched[:3]}"


# ------------------------------------------------------------------------------ metrics

def _metrics(server: LiveServer) -> dict[str, float]:
    """name -> value for gauges/counters; name_count / name_sum for histograms."""
    r = server.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            if s.labels and s.name.endswith("_bucket"):
                continue
            key = s.name if not s.labels else f"{s.name}{sorted(s.labels.items())}"
            out[key] = s.value
        out[f"type:{fam.name}"] = fam.type
    return out


def test_metrics_in_prometheus_format(server):
    server.wait_idle()
    before = _metrics(server)
    for name, kind in (("jaxsys_queue_length", "gauge"), ("jaxsys_running_requests", "gauge"),
                       ("jaxsys_prefix_cache_hit_rate", "gauge"), ("jaxsys_generated_tokens", "counter"),
                       ("jaxsys_time_to_first_token_seconds", "histogram"),
                       ("jaxsys_time_per_output_token_seconds", "histogram")):
        assert before[f"type:{name}"] == kind, name
    prompt = "List the planets of the solar system in order from the sun: Mercury,"
    usage = []
    for _ in range(2):  # the second request reuses the first one's prompt pages
        r = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
        usage.append(r.usage.completion_tokens)
    server.wait_idle()
    after = _metrics(server)
    assert after["jaxsys_generated_tokens_total"] - before["jaxsys_generated_tokens_total"] == sum(usage)
    assert after["jaxsys_time_to_first_token_seconds_count"] - before["jaxsys_time_to_first_token_seconds_count"] == 2
    assert (after["jaxsys_time_per_output_token_seconds_count"]
            - before["jaxsys_time_per_output_token_seconds_count"]) >= sum(u - 1 for u in usage)
    assert after["jaxsys_time_to_first_token_seconds_sum"] > before["jaxsys_time_to_first_token_seconds_sum"]
    assert 0 < after["jaxsys_prefix_cache_hit_rate"] <= 1
    assert after["jaxsys_queue_length"] == 0 and after["jaxsys_running_requests"] == 0
    assert after["jaxsys_kv_pages_free"] == server.llm.scheduler.pages.num_free
    assert after["jaxsys_requests_total[('finish_reason', 'length')]"] >= 2


# ------------------------------------------------------------------------------ bad input

LONG = "hello " * 9000  # > 8192 tokens

BAD = [
    ("malformed_json", "/v1/completions", b'{"model": "smollm2-135m-instruct", "prompt": "hi",', 400, None, None),
    ("not_an_object", "/v1/chat/completions", b"[1, 2, 3]", 400, None, None),
    ("unknown_model", "/v1/completions", {"model": "gpt-17", "prompt": "hi"}, 404, "model", "model_not_found"),
    ("unknown_model_chat", "/v1/chat/completions", {"model": "gpt-17", "messages": [{"role": "user", "content": "x"}]},
     404, "model", "model_not_found"),
    ("prompt_too_long", "/v1/completions", {"model": MODEL, "prompt": LONG, "max_tokens": 4}, 400, "prompt",
     "context_length_exceeded"),
    ("chat_too_long", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": LONG}]},
     400, "messages", "context_length_exceeded"),
    ("max_tokens_zero", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
    ("max_tokens_negative", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -3}, 400, "max_tokens", None),
    ("max_completion_tokens_zero", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, 400,
     "max_tokens", None),
    ("temperature_negative", "/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -0.5}, 400,
     "temperature", None),
    ("temperature_huge", "/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": 1e9}, 400,
     "temperature", None),
    ("top_p_zero", "/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p", None),
    ("top_p_above_one", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, 400, "top_p", None),
    ("top_k_negative", "/v1/completions", {"model": MODEL, "prompt": "hi", "top_k": -2}, 400, "top_k", None),
    ("five_stop_strings", "/v1/completions", {"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]},
     400, "stop", None),
    ("empty_stop_string", "/v1/completions", {"model": MODEL, "prompt": "hi", "stop": [""]}, 400, "stop", None),
    ("seed_negative", "/v1/completions", {"model": MODEL, "prompt": "hi", "seed": -1}, 400, "seed", None),
    ("logprobs", "/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 3}, 400, "logprobs", None),
    ("stream_prompt_too_long", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": LONG}], "stream": True}, 400, "messages",
     "context_length_exceeded"),
    ("n_two", "/v1/completions", {"model": MODEL, "prompt": "hi", "n": 2}, 400, "n", None),
    ("n_two_chat", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n", None),
    ("missing_messages", "/v1/chat/completions", {"model": MODEL}, 400, "messages", None),
    ("empty_messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages", None),
    ("bad_role", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     None, None),
    ("missing_prompt", "/v1/completions", {"model": MODEL}, 400, "prompt", None),
    ("empty_prompt", "/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt", None),
    ("token_out_of_vocab", "/v1/completions", {"model": MODEL, "prompt": [1, 10**7]}, 400, "prompt", None),
    ("more_tokens_than_cache", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 100000}, 400,
     "prompt", None),
    ("missing_model", "/v1/completions", {"prompt": "hi"}, 400, "model", None),
    ("batched_prompts", "/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt", None),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_gets_openai_error_and_server_keeps_serving(server, case):
    _, path, body, status, param, code = case
    if isinstance(body, bytes):
        r = server.http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = server.http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    good_request(server)


def test_openai_client_maps_errors(server):
    with pytest.raises(openai.NotFoundError) as e:
        server.client.completions.create(model="gpt-17", prompt="hi")
    assert e.value.status_code == 404
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": LONG}])
    assert e.value.code == "context_length_exceeded"
    good_request(server)


# ------------------------------------------------------------------------------ disconnects

def test_streaming_client_disconnect_cancels_request(server):
    server.wait_idle()
    sched = server.llm.scheduler
    finished0, generated0 = sched.stats.finished, sched.stats.generated_tokens
    stream = server.client.completions.create(model=MODEL, prompt="Count slowly from one to one thousand: one,",
                                              max_tokens=400, temperature=0, stream=True)
    got = []
    for chunk in stream:
        got.append(chunk)
        if len(got) == 3:
            break
    assert sched.num_running == 1  # still generating
    stream.close()
    server.wait_idle(timeout=15)  # 400 tokens would take far longer than this
    assert sched.stats.finished == finished0 + 1
    assert sched.stats.generated_tokens - generated0 < 400
    check_accounting(sched)
    assert sched.pages.num_free + sched.radix.evictable_pages() == sched.pages.capacity
    assert all(n.ref == 0 for n in sched.radix.nodes())
    good_request(server)


# ------------------------------------------------------------------------------ internal errors

def test_engine_failure_fails_requests_with_500_and_health_reports_it(server, monkeypatch):
    server.wait_idle()
    sched = server.llm.scheduler

    def broken(*args, **kwargs):
        raise RuntimeError("injected engine failure")

    monkeypatch.setattr(server.llm.engine, "prefill", broken)
    r = server.http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello there", "max_tokens": 4})
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["type"] == "server_error" and "injected engine failure" in err["message"]
    health = server.http.get("/health")
    assert health.status_code == 503 and "injected" in health.json()["detail"]
    server.wait_idle()
    check_accounting(sched)  # the failed request gave its pages back
    monkeypatch.undo()
    sched.error = None  # recovered: the engine works again
    assert server.http.get("/health").status_code == 200
    good_request(server)


# ------------------------------------------------------------------------------ the `jaxsys serve` command

def _run_py(code: str, tmp_path, timeout: float = 240):
    import os
    import subprocess
    import sys

    env = dict(os.environ, JAXSYS_CACHE_DIR=str(tmp_path / "xla"), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


def test_cli_help_is_instant_and_bad_options_exit_2(tmp_path):
    help_run = _run_py(
        "import sys\n"
        "from jaxsys.cli import main\n"
        "try:\n"
        "    main(['serve', '--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "assert 'jax' not in sys.modules, 'jaxsys serve --help imported jax'\n", tmp_path)
    assert help_run.returncode == 0, help_run.stderr
    for opt in ("--model", "--port", "--num-pages", "--tensor-parallel", "--no-shared-attention"):
        assert opt in help_run.stdout
    bad = _run_py(
        "from jaxsys.cli import main\n"
        "print(main(['serve', '--page-size', '16', '--prefill-chunk', '10']))\n"
        "print(main(['serve', '--tensor-parallel', '99', '--no-shared-attention']))\n"
        "print(main(['serve', '--model', 'no-such-model', '--no-shared-attention']))\n", tmp_path)
    assert bad.returncode == 0, bad.stderr
    assert bad.stdout.split() == ["2", "2", "2"], (bad.stdout, bad.stderr)
    err = bad.stderr.splitlines()
    assert any("prefill_chunk must be a multiple of page_size" in e for e in err), bad.stderr
    assert any("--tensor-parallel 99" in e for e in err), bad.stderr
    assert any(e.startswith("jaxsys serve:") and "no-such-model" in e for e in err), bad.stderr


@pytest.mark.slow
def test_cli_serves_a_chat_completion(tmp_path):
    import os
    import subprocess
    import sys

    smollm2_path()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAXSYS_CACHE_DIR=str(tmp_path / "xla"), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "jaxsys.cli", "serve", "--port", str(port), "--num-pages", "64",
                             "--no-shared-attention", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "jaxsys serve did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=12,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in r.choices[0].message.content
    finally:
        proc.terminate()
        proc.wait(timeout=30)
