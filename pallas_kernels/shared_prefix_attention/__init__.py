"""Shared-prefix decode attention (FlashForge / CoDec, arXiv 2505.17694).

Decode requests that share a prefix share KV: this op reads each shared KV chunk once for all
requests below it in the prefix tree, computes partial (output, log-sum-exp) per chunk and
merges partials by LSE, instead of streaming the shared KV once per request. Compare
FlashInfer's cascade attention and Hydragen.

Per decode step, on the host (numpy, O(batch)):

    tree = PrefixTree(page_size=..., node_parent=..., node_pages=..., node_lens=...,
                      request_nodes=...)          # or PrefixTree.from_page_tables(...)
    plan = plan_step(tree, block_sizes=get_block_sizes(...), cost_model=get_cost_model(...))

and on the device, inside the engine's jitted decode step (one layer's paged cache
k_pages/v_pages: [num_kv_heads, total_num_pages, page_size, head_dim]):

    out = shared_prefix_attention_xla(q, k_pages, v_pages, plan.step, pages_per_split=...)  # CPU
    out = shared_prefix_attention(q, k_pages, v_pages, plan.step, block_sizes=...)        # GPU

`paged_attention_xla` / `paged_attention` are the plain split-KV paged decode (the fallback the
balancer picks when sharing does not pay), and the `*_reference` functions are the truth.
"""

from .balancer import PrefixTree as PrefixTree
from .balancer import SharedPrefixStep as SharedPrefixStep
from .balancer import StepPlan as StepPlan
from .balancer import StepShape as StepShape
from .balancer import bucket as bucket
from .balancer import plain_step as plain_step
from .balancer import plan_step as plan_step
from .kernel import paged_attention as paged_attention
from .kernel import shared_prefix_attention as shared_prefix_attention
from .reference import paged_attention_reference as paged_attention_reference
from .reference import shared_prefix_attention_reference as shared_prefix_attention_reference
from .tuned_block_sizes import BlockSizes as BlockSizes
from .tuned_block_sizes import CostModel as CostModel
from .tuned_block_sizes import get_block_sizes as get_block_sizes
from .tuned_block_sizes import get_cost_model as get_cost_model
from .xla import paged_attention_xla as paged_attention_xla
from .xla import shared_prefix_attention_xla as shared_prefix_attention_xla

__all__ = [
    "BlockSizes",
    "CostModel",
    "PrefixTree",
    "SharedPrefixStep",
    "StepPlan",
    "StepShape",
    "bucket",
    "get_block_sizes",
    "get_cost_model",
    "paged_attention",
    "paged_attention_reference",
    "paged_attention_xla",
    "plain_step",
    "plan_step",
    "shared_prefix_attention",
    "shared_prefix_attention_reference",
    "shared_prefix_attention_xla",
]
