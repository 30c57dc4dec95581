"""Where membership events come from, and how a membership change is confirmed (detection).

* `ScheduledMembership`: the `--fail/--join` schedule of a single-process run. The run's devices
  are real; a "failed" device is fenced off: its buffers are deleted and nothing is placed on it
  again until it joins. Detection confirms the survivors answer (a small round trip to each).
* `DistributedMembership`: a multi-process `jax.distributed` job. At each step boundary every
  process calls `jax.experimental.multihost_utils.live_devices` (a barrier among live processes
  that returns the same live set to all of them; it needs `jax_enable_recoverability`), and the
  difference to the previous set becomes fail/join events. Detection latency is bounded by the
  coordination service's heartbeat timeout (`heartbeat_timeout_seconds` of
  `jax.distributed.initialize`).

Limitation: the elastic trainer itself runs single-controller (one process drives all of its
devices and moves shards with `jax.device_put`). In a multi-process job the membership monitor
reports changes correctly (tested with two local processes), but moving shards between processes
after a change is not implemented here.
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
    """Fail/join events from `jax.distributed` live-device checks (multi-process jobs).

    `devices`: the run's device list (global, all processes); event device numbers index it.
    """

    def __init__(self, devices: Sequence[jax.Device]):
        from jax._src import distributed

        if distributed.global_state.client is None:
            raise RuntimeError("membership=distributed needs jax.distributed.initialize() first")
        if not jax.config.jax_enable_recoverability:
            raise RuntimeError("membership=distributed needs jax.config.update("
                               "'jax_enable_recoverability', True) before jax.distributed.initialize()")
        self.devices = list(devices)
        self._index = {d.id: i for i, d in enumerate(self.devices)}
        self._live: set[int] = set(range(len(self.devices)))
        self._cached: tuple[int, list[MembershipEvent]] | None = None
        self.last_check_s = 0.0

    def check(self, boundary: int) -> list[MembershipEvent]:
        """Barrier with the live processes; the membership change since the last check.

        `boundary` b is the point between step b-1 and step b: failures found there are losses
        during step b-1, joins take part from step b. One check per boundary (cached)."""
        from jax.experimental import multihost_utils as mhu

        if self._cached is not None and self._cached[0] == boundary:
            return self._cached[1]
        t0 = time.perf_counter()
        try:
            with mhu.live_devices(self.devices) as live:
                now = {self._index[d.id] for d in live}
        except mhu.ProcessFailureError as e:
            now = self._live - {self._index[d.id] for d in e.failed_devices}
        self.last_check_s = time.perf_counter() - t0
        events = [MembershipEvent(boundary - 1, "fail", i) for i in sorted(self._live - now)]
        events += [MembershipEvent(boundary, "join", i) for i in sorted(now - self._live)]
        self._live = now
        self._cached = (boundary, events)
        return events

    def joins(self, step: int) -> list[MembershipEvent]:
        return [e for e in self.check(step) if e.kind == "join"]

    def failures(self, step: int) -> list[MembershipEvent]:
        return [e for e in self.check(step + 1) if e.kind == "fail"]
