"""Device options of the serving commands (`jaxsys serve`, `jaxsys generate`).

`--cpu-devices N` must take effect before JAX initialises its backends, so `request_devices` runs
first thing in a command's `main`, before anything imports jax; `tensor_mesh` then builds the
`tensor` mesh and says how to get more devices when the machine has too few.
"""

from __future__ import annotations

import argparse

import jaxsys.runtime as runtime


class DeviceError(ValueError):
    """The devices a command asked for cannot be had."""


def add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                        help="devices on the tensor axis: attention heads and MLP columns split N ways "
                             "(default: %(default)s)")
    parser.add_argument("--cpu-devices", type=int, default=None, metavar="N",
                        help="on a CPU-only machine, run with N virtual CPU devices (sets "
                             f"XLA_FLAGS={runtime.DEVICE_COUNT_FLAG}=N before JAX starts)")


def request_devices(args: argparse.Namespace) -> None:
    """Apply --cpu-devices; call before JAX initialises. Raises DeviceError."""
    if args.tensor_parallel < 1:
        raise DeviceError(f"--tensor-parallel must be >= 1, got {args.tensor_parallel}")
    if args.cpu_devices is not None:
        try:
            runtime.request_cpu_devices(args.cpu_devices)
        except (ValueError, RuntimeError) as e:
            raise DeviceError(str(e)) from e


def tensor_mesh(n: int):
    """A mesh with a `tensor` axis over the first `n` devices (None for n == 1). Raises DeviceError."""
    if n == 1:
        return None
    import jax

    from jaxsys.sharding import make_mesh

    have = jax.device_count()
    if n > have:
        hint = f"; {runtime.cpu_devices_hint(n)}" if jax.default_backend() == "cpu" else ""
        raise DeviceError(f"--tensor-parallel {n} needs {n} devices, this run has {have} "
                          f"({jax.default_backend()}){hint}")
    return make_mesh({"tensor": n}, devices=jax.devices()[:n])
