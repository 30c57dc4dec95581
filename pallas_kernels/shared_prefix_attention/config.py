"""The two configurations of shared-prefix decode attention: how the work is tiled (`BlockSizes`)
and what the balancer believes it costs (`CostModel`).

`BlockSizes` holds one small frozen dataclass per launch of the Pallas kernels (`kernel.py`):

* `ItemsLaunch`: the shared work items, each one KV chunk of a tree node read once for a block of
  requests below it. `chunk_pages` and `query_block` also shape the step the balancer builds, so
  the XLA path (`xla.py`) uses them too.
* `SplitLaunch`: split-KV ("FlashDecoding") decode of the pages a request does not share; on its
  own, plain paged decode. `pages_per_split` is used by every path.
* `MergeLaunch`: the log-sum-exp merge of each request's partials (Pallas only).

Fields marked GPU only change how the Triton kernels run, never what they compute; every path is
tested against the reference for several values. The tuned values, by device, live in
`tuned_block_sizes.py`.

This module imports neither jax nor numpy: the host-side balancer and the tables use it freely.
"""

from __future__ import annotations

import dataclasses

__all__ = ["ItemsLaunch", "SplitLaunch", "MergeLaunch", "BlockSizes", "CostModel", "PRECISIONS",
           "DEFAULT_PRECISION"]

# How the Pallas kernels compute fp32 dots (bf16 inputs always use bf16 products with fp32
# accumulation). "tf32x3": three TF32 tensor-core products per dot, fp32 accuracy (~2**-21
# relative); "tf32": one TF32 product, ~1e-3 relative (Triton's default for fp32 and the precision
# of JAX's own Pallas decode kernels); "ieee": fp32 on the FMA units, fp32 accuracy, slower. The
# Pallas interpreter and the XLA path compute IEEE fp32 whatever the setting.
PRECISIONS = ("tf32x3", "tf32", "ieee")
DEFAULT_PRECISION = "tf32x3"


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _check_fields(obj, *, positive=(), at_least_zero=(), pow2=(), flags=()) -> None:
    name = type(obj).__name__
    for f in positive + at_least_zero + pow2:
        value = getattr(obj, f)
        least = 0 if f in at_least_zero else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name}.{f} must be {'a positive int' if least else 'an int >= 0'}, got {value!r}")
    for f in pow2:
        if not _is_pow2(getattr(obj, f)):
            raise ValueError(f"{name}.{f} must be a power of two (Triton tiles), got {getattr(obj, f)}")
    for f in flags:
        if not isinstance(getattr(obj, f), bool):
            raise ValueError(f"{name}.{f} must be a bool, got {getattr(obj, f)!r}")


@dataclasses.dataclass(frozen=True)
class ItemsLaunch:
    """Tiling of the shared work items.

    Attributes:
      chunk_pages: KV pages per work item. A shared tree node longer than this is split into
        several chunks, each read once for all its queries (partials merged by LSE).
      query_block: requests per work item. A node shared by more requests is read once per
        block of `query_block` of them.
      pages_per_compute_block: pages per tile of the kernel's inner KV loop; divides
        `chunk_pages`. GPU only.
      num_warps, num_stages: Triton launch parameters. GPU only.
      row_tiers: row counts an item program may run on: its full `query_block` x G rows (G query
        heads per KV head; padded to a power of two) and up to `row_tiers - 1` halvings of it,
        none below 16. Each item takes the smallest that holds its requests, so a node shared
        by 8 requests under a query block of 32 multiplies 32 rows, not 128. Costs one branch
        per tier in the compiled kernel. GPU only (the XLA path picks rows per item anyway).
      flat_kv: read the cache as [pages x page_size, D] token rows (a reshape, no copy) and
        gather each KV tile as one 2D block, instead of [pages, page_size, D] blocks. Which of
        the two Triton copies to shared memory in wide transactions depends on the tile
        (`make kernel-report`). GPU only.
    """

    chunk_pages: int
    query_block: int
    pages_per_compute_block: int = 1
    num_warps: int = 4
    num_stages: int = 2
    row_tiers: int = 1
    flat_kv: bool = False

    def __post_init__(self):
        _check_fields(self, positive=("query_block", "num_stages", "row_tiers"),
                      pow2=("chunk_pages", "pages_per_compute_block", "num_warps"), flags=("flat_kv",))
        if self.chunk_pages % self.pages_per_compute_block:
            raise ValueError(f"ItemsLaunch.pages_per_compute_block={self.pages_per_compute_block} must divide "
                             f"chunk_pages={self.chunk_pages}")


@dataclasses.dataclass(frozen=True)
class SplitLaunch:
    """Tiling of split-KV paged decode (each request's unshared pages; plain paged decode).

    Attributes:
      pages_per_split: KV pages per split; each split gives one partial per request.
      pages_per_compute_block: pages per tile of the inner KV loop; divides `pages_per_split`.
        GPU only.
      num_warps, num_stages: Triton launch parameters. GPU only.
      min_programs: the launch halves its split (down to one compute tile) until it runs at
        least this many programs (requests x splits x KV heads), so a small batch of long
        requests still fills the GPU: FlashDecoding's choice of the split count from the batch.
        0 keeps `pages_per_split`. GPU only.
      flat_kv: as `ItemsLaunch.flat_kv`, for this launch. GPU only.
    """

    pages_per_split: int
    pages_per_compute_block: int = 1
    num_warps: int = 4
    num_stages: int = 2
    min_programs: int = 0
    flat_kv: bool = False

    def __post_init__(self):
        _check_fields(self, positive=("num_stages",), at_least_zero=("min_programs",),
                      pow2=("pages_per_split", "pages_per_compute_block", "num_warps"), flags=("flat_kv",))
        if self.pages_per_split % self.pages_per_compute_block:
            raise ValueError(f"SplitLaunch.pages_per_compute_block={self.pages_per_compute_block} must divide "
                             f"pages_per_split={self.pages_per_split}")


@dataclasses.dataclass(frozen=True)
class MergeLaunch:
    """Tiling of the merge of each request's partials (GPU only; the XLA path merges all at once).

    Attributes:
      partials_per_step: partials the merge folds per loop step, a power of two. 1 is a serial
        loop whose every step waits for its loads; more loads that many private partials with
        one load and that many shared partials with one gather each (cut to the largest power of
        two dividing the request's partials).
      num_warps, num_stages: Triton launch parameters.
    """

    partials_per_step: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        _check_fields(self, positive=("num_stages",), pow2=("partials_per_step", "num_warps"))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of shared-prefix decode attention: one setting per launch (a static argument of the
    attention functions, so it is hashable and compared by value)."""

    items: ItemsLaunch
    split: SplitLaunch
    merge: MergeLaunch = MergeLaunch()

    def __post_init__(self):
        for name, cls in (("items", ItemsLaunch), ("split", SplitLaunch), ("merge", MergeLaunch)):
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"BlockSizes.{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")

    def to_dict(self) -> dict:
        """JSON form (benchmark records): {"items": {...}, "split": {...}, "merge": {...}}."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BlockSizes":
        return cls(items=ItemsLaunch(**d["items"]), split=SplitLaunch(**d["split"]),
                   merge=MergeLaunch(**d.get("merge", {})))


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Predicted cost of a decode step, in plain-path request-token units.

    One unit = the time the plain paged path spends on one KV token of one request (all heads).
    Then

      plain cost of a node   = R * L                      (R requests below it, L tokens)
      shared cost of a node  = sum over its work items of
                               chunk_tokens * token_cost(requests in the item) + item_overhead

    where `chunk_tokens = chunk_pages * page_size` (a partly filled chunk costs a full one). The
    balancer shares a node iff its shared cost is below its plain cost, and takes the sharing
    path for a step iff the summed saving exceeds `overhead(requests in the step's largest
    item)`: the sharing path's extra launches cost at least one item program, and an item of
    more requests has more rows to multiply. For a long node whose R requests fit one item the
    decision is a sharing degree: shared iff R > token_cost(R) (`sharing_threshold`).

    Attributes:
      shared_token_cost: ((requests in an item, cost per padded chunk token), ...), measured.
        `token_cost(n)` is the entry of the smallest size >= n, extrapolated linearly past the
        largest.
      item_overhead: fixed cost of one work item, in tokens.
      step_overhead: the sharing path's fixed extra cost per step, where
        `step_overhead_by_size` is empty.
      step_overhead_by_size: ((requests in the step's largest item, overhead), ...): the entry
        of the smallest size >= n, the largest entry past it (a fixed cost: not extrapolated).
    """

    shared_token_cost: tuple[tuple[int, float], ...]
    item_overhead: float = 0.0
    step_overhead: float = 0.0
    step_overhead_by_size: tuple[tuple[int, float], ...] = ()

    def __post_init__(self):
        if not self.shared_token_cost:
            raise ValueError("CostModel.shared_token_cost must name at least one item size")
        for n, cost in self.shared_token_cost:
            if n <= 0 or not cost > 0:
                raise ValueError(f"CostModel.shared_token_cost entry ({n}, {cost}) must be positive")
        if self.item_overhead < 0 or self.step_overhead < 0:
            raise ValueError("CostModel overheads must be >= 0")
        for n, cost in self.step_overhead_by_size:
            if n <= 0 or not cost >= 0:
                raise ValueError(f"CostModel.step_overhead_by_size entry ({n}, {cost}) needs a positive "
                                 "size and an overhead >= 0")

    def overhead(self, requests: int) -> float:
        """The sharing path's fixed extra cost for a step whose largest item holds `requests`."""
        pts = sorted(self.step_overhead_by_size)
        for n, cost in pts:
            if requests <= n:
                return cost
        return pts[-1][1] if pts else self.step_overhead

    def token_cost(self, requests: int) -> float:
        """Cost per padded chunk token of a work item holding `requests` requests."""
        pts = sorted(self.shared_token_cost)
        for n, cost in pts:
            if requests <= n:
                return cost
        n, cost = pts[-1]
        return cost * requests / n

    def sharing_threshold(self, max_requests: int = 64) -> int | None:
        """Smallest sharing degree R (<= max_requests) at which a long node is worth sharing
        when its R requests fit one item, or None."""
        for r in range(2, max_requests + 1):
            if self.token_cost(r) < r:
                return r
        return None

    def to_dict(self) -> dict:
        """JSON form: the fields, and the sharing threshold they imply."""
        return {**dataclasses.asdict(self), "sharing_threshold": self.sharing_threshold()}

    @classmethod
    def from_dict(cls, d: dict) -> "CostModel":
        """The model of a `to_dict` (JSON lists back to tuples; other keys ignored)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(map(tuple, v)) if isinstance(v, list) else v for k, v in d.items() if k in fields})
