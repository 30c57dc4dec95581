"""Shape buckets: sizes padded to powers of two, so a handful of compiled executables serve every
request. This is the one bucket helper of jaxsys. It lives here, at the bottom of the dependency
graph (see DESIGN.md), because the kernels need it as much as the engine, the generation loop and
the trainer do; `jaxsys.shapes` re-exports it for code above the kernel package.
"""

from __future__ import annotations

__all__ = ["pow2_bucket"]


def pow2_bucket(n: int, minimum: int = 1, maximum: int | None = None) -> int:
    """The smallest power of two >= `n`, but at least `minimum` (and at most `maximum` if given).

    `n <= 0` gives `minimum`, so `pow2_bucket(0, 0) == 0` (an empty bucket stays empty).
    """
    n = int(n)
    b = max(minimum, 1 << (n - 1).bit_length()) if n > 0 else minimum
    return b if maximum is None else min(b, max(maximum, minimum))
