"""The transfer planner: build the new layout's shards from the surviving copies of the old ones.

Old layout: N devices, shard k = flat elements [k*S, (k+1)*S) held by device k (primary) and by
device k+1 mod N (replica). New layout: N' devices, shard j = [j*S', (j+1)*S'). For every new shard
the planner cuts its range at old shard boundaries and picks, for each piece, a surviving holder
of that old shard, preferring the destination itself (a local copy moves nothing over the
network), then the primary, then the replica. The plan is a list of `Transfer`s with these
properties (property-tested in tests/test_elastic_planner.py):

* no source is a lost device;
* each destination's pieces are disjoint and cover exactly its shard's real elements;
* each destination receives at most ceil(P / N') elements (its shard), i.e. the state is spread
  evenly and nothing is sent twice.

The plan is pure Python; `execute` runs it with jax: a piece is cut on its source device by a
small precompiled slice program, copied device-to-device with `jax.device_put`, and the pieces of
a destination are concatenated there (precompiled too; see `jaxsys.train.elastic.compile`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

from jaxsys.train.elastic.layout import FlatLayout, ceil_div


class UnrecoverableError(RuntimeError):
    """No surviving copy of some shard (e.g. a device and the one holding its replica were lost)."""


@dataclasses.dataclass(frozen=True)
class Transfer:
    src: int
    """Device id that sends (may equal dst: a local copy)."""
    dst: int
    copy: Literal["primary", "replica"]
    shard: int
    """Old shard index the piece comes from."""
    src_offset: int
    """Offset inside the old shard's buffer."""
    dst_offset: int
    """Offset inside the new shard's buffer."""
    length: int

    @property
    def local(self) -> bool:
        return self.src == self.dst


@dataclasses.dataclass(frozen=True)
class TransferPlan:
    old: FlatLayout
    new: FlatLayout
    lost: frozenset[int]
    transfers: tuple[Transfer, ...]

    def for_destination(self, dst: int) -> list[Transfer]:
        return sorted((t for t in self.transfers if t.dst == dst), key=lambda t: t.dst_offset)

    def bytes_by_destination(self, itemsize: int = 4, rows: int = 1) -> dict[int, int]:
        out = {d: 0 for d in self.new.device_ids}
        for t in self.transfers:
            out[t.dst] += t.length * itemsize * rows
        return out

    def network_elements(self) -> int:
        return sum(t.length for t in self.transfers if not t.local)


def plan_transfers(old: FlatLayout, new_devices: Sequence[int], lost: Sequence[int] = (), *,
                   use_replicas: bool = True) -> TransferPlan:
    """Plan how to build the layout over `new_devices` from `old` after losing `lost`.

    use_replicas: whether replicas exist as sources (a snapshot), or only the primaries (the live
    state, e.g. when a device joins)."""
    lost_set = frozenset(lost)
    if set(new_devices) & lost_set:
        raise ValueError(f"new devices {sorted(set(new_devices) & lost_set)} are lost")
    if len(set(new_devices)) != len(new_devices) or not new_devices:
        raise ValueError("new_devices must be distinct and non-empty")
    new = dataclasses.replace(old, device_ids=tuple(new_devices))
    transfers: list[Transfer] = []
    S, S2 = old.shard_size, new.shard_size
    for j, dst in enumerate(new.device_ids):
        lo, hi = new.shard_range(j)
        pos = lo
        while pos < hi:
            k = pos // S
            end = min(hi, (k + 1) * S)
            holders = [("primary", old.primary_holder(k))]
            if use_replicas:
                holders.append(("replica", old.replica_holder(k)))
            alive = [(c, d) for c, d in holders if d not in lost_set]
            if not alive:
                raise UnrecoverableError(
                    f"shard {k} (elements {k * S}-{min((k + 1) * S, old.num_params) - 1}) is lost: "
                    f"every copy ({', '.join(f'{c} on device {d}' for c, d in holders)}) is gone")
            local = [(c, d) for c, d in alive if d == dst]
            copy, src = (local or alive)[0]
            transfers.append(Transfer(src=src, dst=dst, copy=copy, shard=k, src_offset=pos - k * S,
                                      dst_offset=pos - j * S2, length=end - pos))
            pos = end
    return TransferPlan(old, new, lost_set, tuple(transfers))


def check_plan(plan: TransferPlan) -> None:
    """Assert the planner's invariants (used by tests and, cheaply, before executing)."""
    old, new = plan.old, plan.new
    bound = ceil_div(old.num_params, new.n)
    for t in plan.transfers:
        assert t.src not in plan.lost, f"source {t.src} is lost"
        holder = old.primary_holder(t.shard) if t.copy == "primary" else old.replica_holder(t.shard)
        assert holder == t.src, f"device {t.src} does not hold the {t.copy} of shard {t.shard}"
        a, b = old.shard_range(t.shard)
        assert 0 <= t.src_offset and a + t.src_offset + t.length <= b, "source range out of shard"
    for j, dst in enumerate(new.device_ids):
        lo, hi = new.shard_range(j)
        pieces = plan.for_destination(dst)
        cur = 0
        for t in pieces:
            assert t.dst_offset == cur, f"gap or overlap at destination {dst} offset {cur}"
            src_global = t.shard * old.shard_size + t.src_offset
            assert src_global == lo + t.dst_offset, "piece lands at the wrong position"
            cur += t.length
        assert cur == hi - lo, f"destination {dst} gets {cur} elements, needs {hi - lo}"
        assert cur <= bound, f"destination {dst} gets {cur} > ceil(P/N') = {bound} elements"
