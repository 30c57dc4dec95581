"""Process-level runtime set-up shared by the `jaxsys` command, the apps and the benchmarks.

Two things must happen before JAX initialises its backends, so they live in one small module that
imports jax only inside its functions:

- `request_cpu_devices(n)`: give a CPU-only machine `n` virtual devices (the elastic and sharded
  paths need several devices; XLA's `--xla_force_host_platform_device_count` flag does this).
- `enable_compilation_cache()`: JAX's persistent compilation cache under the user's cache folder.
"""

from __future__ import annotations

import os
import re
import sys

__all__ = ["DEVICE_COUNT_FLAG", "cpu_devices_hint", "enable_compilation_cache", "request_cpu_devices"]

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def _backends_initialized() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(getattr(xla_bridge, "_backends", None))
    except Exception:  # a jax without the private module: assume the worst
        return True


def request_cpu_devices(n: int) -> None:
    """Make JAX's CPU platform expose `n` devices. Must run before JAX initialises its backends.

    Raises RuntimeError if the backends already run with another CPU device count (the flag would be
    silently ignored otherwise).
    """
    if n < 1:
        raise ValueError(f"the CPU device count must be >= 1, got {n}")
    flags = re.sub(rf"{DEVICE_COUNT_FLAG}=\S+", "", os.environ.get("XLA_FLAGS", "")).strip()
    os.environ["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={n}".strip()
    if _backends_initialized():
        import jax

        have = len(jax.devices("cpu"))
        if have != n:
            raise RuntimeError(f"JAX already started with {have} CPU device(s); request {n} before the "
                               "first JAX computation (e.g. with --cpu-devices on the command line)")


def cpu_devices_hint(needed: int) -> str:
    """One sentence for an error message: how a CPU machine gets `needed` devices."""
    return (f"on a CPU-only machine, pass --cpu-devices {needed} (or set XLA_FLAGS={DEVICE_COUNT_FLAG}="
            f"{needed} before starting Python) to get {needed} virtual devices")


def enable_compilation_cache() -> None:
    """Turn on JAX's persistent compilation cache under the user's cache directory.

    Only on GPU/TPU: a CI run on jax 0.10's CPU backend, with this cache on, failed with
    ``NOT_FOUND: Function <fusion> not found`` from a deserialized executable, so CPU runs compile
    afresh unless the user opts in with ``JAXSYS_CPU_COMPILE_CACHE=1``.
    """
    import jax

    if jax.default_backend() == "cpu" and os.environ.get("JAXSYS_CPU_COMPILE_CACHE") != "1":
        return
    cache = os.environ.get("JAXSYS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jaxsys", "xla")
    os.makedirs(cache, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
