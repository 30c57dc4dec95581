"""Shared-prefix decode attention (FlashForge / CoDec, arXiv 2505.17694).

Decode requests that share a prefix share KV. This op reads each shared KV chunk once for all
requests below it in the prefix tree (one matrix product of the chunk against their stacked
queries), computes partial (output, log-sum-exp) results per chunk, and merges partials by LSE,
instead of streaming the shared KV once per request. Compare FlashInfer's cascade attention
and Hydragen, which do this for one shared level; here the tree has any depth.

Engine integration, once per decode step:

    # Host (numpy, no jax): the batch's prefix tree, straight from the radix cache ...
    tree = PrefixTree(page_size=16,
                      node_parent=parents,        # i32[N], -1 for roots
                      node_pages=pages_per_node,  # N int arrays of physical page ids
                      node_lens=tokens_per_node,  # i32[N]
                      request_nodes=leaf_of_each_request)  # i32[B], row r of q = request r
    # ... or inferred from plain page tables (equal physical pages = shared KV), O(B * P):
    tree = PrefixTree.from_page_tables(page_tables, lengths, page_size=16)

    device = jax.devices()[0]
    tuned = get_default(device.device_kind, "bfloat16", "tf32x3", q_per_kv=num_q_heads // num_kv_heads,
                        head_dim=head_dim, page_size=16)
    plan = plan_step(tree, block_sizes=tuned.block_sizes, cost_model=tuned.cost_model)
    step = plan.step  # SharedPrefixStep: six int32 arrays, static shapes

    # Device, inside the jitted decode step, for each layer's paged cache
    # k_pages / v_pages: [num_kv_heads, total_num_pages, page_size, head_dim]:
    out = shared_prefix_attention_xla(q, k_pages, v_pages, step, block_sizes=tuned.block_sizes)  # CPU / any
    out = shared_prefix_attention(q, k_pages, v_pages, step, block_sizes=tuned.block_sizes)      # GPU (Pallas)
    # q: [B, num_q_heads, head_dim] -> out: [B, num_q_heads, head_dim]; B = plan.shape.num_requests

The step is the same for every layer, so it is built once and closed over by the layer scan.
Its shapes (`StepShape`) are bucketed to powers of two, so steady-state serving reuses a few
compiled functions; pass `shape=` to pin them. When sharing does not pay (the cost model,
measured by `benchmarks/attention.py` and fitted by `calibration`, says so) the step has no
work items and both functions run plain split-KV paged decode, also available on its own as
`paged_attention_xla` / `paged_attention` (classic page tables + lengths). With `return_lse`
the attention functions also give each row's log-sum-exp, and `merge_partials` merges more keys
(e.g. the step's own token) in. The `*_reference` functions are the truth.
"""

from . import calibration as calibration
from .balancer import PrefixTree as PrefixTree
from .balancer import SharedPrefixStep as SharedPrefixStep
from .balancer import StepPlan as StepPlan
from .balancer import StepShape as StepShape
from .balancer import forced_plan as forced_plan
from .balancer import plain_step as plain_step
from .balancer import plan_step as plan_step
from .config import DEFAULT_PRECISION as DEFAULT_PRECISION
from .config import PRECISIONS as PRECISIONS
from .config import BlockSizes as BlockSizes
from .config import CostModel as CostModel
from .config import ItemsLaunch as ItemsLaunch
from .config import MergeLaunch as MergeLaunch
from .config import SplitLaunch as SplitLaunch
from .kernel import paged_attention as paged_attention
from .kernel import shared_prefix_attention as shared_prefix_attention
from .reference import paged_attention_reference as paged_attention_reference
from .reference import shared_prefix_attention_reference as shared_prefix_attention_reference
from .tuned_block_sizes import Defaults as Defaults
from .tuned_block_sizes import get_default as get_default
from .xla import merge_partials as merge_partials
from .xla import paged_attention_xla as paged_attention_xla
from .xla import shared_prefix_attention_xla as shared_prefix_attention_xla

__all__ = [
    "DEFAULT_PRECISION",
    "PRECISIONS",
    "BlockSizes",
    "CostModel",
    "Defaults",
    "ItemsLaunch",
    "MergeLaunch",
    "PrefixTree",
    "SharedPrefixStep",
    "SplitLaunch",
    "StepPlan",
    "StepShape",
    "calibration",
    "forced_plan",
    "get_default",
    "merge_partials",
    "paged_attention",
    "paged_attention_reference",
    "paged_attention_xla",
    "plain_step",
    "plan_step",
    "shared_prefix_attention",
    "shared_prefix_attention_reference",
    "shared_prefix_attention_xla",
]
