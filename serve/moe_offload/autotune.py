"""`gamma="auto"`: the roofline tuner configures a serving engine's speculation and expert cache.

SpecMoEOff picks its speculative parameters by roofline analysis of the given hardware. Here the
tuner (`tuner.predict`, one verify step of B requests x (gamma + 1) tokens, layer by layer) is
evaluated for every batch bucket the scheduler can run and every gamma of the compiled set, gamma
0 (no drafting) included, and the scheduler then drafts, step by step, the gamma predicted
fastest for the number of requests running. A batch changes the answer: one request's gamma + 1
tokens share the experts fetched for them, while a large batch needs most experts anyway and
drafting only adds compute. Before serving, the same model sizes the expert cache (as many slots
per layer as fit beside the rest, in the plan that needs the most memory) and turns prefetch on
only where the hardware overlaps copies with compute.

Inputs:
- the hardware: a `HardwareSpec` (a YAML of `configs/hardware/`, or measured);
- the model's shapes, from its config (a dense model is one always-resident "expert": its FFN);
- the workload: the distinct experts a step needs and the cache's hit rate (measured routing
  statistics, e.g. `moefy.evaluate`'s record; without them, independent uniform routing:
  U = E (1 - (1 - k/E)^n) for n tokens and hit rate C/E, the statistics of a router with no
  locality), and the draft's acceptance.

The acceptance is measured while serving: every verify step reports its rows' proposals and
accepted tokens (`observe`), and the tokens a request emits per step at each gamma, once
`MIN_ROWS` rows have been seen at it, replace the prediction from a per-token acceptance (the
measured one, or `PRIOR_ACCEPTANCE` before any step). A gamma not yet tried is priced by the
independent-acceptance formula, which overestimates drafts that often propose nothing (n-gram
lookup), so the schedule tries it and then keeps the measured value: the choice converges to what
the roofline says for the acceptance this traffic actually gets. Without a measured acceptance to
start from, the schedule drafts (the best gamma >= 1) until `MIN_ROWS` request-steps have measured
one: a schedule that started at gamma 0 would never verify a draft, and so never learn it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from jaxsys.serve.moe_offload.tuner import (HardwareSpec, ModelShape, Plan, Prediction, TunerError, Workload,
                                            load_hardware, max_cache_slots, predict, workload_from_evaluation)

PRIOR_ACCEPTANCE = 0.5  # per-token acceptance assumed before the first verify step reports one
MIN_ROWS = 32  # request-steps at a gamma before its measured tokens per step replace the prediction
REPLAN_ROWS = 64  # request-steps observed between two re-plans


@dataclasses.dataclass(frozen=True)
class AutoTune:
    """What `gamma="auto"` tunes against. hardware: a `HardwareSpec`, a YAML path or name
    (`configs/hardware/`), or None: this machine, measured at start (`machine.measure_hardware`,
    seconds to a minute). stats: measured routing statistics and acceptances (a `Workload`, or
    the JSON record of `moefy.evaluate`); None assumes independent uniform routing (module
    docstring). context: cached tokens per request the plan is priced at."""

    hardware: HardwareSpec | str | Path | None = None
    stats: Workload | str | Path | None = None
    context: int = 512

    def __post_init__(self):
        if self.context < 1:
            raise TunerError(f"context must be >= 1 token, got {self.context}")


def model_shape(cfg: Any) -> ModelShape:
    """The tuner's shapes of a model config; a dense model's FFN is its one expert (top-1 of 1,
    always resident)."""
    if cfg.is_moe:
        return ModelShape.from_config(cfg)
    nbytes = 2.0 if cfg.dtype == "bfloat16" else 4.0
    return ModelShape(num_layers=cfg.num_layers, hidden=cfg.hidden_size, num_heads=cfg.num_heads,
                      num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, vocab=cfg.vocab_size, num_experts=1,
                      top_k=1, expert_ffn=cfg.intermediate_size, weight_bytes=nbytes, kv_bytes=nbytes)


def independent_routing(shape: ModelShape, *, max_tokens: int = 4096) -> tuple[dict, dict]:
    """(unique_experts, hit_rate) of a router with no locality: each token picks k of E experts
    uniformly, independently of every other token."""
    E, k = shape.num_experts, shape.top_k
    uniq = {}
    n = 1
    while n <= max_tokens:
        uniq[(n, 1)] = E * (1 - (1 - k / E) ** n)
        n *= 2
    return uniq, {c: c / E for c in range(k, E + 1)}


def draft_key(draft: str, draft_layers: int) -> str:
    """The `Workload` name of a serving draft: "ngram", or "early_exit_<layers>" for "self"."""
    if draft == "ngram":
        return "ngram"
    if draft == "self":
        return f"early_exit_{draft_layers}"
    raise TunerError(f"gamma='auto' prices the 'ngram' and 'self' drafts; the {draft!r} draft's cost is not "
                     "modelled: give gamma as a number")


def load_workload(auto: AutoTune, shape: ModelShape, draft: str, draft_layers: int) -> tuple[Workload, bool]:
    """The `Workload` of `auto.stats` for this model and draft (see `AutoTune`), and whether it has
    a measured acceptance of the draft. A record measured on a model with other expert counts is
    refused: its statistics describe another router."""
    key = draft_key(draft, draft_layers)
    stats = auto.stats
    if isinstance(stats, (str, Path)):
        import json

        try:
            ev = json.loads(Path(stats).read_text())
            w = workload_from_evaluation(ev, context=auto.context)
            measured = (ev["model"]["num_experts"], ev["model"]["top_k"])
        except (OSError, ValueError, KeyError) as e:
            raise TunerError(f"cannot read routing statistics from {str(stats)!r}: {e}") from None
        if measured != (shape.num_experts, shape.top_k):
            raise TunerError(f"the statistics in {str(stats)!r} were measured on {measured[0]} experts, "
                             f"top-{measured[1]}; this model has {shape.num_experts}, top-{shape.top_k}")
        stats = w
    if stats is None:
        uniq, hits = independent_routing(shape)
        stats = Workload(uniq, hits, {}, {}, auto.context)
    acceptance = dict(stats.acceptance)
    measured = key in acceptance
    acceptance.setdefault(key, PRIOR_ACCEPTANCE)
    layers = dict(stats.draft_layers)
    layers[key] = 0 if draft == "ngram" else draft_layers
    return dataclasses.replace(stats, acceptance=acceptance, draft_layers=layers, context=auto.context), measured


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes the scheduler pads a step to: powers of two up to max_batch's bucket."""
    out, b = [], 1
    while True:
        out.append(b)
        if b >= max_batch:
            return out
        b *= 2


class GammaSchedule:
    """The gamma per batch bucket that the roofline predicts fastest, re-planned from the
    acceptance measured while serving (module docstring). gamma_for(n) is what the scheduler drafts
    for a step of n running requests; 0 means a plain decode step. explore: draft until an
    acceptance has been measured (the workload's is a prior)."""

    def __init__(self, hw: HardwareSpec, shape: ModelShape, workload: Workload, *, draft: str,
                 gammas: Iterable[int], max_batch: int, cache_slots: int, explore: bool = False):
        self.hw, self.shape, self.draft = hw, shape, draft
        self.gammas = (0, *sorted(set(int(g) for g in gammas)))
        self.buckets = batch_buckets(max_batch)
        self.cache_slots = cache_slots
        self.prior = workload
        self.rows: dict[int, int] = {}
        self.emitted: dict[int, int] = {}
        self.proposed = self.accepted = 0
        self._since_plan = 0
        self.exploring = explore
        self.plan()

    def workload(self) -> Workload:
        """The prior workload with what serving has measured: the per-token acceptance, and tokens
        per step at each gamma seen on `MIN_ROWS` rows or more."""
        w = self.prior
        acc = dict(w.acceptance)
        if self.proposed:
            acc[self.draft] = self.accepted / self.proposed
        per_step = {d: dict(v) for d, v in w.tokens_per_step.items()}
        mine = per_step.setdefault(self.draft, {})
        for g, rows in self.rows.items():
            if rows >= MIN_ROWS:
                mine[g] = self.emitted[g] / rows
        return dataclasses.replace(w, acceptance=acc, tokens_per_step=per_step)

    def predictions(self, batch: int) -> dict[int, Prediction]:
        """The tuner's prediction of each gamma at this batch size (the current workload)."""
        w = self.workload()
        overlap = self.hw.link.overlaps_compute
        return {g: predict(self.hw, self.shape, w, Plan(g, batch, self.cache_slots, "device",
                                                        self.draft if g else "none"), overlap=overlap)
                for g in self.gammas}

    def plan(self) -> dict[int, int]:
        """Re-plan: the fastest gamma of every batch bucket."""
        self.table = {}
        allowed = self.gammas[1:] if self.exploring else self.gammas
        for b in self.buckets:
            preds = self.predictions(b)
            self.table[b] = max(allowed, key=lambda g: (preds[g].tokens_per_s, -g))
        self._since_plan = 0
        return self.table

    def gamma_for(self, batch: int) -> int:
        for b in self.buckets:
            if batch <= b:
                return self.table[b]
        return self.table[self.buckets[-1]]

    def observe(self, gamma: int, draft_len_B: np.ndarray, accepted_B: np.ndarray) -> None:
        """One verify step's real rows: how many drafts each proposed and accepted."""
        n = len(draft_len_B)
        if n == 0:
            return
        self.rows[gamma] = self.rows.get(gamma, 0) + n
        self.emitted[gamma] = self.emitted.get(gamma, 0) + int(np.sum(accepted_B)) + n
        self.proposed += int(np.sum(draft_len_B))
        self.accepted += int(np.sum(accepted_B))
        self._since_plan += n
        if self.exploring and sum(self.rows.values()) >= MIN_ROWS:
            self.exploring = False
            self.plan()
        elif self._since_plan >= REPLAN_ROWS:
            self.plan()


@dataclasses.dataclass(frozen=True)
class EngineChoice:
    """What the tuner sets before serving: device expert slots per layer (None: not offloaded),
    whether to prefetch experts, and the gamma schedule."""

    expert_cache: int | None
    prefetch: bool
    schedule: GammaSchedule


def choose_engine(auto: AutoTune, cfg: Any, *, draft: str, draft_layers: int, gammas: Iterable[int],
                  max_batch: int, offload: bool, expert_cache: int | None = None,
                  log: Callable[[str], None] | None = None) -> EngineChoice:
    """The engine's configuration for `gamma="auto"` (module docstring). expert_cache: the user's
    slots per layer (kept); None lets the tuner size the cache. log: where a hardware measurement
    reports."""
    if auto.hardware is None:
        from jaxsys.serve.moe_offload.machine import measure_hardware

        hw = measure_hardware(cfg, context=auto.context, log=log)
    elif isinstance(auto.hardware, HardwareSpec):
        hw = auto.hardware
    else:
        hw = load_hardware(auto.hardware)
    shape = model_shape(cfg)
    w, measured = load_workload(auto, shape, draft, draft_layers)
    gammas = sorted(set(int(g) for g in gammas))
    if not offload:
        slots = shape.num_experts
    elif expert_cache is not None:
        slots = expert_cache
    else:
        widest = Plan(max(gammas), batch_buckets(max_batch)[-1], shape.top_k, "device", draft_key(draft, draft_layers))
        slots = max_cache_slots(hw, shape, widest, w.context)
        if slots < shape.top_k:
            raise TunerError(f"not even top-k ({shape.top_k}) experts per layer fit in {hw.name}'s accelerator memory "
                             f"beside the rest of the model and a batch of {widest.batch}; lower the max batch")
    schedule = GammaSchedule(hw, shape, w, draft=draft_key(draft, draft_layers), gammas=gammas,
                             max_batch=max_batch, cache_slots=slots, explore=not measured)
    return EngineChoice(slots if offload else None, bool(offload and hw.link.overlaps_compute), schedule)


def describe(choice: EngineChoice) -> str:
    """One line for logs: the cache, prefetch and gamma per batch bucket."""
    s = choice.schedule
    cache = f"expert cache {choice.expert_cache}/{s.shape.num_experts} per layer, prefetch " \
            f"{'on' if choice.prefetch else 'off'}; " if choice.expert_cache is not None else ""
    gam = ", ".join(f"{b}:{g}" for b, g in s.table.items())
    return f"{cache}gamma by batch {{{gam}}} ({s.hw.name})"
