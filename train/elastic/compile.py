"""Executables for the likely device sets, compiled ahead of time in the background.

A recovery must not wait for XLA. Two observations make that cheap:

* An SPMD program for N devices does not depend on *which* N devices run it: the compiled code is
  the same, only the device assignment differs. `retarget` loads a compiled executable onto another
  device set of the same size (serialize, then deserialize with the device ids remapped and a new
  device assignment; jax's persistent compilation cache does the same on GPU, where it strips the
  device assignment from its keys): milliseconds for small programs, ~0.15 s for the benchmark
  model's step on CPU, against seconds (here) to minutes (large models) for a compile. So after
  one device is lost from N, a single compile for N-1 devices covers every one of the N possible
  survivor sets.
* Compiling happens on a background thread (`background`) while the training loop runs.

`ExecutableCache.get` returns a cached executable, else retargets one of the same size (SPMD
programs only: single-device programs are the small transfer/repair programs, which compile in
milliseconds, and a CI run on jax 0.10 saw a deserialized single-device CPU executable fail with
``NOT_FOUND: Function ... not found``), else compiles (waiting for an in-flight background
compile of the same program instead of starting a second one). Every non-cached get is recorded
(how, seconds); recovery timings and the benchmark report them.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import io
import threading
import time
from typing import Any, Callable, Hashable, Sequence

import jax
import numpy as np

Builder = Callable[[Sequence[jax.Device]], tuple[Any, tuple]]
"""devices -> (jitted function, abstract args for `.lower`)."""


@dataclasses.dataclass(frozen=True)
class CompileRecord:
    name: str
    num_devices: int
    how: str  # "cached" | "retargeted" | "compiled" | "waited"
    seconds: float


def _compile_options_for(devices: Sequence[jax.Device]):
    from jax._src import compiler

    return compiler.get_compile_options(
        num_replicas=1, num_partitions=len(devices),
        device_assignment=np.array(list(devices), dtype=object)[None, :])


def retarget(compiled: Any, old_devices: Sequence[jax.Device], new_devices: Sequence[jax.Device]) -> Any:
    """`compiled` (for `old_devices`, in mesh order) as an executable for `new_devices` (same count,
    same order of roles). Raises if this jax version cannot do it; callers then compile."""
    import pickle

    from jax._src.lib import xla_client as xc
    from jax.experimental import serialize_executable as se

    if len(old_devices) != len(new_devices):
        raise ValueError("retarget needs device sets of the same size")
    payload, in_tree, out_tree = se.serialize(compiled)
    remap = {o.id: n for o, n in zip(old_devices, new_devices)}
    backend = new_devices[0].client
    dev_list = xc.DeviceList(tuple(new_devices))
    options = _compile_options_for(new_devices)

    class _Remap(se._JaxPjrtUnpickler):  # noqa: N801 - a local subclass of jax's own unpickler
        def persistent_load(self, pid):
            if pid[0] == "exec":
                return backend.deserialize_executable(pid[1], dev_list, options)
            if pid[0] == "device":
                return remap[pid[1]]
            return super().persistent_load(pid)

    unloaded, args_info_flat, no_kwargs = _Remap(io.BytesIO(payload), backend, list(new_devices)).load()
    loaded = unloaded.load()
    return jax.stages.Compiled(loaded, [], in_tree.unflatten(args_info_flat), out_tree, no_kwargs=no_kwargs)


class ExecutableCache:
    """Compiled executables keyed by (name, static key, device ids); thread-safe."""

    def __init__(self, *, allow_retarget: bool = True):
        self.allow_retarget = allow_retarget
        self._lock = threading.Lock()
        self._exe: dict[tuple, Any] = {}
        self._by_size: dict[tuple, tuple[tuple[jax.Device, ...], Any]] = {}
        self._pending: dict[tuple, cf.Future] = {}
        self._jobs: list[cf.Future] = []
        self._pool: cf.ThreadPoolExecutor | None = None
        self.records: list[CompileRecord] = []

    # ------------------------------------------------------------------ internals
    def _lookup(self, name: str, key: Hashable, devices: tuple) -> Any | None:
        with self._lock:
            return self._exe.get((name, key, tuple(d.id for d in devices)))

    def _store(self, name: str, key: Hashable, devices: tuple, exe: Any) -> None:
        with self._lock:
            self._exe[(name, key, tuple(d.id for d in devices))] = exe
            self._by_size.setdefault((name, key, len(devices)), (devices, exe))

    # ------------------------------------------------------------------ public
    def get(self, name: str, key: Hashable, devices: Sequence[jax.Device], build: Builder) -> Any:
        return self.get_with_info(name, key, devices, build)[0]

    def get_with_info(self, name: str, key: Hashable, devices: Sequence[jax.Device],
                      build: Builder) -> tuple[Any, str, float]:
        """(executable, how, seconds): the executable of program (name, key) on `devices`: cached, else retargeted from one
        of the same size, else compiled (a compile of the same size already running in another
        thread is waited for rather than duplicated)."""
        devices = tuple(devices)
        t0 = time.perf_counter()
        how = "cached"
        size_key = (name, key, len(devices))
        while True:
            exe = self._lookup(name, key, devices)
            if exe is not None:
                break
            with self._lock:
                fut = self._pending.get(size_key)
                base = self._by_size.get(size_key)
                mine = None
                if fut is None and (base is None or not self.allow_retarget or len(devices) == 1):
                    mine = cf.Future()
                    self._pending[size_key] = mine
            if fut is not None:
                fut.result()
                how = "waited"
                continue
            if mine is None:
                try:
                    exe = retarget(base[1], base[0], devices)
                    self._store(name, key, devices, exe)
                    how = "retargeted" if how == "cached" else how
                    break
                except Exception:  # a jax version that cannot: compile instead
                    self.allow_retarget = False
                    continue
            try:
                fn, args = build(devices)
                exe = fn.lower(*args).compile()
                self._store(name, key, devices, exe)
                how = "compiled"
                mine.set_result(None)
            except BaseException as e:
                mine.set_exception(e)
                raise
            finally:
                with self._lock:
                    self._pending.pop(size_key, None)
            break
        dt = time.perf_counter() - t0
        if how != "cached":
            self.records.append(CompileRecord(name, len(devices), how, dt))
        return exe, how, dt

    def background(self, fn: Callable[[], Any]) -> cf.Future:
        """Run `fn` (typically a series of `get`s) on the background compile thread."""
        with self._lock:
            if self._pool is None:
                self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="jaxsys-precompile")
            fut = self._pool.submit(fn)
            self._jobs.append(fut)
            return fut

    def wait(self) -> None:
        """Block until every background job has finished (re-raising its error)."""
        with self._lock:
            jobs = list(self._jobs)
        for f in jobs:
            f.result()
        with self._lock:
            self._jobs = [f for f in self._jobs if not f.done()]

    def busy(self) -> bool:
        """Whether a background job is still running (benchmarks charge its cost to the training
        steps it overlaps)."""
        with self._lock:
            return any(not f.done() for f in self._jobs)

    def has(self, name: str, key: Hashable, devices: Sequence[jax.Device]) -> bool:
        return self._lookup(name, key, tuple(devices)) is not None

    def has_size(self, name: str, key: Hashable, num_devices: int) -> bool:
        """Whether some device set of this size has the program (so others can be retargeted)."""
        with self._lock:
            return (name, key, num_devices) in self._by_size

    def clear(self) -> None:
        """Forget every executable (benchmarks use this to measure cold compiles)."""
        self.wait()
        with self._lock:
            self._exe.clear()
            self._by_size.clear()


_GLOBAL = ExecutableCache()


def global_cache() -> ExecutableCache:
    """The process-wide cache (runs in one process share executables)."""
    return _GLOBAL
