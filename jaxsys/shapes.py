"""Shape buckets for every jitted path (re-exported from the kernel package, which needs them too)."""

from jaxsys.pallas_kernels.shapes import pow2_bucket as pow2_bucket

__all__ = ["pow2_bucket"]
