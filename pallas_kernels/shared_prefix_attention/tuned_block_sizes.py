"""Tile sizes and the balancer's cost model for shared-prefix decode attention.

Two frozen, validated dataclasses and the tables that pick them:

* `BlockSizes`: how the work is tiled. They change performance only; every path is
  tested against the reference for several values.
* `CostModel`: what the balancer (`balancer.py`) believes a work item costs,
  in units of "one request streaming one KV token on the plain paged path". Its numbers
  are measured by `benchmarks/attention.py` (section "calibration" of its JSON) and
  copied here by hand, with the device and date they came from.

This module imports neither jax nor numpy, so the host-side balancer can use it freely.

Table keys are `(platform, num_q_heads_per_kv_head, head_dim, page_size, dtype name)`, plus the
fp32 dot mode where a mode has tiles of its own;
`platform` is `jax.devices()[0].platform` ("cpu", "gpu", "tpu"). A missing key falls back to
the platform default, and a missing platform to the CPU default.
"""

from __future__ import annotations

import dataclasses


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of shared-prefix decode attention.

    Attributes:
      chunk_pages: KV pages per shared work item. A shared tree node longer than this is split
        into several KV chunks (each read once for all its queries; partials merged by LSE).
      query_block: requests per shared work item. A node shared by more requests than this is
        read once per block of `query_block` requests.
      split_pages: KV pages per split of the plain (unshared) paged decode, FlashDecoding-style.
      pages_per_compute_block: pages loaded per inner-loop step of the Pallas kernels
        (GPU only; the XLA path ignores it). Divides `chunk_pages`.
      num_warps, num_stages: Triton launch parameters (GPU only).
      split_pages_per_compute_block, split_num_warps, split_num_stages: the same three for the
        split-KV launch (a request's unshared pages; all of plain paged decode), whose programs
        hold 16 query rows where a shared item's hold up to `query_block` x G: 0 (default)
        means the value above. The split-KV tile divides `split_pages`.
      min_split_programs: the Pallas split-KV launch halves `split_pages` (down to one compute
        tile) until it runs at least this many programs (requests x splits x KV heads), so a
        small batch of long requests still fills the GPU: FlashDecoding's choice of the split
        count from the batch. 0 (default) keeps `split_pages` fixed. GPU only; the XLA path
        ignores it.
      prefetch: 1 = the Pallas kernels load the next KV tile into registers before computing
        on the current one (software pipelining by hand; `make kernel-report` shows it spilling
        registers, Triton's own pipeline at num_stages >= 3 is the usual way); 0 (default) =
        one tile at a time. GPU only.
      min_shared_items: the balancer cuts shared nodes into shorter work items (halving the
        pages per item, down to one compute tile; the item width `chunk_pages` stays, the rest
        is padding that is not loaded) until the step has at least this many items, so a step
        whose shared nodes are few and short still spreads them over the GPU (on the H200 a
        node of 4 chunks gave 32 programs and streamed at 0.2 TB/s). More items mean more merge
        rows. 0 (default) = items of `chunk_pages`. For the Pallas kernels: the XLA path
        computes padded items in full, so on CPU it only costs.
      merge_block: partials the Pallas merge folds per step, a power of two. 1 (default)
        = one at a time: a serial loop whose every step waits for its loads (a shared step for
        a merge row, then for the partial it names), latency bound (24-84 us a call on the
        H200, 24-32 us with private partials alone; `launches` in
        benchmarks/results/attention_gpu_tf32_before_row_tiers.json); > 1 = that many private
        partials with one load, and that many merge rows and shared partials with one gather
        each, folded together (16 took 4-7% off a TF32 step on the H200 against 1). GPU only;
        the XLA path merges all at once anyway.
      row_tiers: row counts an item program may run on: its full `query_block` x G rows (padded
        to a power of two) and up to `row_tiers` - 1 halvings of it (>= 16 rows). Each item
        takes the smallest that holds its requests, so a node shared by 8 requests under a
        query_block of 32 multiplies 32 rows, not 128 of which 96 are zeros. On the H200 at
        TF32 the C2 tree's items (8 requests) took 0.149 ms on 128 rows and 0.087 ms with 4
        tiers (`launches` in benchmarks/results/attention_gpu_tf32{_before_row_tiers,}.json).
        1 (default) = always the full rows. Costs one branch per tier in the compiled kernel.
        GPU only; the XLA path computes an item's rows in full.
      flat_kv, split_flat_kv: 1 = the shared-items launch (flat_kv) or the split-KV launch
        (split_flat_kv) reads the cache as [pages x page_size, D] token rows (a reshape, no
        copy) and gathers each KV tile as one 2D [tokens, D] block, as JAX's contiguous decode
        kernel reads its tiles; 0 (default) = as [pages, page_size, D] blocks. Which one
        Triton copies to shared memory 16 bytes at a time and which 4 depends on the tile
        (it may lay the fp32 V tile out token-fastest for the tensor cores): in
        `make kernel-report`, flat tiles make the TF32 split-KV launch's V copies 16-byte
        and the tuned TF32 items' 4-byte, and the 3D tiles the other way round. On the H200
        flat tiles made the split-KV launch 24-31% faster at TF32 and 37% in bf16; the items
        within 1% (TF32) and 4% (bf16). GPU only.
    """

    chunk_pages: int
    query_block: int
    split_pages: int
    pages_per_compute_block: int = 1
    num_warps: int = 4
    num_stages: int = 2
    split_pages_per_compute_block: int = 0
    split_num_warps: int = 0
    split_num_stages: int = 0
    min_split_programs: int = 0
    prefetch: int = 0
    merge_block: int = 1
    min_shared_items: int = 0
    row_tiers: int = 1
    flat_kv: int = 0
    split_flat_kv: int = 0

    def __post_init__(self):
        zero_ok = ("split_pages_per_compute_block", "split_num_warps", "split_num_stages",
                   "min_split_programs", "prefetch", "min_shared_items", "flat_kv",
                   "split_flat_kv")
        for f in dataclasses.fields(self):
            value, least = getattr(self, f.name), 0 if f.name in zero_ok else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"BlockSizes.{f.name} must be {'a positive int' if least else 'an int >= 0'}"
                                 f", got {value!r}")
        for name in ("prefetch", "flat_kv", "split_flat_kv"):
            if getattr(self, name) > 1:
                raise ValueError(f"BlockSizes.{name} must be 0 or 1, got {getattr(self, name)}")
        for name in ("chunk_pages", "split_pages", "pages_per_compute_block", "num_warps",
                     "split_pages_per_compute_block", "split_num_warps", "merge_block"):
            if getattr(self, name) and not _is_pow2(getattr(self, name)):
                raise ValueError(f"BlockSizes.{name} must be a power of two (Triton tiles), "
                                 f"got {getattr(self, name)}")
        split_tile = self.split_pages_per_compute_block or self.pages_per_compute_block
        for name, tile_name, tile in (("chunk_pages", "pages_per_compute_block", self.pages_per_compute_block),
                                      ("split_pages", "split_pages_per_compute_block", split_tile)):
            if getattr(self, name) % tile:
                raise ValueError(f"BlockSizes.{tile_name}={tile} must divide {name}="
                                 f"{getattr(self, name)}")

    def split_launch(self) -> BlockSizes:
        """The sizes the split-KV launch runs with: its own tile and Triton parameters in place
        of the shared launch's (and chunk_pages = split_pages: it has no shared chunks)."""
        if not (self.split_pages_per_compute_block or self.split_num_warps or self.split_num_stages):
            return self
        return dataclasses.replace(
            self, chunk_pages=self.split_pages,
            pages_per_compute_block=self.split_pages_per_compute_block or self.pages_per_compute_block,
            num_warps=self.split_num_warps or self.num_warps,
            num_stages=self.split_num_stages or self.num_stages,
            split_pages_per_compute_block=0, split_num_warps=0, split_num_stages=0)


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Predicted cost of a decode step, in plain-path request-token units.

    One unit = the time the plain paged path (`paged_attention_xla` / the split-KV kernel)
    spends on one KV token of one request (all heads). Then

      plain cost of a node   = R * L                      (R requests below it, L tokens)
      shared cost of a node  = sum over its work items of
                               chunk_tokens * token_cost(requests in the item) + item_overhead

    where `chunk_tokens = chunk_pages * page_size` (padded: a partly filled chunk costs a full
    one). The balancer shares a node iff its shared cost is below its plain cost, and uses the
    sharing path for a step iff the summed saving exceeds the step's overhead,
    `overhead(largest item)`: `step_overhead`, or where `step_overhead_by_size` is given, the
    entry for the step's largest work item (its requests). The sharing path's extra cost is
    mostly its items launch, which takes at least as long as one item program, and an item of
    more requests has more rows to multiply (on the H200 at TF32: ~36 us for a launch of
    16-row items, 72-88 us for 64-128 rows, however few programs).

    So for a long node with R <= query_block requests the decision threshold is a sharing
    degree: the node is shared iff R > token_cost(R).

    Attributes:
      shared_token_cost: ((requests in an item, cost per padded chunk token), ...), measured.
        `token_cost(n)` is the entry of the smallest measured size >= n (the XLA path runs an
        item with n requests as a product of that many rows, rounded up to a power of two),
        extrapolated linearly past the largest.
      item_overhead: fixed cost of one work item, in tokens.
      step_overhead: fixed extra cost of the sharing path for a step (items loop, merge).
      step_overhead_by_size: ((requests in the step's largest item, overhead), ...), measured;
        empty (default) = `step_overhead` for every step. `overhead(n)` is the entry of the
        smallest size >= n, and the largest entry past it (a fixed cost: not extrapolated).
      source: where the numbers came from (device, date, benchmark), or why they are a guess.
    """

    shared_token_cost: tuple[tuple[int, float], ...]
    item_overhead: float = 0.0
    step_overhead: float = 0.0
    step_overhead_by_size: tuple[tuple[int, float], ...] = ()
    source: str = ""

    def __post_init__(self):
        if not self.shared_token_cost:
            raise ValueError("CostModel.shared_token_cost must name at least one block size")
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
        """Fixed extra cost of the sharing path for a step whose largest work item holds
        `requests` requests."""
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


# -- tables ------------------------------------------------------------------------------------

# CPU entries: measured with `jaxsys bench attention` on a 2-core AMD EPYC (Zen 4) VM,
# jax 0.10.2, fp32, Hq=32, Hkv=8, head_dim=128, page_size=16 (benchmarks/results/
# attention.json, section "tuning"): split_pages 16 (8: +40%, 128: +25%; 32 and 64 within
# the noise of a shared machine), chunk_pages 64 with query_block 32 (32 x 32 within noise;
# query_block 8/16 read a 32-request prefix 4/2 times and are 25-50% slower).
_CPU_DEFAULT_BLOCKS = BlockSizes(chunk_pages=64, query_block=32, split_pages=16)
# GPU default (untuned shapes and dtypes): 256-token chunks; query_block=4 with G=4 fills exactly
# the 16 rows Triton's dot needs; 64-token inner tiles keep the fp32 K and V tiles (2 x 32 KiB)
# in shared memory with 2 pipeline stages. Every setting here compiled and passed the kernel
# tests on the H200.
_GPU_DEFAULT_BLOCKS = BlockSizes(chunk_pages=16, query_block=4, split_pages=16,
                                 pages_per_compute_block=4, num_warps=4, num_stages=2)

# GPU entries: measured with `make gpu-check` on an NVIDIA H200 (jax 0.11.2, Triton backend,
# fp32 with 3xTF32 dots, Hq=32, Hkv=8, head_dim=128, page_size=16; benchmarks/results/
# attention_gpu.json, section "tuning", 2026-11-27), per call, medians of 7:
# split_pages 32 on the plain B=8 x 8192 tree (8: +21%, 16: +7%, 64/128 within 1%);
# chunk_pages 64 x query_block 16 on the star B=32 P=8192 S=128 tree (256 us; query_block 4 and
# 8 read the prefix 8 and 4 times: 440 and 313 us; 32 does not fit the 227 KiB of shared
# memory); pages_per_compute_block 2 with 4 warps and 2 stages (4 pages: +1%; 8 warps: +18-36%;
# 3 stages: +1-2%; 8 pages x 2 stages does not fit shared memory).
_GPU_H200_BLOCKS = BlockSizes(chunk_pages=64, query_block=16, split_pages=32,
                              pages_per_compute_block=2, num_warps=4, num_stages=2)
# bf16 KV: the same H200 and shapes, `make gpu-check` section bf16 with --tune-first
# (benchmarks/results/attention_gpu_bf16.json, section "tuning", 2026-11-27, medians of 9; the
# sweeps had 70 s and stopped before min_shared_items and merge_block, which keep their
# defaults):
# - split-KV launch, plain B=8 x 8192 tree: split_pages 128 (120 us; 64: +8%, 32: +19%), its own
#   tile 8 pages x 8 warps x 2 stages as flat token rows (97 us; the same as 3D tiles: 155 us;
#   2 pages x 4 warps x 3 stages flat: 98 us); min_split_programs 512 (-22% on plain B=4 x 4096);
# - shared items, star B=32 P=8192 S=128: chunk_pages 32 x query_block 32 with 8 warps (77 us;
#   32 x 16 with 4 warps: 78 us), then 8 pages x 8 warps x 2 stages, flat (66 us; 3D: +4%;
#   2 pages x 4 warps x 3 stages: +5%); prefetch off (+34%); row_tiers 4 (star B=8 P=8192
#   S=512: 59 against 76 us untiered; depth-4 binary tree: 100 against 119 us; the B=32 star,
#   whose items are full: 79 against 81 us).
# Other shapes fall back to the platform default, which is untuned.
_GPU_H200_BF16_BLOCKS = BlockSizes(chunk_pages=32, query_block=32, split_pages=128,
                                   pages_per_compute_block=8, num_warps=8, num_stages=2,
                                   split_pages_per_compute_block=8, split_num_warps=8, split_num_stages=2,
                                   min_split_programs=512, row_tiers=4, flat_kv=1, split_flat_kv=1)

# fp32 with one TF32 product per dot (`fp32_dot="tf32"`, opt-in): `make gpu-check` section tf32
# with --tune-first on one H200, jax 0.11.2 (benchmarks/results/attention_gpu_tf32.json,
# section "tuning", 2026-11-27, medians of 7; its configurations ran on these tiles):
# - split-KV launch, plain B=8 x 8192 tree: split_pages 64 (217 us; 32: +3%, 16: +11%), its own
#   tile 2 pages x 4 warps x 2 stages as flat token rows (`split_flat_kv`: 165 us; the same as
#   [pages, page_size, D] blocks: 220 us, the tile of the run before; every tile but 8 pages x 8
#   warps x 1 stage gains 24-31% from flat rows); min_split_programs 512 (-8% on plain
#   B=4 x 4096 and -12% on the star B=8 P=4096 S=512 against 0);
# - shared items, star B=32 P=8192 S=128: chunk_pages 32 x query_block 32 with 8 warps (113 us;
#   query_block 16: +39%), then 4 pages x 8 warps x 3 stages, flat (111 us; 3D tiles +1%, within
#   noise; 2 stages: +2-3%; 4 warps: +27-30%; 8 pages x 2 stages: over shared memory); prefetch off
#   (+35%; +48% on the plain tree);
# - row_tiers 4: star B=8 P=8192 S=512 (8 requests in 128-row items) 77 against 106 us
#   untiered, depth-4 binary tree 159 against 190 us, the B=32 star (full items) 106.5 against
#   108 us; 2 tiers: within 5% of 1;
# - merge_block 16: -7% on the B=32 star, -4% on the star B=16 P=2048 S=512 (4: about the
#   same); min_shared_items 0: 32 was -14% on that short star but +17% on the B=32 star.
# The run before (page-table change, no tiers, 3D tiles, merge one partial at a time) had the same
# tiles otherwise (benchmarks/results/attention_gpu_tf32_tuning_run.json).
_GPU_H200_TF32_BLOCKS = BlockSizes(chunk_pages=32, query_block=32, split_pages=64,
                                   pages_per_compute_block=4, num_warps=8, num_stages=3,
                                   split_pages_per_compute_block=2, split_num_warps=4, split_num_stages=2,
                                   min_split_programs=512, merge_block=16, row_tiers=4, flat_kv=1,
                                   split_flat_kv=1)

TUNED_BLOCK_SIZES: dict[str, dict[tuple, BlockSizes]] = {
    "cpu": {
        ("cpu", 4, 128, 16, "float32"): _CPU_DEFAULT_BLOCKS,
    },
    "gpu": {
        ("gpu", 4, 128, 16, "float32"): _GPU_H200_BLOCKS,
        ("gpu", 4, 128, 16, "bfloat16"): _GPU_H200_BF16_BLOCKS,
        ("gpu", 4, 128, 16, "float32", "tf32"): _GPU_H200_TF32_BLOCKS,
    },
}

DEFAULT_BLOCK_SIZES: dict[str, BlockSizes] = {"cpu": _CPU_DEFAULT_BLOCKS, "gpu": _GPU_DEFAULT_BLOCKS}

# CPU: the benchmark's calibration (benchmarks/attention.py `calibrate`, JSON section
# "calibration"): the same star trees timed plain and shared; kappa(s) = (seconds per shared
# chunk token) / (seconds per plain request-token), fitted on the fastest of the round-robin
# repeats. Every run re-measures it (`derived_cost_model` next to `tuned_cost_model_in_use`):
# on this shared 2-core VM kappa moves by ~0.1 between runs, which changes no decision in the
# benchmark's trees. A long node is shared from R = 2 on (kappa(2) ~ 1.25-1.35 < 2).
_CPU_COST = CostModel(
    shared_token_cost=((2, 1.245), (4, 1.646), (8, 2.349), (16, 3.638), (32, 6.077)),
    item_overhead=0.0,
    step_overhead=284.1,
    source="cpu: 2-core AMD EPYC (Zen 4) VM, jax 0.10.2, fp32 Hq=32 Hkv=8 D=128 page 16, "
           "chunk 64 pages x 32 requests, split 16 pages; calibration of the full "
           "`jaxsys bench attention` run of 2026-11-26",
)
# GPU: the calibration of the same H200 run (attention_gpu.json, "calibration"), with the
# tuned blocks above. A shared chunk token costs about one plain request-token (kappa 1.03 for
# items of 2-8 requests, 1.06 for 16): a long node is worth sharing from R = 2 on. But the
# sharing path has a fixed cost per call that the plain path has not (~200 us against ~45-70 us
# at the intercepts: a shared item's 64 pages are one program's serial loop), 33.6k plain
# request-tokens: a step shares only when that many KV reads are saved (e.g. 8 requests below
# a 4.8k-token prefix). On the benchmark's trees that keeps C3 (B=4, 16) and the depth-2 binary
# tree on the plain kernel, where the model predicts that sharing would lose. (Taken from one
# intercept, the rule of that time; the calibration's present rule, least time lost on its own
# trees, gives 42.9k from the same points, with the same decisions on them: kept as measured.)
_GPU_COST = CostModel(
    shared_token_cost=((2, 1.025), (4, 1.025), (8, 1.025), (16, 1.064)),
    item_overhead=0.0,
    step_overhead=33627.1,
    source="gpu: NVIDIA H200, jax 0.11.2, fp32 (3xTF32 dots) Hq=32 Hkv=8 D=128 page 16, chunk 64 "
           "pages x 16 requests, split 32 pages; calibration of `make gpu-check` of 2026-11-27",
)
# GPU, fp32 with one TF32 product per dot (`fp32_dot="tf32"`), with the TF32 tiles above:
# `make gpu-check` section tf32 with --tune-first on one H200 (attention_gpu_tf32.json,
# "calibration", 2026-11-27 14:53 UTC). A shared chunk token costs 0.48 of a plain request-token
# for items of 2-4 requests (plain decode of a small batch is latency bound: 2.3-2.5 ns per
# request-token, against 1.0-1.2 from 8 requests on), 0.70 for 8, and 2.1-2.2 for 16-32 (items
# of 64-128 rows). The step overheads are the ones whose decisions lose the least time on the
# calibration's own trees, each timed both ways (`fit_cost_model` in benchmarks/attention.py;
# those points refitted after the run): per size of the step's largest item 3.9k request-tokens
# (2 requests), 9.0k (4), 18.7k (8), 35.6k (16) and 15.3k (32: every one of its trees shared
# profitably, so half its smallest saving), deciding every calibration tree as it measured
# (one overhead for all sizes, 10.0k, would lose 14.6 us on them). The run itself used 6.5k for
# all, from one intercept (19.9 us lost), and so shared in C3 B=4, C3 B=16 and the depth-2 tree, where
# sharing was 8%, 22% and 19% slower than the plain kernel. With the per-size overheads the
# balancer (`plan_step` on the benchmark's trees) runs those three plain and shares in the
# other eight where the run shared and won: every configuration decided as measured, by a
# model fitted on other trees. The s = 16 overhead is bounded only to [14k, 57k) by its trees,
# and C3 B=16's saving, 28k, lies inside: the next calibration times P = 2048 too.
_GPU_TF32_COST = CostModel(
    shared_token_cost=((2, 0.479), (4, 0.479), (8, 0.698), (16, 2.108), (32, 2.187)),
    item_overhead=0.0,
    step_overhead_by_size=((2, 3893.8), (4, 9013.8), (8, 18693.1), (16, 35563.5), (32, 15264.3)),
    source="gpu: NVIDIA H200, jax 0.11.2, fp32 (one TF32 product per dot) Hq=32 Hkv=8 D=128 page 16, "
           "chunk 32 pages x 32 requests, split 64 pages, 4 row tiers, flat KV tiles; calibration of "
           "`make gpu-check` section tf32 of 2026-11-27 (14:53 UTC), overhead by least lost time",
)
# Keyed by platform, then by KV dtype name, or (dtype name, fp32 dot mode) for a mode with its
# own calibration. A dtype without one (bf16 on the GPU so far: `make gpu-check` section bf16
# calibrates it when run without --skip-calibration) uses the platform's fp32 model, whose
# kernels it shares.
COST_MODELS: dict[str, dict[str | tuple[str, str], CostModel]] = {
    "cpu": {"float32": _CPU_COST},
    "gpu": {"float32": _GPU_COST, ("float32", "tf32"): _GPU_TF32_COST},
}


def get_block_sizes(platform: str, num_q_heads_per_kv_head: int, head_dim: int, page_size: int,
                    dtype_name: str, fp32_dot: str = "auto") -> BlockSizes:
    """Tuned `BlockSizes` for a platform and model shape (platform default when untuned).

    `fp32_dot` (the kernels' fp32 dot mode, see `shared_prefix_attention`): a mode with its own
    entry (key + (fp32_dot,)) uses it, any other the dtype's entry."""
    table = TUNED_BLOCK_SIZES.get(platform, {})
    key = (platform, num_q_heads_per_kv_head, head_dim, page_size, dtype_name)
    for k in (key + (fp32_dot,), key):
        if k in table:
            return table[k]
    return DEFAULT_BLOCK_SIZES.get(platform, _CPU_DEFAULT_BLOCKS)


def get_cost_model(platform: str, dtype_name: str = "float32", fp32_dot: str = "auto") -> CostModel:
    """The balancer's `CostModel` for a platform, KV dtype and fp32 dot mode: the mode's own
    model where it has one, else the dtype's, else the platform's fp32 model; CPU's when the
    platform is unknown."""
    table = COST_MODELS.get(platform, COST_MODELS["cpu"])
    return table.get((dtype_name, fp32_dot), table.get(dtype_name, table["float32"]))
