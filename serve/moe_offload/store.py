"""Expert weights in host memory, and the per-layer device-side expert cache.

Host side: each expert's three matrices are packed into one flat buffer, so one fetch is one
transfer. They live in the `pinned_host` memory of the accelerator where the backend has one (JAX
memory kinds; XLA:CPU lists CPU_DEVICE, PINNED_HOST and UNPINNED_HOST memories, and a
`device_put` from pinned_host to device there is a real copy into a new buffer, which
`tests/test_moe_offload.py` checks), and in plain host numpy buffers otherwise.

Device side: `LayerExpertCache` holds `num_slots` experts of one layer in one donated buffer
[num_slots, expert_size]. After routing, `ensure` brings in the missing experts (the transfer is
asynchronous; the insertion is a jitted in-place update), evicting what the policy names among
experts this step does not need. `prefetch` does the same ahead of time for a guess.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsys.serve.moe_offload.policy import EvictionPolicy


class ExpertCacheError(ValueError):
    """An expert cache that cannot serve the model (e.g. fewer slots than experts per token)."""


def host_memory_kind(device: jax.Device) -> str | None:
    """'pinned_host' where the device's backend has that memory, else None (numpy buffers)."""
    try:
        kinds = {m.kind for m in device.addressable_memories()}
    except (AttributeError, NotImplementedError):
        return None
    return "pinned_host" if "pinned_host" in kinds else None


def pack_expert(gate_DxF: np.ndarray, up_DxF: np.ndarray, down_FxD: np.ndarray) -> np.ndarray:
    return np.concatenate([gate_DxF.ravel(), up_DxF.ravel(), down_FxD.ravel()])


def unpack_experts(flat_UxP: jax.Array, d_model: int, d_ff: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[U, 3 * D * F] -> gate [U, D, F], up [U, D, F], down [U, F, D] (free reshapes)."""
    U, n = flat_UxP.shape[0], d_model * d_ff
    return (flat_UxP[:, :n].reshape(U, d_model, d_ff), flat_UxP[:, n:2 * n].reshape(U, d_model, d_ff),
            flat_UxP[:, 2 * n:].reshape(U, d_ff, d_model))


class HostExpertStore:
    """All experts of all layers in host memory, one packed buffer per (layer, expert)."""

    def __init__(self, we_gate_LxExDxF: np.ndarray, we_up_LxExDxF: np.ndarray, we_down_LxExFxD: np.ndarray,
                 device: jax.Device):
        L, E, D, F = we_gate_LxExDxF.shape
        self.num_layers, self.num_experts, self.d_model, self.d_ff = L, E, D, F
        self.device = device
        self.memory_kind = host_memory_kind(device)
        self.dtype = np.dtype(we_gate_LxExDxF.dtype)
        self.expert_size = 3 * D * F
        self.expert_bytes = self.expert_size * self.dtype.itemsize
        host = (jax.sharding.SingleDeviceSharding(device, memory_kind=self.memory_kind)
                if self.memory_kind else None)
        self._buffers = [[self._place(pack_expert(we_gate_LxExDxF[l, e], we_up_LxExDxF[l, e],
                                                  we_down_LxExFxD[l, e]), host)
                          for e in range(E)] for l in range(L)]
        self.device_sharding = jax.sharding.SingleDeviceSharding(device)

    @staticmethod
    def _place(flat: np.ndarray, host_sharding):
        if host_sharding is None:
            return np.ascontiguousarray(flat)
        return jax.device_put(flat, host_sharding)

    def host_buffer(self, layer: int, expert: int):
        return self._buffers[layer][expert]

    def fetch(self, layer: int, expert: int) -> jax.Array:
        """Start the host-to-device copy of one expert; returns its device array (asynchronous)."""
        return jax.device_put(self._buffers[layer][expert], self.device_sharding)


@functools.partial(jax.jit, donate_argnums=0)
def _insert(buf_SxP: jax.Array, flat_P: jax.Array, slot: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(buf_SxP, flat_P.astype(buf_SxP.dtype), slot, 0)


@dataclasses.dataclass
class CacheCounters:
    hits: int = 0  # needed experts found in the cache
    misses: int = 0  # needed experts fetched after routing (on the critical path)
    prefetched: int = 0  # experts fetched ahead by prefetch
    prefetch_hits: int = 0  # needed experts that were there because prefetch brought them
    bytes_moved: int = 0  # host -> device bytes, misses and prefetches

    def add(self, other: "CacheCounters") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class LayerExpertCache:
    """`num_slots` experts of one layer on the device, with a replaceable eviction policy."""

    def __init__(self, store: HostExpertStore, layer: int, num_slots: int, policy: EvictionPolicy):
        if not 1 <= num_slots <= store.num_experts:
            raise ExpertCacheError(f"expert cache of {num_slots} slots per layer: must be in "
                                   f"[1, {store.num_experts}] (the layer's experts)")
        self.store, self.layer, self.num_slots, self.policy = store, layer, num_slots, policy
        self.buf = jax.device_put(jnp.zeros((num_slots, store.expert_size), store.dtype), store.device_sharding)
        self.expert_in_slot = [-1] * num_slots
        self.slot_of: dict[int, int] = {}
        self._from_prefetch: set[int] = set()
        self.counters = CacheCounters()

    def _place(self, expert: int, keep: set[int], step: int) -> None:
        free = [s for s, e in enumerate(self.expert_in_slot) if e < 0]
        if free:
            slot = free[0]
        else:
            evictable = [e for e in self.slot_of if e not in keep]
            if not evictable:
                raise ExpertCacheError(f"layer {self.layer}: all {self.num_slots} slots hold experts this "
                                       "step needs; pass at most num_slots experts at once")
            old = self.policy.victim(evictable)
            slot = self.slot_of.pop(old)
            self.policy.remove(old)
            self._from_prefetch.discard(old)
        self.buf = _insert(self.buf, self.store.fetch(self.layer, expert), jnp.int32(slot))
        self.expert_in_slot[slot] = expert
        self.slot_of[expert] = slot
        self.policy.access(expert, step)
        self.counters.bytes_moved += self.store.expert_bytes

    def ensure(self, experts: Sequence[int], step: int) -> list[int]:
        """Make `experts` resident (at most num_slots of them); returns their slots."""
        keep = set(experts)
        if len(keep) > self.num_slots:
            raise ExpertCacheError(f"{len(keep)} experts requested at once, cache has {self.num_slots} slots")
        for e in experts:
            if e in self.slot_of:
                self.counters.hits += 1
                if e in self._from_prefetch:
                    self.counters.prefetch_hits += 1
                    self._from_prefetch.discard(e)
                self.policy.access(e, step)
            else:
                self.counters.misses += 1
                self._place(e, keep, step)
        return [self.slot_of[e] for e in experts]

    def prefetch(self, experts: Iterable[int], step: int) -> None:
        """Bring in a guess of the next experts (never evicting another guessed one)."""
        guess = list(dict.fromkeys(experts))[:self.num_slots]
        keep = set(guess)
        for e in guess:
            if e not in self.slot_of:
                self._place(e, keep, step)
                self._from_prefetch.add(e)
                self.counters.prefetched += 1
