"""The orchestrator: request queue, continuous batching, chunked prefill, the radix prefix cache,
and the per-step shared-prefix description. All concurrency lives here.

Design. One scheduler thread owns every piece of mutable serving state (queues, pages, the radix
tree, per-request progress) and the `Engine` (device state). Other threads (the HTTP server, the
CLI) only call `submit` and `cancel`, which push onto a locked inbox and wake the loop; results
flow back through each request's `on_output` callback, called on the scheduler thread (the server
forwards them into its asyncio loop). So no lock is ever held around device work.

One iteration (`step`):
  1. inbox -> waiting queue; cancellations free pages at once;
  2. admission (FIFO): longest cached prefix from the radix tree (whole pages), pages for the rest
     of the prompt and all `max_tokens` reserved up front (no preemption needed), the prompt's
     whole pages inserted into the tree immediately as *pending*: a request that matches a
     pending prefix waits until its KV is computed, so N requests arriving together with one
     system prompt compute it once and then share it. Evicts unreferenced tree pages (policy
     order) when the free list runs short;
  3. one chunked-prefill step over up to `max_prefill_batch` requests (each at most
     `prefill_chunk` tokens); a request whose prompt completes gets its first token;
  4. one decode step over every running request. With shared-prefix attention on, the running
     requests are grouped by their radix-tree ancestors (each request's path is walked once:
     O(batch x depth)) into a `PrefixTree`, and the balancer plans the step. With speculation on
     (a `Verifier`), a verify step instead: each request's draft (at most gamma tokens, capped
     so that every position stays in its reserved pages) is scored by the target at once and
     the request emits its accepted tokens plus one (`jaxsys.serve.engine.verify`);
  5. tokens -> text (incremental detokenizer), stop strings, EOS, max_tokens; finished requests
     release their radix references and free their own pages.
Shapes are padded to power-of-two buckets; the engine compiles each bucket once.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from jaxsys.models.tokenizer import Tokenizer
from jaxsys.sampling import SamplingParams, StopMatcher, batch_arrays
from jaxsys.serve.engine.engine import Engine
from jaxsys.serve.engine.verify import Verifier
from jaxsys.serve.scheduler.pages import PageAllocator
from jaxsys.serve.scheduler.radix import EvictionPolicy, RadixCache
from jaxsys.serve.scheduler.request import Request, RequestOutput, State
from jaxsys.shapes import pow2_bucket


logger = logging.getLogger("jaxsys.serve")


class RequestError(ValueError):
    """A request that cannot be served (e.g. longer than the context)."""


class SchedulerStats:
    """Counters since the scheduler started. `prefill_s` / `decode_s` are the wall time of the
    prefill and decode steps (host preparation, planning, the device step and the token
    bookkeeping), `prefill_tokens` the prompt tokens computed (not taken from the prefix cache)
    and `decode_tokens` the rows of the decode steps (one new token each). With speculation, each
    decode step is a verify step: `spec_proposed` / `spec_accepted` count draft tokens proposed and
    accepted, `spec_emitted` the tokens the verify steps produced (accepted + one per row)."""

    def __init__(self):
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.finished = 0
        self.decode_steps = 0
        self.prefill_steps = 0
        self.shared_steps = 0
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self.spec_proposed = 0
        self.spec_accepted = 0
        self.spec_emitted = 0
        self.prefill_s = 0.0
        self.decode_s = 0.0
        self.ttft: collections.deque[float] = collections.deque(maxlen=100_000)
        self.tpot: collections.deque[float] = collections.deque(maxlen=1_000_000)
        self.observers: list[Callable[[str, float], None]] = []  # ("ttft" | "tpot", seconds)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (0 before any proposal)."""
        return self.spec_accepted / self.spec_proposed if self.spec_proposed else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens a request gets per decode (or verify) step: 1 without speculation."""
        if not self.spec_emitted:
            return 1.0 if self.decode_tokens else 0.0
        return self.spec_emitted / self.decode_tokens

    def observe(self, kind: str, seconds: float) -> None:
        (self.ttft if kind == "ttft" else self.tpot).append(seconds)
        for fn in self.observers:
            fn(kind, seconds)


class Scheduler:
    def __init__(self, engine: Engine, tokenizer: Tokenizer | None, *,
                 eviction_policy: EvictionPolicy | None = None,
                 shared_step_builder: Callable[[Any, int], Any] | None = None,
                 verifier: Verifier | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        cfg = engine.config
        self.page_size = cfg.page_size
        self.pages = PageAllocator(cfg.num_pages)
        self.radix = RadixCache(cfg.page_size, eviction_policy, free_pages=self.pages.free)
        self.max_context = engine.cfg.max_position_embeddings
        self.eos = set(engine.cfg.eos_token_ids)
        self.shared_step_builder = shared_step_builder
        self.verifier = verifier
        self.waiting: collections.deque[Request] = collections.deque()
        self.prefilling: list[Request] = []
        self.running: list[Request] = []
        self.stats = SchedulerStats()
        self._inbox: list[Request] = []
        self._cancels: set[str] = set()
        self._by_id: dict[str, Request] = {}
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ public (any thread)
    def validate(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> None:
        n = len(prompt_ids)
        if n == 0:
            raise RequestError("the prompt is empty")
        if n >= self.max_context:
            raise RequestError(f"the prompt has {n} tokens; the model's context is {self.max_context} tokens")
        need = math.ceil(min(n + sampling.max_tokens, self.max_context) / self.page_size)
        if need > self.pages.capacity:
            raise RequestError(f"the request needs {need} KV pages; the cache holds {self.pages.capacity}")
        bad = [t for t in prompt_ids if not 0 <= int(t) < self.engine.cfg.vocab_size]
        if bad:
            raise RequestError(f"token ids out of range: {bad[:5]}")

    def submit(self, request: Request) -> Request:
        self.validate(request.prompt_ids, request.sampling)
        with self._cv:
            self._inbox.append(request)
            self._cv.notify()
        return request

    def cancel(self, request_id: str) -> None:
        with self._cv:
            self._cancels.add(request_id)
            self._cv.notify()

    @property
    def queue_length(self) -> int:
        return len(self.waiting) + len(self._inbox)

    @property
    def num_running(self) -> int:
        return len(self.running) + len(self.prefilling)

    def has_work(self) -> bool:
        return bool(self._inbox or self.waiting or self.prefilling or self.running or self._cancels)

    # ------------------------------------------------------------------ thread
    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="jaxsys-scheduler", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self.has_work():
                    self._cv.wait()
                if self._stop:
                    return
            try:
                self.step()
            except BaseException as e:  # noqa: BLE001 - fail every request loudly, keep the thread alive
                logger.exception("scheduler step failed; failing the requests in flight")
                self.error = e
                self._fail_all(f"internal error: {type(e).__name__}: {e}")

    def run_until_idle(self) -> None:
        """Drive the loop on the calling thread until every submitted request has finished."""
        while self.has_work():
            self.step()

    # ------------------------------------------------------------------ one iteration
    def step(self) -> None:
        self._drain_inbox()
        self._admit()
        if self.prefilling:
            t0 = time.perf_counter()
            self._prefill_step()
            self.stats.prefill_s += time.perf_counter() - t0
        if self.running:
            t0 = time.perf_counter()
            gamma = 0 if self.verifier is None else self.verifier.gamma_for(len(self.running))
            if gamma == 0:
                self._decode_step()
            else:
                self._verify_step(gamma)
            self.stats.decode_s += time.perf_counter() - t0

    def _drain_inbox(self) -> None:
        with self._cv:
            inbox, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, set()
        for r in inbox:
            r.decoder = self.tokenizer.stream_decoder() if self.tokenizer else None
            r.stops = StopMatcher(r.sampling.stop)
            self.waiting.append(r)
            self._by_id[r.request_id] = r
        for rid in cancels:
            r = self._by_id.get(rid)
            if r is not None and r.state is not State.FINISHED:
                self._finish(r, "cancelled")

    def _admit(self) -> None:
        ps = self.page_size
        max_batch = self.engine.config.max_decode_batch
        blocked = []
        while self.waiting and len(self.running) + len(self.prefilling) < max_batch:
            r = self.waiting.popleft()
            shareable = ((r.prompt_len - 1) // ps) * ps  # keep >= 1 token to compute logits from
            path, cached = self.radix.match(r.prompt_ids[:shareable], count=False)
            if any(not n.ready for n in path):
                blocked.append(r)  # its prefix is being computed by another request: wait for it
                continue
            matched_node = path[-1] if path else None
            self.radix.acquire(matched_node)
            total = min(r.prompt_len + r.sampling.max_tokens, self.max_context)
            need = math.ceil(total / ps) - len(cached)
            if need > self.pages.num_free:
                self.radix.evict(need - self.pages.num_free)
            if need > self.pages.num_free:
                self.radix.release(matched_node)
                self.waiting.appendleft(r)  # FIFO: wait for pages
                break
            own = self.pages.alloc(need)
            r.pages = cached + own
            r.num_computed = len(cached) * ps
            if r.cached_tokens is None:
                r.cached_tokens = r.num_computed
            self.radix.lookup_tokens += r.prompt_len
            self.radix.hit_tokens += r.num_computed
            full = r.prompt_len // ps
            new_path, dups = self.radix.insert(r.prompt_ids[:full * ps], r.pages[:full], ready=False,
                                               tags=r.cache_tags)
            tree_pages = set()
            deepest = None
            n_ok = 0
            for n in new_path:  # the deepest node whose pages are exactly this request's
                if r.pages[n_ok:n_ok + len(n.pages)] != n.pages:
                    break
                n_ok += len(n.pages)
                deepest = n
                tree_pages.update(n.pages)
            self.radix.acquire(deepest)
            self.radix.release(matched_node)
            r.node = deepest
            r.pending_node = deepest if deepest is not None and not deepest.ready else None
            r.own_pages = [p for p in own if p not in tree_pages]
            r.state = State.PREFILL
            self.prefilling.append(r)
            self.stats.prompt_tokens += r.prompt_len
        self.waiting.extendleft(reversed(blocked))

    # ------------------------------------------------------------------ prefill
    def _prefill_step(self) -> None:
        cfg = self.engine.config
        batch = self.prefilling[:cfg.max_prefill_batch]
        chunks = [min(cfg.prefill_chunk, r.prompt_len - r.num_computed) for r in batch]
        B = pow2_bucket(len(batch))
        T = pow2_bucket(max(chunks), minimum=16)
        ends = [r.num_computed + c for r, c in zip(batch, chunks)]
        P = pow2_bucket(math.ceil(max(ends) / self.page_size), minimum=4)
        tokens = np.zeros((B, T), np.int32)
        positions = np.full((B, T), -1, np.int32)
        table = np.zeros((B, P), np.int32)
        kv_lens = np.zeros(B, np.int32)
        last = np.zeros(B, np.int32)
        for i, (r, c) in enumerate(zip(batch, chunks)):
            s = r.num_computed
            tokens[i, :c] = r.prompt_ids[s:s + c]
            positions[i, :c] = np.arange(s, s + c)
            n_pages = min(len(r.pages), P)
            table[i, :n_pages] = r.pages[:n_pages]
            kv_lens[i] = s + c
            last[i] = c - 1
        sampling = batch_arrays([r.sampling for r in batch], B)
        nxt = self.engine.prefill(tokens, positions, table, kv_lens, last, sampling)
        self.stats.prefill_steps += 1
        self.stats.prefill_tokens += sum(chunks)
        now = time.perf_counter()
        for i, (r, c) in enumerate(zip(batch, chunks)):
            r.num_computed += c
            if r.num_computed < r.prompt_len:
                continue
            self.prefilling.remove(r)
            node = r.pending_node  # the node, and the pieces split off above it, are now computed
            while node is not None and not node.ready:
                node.ready = True
                node = node.parent
            r.pending_node = None
            r.state = State.RUNNING
            r.first_token_time = now
            self.stats.observe("ttft", now - r.arrival)
            self.running.append(r)
            self._accept_token(r, int(nxt[i]), now)

    # ------------------------------------------------------------------ decode
    def _decode_step(self) -> None:
        batch = list(self.running)
        n = len(batch)
        B = pow2_bucket(n)
        kv_after = [r.total_len for r in batch]  # the last sampled token gets written this step
        P = pow2_bucket(math.ceil(max(kv_after) / self.page_size), minimum=4)
        tokens = np.zeros(B, np.int32)
        positions = np.full(B, -1, np.int32)
        table = np.zeros((B, P), np.int32)
        kv_lens = np.zeros(B, np.int32)
        for i, r in enumerate(batch):
            tokens[i] = r.out_tokens[-1]
            positions[i] = r.total_len - 1
            n_pages = math.ceil(r.total_len / self.page_size)
            table[i, :n_pages] = r.pages[:n_pages]
            kv_lens[i] = r.total_len
        shared = None
        if self.shared_step_builder is not None:
            shared = self.shared_step_builder(self._prefix_tree(batch), B)
            if shared is not None:
                self.stats.shared_steps += 1
        sampling = batch_arrays([r.sampling for r in batch], B)
        nxt = self.engine.decode(tokens, positions, table, kv_lens, sampling, shared)
        self.stats.decode_steps += 1
        self.stats.decode_tokens += n
        now = time.perf_counter()
        for i, r in enumerate(batch):
            r.num_computed = r.total_len
            self._accept_token(r, int(nxt[i]), now)

    def _verify_step(self, G: int) -> None:
        """Speculative decode step of G drafts per request: draft, verify, accept (see
        `jaxsys.serve.engine.verify`)."""
        v = self.verifier
        W = v.context_width
        batch = list(self.running)
        n = len(batch)
        B = pow2_bucket(n)
        last = np.zeros(B, np.int32)
        base = np.full(B, -1, np.int32)
        proposals = np.zeros((B, G), np.int32)
        draft_len = np.zeros(B, np.int32)
        context = np.zeros((B, W), np.int32)
        for i, r in enumerate(batch):
            # a row emits at most draft_len + 1 tokens: stay within max_tokens and the context, and so
            # within the pages reserved at admission
            left = min(r.sampling.max_tokens - len(r.out_tokens), self.max_context - r.total_len)
            d = max(0, min(G, left - 1))
            if v.proposes_on_host and d:
                prop = v.propose(r.prompt_ids + r.out_tokens, d)
                d = len(prop)
                proposals[i, :d] = prop
            if W > 1:
                tail = (r.prompt_ids + r.out_tokens)[-W:]
                context[i, W - len(tail):] = tail
            last[i] = r.out_tokens[-1]
            base[i] = r.total_len - 1
            draft_len[i] = d
        kv_after = [r.total_len + int(d) for r, d in zip(batch, draft_len)]
        P = pow2_bucket(math.ceil(max(kv_after) / self.page_size), minimum=4)
        table = np.zeros((B, P), np.int32)
        for i, (r, kv) in enumerate(zip(batch, kv_after)):
            n_pages = math.ceil(kv / self.page_size)
            table[i, :n_pages] = r.pages[:n_pages]
        sampling = batch_arrays([r.sampling for r in batch], B)
        accepted, nxt, drafted = v.step(last, base, table, proposals, draft_len, context, sampling)
        st = self.stats
        st.decode_steps += 1
        st.decode_tokens += n
        st.spec_proposed += int(draft_len[:n].sum())
        st.spec_accepted += int(accepted[:n].sum())
        st.spec_emitted += int(accepted[:n].sum()) + n
        now = time.perf_counter()
        for i, r in enumerate(batch):
            a = int(accepted[i])
            r.num_computed = r.total_len + a  # the K/V of the last token and the accepted drafts
            for t in [*map(int, drafted[i, :a]), int(nxt[i])]:
                self._accept_token(r, t, now)
                if r.state is State.FINISHED:
                    break

    def _prefix_tree(self, batch: list[Request]):
        """Group running requests by their radix ancestors: the KV each holds *before* this step
        (the new token is attended directly) as tree nodes + one private leaf per request."""
        from jaxsys.pallas_kernels.shared_prefix_attention import PrefixTree

        index: dict[int, int] = {}
        parent, pages, lens, req_nodes = [], [], [], []
        ps = self.page_size
        for r in batch:
            prev, depth = -1, 0
            for node in self.radix.path_to(r.node):
                if node.id not in index:
                    index[node.id] = len(parent)
                    parent.append(prev)
                    pages.append(np.asarray(node.pages, np.int32))
                    lens.append(len(node.tokens))
                prev = index[node.id]
                depth += len(node.tokens)
            cached = r.total_len - 1
            own = cached - depth
            parent.append(prev)
            pages.append(np.asarray(r.pages[depth // ps:depth // ps + math.ceil(own / ps)], np.int32))
            lens.append(own)
            req_nodes.append(len(parent) - 1)
        return PrefixTree(page_size=ps, node_parent=np.asarray(parent, np.int32), node_pages=tuple(pages),
                          node_lens=np.asarray(lens, np.int32), request_nodes=np.asarray(req_nodes, np.int32))

    # ------------------------------------------------------------------ tokens -> text
    def _accept_token(self, r: Request, token: int, now: float) -> None:
        if r.last_token_time is not None:
            r.token_intervals.append(now - r.last_token_time)
            self.stats.observe("tpot", now - r.last_token_time)
        r.last_token_time = now
        if token in self.eos and not r.sampling.ignore_eos:
            self._finish(r, "stop")
            return
        r.out_tokens.append(token)
        self.stats.generated_tokens += 1
        piece, stopped = "", False
        if r.decoder is not None:
            piece, stopped = r.stops.push(r.decoder.push(token))
            r.text += piece
        if stopped:
            self._emit(r, piece, [token])
            self._finish(r, "stop")
            return
        if len(r.out_tokens) >= r.sampling.max_tokens or r.total_len >= self.max_context:
            self._emit(r, piece, [token])
            self._finish(r, "length")
            return
        self._emit(r, piece, [token])

    def _emit(self, r: Request, text: str, tokens: list[int], *, finished: bool = False,
              reason: str | None = None, error: str | None = None) -> None:
        if r.on_output is None:
            return
        if not (text or tokens or finished):
            return
        r.on_output(RequestOutput(r.request_id, text, tokens, finished, reason, r.prompt_len,
                                  len(r.out_tokens), error, r.cached_tokens))

    def _finish(self, r: Request, reason: str, error: str | None = None) -> None:
        if r.state is State.FINISHED:
            return
        tail = ""
        if reason == "length" and r.stops is not None and not r.stops.stopped:
            tail = r.stops.flush()
            r.text += tail
        for queue in (self.waiting, self.prefilling, self.running):
            if r in queue:
                queue.remove(r)
        if r.pending_node is not None:  # cancelled mid-prefill: its KV never completed
            self._drop_pending(r)
        if r.node is not None:
            self.radix.release(r.node)
            r.node = None
        if r.own_pages:
            self.pages.free(r.own_pages)
            r.own_pages = []
        r.state = State.FINISHED
        r.finish_reason = reason
        self.stats.finished += 1
        self._by_id.pop(r.request_id, None)
        self._emit(r, tail, [], finished=True, reason=reason, error=error)

    def _drop_pending(self, r: Request) -> None:
        """Pending nodes whose KV will never be computed (cancelled mid-prefill): take them out of
        the tree and free their pages. Requests that matched them are waiting and hold no
        reference, so they are unreferenced leaves once this request lets go."""
        node = r.pending_node
        r.pending_node = None
        self.radix.release(r.node)
        r.node = None
        while node is not None and node is not self.radix.root and not node.ready:
            parent = node.parent
            if node.ref or not node.is_leaf:  # admission never lets anyone use a pending node
                raise RuntimeError(f"invariant broken: pending radix node {node.id} is in use "
                                   f"(ref={node.ref}, children={len(node.children)}) but its KV was never computed")
            else:
                del parent.children[node.tokens[:self.page_size]]
                self.radix.num_cached_pages -= len(node.pages)
                self.pages.free(node.pages)
            node = parent

    def _fail_all(self, message: str) -> None:
        for r in list(self.waiting) + list(self.prefilling) + list(self.running):
            self._finish(r, "error", error=message)


def new_request(prompt_ids: Sequence[int], sampling: SamplingParams,
                on_output: Callable[[RequestOutput], None] | None = None, request_id: str | None = None) -> Request:
    if sampling.temperature > 0 and sampling.seed == 0:
        sampling = SamplingParams(**{**sampling.__dict__, "seed": random.randrange(1, 2**31)})
    r = Request(list(map(int, prompt_ids)), sampling, on_output)
    if request_id:
        r.request_id = request_id
    return r
