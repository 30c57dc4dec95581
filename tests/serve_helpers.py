"""Shared builders for the serving tests: a tiny random model, a no-cache greedy reference, engines
with or without shared-prefix attention, and the page-accounting check.

The tiny model is drawn at unit scale (matrices ~ N(0, 1/fan_in), embeddings ~ N(0, 1)), so logits
are O(1) and greedy decoding is decided by clear margins: the paged, chunked, batched serving path
and the plain causal forward (no cache) must then pick the very same tokens.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import numpy as np

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=16, max_position_embeddings=256)
REF_ROWS, REF_LEN = 8, 64  # the reference runs one compiled shape: [8, 64]


def tiny_config(**overrides):
    from jaxsys.models import ModelConfig

    return ModelConfig(**{**TINY, **overrides})


@functools.lru_cache(maxsize=None)
def tiny_params(seed: int = 0, **overrides):
    """Unit-scale random parameters of the tiny config (see the module docstring)."""
    import jax

    from jaxsys.models import init_params

    cfg = tiny_config(**overrides)
    p = init_params(cfg, jax.random.key(seed), std=1.0)
    lay = dict(p["layers"])
    D, F = cfg.hidden_size, cfg.intermediate_size
    for k in ("wq", "wk", "wv", "w_gate", "w_up"):
        lay[k] = lay[k] / np.sqrt(D)
    lay["wo"] = lay["wo"] / np.sqrt(cfg.num_heads * cfg.head_dim)
    lay["w_down"] = lay["w_down"] / np.sqrt(F)
    out = dict(p, layers=lay)
    out["lm_head"] = p["lm_head"] / np.sqrt(D)
    return out


def tiny_model(seed: int = 0, *, eos_token_ids: tuple[int, ...] = (), **overrides):
    """A `LoadedModel` with no tokenizer (prompts and outputs are token ids)."""
    from jaxsys.models import LoadedModel

    cfg = tiny_config(**overrides).replace(eos_token_ids=tuple(eos_token_ids))
    return LoadedModel(name="tiny", config=cfg, params=tiny_params(seed, **overrides), tokenizer=None,
                       path=Path("tiny"))


def serving_llm(model, shared_attention: bool, **engine_kw):
    """A `ServingLLM` over `model`; an import error of our own modules fails the test (never skips)."""
    from jaxsys.serve.engine.engine import EngineConfig
    from jaxsys.serve.llm import ServingLLM

    return ServingLLM(model, config=EngineConfig(shared_attention=shared_attention, **engine_kw))


# ------------------------------------------------------------------------------ the reference

@functools.lru_cache(maxsize=None)
def _jit_forward():
    import jax

    from jaxsys.models import decoder

    return jax.jit(decoder.forward, static_argnames=("cfg",))


def greedy_reference(model, prompts: Sequence[Sequence[int]], max_tokens: int | Sequence[int],
                     eos: Sequence[int] = ()) -> list[list[int]]:
    """Greedy continuations by the plain causal forward (no KV cache): argmax at the last position,
    append, repeat. A token in `eos` ends a row and is not part of its output (as the scheduler)."""
    import jax.numpy as jnp

    cfg, params = model.config, model.params
    if isinstance(max_tokens, int):
        max_tokens = [max_tokens] * len(prompts)
    out: list[list[int]] = []
    for start in range(0, len(prompts), REF_ROWS):
        rows = [list(map(int, p)) for p in prompts[start:start + REF_ROWS]]
        budget = list(max_tokens[start:start + REF_ROWS])
        assert all(len(r) + b <= REF_LEN for r, b in zip(rows, budget)), "reference shape too small"
        done = [False] * len(rows)
        gen: list[list[int]] = [[] for _ in rows]
        for _ in range(max(budget)):
            ids = np.zeros((REF_ROWS, REF_LEN), np.int32)  # trailing padding: causal, so harmless
            for i, r in enumerate(rows):
                ids[i, :len(r)] = r
            logits, _ = _jit_forward()(params, jnp.asarray(ids), cfg=cfg)
            logits = np.asarray(logits)
            for i, r in enumerate(rows):
                if done[i]:
                    continue
                t = int(np.argmax(logits[i, len(r) - 1]))
                if t in eos:
                    done[i] = True
                    continue
                gen[i].append(t)
                r.append(t)
                done[i] = len(gen[i]) >= budget[i]
        out += gen
    return out


# ------------------------------------------------------------------------------ page accounting

def live_requests(sched):
    return list(sched.waiting) + list(sched.prefilling) + list(sched.running)


def check_accounting(sched) -> None:
    """Every KV page 1..N-1 is in exactly one place: free, in the radix tree, or private to one live
    request; refcounts equal the live holders; waiting requests hold nothing."""
    from jaxsys.serve.scheduler.request import State

    radix, pages = sched.radix, sched.pages
    tree = [p for n in radix.nodes() for p in n.pages]
    live = live_requests(sched)
    owned = [p for r in live for p in r.own_pages]
    everything = list(pages._free) + tree + owned  # private free list: duplicates must show
    assert sorted(everything) == list(range(1, pages.num_pages)), "a KV page leaked or was freed twice"
    assert radix.num_cached_pages == len(tree)
    for r in live:
        if r.state is State.WAITING:
            assert r.node is None and not r.own_pages and r.pending_node is None
        else:  # the KV a request reads through its tree path is its own page table's prefix
            path = [p for n in radix.path_to(r.node) for p in n.pages]
            assert r.pages[:len(path)] == path
            assert not set(r.own_pages) & set(tree)
    for n in radix.nodes():
        holders = sum(1 for r in live if n in radix.path_to(r.node))
        assert n.ref == holders, f"{n}: ref {n.ref}, {holders} live holders"


def check_idle(sched) -> None:
    """Nothing in flight: no request holds a node, nothing is pending, the accounting holds, and
    evicting the whole tree would return every page to the free list."""
    assert not sched.has_work()
    assert sched.num_running == 0 and sched.queue_length == 0
    check_accounting(sched)
    assert all(n.ref == 0 and n.ready for n in sched.radix.nodes())
    assert sched.pages.num_free + sched.radix.evictable_pages() == sched.pages.capacity
    assert sched.error is None


def reset(sched) -> None:
    """After a failed test: finish whatever is left (freeing its pages) without touching the engine,
    so the next test starts from an idle scheduler instead of erroring on the leftovers."""
    sched._drain_inbox()
    sched._fail_all("reset after a failed test")
    sched.error = None


def drive(sched, max_steps: int = 10_000, on_step=None) -> int:
    """step() until idle, checking the page accounting after every step. Returns the step count."""
    for n in range(max_steps):
        if not sched.has_work():
            return n
        step(sched, on_step=on_step)
    raise AssertionError(f"scheduler not idle after {max_steps} steps")


def step(sched, n: int = 1, on_step=None) -> None:
    """n scheduler steps (fewer if it goes idle), checking the page accounting after each."""
    for i in range(n):
        if not sched.has_work():
            return
        sched.step()
        check_accounting(sched)
        if on_step is not None:
            on_step(i)
