"""Engine instances on sub-meshes of the devices (issue 18 D).

An instance is one serving engine (parameters, KV cache, compiled steps) with its own scheduler,
on its own group of devices: `make_instances(model, 4, devices_per_instance=2)` splits the 8
virtual CPU devices (or a host's GPUs) into 4 meshes of 2, each with the heads on `tensor`, so
the instances share nothing but the host. A `LengthTracker` per instance predicts its running
requests' remaining lengths from its own decode hidden states (ARES/STAR).

Concurrency: each instance has a lock held around every scheduler step; a migration holds the
locks of both ends (taken in index order), so it never races a step. `router.Cluster` runs the
steps (one thread per instance, or all on the caller's thread). Any other thread takes the lock
through `locked()`, which the stepping thread lets through between two steps: a plain lock is
not fair, and a thread that steps back to back takes it again at once (waits of many steps).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator, Sequence

import jax

from jaxsys.serve.engine.engine import Engine, EngineConfig
from jaxsys.serve.engine.shared_decode import make_shared_decode
from jaxsys.serve.length.predictor import LengthPredictor
from jaxsys.serve.length.serving import LengthTracker
from jaxsys.serve.scheduler.scheduler import Scheduler
from jaxsys.sharding import make_mesh

__all__ = ["Instance", "make_instances"]


class Instance:
    """One engine + scheduler on its own devices. `alive` turns False when it is shut down."""

    def __init__(self, index: int, model, devices: Sequence[jax.Device], config: EngineConfig, *,
                 predictor: LengthPredictor | None = None, predict_every: int = 8, track: bool = True):
        self.index = index
        self.devices = list(devices)
        self.mesh = make_mesh({"tensor": len(self.devices)}, devices=self.devices)
        attention, builder = None, None
        if config.shared_attention:
            attention, builder = make_shared_decode(model.config, config)
        self.engine = Engine(model.config, model.params, config, mesh=self.mesh, decode_attention=attention)
        self.scheduler = Scheduler(self.engine, model.tokenizer, shared_step_builder=builder)
        self.tracker: LengthTracker | None = None
        if track:
            self.tracker = LengthTracker(predictor, every=predict_every)
            self.tracker.attach(self.scheduler)
        self.lock = threading.RLock()
        self._waiters = 0  # threads waiting in `locked()`
        self._waiters_lock = threading.Lock()
        self.wake = threading.Event()
        self.alive = True
        self.steps = 0
        self._kv_scatter = None  # the jitted write of migrated-in KV pages (`migration`), built on first use

    # ---------------------------------------------------------------- the lock
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the instance's lock from a thread other than its stepping thread (fairly: see the
        module docstring)."""
        with self._waiters_lock:
            self._waiters += 1
        try:
            self.lock.acquire()
        finally:
            with self._waiters_lock:
                self._waiters -= 1
        try:
            yield
        finally:
            self.lock.release()

    def yield_lock(self) -> None:
        """Called by the stepping thread between steps (lock released): wait while another thread
        waits for the lock, so that it gets it before the next step."""
        while self._waiters and self.alive:
            time.sleep(50e-6)

    # ---------------------------------------------------------------- load
    def load(self) -> dict:
        """What `/metrics` and the policies read (call with the lock held for a consistent view)."""
        s = self.scheduler
        used = s.pages.capacity - s.pages.num_free - s.radix.evictable_pages()
        return {"instance": self.index, "alive": self.alive, "devices": [d.id for d in self.devices],
                "running": len(s.running), "prefilling": len(s.prefilling), "waiting": s.queue_length,
                "kv_tokens": sum(r.total_len for r in s.running) + sum(r.num_computed for r in s.prefilling),
                "used_pages": used, "capacity_pages": s.pages.capacity,
                "decode_steps": s.stats.decode_steps, "generated_tokens": s.stats.generated_tokens,
                "compiles": self.engine.compile_count}

    def __repr__(self) -> str:
        return f"Instance({self.index}, devices={[d.id for d in self.devices]}, alive={self.alive})"


def make_instances(model, num_instances: int, *, devices_per_instance: int | None = None,
                   config: EngineConfig = EngineConfig(), predictor: LengthPredictor | None = None,
                   predict_every: int = 8, devices: Sequence[jax.Device] | None = None) -> list[Instance]:
    """`num_instances` instances of `model` over disjoint groups of `devices` (default: all), each
    of `devices_per_instance` devices (default: as many as divide evenly). A usable `predictor`
    runs in every instance (`LengthTracker`, every `predict_every` decode steps)."""
    devices = list(jax.devices() if devices is None else devices)
    if num_instances < 1:
        raise ValueError(f"num_instances must be >= 1, got {num_instances}")
    per = devices_per_instance or len(devices) // num_instances
    if per < 1 or per * num_instances > len(devices):
        raise ValueError(f"{num_instances} instances x {per} devices need {num_instances * per} devices; "
                         f"there are {len(devices)}")
    track = LengthTracker.unusable_reason(predictor) is None  # else the router warns and balances on load
    return [Instance(i, model, devices[i * per:(i + 1) * per], config, predictor=predictor,
                     predict_every=predict_every, track=track) for i in range(num_instances)]
