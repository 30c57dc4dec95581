"""Who computes what, and in which order: work plans and pipeline schedules.

A `WorkPlan` says which device computes each (micro-batch, stage) pair of the global batch. The
failure-free plan is a grid of `dp` pipelines of `pp` stages: pipeline d is devices
d*pp .. d*pp+pp-1 and computes a contiguous block of the M micro-batches. Recovery strategies
are other plans over the same M micro-batches (`jaxsys.train.recovery`): rerouting gives a
failed stage's micro-batches to that stage's data-parallel peers, redundancy gives them to a
neighbouring stage of the same pipeline.

`compile_schedule` turns a plan into rounds: in each round every device runs at most one op
- F(m, s): stage s's forward of micro-batch m (not for the last stage),
- B(m, s): stage s's backward of m (each layer's VJP from its kept input); on the last stage it
  starts with the stage's forward and the loss, so the last stage has no separate forward,
and its output (an activation for F, the input's cotangent for B) goes to the device that needs
it, usable from the next round. The choice of op per round is greedy under the schedule's rule:

* `gpipe`: a device runs all its forwards (in micro-batch order) before any backward;
* `1f1b`: a device prefers a ready backward, and runs a forward only while fewer than
  `pp - s` micro-batches are in flight on stage s (the PipeDream-flush / Megatron rule),
  so a stage keeps the activations of at most pp - s micro-batches instead of all of them.

The executor (`jaxsys.train.pipeline.step.run_schedule`) dispatches each device's ops in round
order; dispatch is asynchronous, so the rounds fix each device's order, not a lockstep. The
tables also give what the performance model is validated against: bubble slots, micro-batches in
flight per device, received tensors held at once, tensors sent between devices.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import numpy as np

from jaxsys.train.elastic.layout import MicroBatchPlan

ScheduleKind = Literal["gpipe", "1f1b"]
SCHEDULES: tuple[str, ...] = ("gpipe", "1f1b")

IDLE, FWD, BWD = 0, 1, 2


class ScheduleError(ValueError):
    """A plan or schedule that cannot run (bad grid, unknown kind, a deadlock)."""


@dataclasses.dataclass(frozen=True)
class WorkPlan:
    """device_of[m][s]: index (into the step's device list) of the device that computes micro-batch
    m at stage s (both its forward and its backward)."""

    num_devices: int
    device_of: tuple[tuple[int, ...], ...]

    @classmethod
    def grid(cls, dp: int, pp: int, num_micro: int) -> "WorkPlan":
        """dp pipelines of pp stages on dp*pp devices; pipeline d is devices d*pp .. d*pp+pp-1 and
        computes the d-th balanced block of the micro-batches."""
        if dp < 1 or pp < 1:
            raise ScheduleError(f"dp and pp must be >= 1, got dp={dp} pp={pp}")
        if num_micro < dp:
            raise ScheduleError(f"{num_micro} micro-batches cannot feed {dp} pipelines")
        blocks = MicroBatchPlan.balanced(num_micro, dp).assignment
        dev = [None] * num_micro
        for d, ms in enumerate(blocks):
            for m in ms:
                dev[m] = tuple(d * pp + s for s in range(pp))
        return cls(dp * pp, tuple(dev))

    @property
    def num_micro(self) -> int:
        return len(self.device_of)

    @property
    def num_stages(self) -> int:
        return len(self.device_of[0])

    def stages_of(self, device: int) -> tuple[int, ...]:
        """The stages whose parameters `device` needs (sorted)."""
        return tuple(sorted({s for row in self.device_of for s, d in enumerate(row) if d == device}))

    def work(self, device: int) -> list[tuple[int, int]]:
        return [(m, s) for m, row in enumerate(self.device_of) for s, d in enumerate(row) if d == device]

    def used_devices(self) -> tuple[int, ...]:
        return tuple(sorted({d for row in self.device_of for d in row}))

    def widened(self, num_devices: int) -> "WorkPlan":
        """The same work on a list of `num_devices` devices: the extra devices compute nothing and
        only hold their shard of the train state."""
        if num_devices < self.num_devices:
            raise ScheduleError(f"cannot narrow a plan for {self.num_devices} devices to {num_devices}")
        return WorkPlan(num_devices, self.device_of)

    def renumbered(self, keep: Sequence[int]) -> "WorkPlan":
        """The same plan on the device list `keep` (old indices, in their new order); every device
        with work must be kept."""
        new = {old: i for i, old in enumerate(keep)}
        missing = sorted(set(self.used_devices()) - set(new))
        if missing:
            raise ScheduleError(f"devices {missing} still have work in this plan")
        return WorkPlan(len(keep), tuple(tuple(new[d] for d in row) for row in self.device_of))


@dataclasses.dataclass(frozen=True)
class ScheduleTables:
    """The compiled schedule: rounds of ops per device and the buffer bookkeeping (numpy int32)."""

    kind: str
    plan: WorkPlan
    op: np.ndarray          # [N, R] IDLE / FWD / BWD
    stage: np.ndarray       # [N, R]
    micro: np.ndarray       # [N, R]
    grad_slot: np.ndarray   # [N, R] gradient/loss slot written by a BWD (-1 otherwise)
    param_stages: np.ndarray  # [N, Rp] stages whose parameters each device holds (-1: none)
    grad_stage: np.ndarray    # [N, G] stage of each gradient slot (-1: unused)
    grad_row: np.ndarray      # [M, pp] row (device * G + slot) of each (micro, stage) gradient
    peak_buffers: np.ndarray  # [N] received activations/cotangents each device holds at once
    sends: int                # tensors sent between distinct devices per step

    @property
    def num_devices(self) -> int:
        return self.op.shape[0]

    @property
    def num_rounds(self) -> int:
        return self.op.shape[1]

    @property
    def num_grad_slots(self) -> int:
        return self.grad_stage.shape[1]

    @property
    def num_param_slots(self) -> int:
        return self.param_stages.shape[1]

    @property
    def num_stages(self) -> int:
        return self.plan.num_stages

    def busy_slots(self) -> np.ndarray:
        """[N] rounds in which each device runs an op."""
        return (self.op != IDLE).sum(axis=1)

    def bubble_fraction(self) -> float:
        """Idle device-rounds over all device-rounds of the devices with work (slot count; the
        time-weighted bubble, where a backward is longer than a forward, is the performance
        model's)."""
        used = list(self.plan.used_devices())
        busy = self.busy_slots()[used]
        return float(1.0 - busy.sum() / (len(used) * self.num_rounds))

    def peak_in_flight(self) -> np.ndarray:
        """[N] most micro-batches whose forward ran and whose backward has not, on each device
        (the activations it keeps)."""
        out = np.zeros(self.num_devices, np.int64)
        last = self.num_stages - 1
        for d in range(self.num_devices):
            live = 0
            for r in range(self.num_rounds):
                if self.op[d, r] == FWD:
                    live += 1
                elif self.op[d, r] == BWD and self.stage[d, r] < last:
                    live -= 1
                out[d] = max(out[d], live)
        return out


def compile_schedule(plan: WorkPlan, kind: str) -> ScheduleTables:
    """Rounds of ops and their counts for `plan` under schedule `kind` (see the module docstring)."""
    if kind not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {kind!r}; known: {', '.join(SCHEDULES)}")
    M, pp, N = plan.num_micro, plan.num_stages, plan.num_devices
    last = pp - 1
    ops_of: list[list[tuple[int, int, int]]] = [[] for _ in range(N)]  # (kind, m, s)
    for m, row in enumerate(plan.device_of):
        for s, d in enumerate(row):
            if not 0 <= d < N:
                raise ScheduleError(f"micro-batch {m} stage {s} on device {d}, outside 0..{N - 1}")
            if s < last:
                ops_of[d].append((FWD, m, s))
            ops_of[d].append((BWD, m, s))
    ready: dict[tuple[int, int, int], int] = {}
    for m in range(M):
        ready[(FWD, m, 0) if pp > 1 else (BWD, m, 0)] = 0
    done: set[tuple[int, int, int]] = set()
    in_flight = [dict() for _ in range(N)]  # device -> stage -> forwards whose backward is pending
    rounds: list[list[tuple[int, int, int] | None]] = []
    total = sum(len(o) for o in ops_of)
    stall = 0
    while len(done) < total:
        r = len(rounds)
        row: list[tuple[int, int, int] | None] = []
        for d in range(N):
            cands = [o for o in ops_of[d] if o not in done and ready.get(o, 1 << 30) <= r]
            pick = None
            fwd_left = any(o[0] == FWD and o not in done for o in ops_of[d])
            fwds = sorted((o for o in cands if o[0] == FWD), key=lambda o: (o[1], o[2]))
            bwds = sorted((o for o in cands if o[0] == BWD), key=lambda o: (o[1], -o[2]))
            if kind == "gpipe":
                pick = fwds[0] if fwds else (bwds[0] if bwds and not fwd_left else None)
            else:
                if bwds:
                    pick = bwds[0]
                else:
                    for o in fwds:
                        if in_flight[d].get(o[2], 0) < pp - o[2]:
                            pick = o
                            break
            row.append(pick)
        for d, o in enumerate(row):
            if o is None:
                continue
            k, m, s = o
            done.add(o)
            if k == FWD:
                in_flight[d][s] = in_flight[d].get(s, 0) + 1
                ready[(FWD, m, s + 1) if s + 1 < last else (BWD, m, s + 1)] = r + 1
            else:
                if s < last:
                    in_flight[d][s] -= 1
                if s > 0:
                    # B(m, s-1) needs this cotangent and its own forward, done earlier
                    ready[(BWD, m, s - 1)] = r + 1
        rounds.append(row)
        stall = stall + 1 if all(o is None for o in row) else 0
        if stall > 2 * (M + pp) + 4:
            raise ScheduleError(f"schedule {kind} deadlocks on this plan (no op can run)")
    return _tables(plan, kind, rounds)


def _tables(plan: WorkPlan, kind: str, rounds) -> ScheduleTables:
    M, pp, N = plan.num_micro, plan.num_stages, plan.num_devices
    last = pp - 1
    R = len(rounds)
    when: dict[tuple[int, int, int], int] = {}
    for r, row in enumerate(rounds):
        for o in row:
            if o is not None:
                when[o] = r
    # tensors: (m, s, "x") = input activation of stage s (output of F(m, s-1)), kept until B(m, s);
    #          (m, s, "ct") = cotangent of stage s's output (output of B(m, s+1)), used by B(m, s).
    events = []  # (arrival round, last reading round, device, key, source device, producing round)
    for m in range(M):
        for s in range(1, pp):
            prod = (FWD, m, s - 1)
            events.append((when[prod] + 1, when[(BWD, m, s)], plan.device_of[m][s], (m, s, "x"),
                           plan.device_of[m][s - 1], when[prod]))
        for s in range(pp - 1):
            prod = (BWD, m, s + 1)
            events.append((when[prod] + 1, when[(BWD, m, s)], plan.device_of[m][s], (m, s, "ct"),
                           plan.device_of[m][s + 1], when[prod]))
    live = [0] * N
    peak = np.zeros(N, np.int64)
    for r in range(R + 1):
        # a tensor is held from its arrival until the round its consumer (a backward) reads it
        for ev in events:
            if ev[1] == r - 1:
                live[ev[2]] -= 1
        for ev in events:
            if ev[0] == r:
                live[ev[2]] += 1
                peak[ev[2]] = max(peak[ev[2]], live[ev[2]])
    shape = (N, R)
    op = np.zeros(shape, np.int32)
    stage = np.zeros(shape, np.int32)
    micro = np.zeros(shape, np.int32)
    grad_slot = np.full(shape, -1, np.int32)
    n_grad = [0] * N
    grad_row = np.zeros((M, pp), np.int32)
    grad_stage_l: list[list[int]] = [[] for _ in range(N)]
    for r, row in enumerate(rounds):
        for d, o in enumerate(row):
            if o is None:
                continue
            k, m, s = o
            op[d, r], stage[d, r], micro[d, r] = k, s, m
            if k == BWD:
                grad_slot[d, r] = n_grad[d]
                grad_stage_l[d].append(s)
                n_grad[d] += 1
    G = max(1, max(n_grad))
    grad_stage = np.full((N, G), -1, np.int32)
    for d in range(N):
        grad_stage[d, :len(grad_stage_l[d])] = grad_stage_l[d]
    for d in range(N):
        for r in range(R):
            if op[d, r] == BWD:
                grad_row[micro[d, r], stage[d, r]] = d * G + grad_slot[d, r]
    sends = sum(1 for ev in events if ev[4] != ev[2])
    held = [plan.stages_of(d) for d in range(N)]
    Rp = max(1, max(len(h) for h in held))
    param_stages = np.full((N, Rp), -1, np.int32)
    for d, h in enumerate(held):
        param_stages[d, :len(h)] = h
    return ScheduleTables(kind, plan, op, stage, micro, grad_slot, param_stages, grad_stage, grad_row, peak, sends)
