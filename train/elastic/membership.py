"""Where membership events come from, and how a membership change is confirmed (detection).

* `ScheduledMembership`: the `--fail/--join` schedule of a single-process run. The run's devices
  are real; a "failed" device is fenced off: its buffers are deleted and nothing is placed on it
  again until it joins. Detection confirms the survivors answer (a small round trip to each).
* `DistributedMembership`: a multi-process `jax.distributed` job. At each step boundary every
  process asks the coordination service for the live processes (`get_live_nodes`: a barrier
  among the live processes that returns the same set, with each process's incarnation, to all of
  them; it needs `jax_enable_recoverability`), and the difference to the previous answer becomes
  fail/join events. A process that died and came back between two checks (a new incarnation)
  is a failure and a join at the same boundary. Detection latency is bounded by the coordination
  service's heartbeat timeout (`heartbeat_timeout_seconds` of `jax.distributed.initialize`).
  `meet` is the same barrier among some of the processes (the survivors before their first
  collective over a new mesh): it reports those of them that died since.
  `jaxsys.train.elastic.multiprocess.DistributedElasticStep` moves the state between processes
  after such a change.
"""

from __future__ import annotations

import time
from typing import Sequence

import jax
import numpy as np

from jaxsys.train.elastic.events import EventSchedule, MembershipEvent


def probe(devices: Sequence[jax.Device]) -> float:
    """Round-trip a tiny buffer through every device; returns the seconds it took."""
    t0 = time.perf_counter()
    bufs = [jax.device_put(np.zeros((1,), np.float32), d) for d in devices]
    for b in bufs:
        b.block_until_ready()
    return time.perf_counter() - t0


class ScheduledMembership:
    """Events from a schedule (`--fail DEV@STEP`, `--join DEV@STEP`)."""

    def __init__(self, schedule: EventSchedule):
        self.schedule = schedule

    def joins(self, step: int) -> list[MembershipEvent]:
        return self.schedule.at(step, "join")

    def failures(self, step: int) -> list[MembershipEvent]:
        return self.schedule.at(step, "fail")


class DistributedMembership:
    """Fail/join events from `jax.distributed` live-process checks (multi-process jobs).

    `devices`: the run's device list (global, all processes); event device numbers index it.
    One check per step boundary; every live process must make it (it is a barrier).
    """

    def __init__(self, devices: Sequence[jax.Device]):
        self.devices = list(devices)
        self.client = distributed_client()
        self._processes = sorted({d.process_index for d in self.devices})
        self._live: set[int] = set(range(len(self.devices)))
        self._incarnations: dict[int, int] | None = None
        self._cached: tuple[int, list[MembershipEvent]] | None = None
        self.last_check_s = 0.0

    @property
    def live(self) -> list[int]:
        """Indices of the devices in service after the last check."""
        return sorted(self._live)

    def adopt(self, live: Sequence[int]) -> None:
        """Take `live` as the devices in service (a process that joins a running job learns them
        from its peers)."""
        self._live = set(live)

    def live_processes(self) -> dict[int, int]:
        """{process index: incarnation} of the live processes (a barrier among them)."""
        return dict(self.client.get_live_nodes(self._processes))

    def meet(self, processes: Sequence[int]) -> list[int]:
        """A barrier among those of `processes` that are alive; returns those of them that are gone.

        `get_live_nodes` leaves a process out once its heartbeats stop, where a named barrier
        (`wait_at_barrier`) waits for a dead member until its timeout. The devices of the gone
        processes leave `live`, so the next `check` does not report them again."""
        alive = self.client.get_live_nodes(sorted(processes))
        gone = sorted(set(processes) - set(alive))
        if gone:
            self._live -= {i for i, d in enumerate(self.devices) if d.process_index in gone}
            if self._incarnations is not None:
                self._incarnations = {p: inc for p, inc in self._incarnations.items() if p not in gone}
        return gone

    def check(self, boundary: int) -> list[MembershipEvent]:
        """Barrier with the live processes; the membership change since the last check.

        `boundary` b is the point between step b-1 and step b: failures found there are losses
        during step b-1, joins take part from step b. One check per boundary (cached)."""
        if self._cached is not None and self._cached[0] == boundary:
            return self._cached[1]
        t0 = time.perf_counter()
        alive = self.live_processes()
        self.last_check_s = time.perf_counter() - t0
        restarted = set()
        if self._incarnations is not None:
            restarted = {p for p, inc in alive.items() if p in self._incarnations and self._incarnations[p] != inc}
        self._incarnations = alive
        now = {i for i, d in enumerate(self.devices) if d.process_index in alive}
        again = {i for i in now if self.devices[i].process_index in restarted}
        lost, joined = (self._live - now) | (self._live & again), (now - self._live) | (self._live & again)
        events = [MembershipEvent(boundary - 1, "fail", i) for i in sorted(lost)]
        events += [MembershipEvent(boundary, "join", i) for i in sorted(joined)]
        self._live = now
        self._cached = (boundary, events)
        return events

    def joins(self, step: int) -> list[MembershipEvent]:
        return [e for e in self.check(step) if e.kind == "join"]

    def failures(self, step: int) -> list[MembershipEvent]:
        return [e for e in self.check(step + 1) if e.kind == "fail"]


def distributed_client():
    """The `jax.distributed` client of this process; a clear error when the job is not set up for
    membership checks."""
    from jax._src import distributed

    if distributed.global_state.client is None:
        raise RuntimeError("membership=distributed needs jax.distributed.initialize() first")
    if not jax.config.jax_enable_recoverability:
        raise RuntimeError("membership=distributed needs jax.config.update("
                           "'jax_enable_recoverability', True) before jax.distributed.initialize()")
    return distributed.global_state.client
