"""Membership changes as events.

`fail DEV@STEP`: device DEV (an index into the run's device list, i.e. `jax.devices()` order) is lost
while step STEP runs; that step's result is discarded and the step is re-run on the survivors.
`join DEV@STEP`: device DEV is (back) in service from step STEP on.

Events come from the command line / config (`EventSchedule`) or from the live-device check of a
multi-process `jax.distributed` job (`jaxsys.train.elastic.membership.DistributedMembership`).
`EventSchedule.validate` replays the schedule before any compute and rejects what cannot run:
unknown devices, steps outside the run, failing a device that is already out, joining one that is
in, losing every device, and losing two devices that hold each other's replica at once (no copy of
that shard survives in memory) when there is no checkpoint to fall back to.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Literal, Sequence

EventKind = Literal["fail", "join"]
_EVENT_RE = re.compile(r"^\s*(\d+)\s*@\s*(\d+)\s*$")


class EventSpecError(ValueError):
    """A malformed or impossible membership event."""


@dataclasses.dataclass(frozen=True, order=True)
class MembershipEvent:
    step: int
    kind: EventKind
    device: int

    def __str__(self) -> str:
        return f"{self.kind} {self.device}@{self.step}"


def parse_event(text: str, kind: EventKind) -> MembershipEvent:
    """`"3@20"` -> MembershipEvent(step=20, kind, device=3)."""
    m = _EVENT_RE.match(str(text))
    if not m:
        raise EventSpecError(f"malformed --{kind} event {text!r}: expected DEV@STEP with integers, "
                             f"e.g. 3@20 (device 3 at step 20); separate several with commas")
    return MembershipEvent(step=int(m.group(2)), kind=kind, device=int(m.group(1)))


def parse_events(specs: str | Iterable[str], kind: EventKind) -> list[MembershipEvent]:
    """`"3@20,5@30"` or `["3@20", "5@30"]` -> events."""
    if isinstance(specs, str):
        specs = [specs]
    out = []
    for spec in specs:
        for part in str(spec).split(","):
            if part.strip():
                out.append(parse_event(part, kind))
    return out


def ring_neighbours(active: Sequence[int]) -> dict[int, int]:
    """Device -> the device that holds its replica (the next one in the active order, cyclic)."""
    order = sorted(active)
    return {d: order[(i + 1) % len(order)] for i, d in enumerate(order)}


@dataclasses.dataclass(frozen=True)
class EventSchedule:
    events: tuple[MembershipEvent, ...] = ()

    @classmethod
    def from_specs(cls, fail: Iterable[str] = (), join: Iterable[str] = ()) -> "EventSchedule":
        evs = parse_events(list(fail), "fail") + parse_events(list(join), "join")
        return cls(tuple(sorted(evs)))

    def at(self, step: int, kind: EventKind) -> list[MembershipEvent]:
        return [e for e in self.events if e.step == step and e.kind == kind]

    def __bool__(self) -> bool:
        return bool(self.events)

    def device_sets(self, num_devices: int, *, start_step: int = 0,
                    initial: Iterable[int] | None = None) -> list[tuple[int, ...]]:
        """The active device sets the schedule passes through from `start_step` on, starting
        from `initial` (default: all devices); events that change nothing are skipped."""
        active = set(range(num_devices)) if initial is None else set(initial)
        sets = [tuple(sorted(active))]
        for step in sorted({e.step for e in self.events if e.step >= start_step}):
            for kind in ("join", "fail"):
                for e in self.at(step, kind):
                    (active.add if kind == "join" else active.discard)(e.device)
                if tuple(sorted(active)) != sets[-1]:
                    sets.append(tuple(sorted(active)))
        return sets

    def validate(self, *, num_devices: int, steps: int, start_step: int = 0,
                 has_checkpoint: bool = False, initial_active: Iterable[int] | None = None) -> None:
        """Replay the schedule; raise EventSpecError naming the first event that cannot run."""
        active = set(range(num_devices)) if initial_active is None else set(initial_active)
        for e in self.events:
            flag = f"--{e.kind} {e.device}@{e.step}"
            if not 0 <= e.device < num_devices:
                have = f"{num_devices} devices (0-{num_devices - 1})" if num_devices > 1 else "1 device (0)"
                raise EventSpecError(f"{flag}: device {e.device} does not exist; this run has {have}")
            if not start_step <= e.step < steps:
                raise EventSpecError(f"{flag}: step {e.step} is outside the run "
                                     f"(steps {start_step}-{steps - 1})")
        for step in sorted({e.step for e in self.events}):
            # joins take effect before the step runs, failures during it
            for e in self.at(step, "join"):
                if e.device in active:
                    raise EventSpecError(f"--join {e.device}@{step}: device {e.device} is already "
                                         f"in service at step {step}")
                active.add(e.device)
            fails = self.at(step, "fail")
            lost = {e.device for e in fails}
            for e in fails:
                if e.device not in active:
                    raise EventSpecError(f"--fail {e.device}@{step}: device {e.device} is not in "
                                         f"service at step {step} (already lost?)")
            if len(fails) != len(lost):
                raise EventSpecError(f"step {step}: the same device fails twice")
            if lost and lost >= active:
                raise EventSpecError(f"step {step}: every device would be lost; at least one must "
                                     f"survive")
            if lost and not has_checkpoint:
                holder = ring_neighbours(sorted(active))
                for d in sorted(lost):
                    if holder[d] in lost and holder[d] != d:
                        raise EventSpecError(
                            f"step {step}: devices {d} and {holder[d]} fail together, but device "
                            f"{holder[d]} holds the only replica of device {d}'s shard, so that "
                            f"shard survives nowhere in memory; stagger the failures or set "
                            f"checkpoint.dir to fall back to the last checkpoint")
            active -= lost
